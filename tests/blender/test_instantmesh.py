"""InstantMesh in Blender: its own settings in the panel (steps, guidance, seed; no source size, and no threshold
but for the NeRF variants),
the licence, then Generate 3D through the real worker with a tiny two-stage model (random Zero123++ in the
official layout + the tiny LRM): per-step progress, the CLI's mesh, the six views kept as a packed image."""

import os
import re
import subprocess
import time

import bpy
import numpy as np
import pytest

from .conftest import BACKEND_PYTHON, INPUT_IMAGE, ROOT, addon_module, panel_text, prefs

MODEL = "instantmesh-large"
STEPS, SEED = 3, 7


def backend_env():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Built by the backend's Python (torch, diffusers), which the bpy test environment does not have."""
    folder = tmp_path_factory.mktemp("instantmesh") / MODEL
    r = subprocess.run([str(BACKEND_PYTHON), str(ROOT / "tests" / "zero123pp_tiny.py"), str(folder)],
                       cwd=ROOT, env=backend_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return folder


@pytest.fixture
def settings(addon, config_dir, tiny_folder):
    bpy.ops.wm.read_homefile(use_empty=True)
    p = prefs()
    p.backend_python, p.weights_dir, p.device = str(BACKEND_PYTHON), str(tiny_folder), "cpu"
    s = bpy.context.scene.image_to_3d
    s.image = bpy.data.images.load(str(INPUT_IMAGE), check_existing=True)
    s.model = MODEL
    s.remove_background = False
    s.steps, s.seed = STEPS, SEED
    return s


def gen():
    return addon_module("operators.generate")


def cli_mesh(tmp_path, folder):
    out = tmp_path / "cli.npz"
    r = subprocess.run([str(BACKEND_PYTHON), "-m", "backend", "generate", str(INPUT_IMAGE), "-o", str(out),
                        "--model", MODEL, "--weights", str(folder), "--no-remove-background", "--steps", str(STEPS),
                        "--seed", str(SEED), "--device", "cpu", "--accept-licence"],
                       cwd=ROOT, env=backend_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(out) as data:
        return {k: data[k] for k in ("vertices", "faces")}


def test_the_panel_offers_instantmesh_with_its_own_settings(settings):
    ids = [i.identifier for i in settings.bl_rna.properties["model"].enum_items]
    assert ids[-4:] == ["instantmesh-large", "instantmesh-base", "instantnerf-large", "instantnerf-base"]
    assert (settings.steps, settings.guidance) == (STEPS, 4.0)
    assert settings.resolution == 128 and not settings.use_custom_resolution  # the official grid, dimmed

    text = panel_text()
    for name in ("'steps'", "'guidance'", "'seed'", "'resolution'", "'foreground_ratio'"):
        assert name in text
    assert "'threshold'" not in text
    advanced = panel_text("IMAGE_TO_3D_PT_advanced")  # the precision, but no source size to set
    assert "'precision'" in advanced and "'source_size'" not in advanced
    assert "tens of seconds" in text  # the CPU is chosen: view generation will be slow

    options = addon_module("operators.job_options").job_options(settings, prefs())
    assert {k: options[k] for k in ("model", "steps", "guidance", "seed", "resolution")} == {
        "model": MODEL, "steps": STEPS, "guidance": 4.0, "seed": SEED, "resolution": None}
    assert "threshold" not in options and "source_size" not in options  # the backend refuses them
    assert addon_module("properties").effective(settings) == pytest.approx(
        {"resolution": 128, "foreground_ratio": 0.85, "steps": STEPS, "guidance": 4.0, "seed": SEED})

    settings.model = "instantnerf-base"  # the NeRF variant: marching cubes on density, so a threshold too
    text = panel_text()
    assert "'threshold'" in text and "'steps'" in text
    assert "'source_size'" not in panel_text("IMAGE_TO_3D_PT_advanced")
    assert (settings.threshold, settings.resolution) == (10.0, 256)
    options = addon_module("operators.job_options").job_options(settings, prefs())
    assert options["threshold"] is None and options["steps"] == STEPS and "source_size" not in options
    settings.threshold = 5.0
    assert addon_module("operators.job_options").job_options(settings, prefs())["threshold"] == 5.0
    settings.use_custom_threshold = False

    settings.model = "triposr"  # back to a single-view model: its threshold, its source size, no steps
    text = panel_text()
    assert "'threshold'" in text and "'steps'" not in text
    assert "'source_size'" in panel_text("IMAGE_TO_3D_PT_advanced")
    assert "steps" not in addon_module("operators.job_options").job_options(settings, prefs()) and settings.resolution == 256


def test_the_licence_comes_first(settings):
    assert gen().why_not(bpy.context).startswith("Accept the CC-BY-NC-4.0 licence of InstantMesh Large")
    assert "Accept Licence" in panel_text()
    assert bpy.ops.image_to_3d.accept_licence(model=MODEL) == {"FINISHED"}
    assert gen().why_not(bpy.context) == ""


def test_generate_draws_views_step_by_step_then_imports_mesh_and_views(settings, tmp_path, tiny_folder, progress):
    expected = cli_mesh(tmp_path, tiny_folder)
    bpy.ops.image_to_3d.accept_licence(model=MODEL)
    bpy.ops.ed.undo_push(message="before")

    assert bpy.ops.image_to_3d.generate(run_async=True) == {"FINISHED"}
    (timer,) = addon_module("operators.jobs").TIMERS.values()
    job = addon_module("backend.client.session").current_job()
    shown = ""
    deadline = time.monotonic() + 300
    while timer() is not None:
        assert time.monotonic() < deadline, job
        if job.stage == "generating_views" and "synthesis step" in job.message and not shown:
            shown = panel_text()
        time.sleep(0.005)
    bpy.app.timers.unregister(timer)
    assert not settings.last_error, (settings.last_error, settings.last_hint)
    assert ("generating_views", f"view synthesis step {STEPS}/{STEPS}") in progress
    assert "Generating views" in shown and "view synthesis step" in shown, shown

    obj = bpy.context.active_object
    assert obj is not None and obj.select_get() and "image_to_3d" in obj
    assert len(obj.data.vertices) == len(expected["vertices"]) and len(obj.data.polygons) == len(expected["faces"])
    assert "Color" in obj.data.color_attributes

    stored = obj["image_to_3d"].to_dict()
    assert (stored["model"], stored["steps"], stored["seed"], stored["guidance"]) == (MODEL, STEPS, SEED, 4.0)
    assert "threshold" not in stored and "source_size" not in stored
    views = bpy.data.images[stored["views_image"]]
    assert views.name == "input_rgba views" and views.name in settings.last_info
    assert views.packed_file is not None and views.use_fake_user, "kept in the .blend, not the deleted job folder"
    assert tuple(views.size) == (640, 960)
    assert not os.path.exists(bpy.path.abspath(views.filepath_raw)) or views.filepath_raw.startswith("//")
    pixels = np.empty(640 * 960 * 4, np.float32)
    views.pixels.foreach_get(pixels)
    assert pixels.reshape(-1, 4)[:, :3].std() > 0.01, "the views have content"

    names = obj.name, views.name
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert names[0] not in bpy.data.objects and names[1] not in bpy.data.images, "one undo step removes both"


def test_cancel_during_view_generation_leaves_nothing(settings):
    bpy.ops.image_to_3d.accept_licence(model=MODEL)
    settings.steps = 400
    images_before = set(bpy.data.images.keys())
    assert bpy.ops.image_to_3d.generate(run_async=True) == {"FINISHED"}
    (timer,) = addon_module("operators.jobs").TIMERS.values()
    job = addon_module("backend.client.session").current_job()
    deadline = time.monotonic() + 120
    # well into the steps (the worker sends at most ~10 a second: "step 2/400" itself may never come)
    while not re.search(r"step ([2-9]|\d\d+)/400", job.message):
        assert timer() is not None and time.monotonic() < deadline, job
        time.sleep(0.005)
    assert bpy.ops.image_to_3d.cancel() == {"FINISHED"}
    while timer() is not None:
        assert time.monotonic() < deadline + 60, job
        time.sleep(0.01)
    bpy.app.timers.unregister(timer)
    assert settings.last_info == "Cancelled" and not settings.last_error
    assert not [o for o in bpy.data.objects if "image_to_3d" in o]
    assert set(bpy.data.images.keys()) == images_before
    assert not job.job_dir.exists()
