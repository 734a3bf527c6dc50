"""TripoSG in Blender: steps, guidance and seed in the panel with the CPU warning (as InstantMesh's), no source
size or threshold; Generate 3D through the real worker with the tiny TripoSG folder imports a grey mesh (it makes
no colour) with the note under Colours: From Model, and painted from the picture (a camera fitted to its
silhouette) under From Images, the default; the settings stored, one undo step; Retopologize and Bake from Model
work on it."""

import bpy
import numpy as np
import pytest

from .conftest import BACKEND_PYTHON, INPUT_IMAGE, ROOT, addon_module, panel_text, prefs, session, start_async, \
    tick_until

MODEL = "triposg"
TINY = ROOT / "tests" / "data" / "triposg_tiny" / "model"
STEPS, SEED = 2, 5


@pytest.fixture
def settings(addon, config_dir):
    bpy.ops.wm.read_homefile(use_empty=True)
    p = prefs()
    p.backend_python, p.weights_dir, p.device = str(BACKEND_PYTHON), str(TINY), "cpu"
    s = bpy.context.scene.image_to_3d
    s.image = bpy.data.images.load(str(INPUT_IMAGE), check_existing=True)
    s.model = MODEL
    s.remove_background = False
    return s


def test_the_panel_shows_steps_guidance_seed_and_the_cpu_warning(settings):
    assert (settings.steps, settings.guidance) == (50, 7.0)  # TripoSG's own, set with the model
    assert settings.resolution == 512 and not settings.use_custom_resolution
    text = panel_text()
    for name in ("'steps'", "'guidance'", "'seed'", "'resolution'"):
        assert name in text
    assert "'threshold'" not in text and "The shape, drawn from noise" in text
    assert "each of the 50 steps takes minutes" in text  # the CPU is chosen
    assert "'source_size'" not in panel_text("IMAGE_TO_3D_PT_advanced")
    settings.steps, settings.seed = STEPS, SEED
    options = addon_module("operators.job_options").job_options(settings, prefs())
    assert {k: options[k] for k in ("model", "steps", "guidance", "seed", "resolution")} == {
        "model": MODEL, "steps": STEPS, "guidance": 7.0, "seed": SEED, "resolution": None}
    assert "threshold" not in options and "source_size" not in options
    settings.model = "instantmesh-large"  # the guidance was still TripoSG's default: InstantMesh's now; the steps
    assert (settings.steps, settings.guidance) == (STEPS, 4.0)  # were the user's: kept
    settings.model = "triposr"
    assert "'steps'" not in panel_text()


def vertex_srgb(obj):
    rgba = np.empty(len(obj.data.vertices) * 4, np.float32)
    obj.data.color_attributes["Color"].data.foreach_get("color", rgba)
    return addon_module("backend.colour").linear_to_srgb(rgba.reshape(-1, 4)[:, :3])


def test_from_images_paints_it_from_the_picture(settings):
    assert settings.colours == "images"  # the default
    settings.steps, settings.seed, settings.resolution = STEPS, SEED, 128
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}, settings.last_error
    obj = bpy.context.active_object
    assert obj["image_to_3d"]["colours"] == "images"
    assert "painted grey" not in settings.last_notes
    stats = session().current_job().stats
    assert stats["views"][0]["camera"] == "fitted" and stats["views"][0]["iou"] > 0.2
    srgb = vertex_srgb(obj)
    assert not np.allclose(srgb, 0.5, atol=0.02) and srgb.max(axis=1).min() > 0


def test_generate_imports_a_grey_mesh_then_retopologize_and_bake(settings, progress):
    settings.steps, settings.seed, settings.resolution = STEPS, SEED, 128
    settings.colours = "field"  # From Model: TripoSG has none
    bpy.ops.ed.undo_push(message="before")
    assert tick_until(start_async(), timeout=300)
    assert not settings.last_error, (settings.last_error, settings.last_hint)
    steps = [message for stage, message in progress if stage == "generating_shape"]
    # the first and the last always come through; the worker may leave out the ones between (<= 10 a second)
    assert steps[0] == f"{STEPS} shape steps" and steps[-1] == f"shape step {STEPS}/{STEPS}", steps
    assert "TripoSG makes no colour: painted grey" in settings.last_notes

    obj = bpy.context.active_object
    assert obj is not None and "image_to_3d" in obj and len(obj.data.polygons) > 1000
    assert np.allclose(vertex_srgb(obj), 0.5, atol=0.01), "neutral grey, never black"
    stored = obj["image_to_3d"].to_dict()
    assert (stored["model"], stored["steps"], stored["seed"], stored["guidance"]) == (MODEL, STEPS, SEED, 7.0)
    name = obj.name
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert name not in bpy.data.objects, "one undo step removes the generated object"

    settings = bpy.context.scene.image_to_3d  # the undo rebuilt the scene's data
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}, settings.last_error
    obj = bpy.context.active_object
    settings.faces = 500
    assert bpy.ops.image_to_3d.retopologize() == {"FINISHED"}, settings.last_error
    assert session().current_job().stats.get("field") == "cached"
    assert 400 <= len(bpy.context.active_object.data.polygons) <= 500
    settings.texture = "512"
    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}, settings.last_error
    assert "TripoSG makes no colour: painted grey" in settings.last_notes
