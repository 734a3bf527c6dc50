"""OpenLRM's preprocessing recipe against the reference: its runner (white composite, bicubic resize), its demo's
recentring (OpenCV INTER_AREA, reproduced in numpy) and how it joins the shared preprocessing."""

import numpy as np
import pytest
from PIL import Image
from support import OPENLRM_TINY

from backend import preprocess as pp
from backend.errors import InputError

FIXTURES = OPENLRM_TINY / "preprocess"
SOURCES = {"ceramic": OPENLRM_TINY / "input.png", "alpha_probe": FIXTURES / "alpha_probe.png"}


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "preprocess_expected.npz") as d:
        return {k: d[k] for k in d.files}


def raw(path):
    return np.asarray(Image.open(path))  # the reference reads files exactly like this


@pytest.mark.parametrize("name", ["ceramic", "alpha_probe"])
@pytest.mark.parametrize("size", [224, 336])
def test_runner_input_matches_reference(expected, name, size):
    """RGBA composited on white (alpha_probe has real, partial alpha), stretched to size² (not square)."""
    out = pp.to_openlrm_input(raw(SOURCES[name]), size)
    assert tuple(out.shape) == (1, 3, size, size) and str(out.dtype) == "torch.float32"
    assert np.abs(out.numpy() - expected[f"{name}__runner_{size}"]).max() <= 1e-6


@pytest.mark.parametrize("name", ["ceramic", "alpha_probe"])
def test_recentring_matches_the_reference_demo(expected, name):
    """The demo with background removal off: longest side to 1024, object box to 409 px of 512, INTER_AREA."""
    rgba = np.asarray(pp.load_image(SOURCES[name]).convert("RGBA"))
    out = pp.recenter(pp.resize_longest_side(rgba, 1024), 512, 0.8)
    np.testing.assert_array_equal(out, raw(FIXTURES / f"{name}__app_recenter512.png"))  # bit for bit
    model_input = pp.to_openlrm_input(out, 224).numpy()
    assert np.abs(model_input - expected[f"{name}__app_recenter512_then_runner_224"]).max() <= 1e-6


def test_prepare_uses_real_alpha_as_the_demo_does():
    image = pp.load_image(SOURCES["alpha_probe"])
    assert pp.has_real_alpha(image)
    for remove in (True, False):  # real alpha: no background removal, so no u2net is needed
        out = pp.prepare(image, recipe="openlrm", remove_background=remove, u2net_path="/nonexistent/u2net.onnx")
        np.testing.assert_array_equal(out, raw(FIXTURES / "alpha_probe__app_recenter512.png"))


def test_prepare_without_removal_keeps_an_opaque_image_as_given():
    image = pp.load_image(SOURCES["ceramic"])  # RGBA, alpha 255 everywhere
    out = pp.prepare(image, recipe="openlrm", remove_background=False)
    np.testing.assert_array_equal(out, raw(SOURCES["ceramic"]))


def test_prepare_removes_the_background_after_the_first_resize(monkeypatch):
    seen = []

    def fake_removal(image, u2net_path=None):
        seen.append(image.size)
        rgba = np.zeros((image.height, image.width, 4), np.uint8)
        rgba[100:300, 200:600] = 255  # a 400 x 200 object
        return Image.fromarray(rgba)

    monkeypatch.setattr(pp, "_remove_background", fake_removal)
    out = pp.prepare(Image.new("RGB", (800, 600), (10, 20, 30)), recipe="openlrm")
    assert seen == [(1024, 768)]  # rembg sees the demo's 1024 image
    assert out.shape == (512, 512, 4)
    ys, xs = np.nonzero(out[..., 3])
    # the 399 x 199 crop (the reference drops the last row and column) scaled to 409 wide, centred
    assert xs.max() - xs.min() + 1 == 409 and ys.max() - ys.min() + 1 == int(199 * 409 / 399)
    assert xs.min() == (512 - 409) // 2


def test_foreground_ratio_sets_the_object_size():
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[20:81, 30:71] = 255
    for ratio, side in ((0.8, 409), (0.5, 256), (1.0, 512)):
        ys, _ = np.nonzero(pp.recenter(rgba, 512, ratio)[..., 3])
        assert ys.max() - ys.min() + 1 == side
    with pytest.raises(InputError, match="nothing to reconstruct"):
        pp.recenter(np.zeros((8, 8, 4), np.uint8))
    thin = np.zeros((2000, 20, 4), np.uint8)
    thin[:, 10:12] = 255  # a 1-pixel wide box after the reference's crop: 0 pixels once scaled
    with pytest.raises(InputError, match="too thin"):
        pp.recenter(thin)
    with pytest.raises(InputError, match="foreground ratio"):
        pp.prepare(Image.new("RGBA", (8, 8)), recipe="openlrm", foreground_ratio=1.5)


def test_default_foreground_ratio_per_recipe():
    from backend.options import FOREGROUND_RATIO

    # instantmesh.md §1.2; TripoSG's image_process.py pads a tenth of the object's long side on each side
    assert FOREGROUND_RATIO == {"triposr": 0.85, "openlrm": 0.8, "instantmesh": 0.85, "triposg": 1 / 1.2}
    with pytest.raises(ValueError, match="unknown preprocessing recipe"):
        pp.prepare(Image.new("RGB", (8, 8)), recipe="nope")


def test_resize_area_basics():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pp.resize_area(img, 18, 12), img)  # same size: unchanged
    # whole-number shrink: block means (2x2 rounds half up, like OpenCV's vector code; 3x3 to nearest)
    blocks = img.reshape(6, 2, 9, 2, 3).astype(int).sum(axis=(1, 3))
    np.testing.assert_array_equal(pp.resize_area(img, 9, 6), (blocks + 2) >> 2)
    blocks = img.reshape(4, 3, 6, 3, 3).astype(np.float32).sum(axis=(1, 3))
    np.testing.assert_array_equal(pp.resize_area(img, 6, 4), np.rint(blocks * np.float32(1 / 9)))
    # a constant image stays constant at any size, up or down
    flat = np.full((7, 5, 4), 77, np.uint8)
    for w, h in ((3, 2), (11, 13), (2, 9), (5, 7)):
        out = pp.resize_area(flat, w, h)
        assert out.shape == (h, w, 4) and (out == 77).all()
    assert pp.resize_area(flat[..., 0], 3, 3).shape == (3, 3)
    with pytest.raises(ValueError):
        pp.resize_area(flat.astype(np.float32), 3, 3)


def test_resize_longest_side_scales_up_and_down():
    assert pp.resize_longest_side(np.zeros((894, 896, 4), np.uint8), 1024).shape == (1021, 1024, 4)
    assert pp.resize_longest_side(np.zeros((3000, 2000, 3), np.uint8), 1024).shape == (1024, 682, 3)
