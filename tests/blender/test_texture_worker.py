"""Face budgets, quads, textures, Bake from Model and Retopologize through the real worker with the tiny
TripoSR model (the Blender side alone, with a stand-in worker, is in test_texture.py)."""

import re
import shutil
import time
from pathlib import Path

import bmesh
import bpy
import numpy as np
import pytest

from .conftest import ROOT, addon_module, jobs_module, leftover_files, panel_text, prefs, session

pytestmark = pytest.mark.skipif('"bake"' not in (ROOT / "backend" / "worker.py").read_text(),
                                reason="the backend has no bake op yet")


def fields_folder() -> Path:
    """Where the worker keeps the fields (the environment Blender gives it)."""
    env = addon_module("environment").process_env(prefs())
    if env.get("IMAGE_TO_3D_FIELDS"):
        return Path(env["IMAGE_TO_3D_FIELDS"])
    return Path(env["IMAGE_TO_3D_MODELS"]).parent / "fields"


def texture_of(obj):
    bsdf = next(n for n in obj.active_material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    node = bsdf.inputs["Base Color"].links[0].from_node
    assert node.bl_idname == "ShaderNodeTexImage"
    return node.image


def pixels(image):
    out = np.empty(image.size[0] * image.size[1] * 4, dtype=np.float32)
    image.pixels.foreach_get(out)
    return out.reshape(image.size[1], image.size[0], 4)[..., :3]


def colour_at_loops(obj, image):
    """The texture's colour (sRGB) at each loop's UV, nearest texel; and the loop's vertex colour (sRGB)."""
    mesh = obj.data
    uvs = np.empty(len(mesh.loops) * 2, dtype=np.float32)
    mesh.uv_layers.active.data.foreach_get("uv", uvs)
    uvs = uvs.reshape(-1, 2)
    texels = pixels(image)
    height, width = texels.shape[:2]
    cols = np.clip((uvs[:, 0] * width).astype(int), 0, width - 1)
    rows = np.clip((uvs[:, 1] * height).astype(int), 0, height - 1)  # Blender's row 0 is v = 0
    rgba = np.empty(len(mesh.vertices) * 4, dtype=np.float32)
    mesh.color_attributes["Color"].data.foreach_get("color", rgba)
    srgb = addon_module("backend.colour").linear_to_srgb(rgba.reshape(-1, 4)[:, :3])
    corner_verts = np.empty(len(mesh.loops), dtype=np.int32)
    mesh.loops.foreach_get("vertex_index", corner_verts)
    return texels[rows, cols], srgb[corner_verts]


def assert_texture_follows_the_field(obj, image):
    """At a loop's UV the texture shows the field's colour at that corner, which is the vertex colour (both
    are the field's): the UVs, the row order and the colour space all line up."""
    texture, vertex = colour_at_loops(obj, image)
    assert np.median(np.abs(texture - vertex)) < 0.05
    spread = pixels(image).reshape(-1, 3).std(axis=0).max()
    assert spread > 0.02, "not a blank image"


def subdivide(obj):
    bm = bmesh.new()
    bm.from_mesh(obj.data)
    bmesh.ops.subdivide_edges(bm, edges=bm.edges[:], cuts=1, use_grid_fill=True)
    bm.to_mesh(obj.data)
    bm.free()
    obj.data.update()


def test_a_face_budget_and_a_texture_give_a_textured_object(settings):
    settings.faces, settings.texture = 2000, "512"
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    obj = bpy.context.active_object
    mesh = obj.data
    assert 1500 <= len(mesh.polygons) <= 2000
    assert {p.loop_total for p in mesh.polygons} == {3}
    assert mesh.uv_layers.active is not None and "Color" in mesh.color_attributes
    image = texture_of(obj)
    assert image.name == obj.name and tuple(image.size) == (512, 512) and image.packed_file is not None
    assert_texture_follows_the_field(obj, image)
    stored = obj["image_to_3d"].to_dict()
    assert re.fullmatch(r"[0-9a-f]{32}", stored["field_id"])
    assert (stored["faces"], stored["texture"]) == (2000, 512)
    assert session().current_job().stats["faces_reached"] == len(mesh.polygons)
    assert leftover_files() == []


def test_quads_at_a_budget_are_mostly_quads(settings):
    settings.faces, settings.quads = 2000, True
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    assert not [n for n in settings.last_notes.splitlines() if "quad" in n], settings.last_notes
    polygons = bpy.context.active_object.data.polygons
    sizes = np.array([p.loop_total for p in polygons])
    assert (sizes == 4).mean() > 0.8 and set(sizes) <= {3, 4}
    same_corners = len(polygons) - len({tuple(sorted(p.vertices)) for p in polygons})
    assert same_corners == 0, f"{same_corners} faces repeat another face's corners"
    assert not bpy.context.active_object.data.validate()


def decimate(obj, ratio=0.5):
    modifier = obj.modifiers.new("Decimate", "DECIMATE")
    modifier.ratio = ratio
    with bpy.context.temp_override(object=obj, active_object=obj):
        assert bpy.ops.object.modifier_apply(modifier=modifier.name) == {"FINISHED"}


def test_bake_from_model_on_edited_meshes_and_again_without_the_cached_field(settings):
    settings.faces = 1000
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    obj = bpy.context.active_object
    decimate(obj)  # an edit without UVs: the backend makes them
    assert len(obj.data.polygons) < 600 and not obj.data.uv_layers
    settings.texture = "512"

    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}, settings.last_error
    assert session().current_job().stats.get("field") == "cached"
    image = texture_of(obj)
    assert image.name == obj.name and tuple(image.size) == (512, 512)
    assert obj.data.uv_layers.active.name == "UVMap"
    assert_texture_follows_the_field(obj, image)

    subdivide(obj)  # an edit that keeps (and interpolates) the UV map: the bake uses it
    bpy.ops.ed.undo_push(message="subdivided")
    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}, settings.last_error
    assert len(obj.data.uv_layers) == 1, "its UV map was used, not replaced"
    first = pixels(texture_of(obj)).copy()
    assert texture_of(obj).name == obj.name, "the texture it replaced is gone"

    shutil.rmtree(fields_folder())
    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}, settings.last_error
    assert session().current_job().stats.get("field") == "recomputed"
    np.testing.assert_allclose(pixels(texture_of(obj)), first, atol=2 / 255)
    assert leftover_files() == []


def test_retopologize_reuses_the_field_and_one_undo_restores(settings):
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    obj = bpy.context.active_object
    name, dense = obj.name, len(obj.data.polygons)
    settings.faces = 500
    bpy.ops.ed.undo_push(message="generated")

    assert bpy.ops.image_to_3d.retopologize() == {"FINISHED"}, settings.last_error
    assert session().current_job().stats.get("field") == "cached"
    new = bpy.data.objects[name]
    original = bpy.data.objects[f"{name} (original)"]
    assert len(original.data.polygons) == dense and 400 <= len(new.data.polygons) <= 500 < dense
    assert original.hide_get() and original.hide_render and bpy.context.active_object == new
    assert "Retopologize" not in settings.last_error and "original is kept hidden" in settings.last_info
    assert "image_to_3d.retopologize" in panel_text()

    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert [o.name for o in bpy.data.objects] == [name]
    assert len(bpy.data.objects[name].data.polygons) == dense and not bpy.data.objects[name].hide_get()


def test_cancel_while_baking_the_texture_leaves_nothing(settings):
    # The field's bake (From Model); a cancel while painting is tests/test_paint_pipeline.py's.
    settings.faces, settings.texture, settings.colours = 2000, "2048", "field"
    assert bpy.ops.image_to_3d.generate(run_async=True) == {"FINISHED"}
    (timer,) = jobs_module().TIMERS.values()
    job = session().current_job()
    stages = addon_module("backend.protocol").Stage
    deadline = time.monotonic() + 120
    while job.stage != stages.BAKE:
        assert timer() is not None, f"ended before baking: {job!r}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "Baking texture" in panel_text()
    assert bpy.ops.image_to_3d.cancel() == {"FINISHED"}
    asked = time.monotonic()
    while timer() is not None:
        time.sleep(0.01)
    bpy.app.timers.unregister(timer)
    assert time.monotonic() - asked < 10, "the bake honours the cancel between chunks"
    assert job.state == "cancelled" and settings.last_info == "Cancelled"
    assert len(bpy.data.objects) == 0 and len(bpy.data.meshes) == 0
    assert [i.name for i in bpy.data.images] == ["input_rgba.png"]
    assert leftover_files() == [] and session().current() is None
