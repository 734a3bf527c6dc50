"""Generate 3D inside Blender, through the real worker and the tiny TripoSR model: the imported object,
undo, progress, cancel, a killed worker, Free Memory, disabling the add-on."""

import os
import signal
import subprocess
import time
from types import SimpleNamespace
from unittest.mock import MagicMock

import addon_utils
import bpy
import numpy as np
import pytest

from .conftest import (ADDON, BACKEND_PYTHON, INPUT_IMAGE, ROOT, TINY_MODEL, addon_module, generate_module,
                       leftover_files, session, start_async, tick_until)

SLOW_RESOLUTION = 512  # ~9 s of surface extraction, in chunks: time to cancel or kill mid-job


def group_alive(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def cli_mesh(tmp_path, resolution=64):
    """The CLI's mesh with Blender's defaults (Colours: From Images)."""
    out = tmp_path / "cli.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([str(BACKEND_PYTHON), "-m", "backend", "generate", str(INPUT_IMAGE), "-o", str(out),
                        "--weights", str(TINY_MODEL), "--resolution", str(resolution), "--no-remove-background",
                        "--foreground-ratio", "0.85", "--device", "cpu", "--colours", "images", "--json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(out) as data:
        return {k: data[k] for k in ("vertices", "faces", "colors")}


def draw_panel():
    layout = MagicMock()
    bpy.types.IMAGE_TO_3D_PT_sidebar.draw(SimpleNamespace(layout=layout), bpy.context)
    return layout


def called_texts(layout):
    return [str(c) for c in layout.mock_calls]


def test_generate_imports_the_cli_mesh_coloured_placed_and_undoable(settings, tmp_path):
    expected = cli_mesh(tmp_path)
    bpy.context.scene.cursor.location = (1.0, -2.0, 0.5)
    bpy.ops.ed.undo_push(message="before")

    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj is not None and obj.select_get() and obj.type == "MESH"
    mesh = obj.data
    assert len(mesh.vertices) == len(expected["vertices"])
    assert len(mesh.polygons) == len(expected["faces"])
    assert all(len(p.vertices) == 3 for p in mesh.polygons[:100])
    assert not mesh.validate(), "the mesh needed no repair"

    color = mesh.color_attributes["Color"]
    assert (color.data_type, color.domain) == ("FLOAT_COLOR", "POINT")
    rgba = np.empty(len(mesh.vertices) * 4, dtype=np.float32)
    color.data.foreach_get("color", rgba)
    srgb = expected["colors"]
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(rgba.reshape(-1, 4)[:, :3], linear, atol=1e-5)

    material = obj.active_material
    nodes = material.node_tree.nodes
    attribute = next(n for n in nodes if n.bl_idname == "ShaderNodeVertexColor")
    assert attribute.layer_name == "Color"
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    assert bsdf.inputs["Base Color"].links[0].from_node == attribute

    co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.vertices.foreach_get("co", co)
    world = co.reshape(-1, 3) + np.array(obj.location)
    assert tuple(obj.location) == pytest.approx((1.0, -2.0, 0.5))
    assert world[:, 2].min() == pytest.approx(0.5, abs=1e-5), "its lowest point rests on the cursor"
    centre = (world.min(axis=0) + world.max(axis=0)) / 2
    assert centre[:2] == pytest.approx([1.0, -2.0], abs=1e-5)
    extent = expected["vertices"].max(axis=0) - expected["vertices"].min(axis=0)
    assert world.max(axis=0) - world.min(axis=0) == pytest.approx(extent, abs=1e-4), "model units kept"

    stored = obj["image_to_3d"].to_dict()
    assert stored["model"] == "triposr" and stored["resolution"] == 64 and stored["remove_background"] is False
    assert stored["image"] == "input_rgba.png" and stored["device"] == "cpu"
    assert all(p.use_smooth for p in mesh.polygons[:100])
    assert "vertices" in bpy.context.scene.image_to_3d.last_info
    assert leftover_files() == []

    name = obj.name
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert name not in bpy.data.objects, "one undo step removes the generated object"


def test_second_generation_reuses_the_warm_worker(settings):
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    pid = session().current().pid
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    assert session().current().pid == pid
    assert "model reused" in settings.last_info
    assert len([o for o in bpy.data.objects if "image_to_3d" in o]) == 2


def test_target_height_and_flat_shading(settings):
    settings.target_height = 2.0
    settings.smooth_shading = False
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.dimensions.z == pytest.approx(2.0, rel=1e-4)
    assert not any(p.use_smooth for p in obj.data.polygons)


def test_async_progress_in_the_panel_then_the_object(settings):
    settings.resolution = SLOW_RESOLUTION // 2
    timer = start_async()
    assert not bpy.ops.image_to_3d.generate.poll(), "one job at a time"
    assert generate_module().why_not(bpy.context) == "A generation is already running"
    job = session().current_job()
    tick_until(timer, lambda: job.stage == "extracting_surface")
    layout = draw_panel()
    assert layout.progress.called
    assert "Extracting surface" in layout.progress.call_args.kwargs["text"]
    assert "image_to_3d.cancel" in str(layout.operator.call_args_list)
    assert bpy.ops.image_to_3d.cancel.poll()
    assert tick_until(timer)
    assert bpy.context.active_object is not None and "image_to_3d" in bpy.context.active_object
    assert "image_to_3d.generate" in str(draw_panel().operator.call_args_list)


def test_cancel_mid_job_leaves_no_object_no_worker_no_files(settings):
    settings.resolution = SLOW_RESOLUTION
    timer = start_async()
    job = session().current_job()
    tick_until(timer, lambda: job.stage == "extracting_surface")
    pid = session().current().pid
    assert bpy.ops.image_to_3d.cancel() == {"FINISHED"}
    asked = time.monotonic()
    assert tick_until(timer, timeout=30)
    assert time.monotonic() - asked < 10
    assert job.state == "cancelled"
    assert len(bpy.data.objects) == 0 and len(bpy.data.meshes) == 0
    assert session().current() is None and not group_alive(pid)
    assert leftover_files() == []
    assert settings.last_info == "Cancelled" and settings.last_error == ""


def test_a_killed_worker_shows_an_error_and_the_next_generate_works(settings):
    settings.resolution = SLOW_RESOLUTION
    timer = start_async()
    job = session().current_job()
    tick_until(timer, lambda: job.stage == "extracting_surface")
    pid = session().current().pid
    os.kill(pid, signal.SIGKILL)
    assert tick_until(timer, timeout=30)
    assert "killed" in settings.last_error and settings.last_hint
    assert len(bpy.data.objects) == 0
    assert leftover_files() == []
    texts = " ".join(called_texts(draw_panel()))
    assert "killed" in texts and "ERROR" in texts

    settings.resolution = 64
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    assert settings.last_error == "" and session().current().pid != pid
    assert len(bpy.data.objects) == 1


def test_bad_settings_reach_the_panel(settings):
    bpy.context.preferences.addons[ADDON].preferences.weights_dir = str(ROOT / "no-such-model")
    with pytest.raises(RuntimeError, match="model folder not found"):  # how bpy.ops reports an error
        bpy.ops.image_to_3d.generate()
    assert "not found" in settings.last_error and "Model Folder" in settings.last_hint
    assert "not found" in " ".join(called_texts(draw_panel()))
    assert len(bpy.data.objects) == 0


def test_generated_and_packed_images_are_sent_as_png(settings, tmp_path):
    image = bpy.data.images.new("painted", 32, 16, alpha=True)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 32, 4)).astype(np.float32) / 255
    image.pixels.foreach_set(pixels.ravel())
    path = addon_module("operators.results").image_file_for_worker(image, str(tmp_path))
    assert path.startswith(str(tmp_path)) and path.endswith(".png")
    back = bpy.data.images.load(path)
    got = np.empty(32 * 16 * 4, dtype=np.float32)
    back.pixels.foreach_get(got)
    np.testing.assert_allclose(got.reshape(16, 32, 4), pixels, atol=1 / 255 + 1e-6)

    packed = bpy.data.images.load(str(INPUT_IMAGE), check_existing=False)
    packed.pack()
    path = addon_module("operators.results").image_file_for_worker(packed, str(tmp_path))
    assert path != str(INPUT_IMAGE) and os.path.getsize(path) > 0


def test_packed_image_generates(settings):
    settings.image.pack()
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    assert len(bpy.data.objects) == 1 and leftover_files() == []


def test_greyed_out_generate_says_why(settings):
    gen = generate_module()
    settings.image = None
    assert not bpy.ops.image_to_3d.generate.poll()
    assert gen.why_not(bpy.context) == "Choose an image first"
    settings.image = bpy.data.images.load(str(INPUT_IMAGE), check_existing=True)
    bpy.context.preferences.addons[ADDON].preferences.backend_python = "/nonexistent/python"
    assert "Backend Python not found" in gen.why_not(bpy.context)
    assert not bpy.ops.image_to_3d.free_memory.poll() or session().worker_running()


def test_panel_shows_the_settings(settings):
    layout = draw_panel()
    props = [c.args[1] for c in layout.mock_calls if c[0].endswith("prop") and len(c.args) > 1]
    for name in ("model", "resolution", "threshold", "foreground_ratio", "remove_background", "device",
                 "smooth_shading", "target_height"):
        assert name in props
    assert layout.template_ID.call_args.args[1] == "image"
    assert layout.template_icon.called, "a thumbnail of the image"


def test_open_image_operator_sets_the_image(settings):
    settings.image = None
    assert bpy.ops.image_to_3d.open_image(filepath=str(INPUT_IMAGE)) == {"FINISHED"}
    assert settings.image is not None and settings.image.size[0] > 0


def test_settings_and_preferences_contract(settings):
    for name in ("image", "model", "resolution", "foreground_ratio", "remove_background", "device"):
        assert hasattr(settings, name)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    assert hasattr(prefs, "backend_python") and hasattr(prefs, "weights_dir")


def test_free_memory_stops_the_worker(settings):
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    pid = session().current().pid
    assert bpy.ops.image_to_3d.free_memory.poll()
    assert bpy.ops.image_to_3d.free_memory() == {"FINISHED"}
    assert not group_alive(pid) and not session().worker_running()
    assert not bpy.ops.image_to_3d.free_memory.poll()


def test_disabling_the_add_on_stops_the_worker_even_mid_job(settings):
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    idle_pid = session().current().pid
    addon_utils.disable(ADDON, default_set=True)
    assert not group_alive(idle_pid)

    addon_utils.enable(ADDON, default_set=True)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.backend_python, prefs.weights_dir, prefs.device = str(BACKEND_PYTHON), str(TINY_MODEL), "cpu"
    settings = bpy.context.scene.image_to_3d
    settings.resolution = SLOW_RESOLUTION
    timer = start_async()
    busy_pid = session().current().pid
    addon_utils.disable(ADDON, default_set=True)
    assert not group_alive(busy_pid)
    assert not bpy.app.timers.is_registered(timer)
    addon_utils.enable(ADDON, default_set=True)
    assert leftover_files() == []


def test_a_backend_python_that_cannot_run_the_worker_is_explained(settings, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    bpy.context.preferences.addons[ADDON].preferences.backend_python = str(fake)
    with pytest.raises(RuntimeError, match="before it was ready"):
        bpy.ops.image_to_3d.generate()
    assert "No module named torch" in settings.last_hint and "preferences" in settings.last_hint
    assert len(bpy.data.objects) == 0 and leftover_files() == []
    bpy.context.preferences.addons[ADDON].preferences.backend_python = str(BACKEND_PYTHON)
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
