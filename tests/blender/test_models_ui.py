"""Models in the panel: the registry's list, the model's own defaults (None to the backend until the user
sets a value), the licence to accept before OpenLRM is used, and OpenLRM through the real worker."""

import json
import os
import subprocess
import time

import bpy
import numpy as np
import pytest

from .conftest import BACKEND_PYTHON, ROOT, addon_module, panel_text, prefs

OPENLRM_TINY = ROOT / "tests" / "data" / "openlrm_tiny"
PACKED = OPENLRM_TINY / "packed"  # the base architecture's layout: openlrm-mix-base, source size 336
OPENLRM_IMAGE = OPENLRM_TINY / "input.png"
OPENLRM_IDS = [f"openlrm-{d}-{s}" for d in ("obj", "mix") for s in ("small", "base", "large")]


def gen():
    return addon_module("operators.generate")


def mesh_threshold() -> float:
    with np.load(PACKED / "expected.npz") as e:
        return float(e["mesh_thres"])  # 3.0 finds no surface in random weights


@pytest.fixture
def fresh(addon, config_dir):
    bpy.ops.wm.read_homefile(use_empty=True)
    p = prefs()
    p.backend_python, p.weights_dir, p.device = str(BACKEND_PYTHON), "", "cpu"
    return bpy.context.scene.image_to_3d


def test_the_model_list_is_the_registrys(fresh):
    items = fresh.bl_rna.properties["model"].enum_items
    ids = [i.identifier for i in items]
    assert ids == list(addon_module("backend.models.registry").MODELS)
    assert ids == ["triposr", "triposg", *OPENLRM_IDS, "instantmesh-large", "instantmesh-base", "instantnerf-large",
                   "instantnerf-base"]
    assert items["triposr"].name == "TripoSR" and items["openlrm-mix-base"].name == "OpenLRM Base (mix)"
    assert "CC-BY-NC-4.0" in items["openlrm-obj-large"].description
    assert fresh.model == "triposr"


def test_settings_follow_the_model_until_the_user_sets_one(fresh):
    s = fresh
    assert (s.resolution, s.threshold, s.source_size) == (256, 25.0, 0) and s.foreground_ratio == pytest.approx(0.85)
    options = addon_module("operators.job_options").job_options(s, prefs())
    assert options["resolution"] is options["threshold"] is options["foreground_ratio"] is None
    assert options["source_size"] is None and options["precision"] == "auto"
    assert "'precision'" in panel_text("IMAGE_TO_3D_PT_advanced")
    s.precision = "bf16"
    assert addon_module("operators.job_options").job_options(s, prefs())["precision"] == "bf16"
    s.precision = "auto"

    s.model = "openlrm-mix-base"
    assert (s.resolution, s.threshold) == (384, 3.0) and s.foreground_ratio == pytest.approx(0.8)
    assert addon_module("properties").effective(s) == pytest.approx(
        {"resolution": 384, "threshold": 3.0, "foreground_ratio": 0.8, "source_size": 336})
    assert not (s.use_custom_resolution or s.use_custom_threshold or s.use_custom_foreground_ratio)

    s.threshold = 0.5  # the user's own value: kept, and sent
    assert s.use_custom_threshold
    s.model = "openlrm-obj-small"
    assert s.threshold == 0.5 and s.resolution == 384
    assert addon_module("properties").effective(s)["source_size"] == 224
    s.model = "triposr"
    assert (s.resolution, s.threshold) == (256, 0.5) and s.foreground_ratio == pytest.approx(0.85)
    options = addon_module("operators.job_options").job_options(s, prefs())
    assert options["threshold"] == 0.5 and options["resolution"] is None

    s.use_custom_threshold = False  # back to the model's
    assert s.threshold == 25.0 and addon_module("operators.job_options").job_options(s, prefs())["threshold"] is None


def test_source_size_off_the_patch_grid_is_flagged(fresh):
    props = addon_module("properties")
    fresh.model = "openlrm-mix-small"
    fresh.source_size = 230
    assert props.source_size_problem(fresh) == \
        "Not a multiple of the encoder's 14-pixel patches: use 224 or 238"
    assert "224 or 238" in panel_text("IMAGE_TO_3D_PT_advanced")
    fresh.model = "triposr"
    assert "16-pixel" in props.source_size_problem(fresh)
    fresh.source_size = 512
    assert props.source_size_problem(fresh) == ""
    assert addon_module("operators.job_options").job_options(fresh, prefs())["source_size"] == 512


def test_openlrm_needs_its_licence_accepted_once(fresh, config_dir):
    fresh.image = bpy.data.images.load(str(OPENLRM_IMAGE), check_existing=True)
    assert bpy.ops.image_to_3d.generate.poll()
    fresh.model = "openlrm-mix-large"
    assert not bpy.ops.image_to_3d.generate.poll()
    why = gen().why_not(bpy.context)
    assert why.startswith("Accept the CC-BY-NC-4.0 licence of OpenLRM Large (mix)")
    texts = panel_text()
    assert "image_to_3d.accept_licence" in texts and "Non-commercial use only" in texts
    assert "image_to_3d.generate" in texts  # shown, greyed out with the reason

    assert bpy.ops.image_to_3d.accept_licence(model="openlrm-mix-large") == {"FINISHED"}
    record = json.loads((config_dir / "accepted_licences.json").read_text())
    assert record["CC-BY-NC-4.0"]["first_model"] == "openlrm-mix-large"
    assert bpy.ops.image_to_3d.generate.poll()
    fresh.model = "openlrm-obj-small"  # the same licence: accepted for every OpenLRM model
    assert bpy.ops.image_to_3d.generate.poll()
    assert "image_to_3d.accept_licence" not in panel_text()


def cli_npz(tmp_path, config_dir, threshold) -> dict:
    out = tmp_path / "cli.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT),
                                                                       "IMAGE_TO_3D_CONFIG_DIR": str(config_dir)}
    r = subprocess.run([str(BACKEND_PYTHON), "-m", "backend", "generate", str(OPENLRM_IMAGE), "-o", str(out),
                        "--model", "openlrm-mix-base", "--weights", str(PACKED), "--resolution", "64",
                        "--threshold", repr(threshold), "--no-remove-background", "--device", "cpu", "--json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # no --accept-licence: the acceptance made in Blender is the one seen
    with np.load(out) as data:
        return {k: data[k] for k in ("vertices", "faces")} | {"summary": json.loads(r.stdout)}


def test_openlrm_generates_the_cli_mesh_through_the_worker(fresh, config_dir, tmp_path):
    s = fresh
    s.image = bpy.data.images.load(str(OPENLRM_IMAGE), check_existing=True)
    s.model = "openlrm-mix-base"
    assert bpy.ops.image_to_3d.accept_licence(model=s.model) == {"FINISHED"}
    prefs().weights_dir = str(PACKED)  # holds config.json + model.safetensors: used as the model's folder
    s.resolution = 64
    s.threshold = mesh_threshold()
    s.remove_background = False  # the fixture's input is opaque
    options = addon_module("operators.job_options").job_options(s, prefs())
    assert options["foreground_ratio"] is None and options["source_size"] is None
    assert options["weights"] == str(PACKED)

    expected = cli_npz(tmp_path, config_dir, s.threshold)
    assert len(expected["faces"]) > 0
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}, s.last_error
    obj = bpy.context.active_object
    assert len(obj.data.vertices) == len(expected["vertices"])
    assert len(obj.data.polygons) == len(expected["faces"])
    stored = obj["image_to_3d"].to_dict()
    assert stored["model"] == "openlrm-mix-base" and stored["resolution"] == 64
    assert stored["foreground_ratio"] == pytest.approx(0.8) and stored["source_size"] == 336
    assert stored["threshold"] == pytest.approx(mesh_threshold())
    assert expected["summary"]["source_size"] == 336


def test_a_source_size_the_encoder_refuses_is_explained(fresh, config_dir):
    s = fresh
    s.image = bpy.data.images.load(str(OPENLRM_IMAGE), check_existing=True)
    s.model = "openlrm-mix-base"
    bpy.ops.image_to_3d.accept_licence(model=s.model)
    prefs().weights_dir = str(PACKED)
    s.resolution, s.remove_background, s.source_size = 32, False, 230
    with pytest.raises(RuntimeError, match="not a multiple"):
        bpy.ops.image_to_3d.generate()
    assert "not a multiple of the image encoder's 14-pixel patches" in s.last_error
    assert "224 or 238" in s.last_hint
    assert "224 or 238" in panel_text()
    assert len(bpy.data.objects) == 0


def test_the_workers_licence_refusal_shows_with_a_blender_hint(fresh, config_dir):
    """Accepted when Generate 3D was clicked, gone when the worker looked (the file was removed meanwhile)."""
    s = fresh
    s.image = bpy.data.images.load(str(OPENLRM_IMAGE), check_existing=True)
    s.model = "openlrm-mix-base"
    bpy.ops.image_to_3d.accept_licence(model=s.model)
    prefs().weights_dir = str(PACKED)
    s.resolution, s.remove_background = 32, False
    assert bpy.ops.image_to_3d.generate(run_async=True) == {"FINISHED"}
    (config_dir / "accepted_licences.json").unlink()
    (job_id,) = addon_module("operators.jobs").TIMERS
    timer = addon_module("operators.jobs").TIMERS[job_id]
    deadline = time.monotonic() + 120
    while timer() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    bpy.app.timers.unregister(timer)
    assert "Non-commercial use only" in s.last_error and "must be accepted" in s.last_error
    assert "Accept Licence" in s.last_hint and "--accept-licence" not in s.last_hint
    texts = panel_text()
    assert "must be accepted" in texts and "image_to_3d.accept_licence" in texts
    assert len(bpy.data.objects) == 0
