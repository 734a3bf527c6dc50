"""TripoSG through the entry points: the CLI and the worker with the tiny folder, its options and checks, the
grey it is painted (it makes no colour), and strict loading through the CLI (exit 3 naming the file and key)."""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import DATA, run_backend

from backend import client as wire
from backend import options as opts
from backend import postprocess, preprocess, protocol
from backend.errors import InputError
from backend.models import registry

ROOT = Path(__file__).resolve().parent.parent
TINY = DATA / "triposg_tiny"
MODEL = TINY / "model"
IMAGE = TINY / "conditioning.png"
FAST = ["--model", "triposg", "--weights", MODEL, "--resolution", 128, "--steps", 1, "--guidance", 1, "--no-remove-background"]
NOTE = "TripoSG makes no colour: painted grey"


def generate(tmp_path, *extra, out="m.npz"):
    return run_backend("generate", IMAGE, "-o", tmp_path / out, *FAST, *extra, "--json")


def test_generate_end_to_end_grey_with_a_note(tmp_path):
    r = generate(tmp_path, "--seed", 7)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["model"] == "triposg" and stats["resolution"] == 128 and stats["surface"] == "SDF 0"
    assert (stats["steps"], stats["guidance"], stats["seed"]) == (1, 1.0, 7)
    assert any(n.startswith(NOTE) for n in stats["notes"])
    assert protocol.Stage.SHAPE in stats["seconds"]
    with np.load(tmp_path / "m.npz") as m:
        assert len(m["faces"]) == stats["faces"] > 1000
        assert np.all(m["colors"] == postprocess.GREY)  # neutral grey, never black
        # Blender's frame: TripoSG's y (up) is z; the object sits in the ±1.005 box
        assert np.abs(m["vertices"]).max() <= 1.005 + 1e-6
    # the same seed and image give the same shape
    again = generate(tmp_path, "--seed", 7, out="n.npz")
    with np.load(tmp_path / "m.npz") as a, np.load(tmp_path / "n.npz") as b:
        assert np.array_equal(a["vertices"], b["vertices"]) and np.array_equal(a["faces"], b["faces"])
    assert again.returncode == 0


def test_reduction_and_texture_are_grey_too(tmp_path):
    r = generate(tmp_path, "--faces", 500, "--texture", 512, out="m.glb")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["faces_reached"] <= 500 and any(n.startswith(NOTE) for n in stats["notes"])


def test_colours_from_images_paint_it_through_a_fitted_camera(tmp_path):
    """--colours images: the picture's camera is fitted to the mesh's silhouette (TripoSG has none of its own) and
    the picture paints what it sees; the rest takes colours spread from it: no grey note, no flat grey."""
    rgba = np.zeros((96, 80, 4), np.uint8)  # an object with its own alpha: the mask the camera is fitted to
    yy, xx = np.mgrid[:96, :80]
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 40 + 2 * xx, 200 - 2 * yy, 90
    rgba[..., 3] = 255 * (((yy - 48) / 40.0) ** 2 + ((xx - 40) / 30.0) ** 2 < 1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "object.png")
    r = run_backend("generate", tmp_path / "object.png", "-o", tmp_path / "m.npz", *FAST, "--colours", "images",
                    "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert not any(n.startswith(NOTE) for n in stats["notes"])
    picture = stats["views"][0]
    assert picture["camera"] == "fitted" and 0 < picture["iou"] <= 1
    assert set(stats["colour_sources"]["vertices"]) <= {"picture", "spread"}
    assert stats["colour_sources"]["vertices"].get("picture", 0) > 0
    with np.load(tmp_path / "m.npz") as m:
        assert not np.allclose(m["colors"], postprocess.GREY, atol=0.02) and m["colors"].max(axis=1).min() > 0


def test_bake_from_model_paints_grey_with_the_note():
    from backend.progress import Stages

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    uvs, texture, stats = postprocess.bake_polygons(v, [0, 1, 2], [3], np.array([[0, 0], [1, 0], [0, 1]]), None, 512,
                                                    Stages(None, None), model="triposg")
    assert texture.shape == (512, 512, 3) and texture.max() == texture.min() == 128
    assert stats["notes"][0].startswith(NOTE)


@pytest.mark.parametrize("extra,fragment", [
    (["--resolution", 200], "TripoSG takes a resolution of 128, 256, 512, 1024, got 200"),
    (["--threshold", 0.5], "--threshold does not apply: TripoSG extracts its surface at SDF 0"),
    (["--source-size", 224], "--source-size does not apply"),
    (["--save-views", "v.png"], "--save-views does not apply"),
])
def test_options_that_do_not_apply_are_refused(tmp_path, extra, fragment):
    r = run_backend("generate", IMAGE, "-o", tmp_path / "m.npz", "--model", "triposg", "--weights", MODEL,
                    *extra, "--json")
    assert r.returncode == 2 and fragment in r.stderr, r.stderr


def test_steps_guidance_seed_are_shared_with_instantmesh_and_refused_for_triposr():
    spec = registry.get("triposg")
    opts.check(opts.Options(model="triposg", steps=50, guidance=7.0, seed=1), spec)
    with pytest.raises(InputError, match="--steps does not apply"):
        opts.check(opts.Options(model="triposr", steps=50), registry.get("triposr"))


def test_registry_entry():
    spec = registry.get("triposg")
    assert (spec.repo, spec.licence, spec.default_resolution, spec.default_threshold) == \
        ("VAST-AI/TripoSG", "MIT", 512, None)
    assert spec.resolutions == (128, 256, 512, 1024) and spec.sampled and not spec.multiview
    assert spec.file_names[0] == "model_index.json" and len(spec.file_names) == 9
    assert 4.0e9 < registry.approx_size(spec.files) < 5.0e9  # estimates until the first download records them


def test_download_lists_files_and_size(tmp_path):
    r = run_backend("download", "--model", "triposg", "--store", tmp_path, "--offline")
    assert r.returncode == 3
    assert "triposg: 9 files, about 4.6 GB: model_index.json" in r.stderr
    assert "transformer/diffusion_pytorch_model.safetensors (2.9 GB)" in r.stderr


def test_preprocessing_frames_the_object_on_white():
    rgba = np.zeros((100, 60, 4), np.uint8)
    rgba[10:90, 20:40] = (10, 200, 30, 255)  # 80 rows × 20 columns
    out = preprocess.prepare(Image.fromarray(rgba, "RGBA"), recipe="triposg")
    # a tenth of the long side (8) above and below; 8 + (80 - 20) / 2 = 38 left and right
    assert out.shape == (96, 96, 3) and (out[0, 0] == 255).all() and (out[8:88, 38:58] == (10, 200, 30)).all()
    assert (out[7] == 255).all() and (out[:, 37] == 255).all()


def _strict(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "w"
    shutil.copytree(MODEL, folder)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if edit == "missing":
        path.unlink()
    else:
        state = load_file(path)
        if edit == "renamed":
            state["proj_in.weights"] = state.pop("proj_in.weight")
        else:
            state["proj_out.bias"] = state["proj_out.bias"][:4].clone()
        save_file(state, path)
    return folder


@pytest.mark.parametrize("edit,fragment", [
    ("renamed", "1 missing: proj_in.weight; 1 unexpected: proj_in.weights"),
    ("shape", "proj_out.bias: (4,) instead of (8,)"),
    ("missing", "lacks transformer/diffusion_pytorch_model.safetensors"),
])
def test_strict_loading_exit_3_names_file_and_key(tmp_path, edit, fragment):
    folder = _strict(tmp_path, edit)
    r = run_backend("generate", IMAGE, "-o", tmp_path / "m.npz", "--model", "triposg", "--weights", folder,
                    "--no-remove-background", "--json")
    assert r.returncode == 3, r.stderr
    error = json.loads(r.stdout)["error"]
    assert error["code"] == "weights" and fragment in error["message"]
    if edit != "missing":
        assert "transformer/diffusion_pytorch_model.safetensors" in error["message"]
    assert not (tmp_path / "m.npz").exists()


def test_worker_generates_with_progress_per_step(tmp_path):
    w = wire.Worker(sys.executable, ROOT, temp_dir=str(tmp_path / "jobs"))
    w.start()
    try:
        job = w.submit(str(IMAGE), {"model": "triposg", "weights": str(MODEL), "resolution": 128, "steps": 2,
                                    "guidance": 2.0, "remove_background": False, "device": "cpu"})
        events, deadline = [], time.monotonic() + 300
        while not job.finished:
            events += w.poll()
            assert time.monotonic() < deadline, w.log_tail()
            time.sleep(0.01)
        assert job.state == protocol.DONE, (job.error, w.log_tail())
    finally:
        w.stop()
    steps = [e["message"] for e in events if e["event"] == "progress" and e["stage"] == protocol.Stage.SHAPE]
    assert "shape step 1/2" in steps and "shape step 2/2" in steps
    assert job.stats["steps"] == 2 and job.stats["model"] == "triposg"
    with np.load(job.result_path) as data:
        assert len(data["faces"]) == job.stats["faces"] and np.all(data["colors"] == postprocess.GREY)


def test_a_batch_takes_it_like_any_model(tmp_path):
    """Two images, one folder out: the sampled model runs per image with the batch's options (same seed: the
    mirrored image gives the mirrored conditioning, another shape)."""
    from PIL import ImageOps

    (tmp_path / "in").mkdir()
    shutil.copy(IMAGE, tmp_path / "in" / "a.png")
    ImageOps.mirror(Image.open(IMAGE)).save(tmp_path / "in" / "b.png")
    r = run_backend("generate", tmp_path / "in", "-o", tmp_path / "out", "--format", "npz", *FAST, "--seed", 3)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out" / "a.npz") as a, np.load(tmp_path / "out" / "b.npz") as b:
        assert len(a["faces"]) > 1000 and len(b["faces"]) > 1000
        assert not np.array_equal(a["vertices"], b["vertices"])
