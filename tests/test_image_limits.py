"""backend.preprocess: hostile images (issue 20, findings 3 and 4): a memory budget read from the header, the
shrink before any full-size conversion, an allow-list of formats, and one opening helper for every caller."""

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import preprocess as pp
from backend.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _gray16_png(path, w, h, bright=0):
    """A real w x h 16-bit gray PNG, black but for a white ``bright`` x ``bright`` top-left square, written
    a row at a time (the test never holds the image; zeros compress about 1000:1)."""
    c = zlib.compressobj(6)
    dark = b"\0" * (1 + 2 * w)
    lit = b"\0" + b"\xff" * (2 * bright) + b"\0" * (2 * (w - bright))
    idat = b"".join(c.compress(lit if y < bright else dark) for y in range(h)) + c.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
                     + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def _png_header_only(path, w, h, color_type=6):
    """A PNG declaring w x h (8-bit RGBA by default) with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + _chunk(b"IEND", b""))
    return path


# load_image in a fresh process: its peak RSS over what the interpreter and imports already hold, and seconds.
# VmHWM is this process's own peak (ru_maxrss would start from pytest's, inherited over fork).
_CHILD = r"""
import json, resource, sys, time
from backend import preprocess as pp
from backend.errors import InputError
def peak_rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
# A cap well above the 1 GB allowed, so a runaway load fails the RSS check instead of swapping the machine.
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**30, vm + 3 * 2**30))
before = peak_rss()
t = time.perf_counter()
try:
    im = pp.load_image(sys.argv[1])
    out = {"mode": im.mode, "size": list(im.size), "corner": list(im.getpixel((10, 10))),
           "middle": list(im.getpixel((im.width // 2, im.height // 2)))}
except InputError as e:
    out = {"refused": e.message}
out["seconds"] = time.perf_counter() - t
out["peak"] = peak_rss() - before
print(json.dumps(out))
"""


def _load_in_child(path):
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


needs_resource = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc")


# ------------------------------------------------------------------------------------------------ memory

@needs_resource
def test_16bit_16k_png_is_bounded(tmp_path):
    """The issue's file: 522 KB, 16384² 16-bit gray; it took 7.2 GB and 29 s (float64 at full size)."""
    p = _gray16_png(tmp_path / "big16.png", 16384, 16384)
    assert p.stat().st_size < 1_000_000
    out = _load_in_child(p)
    assert out["peak"] < 2**30 and out["seconds"] < 10, out
    # Refused (over PIL's pixel guard) or loaded, never "not enough memory".
    assert "size" in out or "too large" in out["refused"], out


@needs_resource
def test_16bit_png_under_the_guards_loads_in_bounded_memory(tmp_path):
    """9000² 16-bit (81 Mpx: under PIL's pixel guard and the budget) loads, shrunk, without a full-size float copy."""
    p = _gray16_png(tmp_path / "g16.png", 9000, 9000, bright=2000)
    assert p.stat().st_size < 1_000_000
    out = _load_in_child(p)
    assert out.get("size") == [4096, 4096] and out["mode"] == "RGB", out
    assert out["corner"] == [255, 255, 255] and out["middle"] == [0, 0, 0]
    # Decoded I;16 (162 MB) + its 8-bit copy (81 MB) + the shrink; the old code peaked near 3 GB.
    assert out["peak"] < 512 * 2**20 and out["seconds"] < 10, out


def test_large_16bit_shrinks_as_the_full_size_conversion(tmp_path):
    """Shrinking 16-bit images before converting keeps today's pixels: 65535 -> 255 by rint(v / 257), then
    the same LANCZOS as an 8-bit image (values are per channel, so gray first, RGB last, is the same)."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 65536, (300, 5000), dtype=np.uint16)
    p = tmp_path / "wide16.png"
    Image.fromarray(a).save(p)
    full = Image.fromarray(np.repeat(np.rint(a / 257.0).astype(np.uint8)[..., None], 3, axis=2))
    want = full.resize((4096, 246), Image.Resampling.LANCZOS, reducing_gap=3.0)
    np.testing.assert_array_equal(np.asarray(pp.load_image(p)), np.asarray(want))


def test_over_the_memory_budget_is_refused_from_the_header(tmp_path):
    # 12000² RGBA: 144 Mpx is under PIL's pixel guard, but decoding and shrinking it needs about 1.6 GiB.
    p = _png_header_only(tmp_path / "huge.png", 12000, 12000)
    for load in (lambda: pp.load_image(p), lambda: pp.load_image_bytes(p.read_bytes(), "huge.png")):
        with pytest.raises(InputError) as e:
            load()
        msg = e.value.message
        assert "huge.png" in msg and "12000×12000" in msg and f"{pp.MAX_IMAGE_BYTES // 2**20:,} MiB" in msg, msg
        assert e.value.code == "bad_input" and "Downscale" in e.value.hint
    # The same file at a size under the budget gets as far as decoding its (missing) pixels.
    with pytest.raises(InputError, match="truncated or corrupt"):
        pp.load_image(_png_header_only(tmp_path / "fine.png", 3000, 2000))


def test_pixel_guard_is_pils_own(tmp_path, monkeypatch):
    p = _png_header_only(tmp_path / "wide.png", 4000, 4000, color_type=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # an application's own limit is honoured
    with pytest.raises(InputError, match="too large") as e:
        pp.load_image(p)
    assert "2,000,000 pixels" in e.value.message and "wide.png" in e.value.message


# ------------------------------------------------------------------------------------------------ formats

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n0 0 moveto 16 16 lineto stroke\n" \
      b"showpage\n%%EOF\n"


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that leaves a marker file if anything runs it; PIL looks for it afresh."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "gs-ran"
    folder = tmp_path / "bin"
    folder.mkdir()
    gs = folder / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script stand-in for gs")
def test_eps_named_png_never_runs_ghostscript(tmp_path, fake_ghostscript):
    p = tmp_path / "chair.png"
    p.write_bytes(EPS)
    from backend.preprocess import check_views_image

    attempts = [lambda: pp.load_image(p), lambda: pp.load_image_bytes(EPS, "chair.png"),
                lambda: check_views_image(p), lambda: pp.open_image(p).load()]
    for attempt in attempts:
        with pytest.raises(InputError) as e:
            attempt()
        assert "chair.png" in e.value.message and "EPS" in e.value.message, e.value.message
        assert "PNG, JPEG, WebP, TIFF, BMP, GIF, TGA" in e.value.message and e.value.code == "bad_input"
    assert not fake_ghostscript.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script stand-in for gs")
def test_views_grids_refuse_eps(tmp_path, fake_ghostscript):
    pytest.importorskip("torch")
    from backend.models.instantmesh import views_from_grid

    p = tmp_path / "views.png"
    p.write_bytes(EPS)
    with pytest.raises(InputError, match="EPS"):
        views_from_grid(p)
    assert not fake_ghostscript.exists()


@pytest.mark.parametrize("fmt,label", [("PPM", "PPM"), ("PCX", "PCX"), ("SGI", "SGI"), ("ICO", "ICO"),
                                       ("QOI", "QOI")])
def test_formats_off_the_list_are_refused_by_name(tmp_path, fmt, label):
    p = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(p, format=fmt)
    with Image.open(p) as im:
        assert im.format == fmt  # PIL itself reads it
    with pytest.raises(InputError) as e:
        pp.load_image(p)
    msg = e.value.message
    assert "photo.png" in msg and f"in {label} format" in msg and "PNG, JPEG, WebP, TIFF, BMP, GIF, TGA" in msg, msg
    assert "PNG" in e.value.hint


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "MPO", "WEBP", "TIFF", "BMP", "GIF", "TGA"])
def test_allowed_formats_load_whatever_their_name(tmp_path, fmt):
    p = tmp_path / "photo.dat"
    Image.new("RGB", (16, 12), (200, 30, 30)).save(p, format=fmt)
    out = pp.load_image(p)
    assert out.size == (16, 12) and out.mode in ("RGB", "RGBA")
    r, g, b = np.asarray(out)[6, 8][:3]
    assert r > 180 and g < 60 and b < 60


def test_load_image_bytes_is_load_image(tmp_path):
    rng = np.random.default_rng(2)
    im = Image.fromarray(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8))
    p = tmp_path / "up.png"
    im.save(p)
    from_bytes = pp.load_image_bytes(p.read_bytes(), "up.png", max_side=40)
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(pp.load_image(p, max_side=40)))
    assert from_bytes.size == (40, 29) and from_bytes.mode == "RGBA"
    with pytest.raises(InputError, match="empty"):
        pp.load_image_bytes(b"", "up.png")
    with pytest.raises(InputError, match="not an image") as e:
        pp.load_image_bytes(b"hello", "notes.png")
    assert "notes.png" in e.value.message
    with io.BytesIO() as buf:
        im.convert("RGB").save(buf, format="PCX")
        with pytest.raises(InputError, match="in PCX format"):
            pp.load_image_bytes(buf.getvalue(), "up.png")
