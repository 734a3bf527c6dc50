"""backend.preprocess: reference parity (TripoSR tiny fixture), odd input files, rembg with a stand-in u2net."""

import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import preprocess as pp
from backend.errors import InputError, WeightsError

TINY = Path(__file__).parent / "data" / "triposr_tiny"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # The user's real u2net locations must never leak into a test.
    for var in ("IMAGE_TO_3D_U2NET", "U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME", "IMAGE_TO_3D_MODELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def expected():
    with np.load(TINY / "expected.npz") as d:
        return {k: d[k] for k in ("resize_foreground_rgba", "conditioning_uint8", "rgb_cond", "rgb_cond_512")}


@pytest.fixture(scope="module")
def chair():
    return pp.load_image(TINY / "input_rgba.png")


# ----------------------------------------------------------------------------------------------- parity

def test_resize_foreground_matches_reference(chair, expected):
    out = pp.resize_foreground(np.asarray(chair), 0.85)
    assert out.dtype == np.uint8 and out.shape == (503, 503, 4)
    np.testing.assert_array_equal(out, expected["resize_foreground_rgba"])


def test_composite_on_gray_matches_reference(expected):
    out = pp.composite_on_gray(expected["resize_foreground_rgba"])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected["conditioning_uint8"])
    assert out[0, 0].tolist() == [127, 127, 127]


@pytest.mark.parametrize("size,key", [(64, "rgb_cond"), (512, "rgb_cond_512")])
def test_to_model_input_matches_reference(expected, size, key):
    t = pp.to_model_input(expected["conditioning_uint8"], size)
    assert tuple(t.shape) == (1, size, size, 3) and str(t.dtype) == "torch.float32"
    assert np.abs(t.numpy()[0] - expected[key][0, 0]).max() <= 1e-6


def test_prepare_chair_matches_reference(chair, expected, tmp_path):
    assert chair.mode == "RGBA" and pp.has_real_alpha(chair)
    # Real alpha: rembg must not run, so a missing model must not matter.
    missing = str(tmp_path / "none.onnx")
    out = pp.prepare(chair, remove_background=True, foreground_ratio=0.85, u2net_path=missing)
    np.testing.assert_array_equal(out, expected["conditioning_uint8"])
    # With removal off, real alpha is still used to crop/composite.
    out2 = pp.prepare(chair, remove_background=False, u2net_path=missing)
    np.testing.assert_array_equal(out2, expected["conditioning_uint8"])


def test_has_real_alpha():
    assert not pp.has_real_alpha(Image.new("RGB", (4, 4)))
    assert not pp.has_real_alpha(Image.new("RGBA", (4, 4), (1, 2, 3, 255)))
    assert pp.has_real_alpha(Image.new("RGBA", (4, 4), (1, 2, 3, 254)))


def test_prepare_without_removal_pads_opaque_image_to_gray_square():
    im = Image.new("RGB", (30, 10), (200, 10, 20))
    out = pp.prepare(im, remove_background=False)
    assert out.shape == (30, 30, 3) and out.dtype == np.uint8
    assert (out[10:20] == [200, 10, 20]).all()  # centred, not cropped or scaled
    assert (out[:10] == 127).all() and (out[20:] == 127).all()


def test_resize_foreground_off_by_one_and_errors():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[5:10, 3:13] = 255  # rows 5..9, cols 3..12 -> crop [5:9, 3:12] = 4x9
    out = pp.resize_foreground(rgba, 1.0)
    assert out.shape == (9, 9, 4)
    assert (out[..., 3] > 0).sum() == 4 * 9
    with pytest.raises(InputError, match="nothing to reconstruct"):
        pp.resize_foreground(np.zeros((8, 8, 4), np.uint8), 0.85)
    one = np.zeros((8, 8, 4), np.uint8)
    one[3, 2:6] = 255  # a single row: zero height after the reference's off-by-one crop
    with pytest.raises(InputError, match="nothing to reconstruct") as e:
        pp.resize_foreground(one, 0.85)
    assert "alpha" in e.value.hint
    with pytest.raises(InputError):
        pp.resize_foreground(rgba, 1.5)


# ------------------------------------------------------------------------------------------ odd inputs

def _png_with_header(path, w, h):
    """A PNG whose IHDR says w x h, with almost no data (cheap huge/zero-size files)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the left edge becomes the top
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    out = pp.load_image(p)
    assert out.mode == "RGB" and out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 128 * 257, 65535], [1000, 30000, 50000, 65535]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    out = np.asarray(pp.load_image(p))
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[..., 0], np.rint(a / 257.0).astype(np.uint8))
    assert (out[..., 0] == out[..., 2]).all()
    # The same data as a 32-bit integer ("I") TIFF is read on the same 16-bit scale.
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "g32.tif")
    np.testing.assert_array_equal(np.asarray(pp.load_image(tmp_path / "g32.tif")), out)


def test_float_tiff(tmp_path):
    a = np.array([[0.0, 0.5], [0.25, 1.0]], np.float32)
    p = tmp_path / "f.tif"
    Image.fromarray(a, "F").save(p)
    out = np.asarray(pp.load_image(p))
    assert out[..., 1].tolist() == [[0, 128], [64, 255]]


def test_grayscale_la_and_1bit(tmp_path):
    Image.new("L", (5, 4), 90).save(tmp_path / "l.png")
    out = pp.load_image(tmp_path / "l.png")
    assert out.mode == "RGB" and np.asarray(out)[0, 0].tolist() == [90, 90, 90]

    la = Image.new("LA", (6, 6), (200, 0))
    la.paste((50, 255), (1, 1, 5, 5))
    la.save(tmp_path / "la.png")
    out = pp.load_image(tmp_path / "la.png")
    assert out.mode == "RGBA" and pp.has_real_alpha(out)
    assert np.asarray(out)[2, 2].tolist() == [50, 50, 50, 255] and np.asarray(out)[0, 0, 3] == 0

    Image.new("1", (8, 3), 1).save(tmp_path / "b.png")
    out = pp.load_image(tmp_path / "b.png")
    assert out.mode == "RGB" and (np.asarray(out) == 255).all()


def test_palette_with_transparency_becomes_rgba(tmp_path):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    im.paste(1, (2, 2, 8, 8))
    im.save(tmp_path / "p.png", transparency=0)
    out = pp.load_image(tmp_path / "p.png")
    assert out.mode == "RGBA"
    a = np.asarray(out)
    assert a[0, 0, 3] == 0 and a[5, 5].tolist() == [200, 0, 0, 255]
    # ...and the transparent palette entry drives the crop.
    assert pp.prepare(out, foreground_ratio=1.0).shape == (5, 5, 3)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    out = pp.load_image(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[8, 8]
    assert r > 200 and g < 60 and b < 60


def test_very_large_jpeg_is_downscaled(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("L", (12000, 9000), 180).save(p, quality=50)
    out = pp.load_image(p)
    assert out.mode == "RGB" and max(out.size) <= 4096 and out.size == (4096, 3072)
    out = pp.load_image(p, max_side=1000)
    assert out.size == (1000, 750)


def test_large_png_downscaled_keeps_alpha(tmp_path):
    im = Image.new("RGBA", (3000, 600), (10, 20, 30, 0))
    im.paste((10, 20, 30, 255), (1000, 100, 2000, 500))
    im.save(tmp_path / "wide.png")
    out = pp.load_image(tmp_path / "wide.png", max_side=600)
    assert out.mode == "RGBA" and out.size == (600, 120)
    assert np.asarray(out)[60, 300].tolist() == [10, 20, 30, 255]


def test_decompression_bomb_is_refused(tmp_path):
    p = _png_with_header(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(InputError, match="too large") as e:
        pp.load_image(p)
    assert "bomb.png" in e.value.message


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = pp.load_image(tmp_path / "a.gif")
    r, g, b = np.asarray(out.convert("RGB"))[4, 4]
    assert r > 200 and b < 50


def test_empty_alpha_has_nothing_to_reconstruct(tmp_path):
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    im = pp.load_image(tmp_path / "clear.png")
    for remove in (True, False):
        with pytest.raises(InputError, match="nothing to reconstruct") as e:
            pp.prepare(im, remove_background=remove, u2net_path=str(tmp_path / "none.onnx"))
        assert e.value.hint


def _good_png(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def test_truncated_png(tmp_path):
    data = _good_png(tmp_path / "ok.png")
    p = tmp_path / "trunc.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as e:
        pp.load_image(p)
    assert "trunc.png" in e.value.message and "\n" not in e.value.message


def test_corrupt_png(tmp_path):
    data = bytearray(_good_png(tmp_path / "ok.png"))
    i = data.index(b"IDAT") + 100
    data[i:i + 50] = bytes(50)  # CRC mismatch / bad deflate stream
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    with pytest.raises(InputError, match="bad.png"):
        pp.load_image(p)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(InputError, match="not an image") as e:
        pp.load_image(p)
    assert "notes.png" in e.value.message and "PNG or JPEG" in e.value.hint


def test_missing_directory_empty_zero_size(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        pp.load_image(tmp_path / "nope.png")
    assert "nope.png" in e.value.message
    with pytest.raises(InputError, match="is a directory"):
        pp.load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        pp.load_image(tmp_path / "empty.png")
    with pytest.raises(InputError, match="zero.png"):
        pp.load_image(_png_with_header(tmp_path / "zero.png", 0, 0))


# --------------------------------------------------------------------------------- background removal

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    pooch = pytest.importorskip("pooch")
    monkeypatch.setattr(pooch, "retrieve", refuse)


def _fake_u2net(path):
    """A u2net stand-in with u2net's interface: darker than the (white) background -> foreground."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((1, 3, 1, 1), -3.0, np.float32), "w")
    b = numpy_helper.from_array(np.zeros(1, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w", "b"], ["z"]), helper.make_node("Sigmoid", ["z"], ["d0"])],
        "fake_u2net",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("d0", TensorProto.FLOAT, [1, 1, 320, 320])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # old enough for any supported onnxruntime
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _square_photo():
    im = Image.new("RGB", (200, 160), (255, 255, 255))
    im.paste((30, 30, 30), (60, 40, 120, 100))  # 60x60 dark square at x 60..119, y 40..99
    return im


def test_remove_background_with_local_model(tmp_path, no_network):
    model = _fake_u2net(tmp_path / "u2net.onnx")
    out = pp.remove_background(_square_photo(), u2net_path=str(model))
    assert out.mode == "RGBA" and out.size == (200, 160)
    a = np.asarray(out)[..., 3]
    assert a[42:98, 62:118].min() >= 250  # the square is opaque (u2net's mask is truncated: 254 is usual)
    assert a[:20].max() == 0 and a[:, :30].max() == 0  # the far background is transparent
    ys, xs = np.nonzero(a > 127)
    assert abs(ys.min() - 40) <= 2 and abs(ys.max() - 99) <= 2
    assert abs(xs.min() - 60) <= 2 and abs(xs.max() - 119) <= 2

    # The session is cached per model file.
    assert len(pp._SESSIONS) == 1
    sess = next(iter(pp._SESSIONS.values()))[1]
    pp.remove_background(_square_photo(), u2net_path=str(model))
    assert next(iter(pp._SESSIONS.values()))[1] is sess


def test_prepare_crops_to_the_removed_background(tmp_path, monkeypatch, no_network):
    (tmp_path / "models").mkdir()
    model = _fake_u2net(tmp_path / "models" / "u2net.onnx")
    monkeypatch.setenv("IMAGE_TO_3D_U2NET", str(model))  # found through the environment this time
    out = pp.prepare(_square_photo(), foreground_ratio=0.85)
    n = out.shape[0]
    # Crop box = the mask's alpha>0 box (the square plus a few pixels of resampling halo), scaled by 1/0.85.
    assert out.shape == (n, n, 3) and int(60 / 0.85) <= n <= int(70 / 0.85)
    ys, xs = np.nonzero(np.all(out < 80, axis=2))
    # The square is not rescaled, fills about 85 % of the output and sits in the middle of a gray border.
    assert ys.max() - ys.min() + 1 == 60 and xs.max() - xs.min() + 1 == 60
    assert abs((ys.min() + ys.max()) / 2 - (n - 1) / 2) <= 2 and abs((xs.min() + xs.max()) / 2 - (n - 1) / 2) <= 2
    assert out[0, 0].tolist() == [127, 127, 127] and out[-1, -1].tolist() == [127, 127, 127]


def test_u2net_model_path_order(tmp_path, monkeypatch):
    store = tmp_path / "home" / ".local" / "share" / "image_to_3d" / "models" / "u2net" / "u2net.onnx"
    rembg_home = tmp_path / "home" / ".u2net" / "u2net.onnx"
    assert pp.u2net_model_path() == store  # neither exists: where `download --model u2net` puts it
    rembg_home.parent.mkdir(parents=True)
    rembg_home.write_bytes(b"x")
    assert pp.u2net_model_path() == rembg_home  # rembg's own copy is used
    store.parent.mkdir(parents=True)
    store.write_bytes(b"x")
    assert pp.u2net_model_path() == store  # ours wins once downloaded
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "uh"))
    assert pp.u2net_model_path() == tmp_path / "uh" / "u2net.onnx"
    monkeypatch.setenv("IMAGE_TO_3D_U2NET", str(tmp_path / "env.onnx"))
    assert pp.u2net_model_path() == tmp_path / "env.onnx"
    assert pp.u2net_model_path(str(tmp_path / "arg.onnx")) == tmp_path / "arg.onnx"


def test_missing_model_is_a_weights_error(tmp_path, no_network):
    with pytest.raises(WeightsError) as e:
        pp.prepare(_square_photo(), remove_background=True)  # default location: the model store
    expected_path = str(tmp_path / "home" / ".local" / "share" / "image_to_3d" / "models" / "u2net" / "u2net.onnx")
    assert "u2net.onnx" in e.value.message and "missing" in e.value.message and expected_path in e.value.message
    hint = e.value.hint
    assert "176 MB" in hint and "rembg" in hint and "IMAGE_TO_3D_U2NET" in hint
    assert "python -m backend download --model u2net" in hint
    assert "transparent" in hint and "--no-remove-background" in hint
    with pytest.raises(WeightsError, match="missing"):
        pp.remove_background(_square_photo(), u2net_path=str(tmp_path))  # a directory is not a model


def test_garbage_model_is_a_weights_error(tmp_path, no_network):
    p = tmp_path / "u2net.onnx"
    p.write_bytes(b"<html>404 not found</html>" * 10)
    with pytest.raises(WeightsError, match="could not be loaded") as e:
        pp.remove_background(_square_photo(), u2net_path=str(p))
    assert str(p) in e.value.message and e.value.hint
