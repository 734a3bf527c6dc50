"""Image preprocessing: file -> 8-bit image -> (background removal) -> framed object -> model input.

Three recipes, one per reference, sharing loading, background removal and the object's bounding box:
- ``triposr``: crop to the object, pad to a square, composite on gray; reproduces TripoSR's ``run.py``
  default path bit for bit (spec ``triposr.md`` §3).
- ``openlrm``: OpenLRM's demo path (spec ``openlrm.md`` §8): longest side to 1024, recentre the object
  to 80 % of a 512 transparent square (OpenCV ``INTER_AREA`` resizing, reimplemented here in numpy),
  then its runner: composite on white, bicubic resize to the encoder's source size.
- ``instantmesh``: InstantMesh's ``run.py`` (spec ``instantmesh.md`` §1.2): TripoSR's crop and padding to
  85 %, left transparent (RGBA): Zero123++ composites it on white itself.
- ``triposg``: TripoSG's ``scripts/image_process.py``: composite on white, crop to the object, pad a tenth of its
  longest side around it (:func:`frame_on_white`); its extractor squares and resizes it.
numpy and PIL only at import time; rembg and torch are imported by the functions that need them.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from .errors import BackendError, InputError, WeightsError, first_line
from .options import FOREGROUND_RATIO, VIEWS_SIZE

GRAY = 127  # background value of the reference composite ((0.5 * 255) truncated)

# Formats read, by PIL plugin id; any other file is refused before a decoder runs: EPS and PDF would run
# Ghostscript, and PIL's ~40 other decoders (PSD, JPEG 2000, ICO, PCX...) are attack surface no photo needs.
# What artists bring: PNG and JPEG (JPEG covers MPO, the multi-picture JPEG of many phones and cameras);
# TIFF for 16-bit and raw-developer exports; WebP and GIF (first frame) from the web; BMP from older tools;
# TGA, which Blender and game tools still write. OpenEXR and HEIC are not read by PIL at all.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "TGA")
_FORMAT_NAMES = ", ".join({"WEBP": "WebP"}.get(f, f) for f in ALLOWED_FORMATS)

# The most memory loading one image may take, estimated from its header before decoding (see _peak_bytes).
# 1 GiB takes every camera photo: a 100-megapixel TIFF (PIL keeps 8 bits a channel, padded to 4 bytes a
# pixel) peaks near 0.8 GB, a 16-bit RGBA 8192² PNG near 0.8 GB; JPEGs are decoded at 1/2 to 1/8 scale
# (draft) when large, so their size hardly counts. Larger files are refused rather than swapping a machine.
MAX_IMAGE_BYTES = 1 << 30

_IMAGE_HINT = "Use a PNG or JPEG image."
_TOO_LARGE_HINT = "Downscale it first; 1-2 megapixels are plenty."


# --------------------------------------------------------------------------------------------- loading

def load_image(path: Path, max_side: int = 4096) -> Image.Image:
    """Read an image file as an 8-bit ``RGB`` or ``RGBA`` PIL image, longest side <= ``max_side``.

    EXIF orientation is applied; 16-bit and float images are rescaled (not clipped) to 8 bits; palette
    transparency becomes alpha; animated files give their first frame. Only :data:`ALLOWED_FORMATS` are read,
    within PIL's pixel guard and :data:`MAX_IMAGE_BYTES`. Every failure is an :class:`InputError`.
    """
    return _load(Path(path), str(path), max_side)


def load_image_bytes(data: bytes, name: str, max_side: int = 4096) -> Image.Image:
    """:func:`load_image` for a file held in memory (an upload); ``name`` is only used in messages."""
    if not data:
        raise InputError(f"Image file {name} is empty (0 bytes)", _IMAGE_HINT)
    return _load(io.BytesIO(data), name, max_side)


def open_image(source, name: Optional[str] = None, max_side: Optional[int] = None) -> Image.Image:
    """Open a user's image file (a path or a binary file object) with :func:`load_image`'s checks, without
    decoding it: the allowed formats, PIL's pixel guard, the memory budget (for a full-size decode, or for
    shrinking to ``max_side``). Use as ``with open_image(path) as im:``. Failures are :class:`InputError`."""
    name = str(source) if name is None else name
    if isinstance(source, (str, os.PathLike)):
        _check_file(Path(source), name)
    with _input_errors(name):
        try:
            with warnings.catch_warnings():
                # PIL warns between its pixel limit and twice that (where it refuses); there the byte budget
                # below decides, and a 100-megapixel photo is no bomb.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(source, formats=[f for f in ALLOWED_FORMATS if f in _plugins()])
        except Image.UnidentifiedImageError:
            other = _sniff(source)
            if other:
                raise InputError(f"{name} is an image in {other} format, which is not read (formats read: "
                                 f"{_FORMAT_NAMES})", "Save it as PNG or JPEG.") from None
            raise InputError(f"{name} is not an image file that can be read (unknown or unsupported format)",
                             f"Use a PNG or JPEG image (formats read: {_FORMAT_NAMES}).") from None
        try:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise InputError(f"Image {name} has zero size ({w}x{h})", _IMAGE_HINT)
            if max_side is not None and im.format == "JPEG" and max(w, h) > max_side:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale instead of the full image.
                s = max_side / max(w, h)
                im.draft(im.mode, (max(1, int(w * s)), max(1, int(h * s))))
            peak = _peak_bytes(im, max_side is not None and max(im.size) > max_side, w * h)
            if peak > MAX_IMAGE_BYTES:
                raise InputError(f"Image {name} is too large to load: {w}×{h} ({im.mode}) needs about "
                                 f"{peak / 2**20:,.0f} MiB, over the {MAX_IMAGE_BYTES // 2**20:,} MiB limit",
                                 _TOO_LARGE_HINT)
        except BaseException:
            im.close()
            raise
    return im


def _plugins() -> dict:
    Image.init()  # registers every plugin; Image.open only ever calls those named in its `formats`
    return Image.OPEN


def _sniff(source) -> Optional[str]:
    """The format PIL would take a refused file for, from its first 16 bytes only (what Image.open reads):
    no decoder and no plugin's opener runs."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                prefix = f.read(16)
        else:
            source.seek(0)
            prefix = source.read(16)
    except OSError:
        return None
    for fmt, (_, accept) in _plugins().items():
        try:
            found = fmt not in ALLOWED_FORMATS and accept and accept(prefix)
        except Exception:  # an accept() that wants more than 16 bytes
            continue
        if found and not isinstance(found, str):  # a str is PIL's "known, but its module is missing"
            return fmt
    return None


def _check_file(path: Path, name: str) -> None:
    if not path.exists():
        raise InputError(f"Image file not found: {name}", "Check the path.")
    if path.is_dir():
        raise InputError(f"{name} is a directory, not an image file", _IMAGE_HINT)
    try:
        if path.stat().st_size == 0:
            raise InputError(f"Image file {name} is empty (0 bytes)", _IMAGE_HINT)
    except OSError as e:
        raise InputError(f"Cannot read image file {name}: {e.strerror or e}") from None


@contextmanager
def _input_errors(name: str):
    """Whatever PIL raises for a bad file, as an InputError naming it."""
    try:
        yield
    except InputError:
        raise
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # PIL refuses above twice its (warning) limit
        raise InputError(f"Image {name} is too large (over {limit:,} pixels)", _TOO_LARGE_HINT) from None
    except PermissionError as e:
        raise InputError(f"Cannot read image file {name}: {e.strerror or e}") from None
    except MemoryError:
        raise InputError(f"Not enough memory to decode image {name}", "Downscale it first.") from None
    except Exception as e:  # truncated/corrupt data surfaces as OSError, SyntaxError, ValueError, zlib.error...
        raise InputError(f"Image {name} could not be decoded ({first_line(e)}); the file may be truncated or corrupt",
                         "Re-export or re-download the image.") from None


def _load(source, name: str, max_side: int) -> Image.Image:
    with open_image(source, name, max_side) as src, _input_errors(name):
        im = _decode(src, name, max_side)
        # Detach from the file (closed on leaving the block) if nothing made a new image.
        return src.copy() if im is src else im


# 16-bit, 32-bit and float gray: made 8-bit gray a band of rows at a time (never a full-size float copy).
_HIGH_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_LUT16 = np.rint(np.arange(65536) / 257.0).astype(np.uint8)


def _peak_bytes(im: Image.Image, shrinks: bool, file_pixels: int) -> int:
    """Bytes _decode holds at most for ``im`` (after any draft), from its header alone. Each step frees the
    image before it, so the peak is one step's input and output: decoding + EXIF rotation (2 x decoded), the
    conversion to 8 bits (decoded + 8-bit), the shrink or the final copy (2 x 8-bit; 3 x for alpha, which
    PIL's resize premultiplies in a copy beside its input). PIL stores 1 byte a pixel for 1/L/P, 2 for I;16,
    else 4. Two decoders hold more, measured: a progressive JPEG keeps every DCT coefficient of the full-size
    file (2 bytes a sample, whatever the draft), and WebP keeps libwebp's two RGBA canvases and a copy of the
    frame (12 bytes a pixel) until the image is closed."""
    mode, alpha = im.mode, "transparency" in im.info or im.mode in ("LA", "La", "PA", "RGBA", "RGBa")
    decoded = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    gray = mode in _HIGH_GRAY or (mode in ("1", "L") and not alpha)
    work = 1 if gray else 4
    decoder = {"WEBP": 12 * file_pixels}.get(im.format, 0)
    if im.format in ("JPEG", "MPO") and im.info.get("progressive"):
        decoder = 2 * len(im.getbands()) * file_pixels
    return decoder + im.width * im.height * max(2 * decoded, decoded + work, (3 if shrinks and alpha else 2) * work)


def _decode(im: Image.Image, name: str, max_side: int) -> Image.Image:
    im.load()  # first frame of animated files; raises on truncated data
    try:
        ImageOps.exif_transpose(im, in_place=True)  # in place: no second full-size image kept
    except Exception:  # a broken EXIF block is not worth refusing the image for
        pass
    try:
        im = _replace(im, _to_8bit(im))
    except ValueError:  # PIL has no conversion for a few exotic modes (e.g. LAB)
        raise InputError(f"Image {name} has an unsupported colour mode ({im.mode})", _IMAGE_HINT) from None
    im = _shrink(im, max_side)
    return _replace(im, im.convert("RGB" if im.mode == "L" else "RGBA")) if im.mode in ("L", "LA") else im


def _replace(old: Image.Image, new: Image.Image) -> Image.Image:
    """``new``, with ``old``'s pixels freed if it is another image (the caller never uses ``old`` again)."""
    if new is not old:
        old.close()
    return new


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    if max(im.size) <= max_side:
        return im
    s = max_side / max(im.size)
    size = (max(1, round(im.width * s)), max(1, round(im.height * s)))
    return _replace(im, im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))  # PIL premultiplies alpha


def _to_8bit(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit L, LA, RGB or RGBA (RGBA where the file has transparency); gray is kept one band
    until after the shrink (the same pixels as shrinking it as RGB, for a third of the work)."""
    mode = im.mode
    if mode in _HIGH_GRAY:
        return _gray_to_8bit(im)
    if "transparency" not in im.info:
        if mode in ("L", "LA", "RGB", "RGBA"):
            return im
        if mode == "1":
            return im.convert("L")
    has_alpha = "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info
    return im.convert("RGBA" if has_alpha else "RGB")


def _gray_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float gray -> L, rescaled (not clipped): 16-bit by 1/257 (65535 -> 255, 257 k -> k),
    32-bit by its own maximum where that is over 16 bits, float from [0, 1] (or [0, 255] when larger)."""
    w, h = im.size
    rows = max(1, (1 << 20) // w)  # about a megapixel a band: 8 MB of float64
    bands = [(y, min(h, y + rows)) for y in range(0, h, rows)]

    def band(y0, y1):
        return np.asarray(im.crop((0, y0, w, y1)), dtype=np.float64)

    if im.mode == "F":  # [0, 1] unless the largest (non-NaN) value says otherwise
        top = np.fmax.reduce([np.fmax.reduce(band(*b), axis=None) for b in bands])
        scale = 255.0 if top <= 1.0 else 1.0
    else:
        top = im.getextrema()[1] if im.mode == "I" else 0
        scale = 255.0 / top if top > 65535 else None  # a genuinely 32-bit image: use its own range
    out = Image.new("L", im.size)
    for y0, y1 in bands:
        if scale is None and im.mode.startswith("I;16"):  # a table lookup: the same rounding, 4x faster
            g = _LUT16[np.asarray(im.crop((0, y0, w, y1)))]
        else:
            a = band(y0, y1)
            a = a / 257.0 if scale is None else a * scale  # 16-bit range: 65535 -> 255
            g = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        out.paste(Image.fromarray(g), (0, y0))
    return out


def has_real_alpha(image: Image.Image) -> bool:
    """The reference rule: an ``RGBA`` image whose alpha is somewhere below 255."""
    return image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255


# ----------------------------------------------------------------------------------- background removal

_SESSIONS: dict = {}  # model path -> ((mtime, size), rembg session), so a warm worker keeps the model loaded
U2NET_ENV = "IMAGE_TO_3D_U2NET"


def u2net_model_path(u2net_path: Optional[str] = None) -> Path:
    """Where the background-removal model is: the argument, $IMAGE_TO_3D_U2NET or $U2NET_HOME when set;
    otherwise the model store (where `download --model u2net` puts it) or rembg's ~/.u2net, whichever has it
    (the store when neither does)."""
    if u2net_path:
        return Path(u2net_path).expanduser()
    if os.environ.get(U2NET_ENV):
        return Path(os.environ[U2NET_ENV]).expanduser()
    if os.environ.get("U2NET_HOME"):
        return Path(os.environ["U2NET_HOME"]).expanduser() / "u2net.onnx"
    from .hub import default_store

    store, rembg_home = default_store() / "u2net" / "u2net.onnx", Path.home() / ".u2net" / "u2net.onnx"
    return rembg_home if rembg_home.is_file() and not store.is_file() else store


def _missing_model_hint(path: Path) -> str:
    return (f"Run `python -m backend download --model u2net` (or the Download button in the add-on's preferences), "
            f"or download u2net.onnx (about 176 MB) from rembg's GitHub releases "
            f"(https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx) and put it at {path} "
            f"or set {U2NET_ENV} to its path; or use an image with a transparent background; "
            f"or use --no-remove-background.")


def _session(path: Path):
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or not path.is_file():
        raise WeightsError(f"The background-removal model u2net.onnx is missing at {path}", _missing_model_hint(path))
    key, stamp = str(path.resolve()), (st.st_mtime_ns, st.st_size)
    if key in _SESSIONS and _SESSIONS[key][0] == stamp:  # reload only if the file was replaced
        return _SESSIONS[key][1]
    try:
        import onnxruntime as ort
        from rembg.sessions.u2net import U2netSession
    except ImportError as e:
        raise BackendError(f"Background removal needs rembg and onnxruntime, which are not installed ({e})",
                           "Install the backend requirements, or use an image with a transparent background, "
                           "or use --no-remove-background.") from None

    class _FileU2net(U2netSession):
        # rembg's own session would fetch the model with pooch; ours only ever opens the given file.
        @classmethod
        def download_models(cls, *args, **kwargs):
            return kwargs["model_path"]

    try:
        sess = _FileU2net("u2net", ort.SessionOptions(), model_path=str(path))
    except Exception as e:
        raise WeightsError(f"The background-removal model {path} could not be loaded ({first_line(e)})",
                           _missing_model_hint(path).replace("Download", "Re-download", 1)) from None
    _SESSIONS[key] = (stamp, sess)
    return sess


def remove_background(image: Image.Image, u2net_path: Optional[str] = None) -> Image.Image:
    """Cut the object out with rembg's u2net, loaded only from a local file (never downloaded). Returns RGBA."""
    path = u2net_model_path(u2net_path)
    session = _session(path)
    import rembg

    try:
        with np.errstate(all="ignore"):  # a uniform image gives 0/0 in u2net's min-max normalisation
            # A fresh RGB copy carries no EXIF, so rembg cannot re-orient it behind our back.
            out = rembg.remove(Image.fromarray(np.asarray(image.convert("RGB"))), session=session)
    except Exception as e:
        raise WeightsError(f"The background-removal model {path} failed to run ({first_line(e)})",
                           "Check that it is rembg's u2net.onnx, or use --no-remove-background.") from None
    return out.convert("RGBA")


_remove_background = remove_background  # prepare() has a parameter of the same name


# --------------------------------------------------------------------------------------- crop/composite

def foreground_box(rgba: np.ndarray):
    """(top, bottom, left, right) of the alpha>0 pixels, bottom and right *exclusive of the last object
    row/column*, as both references crop (``[y_min:y_max, x_min:x_max]``)."""
    mask = rgba[..., 3] > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or rows[-1] == rows[0] or cols[-1] == cols[0]:
        raise InputError("The image has nothing to reconstruct: no visible object after background removal",
                         "The background removal found no object, or the alpha channel is empty; "
                         "use an image with a clear object or --no-remove-background.")
    return rows[0], rows[-1], cols[0], cols[-1]


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise InputError(f"foreground ratio must be in (0, 1], got {ratio}")


def resize_foreground(rgba: np.ndarray, ratio: float) -> np.ndarray:
    """Crop to the alpha>0 box and pad (zeros) so the object fills ``ratio`` of a square, as TripoSR does."""
    _check_ratio(ratio)
    top, bottom, left, right = foreground_box(rgba)
    fg = rgba[top:bottom, left:right]
    h, w = fg.shape[:2]
    size = max(h, w)
    ph, pw = (size - h) // 2, (size - w) // 2
    fg = np.pad(fg, ((ph, size - h - ph), (pw, size - w - pw), (0, 0)))
    new_size = int(size / ratio)
    p = (new_size - size) // 2
    return np.pad(fg, ((p, new_size - size - p), (p, new_size - size - p), (0, 0)))


def frame_on_white(rgba: np.ndarray, ratio: float) -> np.ndarray:
    """TripoSG's framing: blend over white (float32, truncated to bytes), crop to the alpha>0 box (last row and
    column included), pad with white so the longest side fills ``ratio`` (1/1.2: a tenth of it on each side) and
    the other side is centred; one pixel from square where the sides differ by an odd count, as the reference."""
    _check_ratio(ratio)
    mask = rgba[..., 3] > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        foreground_box(rgba)  # raises the usual "nothing to reconstruct"
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1, :3].astype(np.float32) / 255.0
    a = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    rgb = rgb * a + (1 - a)
    h, w = rgb.shape[:2]
    long_pad = int(round(max(h, w) * (1 / ratio - 1) / 2, 9))
    short_pad = int(long_pad + abs(w - h) / 2)
    py, px = (short_pad, long_pad) if w > h else (long_pad, short_pad)
    rgb = np.pad(rgb, ((py, py), (px, px), (0, 0)), constant_values=1.0)
    return (rgb * 255).astype(np.uint8)


def composite_on_gray(rgba: np.ndarray) -> np.ndarray:
    """Blend over 50 % gray in float32 and truncate to uint8, exactly as the reference (background = 127)."""
    a = rgba.astype(np.float32) / 255.0
    rgb = a[..., :3] * a[..., 3:4] + (1 - a[..., 3:4]) * 0.5
    return (rgb * 255.0).astype(np.uint8)


def pad_to_square(rgb: np.ndarray, value: int = GRAY) -> np.ndarray:
    """Centre an RGB image on a square of ``value`` without cropping or scaling."""
    h, w = rgb.shape[:2]
    size = max(h, w)
    ph, pw = (size - h) // 2, (size - w) // 2
    return np.pad(rgb, ((ph, size - h - ph), (pw, size - w - pw), (0, 0)), constant_values=value)


RECIPES = ("triposr", "openlrm", "instantmesh", "triposg")


def prepare(image: Image.Image, *, recipe: str = "triposr", remove_background: bool = True,
            foreground_ratio: Optional[float] = None, u2net_path: Optional[str] = None,
            keep: Optional[dict] = None) -> np.ndarray:
    """Turn a loaded image into the model's conditioning image (uint8), by the model's ``recipe``.

    * Real alpha (RGBA, some alpha < 255): used as the mask as is; rembg is not run (TripoSR's rule, kept for
      OpenLRM, whose demo would run rembg again), and this holds whether or not ``remove_background`` is set.
    * No real alpha and ``remove_background``: rembg u2net makes the mask.
    * Either way the object is then framed to ``foreground_ratio`` (default: the recipe's):
      ``triposr``: cropped, padded to a square and composited on gray 127 -> (H, W, 3);
      ``openlrm``: longest side to 1024, recentred on a 512 transparent square -> (512, 512, 4);
      ``instantmesh``: cropped and padded to a square like ``triposr``, left transparent -> (H, W, 4).
    * No real alpha and not ``remove_background``: the user supplies a prepared image.
      ``triposr``: converted to RGB and padded to a square with gray 127, centred, with no crop. This
      deliberately differs from the reference's ``--no-remove-bg``, which drops alpha and lets the model
      input resize stretch the image.
      ``openlrm``: returned as is (RGB or opaque RGBA) for OpenLRM's own runner path, which composites on
      white and resizes to the source size (a non-square image is stretched, as the reference does).
      ``instantmesh``: returned as is, as the reference's ``--no_rembg`` does.
    * ``keep`` (a dict) receives the framed picture before compositing, with its alpha, as ``keep["picture"]``
      (the painting's view of it, postprocess/sources.py).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown preprocessing recipe {recipe!r}")
    ratio = FOREGROUND_RATIO[recipe] if foreground_ratio is None else float(foreground_ratio)
    _check_ratio(ratio)
    real_alpha = has_real_alpha(image)
    if not real_alpha and not remove_background:
        if recipe == "triposg":
            return _kept(keep, pad_to_square(np.asarray(image.convert("RGB")), 255))
        if recipe in ("openlrm", "instantmesh"):
            return _kept(keep, np.asarray(image))
        return _kept(keep, pad_to_square(np.asarray(image.convert("RGB"))))
    if recipe == "openlrm":
        rgba = resize_longest_side(np.asarray(image.convert("RGBA")), 2 * RECENTER_SIZE)
        if not real_alpha:
            rgba = np.asarray(_remove_background(Image.fromarray(rgba[..., :3]), u2net_path))
        return _kept(keep, recenter(rgba, RECENTER_SIZE, ratio))
    rgba = image if real_alpha else _remove_background(image, u2net_path)
    rgba = np.asarray(rgba.convert("RGBA"))
    if recipe == "triposg":  # painted through a fitted camera: the usual framing is picture enough
        _kept(keep, resize_foreground(rgba, ratio))
        return frame_on_white(rgba, ratio)
    framed = _kept(keep, resize_foreground(rgba, ratio))
    return framed if recipe == "instantmesh" else composite_on_gray(framed)


def _kept(keep: Optional[dict], picture: np.ndarray) -> np.ndarray:
    if keep is not None:
        keep["picture"] = picture
    return picture


# ------------------------------------------------------------------------- OpenLRM's demo framing

RECENTER_SIZE = 512  # the demo's square; its first step brings the longest side to twice this


def resize_longest_side(image: np.ndarray, size: int) -> np.ndarray:
    """Scale (up or down) so the longest side is ``size``, the other truncated, with INTER_AREA."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    return resize_area(image, int(w * scale), int(h * scale))


def recenter(rgba: np.ndarray, size: int = RECENTER_SIZE, ratio: float = 0.8) -> np.ndarray:
    """Scale the alpha>0 box so its longer side is ``int(size * ratio)`` and centre it on a transparent
    black ``size`` square, as OpenLRM's ``Preprocessor.step_recenter``."""
    _check_ratio(ratio)
    top, bottom, left, right = foreground_box(rgba)
    box_h, box_w = bottom - top, right - left
    scale = int(size * ratio) / max(box_h, box_w)
    h, w = int(box_h * scale), int(box_w * scale)
    if h == 0 or w == 0:
        raise InputError(f"The object is too thin to reconstruct ({box_w}x{box_h} pixels)",
                         "Use an image where the object is clearly visible.")
    y0, x0 = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size, 4), np.uint8)
    out[y0:y0 + h, x0:x0 + w] = resize_area(np.ascontiguousarray(rgba[top:bottom, left:right]), w, h)
    return out


def resize_area(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W[, C]) -> (height, width[, C]) as OpenCV's ``cv2.resize(..., interpolation=INTER_AREA)``.

    Shrinking both axes: box filtering with fractional pixel weights in float32, rounded half to even.
    Otherwise OpenCV's "area" variant of bilinear interpolation in 11-bit fixed point. Channels are
    independent (alpha is not premultiplied), as in OpenCV. Bit-exact against opencv-python 5.0.0 on
    thousands of random sizes and images (OpenCV is not a dependency; the tests use the reference's PNGs).
    """
    squeeze = image.ndim == 2
    src = image[..., None] if squeeze else image
    if src.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {src.dtype}")
    src_h, src_w = src.shape[:2]
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot resize a {src_w}x{src_h} image to {width}x{height}")
    # OpenCV's own arithmetic: scale = 1 / (dst / src), in double.
    scale_x, scale_y = 1.0 / (width / src_w), 1.0 / (height / src_h)
    if scale_x >= 1 and scale_y >= 1:
        ix, iy = round(scale_x), round(scale_y)
        if abs(scale_x - ix) < 2.220446049250313e-16 and abs(scale_y - iy) < 2.220446049250313e-16:
            out = _area_integer(src, ix, iy, width, height)
        else:
            out = _area_fractional(src, scale_x, scale_y, width, height)
    else:
        out = _area_bilinear(src, scale_x, scale_y, width, height)
    return out[..., 0] if squeeze else out


def _area_integer(src: np.ndarray, sx: int, sy: int, width: int, height: int) -> np.ndarray:
    """Whole-number shrink factors: plain block means (OpenCV's ``resizeAreaFast``)."""
    blocks = src[:height * sy, :width * sx].reshape(height, sy, width, sx, -1).astype(np.int32).sum(axis=(1, 3))
    if sx == sy == 2:
        return ((blocks + 2) >> 2).astype(np.uint8)  # its vector code for 2x2: round half up
    return np.clip(np.rint(blocks.astype(np.float32) * np.float32(1.0 / (sx * sy))), 0, 255).astype(np.uint8)


def _area_taps(src_n: int, dst_n: int, scale: float):
    """Per output pixel, the source pixels it covers and their weights (OpenCV's ``computeResizeAreaTab``),
    padded with zero weights to one width -> indices (dst_n, T), weights float32 (dst_n, T)."""
    taps = []
    for d in range(dst_n):
        start = d * scale
        end = start + scale
        cell = min(scale, src_n - start)
        first, last = math.ceil(start), min(math.floor(end), src_n - 1)
        first = min(first, last)
        row = []
        if first - start > 1e-3:
            row.append((first - 1, (first - start) / cell))
        row += [(s, 1.0 / cell) for s in range(first, last)]
        if end - last > 1e-3:
            row.append((last, min(min(end - last, 1.0), cell) / cell))
        taps.append(row)
    width = max(len(row) for row in taps)
    index = np.zeros((dst_n, width), np.int64)
    weight = np.zeros((dst_n, width), np.float32)
    for d, row in enumerate(taps):
        for t, (s, a) in enumerate(row):
            index[d, t], weight[d, t] = s, a
    return index, weight


def _area_fractional(src: np.ndarray, scale_x: float, scale_y: float, width: int, height: int) -> np.ndarray:
    """Box filter with fractional weights, summed in OpenCV's order: along x per source row, then rows."""
    xi, xw = _area_taps(src.shape[1], width, scale_x)
    yi, yw = _area_taps(src.shape[0], height, scale_y)
    s = src.astype(np.float32)
    rows = np.zeros((src.shape[0], width, src.shape[2]), np.float32)
    for t in range(xi.shape[1]):
        rows += s[:, xi[:, t]] * xw[:, t, None]
    out = np.zeros((height, width, src.shape[2]), np.float32)
    for t in range(yi.shape[1]):
        out += rows[yi[:, t]] * yw[:, t, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS


def _bilinear_taps(src_n: int, dst_n: int, scale: float):
    """OpenCV's INTER_AREA bilinear taps: left index and the two 11-bit weights per output pixel."""
    d = np.arange(dst_n)
    left = np.floor(d * scale).astype(np.int64)
    frac = ((d + 1) - (left + 1) * (1.0 / scale)).astype(np.float32)
    frac = np.where(frac <= 0, np.float32(0), frac - np.floor(frac)).astype(np.float32)
    edge = left >= src_n - 1
    left[edge], frac[edge] = src_n - 1, 0
    w0 = np.rint((np.float32(1) - frac) * np.float32(1 << COEF_BITS)).astype(np.int32)
    w1 = np.rint(frac * np.float32(1 << COEF_BITS)).astype(np.int32)
    return left, np.minimum(left + 1, src_n - 1), w0, w1


def _area_bilinear(src: np.ndarray, scale_x: float, scale_y: float, width: int, height: int) -> np.ndarray:
    x0, x1, a0, a1 = _bilinear_taps(src.shape[1], width, scale_x)
    y0, y1, b0, b1 = _bilinear_taps(src.shape[0], height, scale_y)
    s = src.astype(np.int32)
    rows = s[:, x0] * a0[:, None] + s[:, x1] * a1[:, None]  # (H, width, C), exact integers
    top, bottom = rows[y0], rows[y1]
    b0, b1 = b0[:, None, None], b1[:, None, None]
    # Rounded as OpenCV's vector code does it (not the exact sum): 16-bit products keeping their high
    # half, then a rounding shift by 2 bits.
    out = ((((top >> 4) * b0) >> 16) + (((bottom >> 4) * b1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- model input

def to_openlrm_input(image_uint8: np.ndarray, size: int):
    """uint8 (H, W, 3 or 4) -> float32 tensor (1, 3, size, size) in [0, 1], as OpenLRM's runner: alpha
    composited on white, bicubic resize with ``align_corners=True`` (no antialias, aspect not kept)."""
    import torch
    import torch.nn.functional as F

    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected a uint8 (H, W, 3|4) array, got {image.dtype} {image.shape}")
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None] / 255.0  # a copy: inputs may be read-only
    if x.shape[1] == 4:
        x = x[:, :3] * x[:, 3:] + (1 - x[:, 3:])
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
    return x.clamp(0, 1)


def to_model_input(rgb_uint8: np.ndarray, size: int):
    """uint8 (H, W, 3) -> float32 tensor (1, size, size, 3) in [0, 1], resized as TripoSR's ImagePreprocessor."""
    import torch
    import torch.nn.functional as F

    rgb = np.asarray(rgb_uint8)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}")
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None].permute(0, 3, 1, 2)
    x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).contiguous()


def check_views_image(path: Path) -> None:
    """A readable 960×640 image (read from its header only)."""
    from PIL import UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"views image not found: {path}")
    try:
        with open_image(path) as im:
            size = im.size
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"views image {path} could not be read ({e})") from None

    if size != VIEWS_SIZE:
        raise InputError(f"the views image must be {VIEWS_SIZE[0]}×{VIEWS_SIZE[1]} (3 rows × 2 columns of 320² "
                         f"views), got {size[0]}×{size[1]}: {path}",
                         hint="Use a grid saved by --save-views, or Zero123++ v1.2's output.")
