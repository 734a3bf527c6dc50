"""Textured, reduced and quad results in Blender, Bake from Model and Retopologize, with a stand-in worker.

The stand-in takes the place of the session's worker (``session.worker_for``): it records each request (the
mesh file of a bake included) and answers at once with a hand-made result file in the wire's format, so
these tests cover the Blender side alone (request contents, import, material, undo, failure) and run fast.
The same flows through the real worker are in test_texture_worker.py.
"""

import itertools
import os
import tempfile
from pathlib import Path

import bmesh
import bpy
import numpy as np
import pytest

from .conftest import addon_module, generate_module, jobs_module, panel_text, session

# A hand-made result: a box of 8 vertices, 4 quads and 4 triangles (two sides split), per-corner UVs.
BOX_VERTICES = np.array([[-1, -1, -2], [1, -1, -2], [1, 1, -2], [-1, 1, -2],
                         [-1, -1, 2], [1, -1, 2], [1, 1, 2], [-1, 1, 2]], dtype=np.float32) * 0.25
BOX_FACES = np.array([[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [2, 3, 7, 6],
                      [1, 2, 6, -1], [1, 6, 5, -1], [3, 0, 4, -1], [3, 4, 7, -1]], dtype=np.int32)
BOX_COLORS = np.linspace(0, 1, 24, dtype=np.float32).reshape(8, 3)
TEXTURE_H, TEXTURE_W = 4, 8


def box_uvs():
    return np.random.default_rng(3).random((len(BOX_FACES), 4, 2)).astype(np.float32)


def box_texture(seed=5):
    return np.random.default_rng(seed).integers(0, 256, (TEXTURE_H, TEXTURE_W, 3)).astype(np.uint8)


class StandInWorker:
    """What the operators see of ``backend.client.Worker``: submit, poll, busy, job; answers at once."""

    def __init__(self, answer):
        self.answer = answer  # answer(request, output_dir) -> (result path, stats)
        self.temp_dir = jobs_module().temp_root()
        self.requests = []
        self.job = None
        self._ids = itertools.count(1)

    @property
    def busy(self):
        return self.job is not None and not self.job.finished

    running = False

    def submit(self, image_path, options, op="generate", mesh=None):
        client = addon_module("backend.client")
        os.makedirs(self.temp_dir, exist_ok=True)
        job = client.Job(f"stand-in-{next(self._ids)}", Path(tempfile.mkdtemp(prefix="job-", dir=self.temp_dir)))
        request = {"op": op, "image": image_path, "options": dict(options)}
        assert os.path.isfile(image_path)
        if mesh is not None:
            with np.load(mesh) as data:
                request["mesh"] = {key: data[key] for key in data.files}
        self.requests.append(request)
        job.result_path, job.stats = self.answer(request, str(job.job_dir))
        job.state = addon_module("backend.protocol").DONE
        self.job = job
        return job

    def poll(self):
        return []

    def log_tail(self, lines=20):
        return ""

    def stop(self):
        self.job = None


@pytest.fixture
def stand_in(settings, monkeypatch):
    """Install a stand-in worker; ``stand_in.answer`` can be replaced per test."""
    worker = StandInWorker(generate_answer())
    monkeypatch.setattr(session(), "_worker", worker)
    monkeypatch.setattr(session(), "worker_for", lambda *args, **kwargs: worker)
    yield worker
    session()._worker = None


def generate_answer(textured=True, vertices=BOX_VERTICES, faces=BOX_FACES, notes=("reduced to 8 faces",)):
    def answer(request, output_dir):
        path = os.path.join(output_dir, "mesh.npz")
        arrays = {"vertices": vertices, "faces": faces, "colors": BOX_COLORS[:len(vertices)]}
        if textured:
            arrays.update(uvs=box_uvs()[:len(faces), :faces.shape[1]], texture=box_texture())
        np.savez(path, **arrays)
        stats = {"vertices": len(vertices), "faces": len(faces), "field_id": "field-abc", "notes": list(notes),
                 "faces_reached": len(faces)}
        return path, stats
    return answer


def bake_answer(seed=9):
    """A texture, and the request's own UVs (or new ones: each loop at its vertex's x, y)."""
    def answer(request, output_dir):
        mesh = request["mesh"]
        uvs = mesh.get("uvs")
        if uvs is None:
            uvs = (mesh["vertices"][mesh["corner_verts"]][:, :2] + 1) / 2
        path = os.path.join(output_dir, "bake.npz")
        np.savez(path, texture=box_texture(seed), uvs=uvs.astype(np.float32))
        return path, {"field_id": "field-abc", "notes": []}
    return answer


def blender_pixels(image):
    pixels = np.empty(image.size[0] * image.size[1] * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    return pixels.reshape(image.size[1], image.size[0], 4)


def base_color_source(material):
    bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    (link,) = bsdf.inputs["Base Color"].links
    return link.from_node


def loop_uvs(mesh, uv_map):
    uvs = np.empty(len(mesh.loops) * 2, dtype=np.float32)
    uv_map.data.foreach_get("uv", uvs)
    return uvs.reshape(-1, 2)


def generate(stand_in, **answer):
    if answer:
        stand_in.answer = generate_answer(**answer)
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    return bpy.context.active_object


def test_a_textured_quad_result_arrives_as_quads_with_uvs_a_packed_texture_and_its_material(stand_in):
    obj = generate(stand_in)
    mesh = obj.data
    assert [p.loop_total for p in mesh.polygons] == [4, 4, 4, 4, 3, 3, 3, 3]
    assert [tuple(p.vertices) for p in mesh.polygons][:2] == [(0, 3, 2, 1), (4, 5, 6, 7)]
    assert tuple(mesh.polygons[4].vertices) == (1, 2, 6)
    assert not mesh.validate(), "the mesh needed no repair"

    uv_map = mesh.uv_layers.active
    assert uv_map is not None and uv_map.name == "UVMap" and uv_map.active_render
    uvs = box_uvs()
    expected = uvs[BOX_FACES >= 0]
    np.testing.assert_allclose(loop_uvs(mesh, uv_map), expected, atol=1e-6)

    image = bpy.data.images[obj.name]
    assert image.packed_file is not None and image.colorspace_settings.name == "sRGB"
    assert tuple(image.size) == (TEXTURE_W, TEXTURE_H)
    pixels = blender_pixels(image)
    np.testing.assert_allclose(pixels[::-1, :, :3] * 255, box_texture(), atol=1e-3)  # row 0 of Blender: bottom
    assert (pixels[..., 3] == 1).all()

    material = obj.active_material
    texture = base_color_source(material)
    assert texture.bl_idname == "ShaderNodeTexImage" and texture.image == image
    uv_node = texture.inputs["Vector"].links[0].from_node
    assert uv_node.bl_idname == "ShaderNodeUVMap" and uv_node.uv_map == "UVMap"
    attribute = next(n for n in material.node_tree.nodes if n.bl_idname == "ShaderNodeVertexColor")
    assert attribute.layer_name == "Color" and not attribute.outputs["Color"].links, "kept, not linked"

    color = mesh.color_attributes["Color"]
    assert (color.data_type, color.domain) == ("FLOAT_COLOR", "POINT")
    rgba = np.empty(len(mesh.vertices) * 4, dtype=np.float32)
    color.data.foreach_get("color", rgba)
    linear = addon_module("backend.colour").srgb_to_linear(BOX_COLORS)
    np.testing.assert_allclose(rgba.reshape(-1, 4)[:, :3], linear, atol=1e-6)

    stored = obj["image_to_3d"].to_dict()
    assert stored["field_id"] == "field-abc" and stored["image"] == "input_rgba.png"
    assert stored["placement_scale"] == 1.0 and len(stored["placement_offset"]) == 3
    assert "faces" not in stored and stored["quads"] is False  # as the panel sent
    assert stored["texture"] == TEXTURE_W  # the size that came back
    settings = bpy.context.scene.image_to_3d
    assert settings.last_notes == "reduced to 8 faces"
    assert "reduced to 8 faces" in panel_text()


def test_an_untextured_triangle_result_keeps_the_vertex_colour_material(stand_in):
    triangles = addon_module("backend.mesh").triangulate(BOX_FACES)[0]
    obj = generate(stand_in, textured=False, faces=triangles)
    mesh = obj.data
    assert {p.loop_total for p in mesh.polygons} == {3} and len(mesh.polygons) == 12
    assert len(mesh.uv_layers) == 0 and len(bpy.data.images) == 1  # only the source image
    source = base_color_source(obj.active_material)
    assert source.bl_idname == "ShaderNodeVertexColor" and source.layer_name == "Color"


def test_the_panel_sends_what_output_says_and_the_object_stores_it(stand_in):
    settings = bpy.context.scene.image_to_3d
    gen = generate_module()
    options = addon_module("operators.job_options").job_options(settings, None)
    assert (options["faces"], options["quads"], options["texture"]) == (None, False, None)
    settings.quads = True  # without a face budget there is nothing to remesh to
    assert addon_module("operators.job_options").job_options(settings, None)["quads"] is False
    settings.faces, settings.texture = 2000, "1024"
    options = addon_module("operators.job_options").job_options(settings, None)
    assert (options["faces"], options["quads"], options["texture"]) == (2000, True, 1024)

    obj = generate(stand_in)
    assert stand_in.requests[-1]["options"]["faces"] == 2000
    stored = obj["image_to_3d"].to_dict()
    assert (stored["faces"], stored["quads"]) == (2000, True)

    settings.faces = 50
    assert "at least 100" in gen.why_not(bpy.context)
    assert not bpy.ops.image_to_3d.generate.poll()


def test_the_output_section_and_the_generated_object_buttons(stand_in):
    from unittest.mock import MagicMock
    from types import SimpleNamespace

    settings = bpy.context.scene.image_to_3d
    sidebar = addon_module("panels.sidebar")
    stages = addon_module("backend.protocol").Stage
    assert set(sidebar.STAGE_LABELS) == set(stages.ALL), "a label for every stage"
    text = panel_text()
    for name in ("'faces'", "'quads'", "'texture'"):
        assert name in text
    assert "bake_from_model" not in text, "no generated object selected"

    layout = MagicMock()
    sidebar.draw_output(layout, settings)
    quads_row = layout.column.return_value.row.return_value
    assert quads_row.enabled is False and quads_row.prop.call_args.args[1] == "quads"
    settings.faces = 5000
    sidebar.draw_output(layout, settings)
    assert quads_row.enabled is True

    generate(stand_in, textured=False)
    text = panel_text()
    assert "image_to_3d.bake_from_model" in text and "image_to_3d.retopologize" in text
    assert "Bake from Model (1024 px)" in text  # nothing chosen: the default size
    settings.texture = "2048"
    assert "Bake from Model (2048 px)" in panel_text()
    bpy.types.IMAGE_TO_3D_PT_sidebar.draw(SimpleNamespace(layout=MagicMock()), bpy.context)


def test_local_vertices_go_back_to_the_backend_frame_exactly(stand_in):
    settings = bpy.context.scene.image_to_3d
    settings.target_height = 3.0
    vertices = BOX_VERTICES + np.array([0.3, -0.2, 0.7], dtype=np.float32)
    obj = generate(stand_in, vertices=vertices)
    assert obj.dimensions.z == pytest.approx(3.0, rel=1e-5)
    stored = obj["image_to_3d"].to_dict()
    assert stored["placement_scale"] == pytest.approx(3.0 / 1.0)

    bake = addon_module("operators.bake")
    folder = tempfile.mkdtemp()
    path = bake.write_mesh_file(obj, stored, None, folder)
    with np.load(path) as data:
        np.testing.assert_allclose(data["vertices"], vertices, atol=1e-6)
        assert data["loop_totals"].tolist() == [4, 4, 4, 4, 3, 3, 3, 3]
        np.testing.assert_array_equal(data["corner_verts"], BOX_FACES[BOX_FACES >= 0])
        assert "uvs" not in data.files


def test_nothing_is_half_added_when_the_object_cannot_be_added(stand_in, monkeypatch):
    import_mesh = addon_module("import_mesh")

    def refuse(*args, **kwargs):
        raise RuntimeError("no room")

    monkeypatch.setattr(import_mesh, "link_selected", refuse)
    counts = (len(bpy.data.images), len(bpy.data.materials))
    with pytest.raises(RuntimeError, match="no room"):
        bpy.ops.image_to_3d.generate()
    assert "no room" in bpy.context.scene.image_to_3d.last_error
    assert len(bpy.data.objects) == 0 and len(bpy.data.meshes) == 0
    assert (len(bpy.data.images), len(bpy.data.materials)) == counts


def edit(obj, subdivide=True):
    """Change the topology as an artist would (the bake must follow the mesh as it is now)."""
    bm = bmesh.new()
    bm.from_mesh(obj.data)
    if subdivide:
        bmesh.ops.subdivide_edges(bm, edges=bm.edges[:], cuts=1, use_grid_fill=True)
    else:
        bmesh.ops.triangulate(bm, faces=bm.faces[:])
    bm.to_mesh(obj.data)
    bm.free()
    obj.data.update()


def test_bake_from_model_on_an_edited_mesh_without_uvs(stand_in):
    obj = generate(stand_in, textured=False)
    edit(obj)
    mesh = obj.data
    stand_in.answer = bake_answer()
    bpy.context.scene.image_to_3d.texture = "512"
    bpy.ops.ed.undo_push(message="before")

    assert bpy.ops.image_to_3d.bake_from_model.poll()
    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}
    request = stand_in.requests[-1]
    assert request["op"] == "bake"
    options = request["options"]
    assert options["texture"] == 512 and options["field_id"] == "field-abc"
    assert options["model"] == "triposr" and options["resolution"] == 64 and options["remove_background"] is False
    assert options["device"] == "cpu" and options["weights"]
    sent = request["mesh"]
    assert sent["loop_totals"].sum() == len(mesh.loops) == len(sent["corner_verts"])
    assert len(sent["vertices"]) == len(mesh.vertices) and "uvs" not in sent
    assert sent["vertices"].min(axis=0) == pytest.approx(BOX_VERTICES.min(axis=0), abs=1e-6)  # backend frame

    uv_map = mesh.uv_layers.active
    assert uv_map is not None and uv_map.name == "UVMap"
    expected = (sent["vertices"][sent["corner_verts"]][:, :2] + 1) / 2
    np.testing.assert_allclose(loop_uvs(mesh, uv_map), expected, atol=1e-6)
    image = bpy.data.images[obj.name]
    assert image.packed_file is not None
    np.testing.assert_allclose(blender_pixels(image)[::-1, :, :3] * 255, box_texture(9), atol=1e-3)
    assert base_color_source(obj.active_material).image == image
    assert "Color" in mesh.color_attributes, "the vertex colours are kept"
    assert obj["image_to_3d"]["texture"] == TEXTURE_W
    assert "onto new UVs" in bpy.context.scene.image_to_3d.last_info

    name = obj.name
    assert bpy.ops.ed.undo() == {"FINISHED"}
    obj = bpy.data.objects[name]
    assert len(obj.data.uv_layers) == 0 and name not in bpy.data.images
    assert base_color_source(obj.active_material).bl_idname == "ShaderNodeVertexColor"


def test_bake_keeps_the_uv_map_replaces_the_texture_and_leaves_a_shared_material_alone(stand_in):
    obj = generate(stand_in)
    first = bpy.data.images[obj.name]
    other = obj.copy()  # an object sharing its material
    other.data = obj.data.copy()
    bpy.context.scene.collection.objects.link(other)
    before = loop_uvs(obj.data, obj.data.uv_layers.active)
    edit(obj, subdivide=False)  # triangulated: the same corners, new loops
    uvs_now = loop_uvs(obj.data, obj.data.uv_layers.active)
    stand_in.answer = bake_answer(seed=11)

    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}
    sent = stand_in.requests[-1]["mesh"]
    np.testing.assert_allclose(sent["uvs"], uvs_now)
    assert set(map(tuple, np.round(before, 5))) == set(map(tuple, np.round(uvs_now, 5)))
    assert len(obj.data.uv_layers) == 1
    assert stand_in.requests[-1]["options"]["texture"] == TEXTURE_W, "the size it was textured at"
    assert obj.active_material != other.active_material, "the shared material was copied first"
    assert base_color_source(other.active_material).image == first, "the other object keeps its texture"
    image = base_color_source(obj.active_material).image
    assert image != first and image.name.startswith(obj.name)  # the name is taken by the one still in use
    np.testing.assert_allclose(blender_pixels(image)[::-1, :, :3] * 255, box_texture(11), atol=1e-3)


def test_a_mesh_changed_while_baking_is_not_touched(stand_in):
    obj = generate(stand_in, textured=False)

    def answer(request, output_dir):
        edit(obj)  # the artist edits while the backend bakes
        return bake_answer()(request, output_dir)

    stand_in.answer = answer
    with pytest.raises(RuntimeError, match="changed while baking"):
        bpy.ops.image_to_3d.bake_from_model()
    assert len(obj.data.uv_layers) == 0 and obj.name not in bpy.data.images
    assert "Bake failed" in bpy.context.scene.image_to_3d.last_error


def test_retopologize_replaces_the_object_in_place_and_one_undo_restores_it(stand_in):
    obj = generate(stand_in, textured=False)
    name = obj.name
    folder = bpy.data.collections.new("Props")
    bpy.context.scene.collection.children.link(folder)
    for collection in list(obj.users_collection):
        collection.objects.unlink(obj)
    folder.objects.link(obj)
    parent = bpy.data.objects.new("Rig", None)
    bpy.context.scene.collection.objects.link(parent)
    parent.location = (0, 0, 1)
    obj.parent = parent
    obj.location, obj.rotation_euler, obj.scale = (1, 2, 3), (0.1, 0.2, 0.3), (2, 2, 2)
    child = bpy.data.objects.new("Label", None)
    folder.objects.link(child)
    child.parent = obj
    bpy.context.view_layer.update()
    world = obj.matrix_world.copy()
    child_world = child.matrix_world.copy()

    settings = bpy.context.scene.image_to_3d
    settings.faces, settings.quads, settings.texture = 500, True, "1024"
    reduced = np.array([[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [2, 3, 7, 6], [1, 2, 6, 5], [3, 0, 4, 7]])
    stand_in.answer = generate_answer(vertices=BOX_VERTICES * 0.9, faces=reduced, notes=("remeshed to quads",))
    bpy.ops.ed.undo_push(message="before")

    assert bpy.ops.image_to_3d.retopologize() == {"FINISHED"}
    options = stand_in.requests[-1]["options"]
    assert stand_in.requests[-1]["op"] == "generate"
    assert (options["faces"], options["quads"], options["texture"], options["field_id"]) == (500, True, 1024,
                                                                                              "field-abc")
    assert options["resolution"] == 64 and options["model"] == "triposr"

    new = bpy.data.objects[name]
    original = bpy.data.objects[f"{name} (original)"]
    assert new != original and bpy.context.active_object == new and new.select_get()
    assert [p.loop_total for p in new.data.polygons] == [4] * 6
    assert list(new.users_collection) == [folder] and new.parent == parent
    bpy.context.view_layer.update()
    assert np.allclose(np.array(new.matrix_world), np.array(world), atol=1e-6)
    assert child.parent == new and np.allclose(np.array(child.matrix_world), np.array(child_world), atol=1e-6)
    assert original.hide_get() and original.hide_render and not original.select_get()
    # the same placement as the original: both meshes overlap
    local = np.empty(len(new.data.vertices) * 3, dtype=np.float32)
    new.data.vertices.foreach_get("co", local)
    stored = original["image_to_3d"].to_dict()
    expected = BOX_VERTICES * 0.9 * stored["placement_scale"] - np.array(stored["placement_offset"])
    np.testing.assert_allclose(local.reshape(-1, 3), expected, atol=1e-6)
    stored_new = new["image_to_3d"].to_dict()
    assert (stored_new["faces"], stored_new["quads"], stored_new["texture"]) == (500, True, TEXTURE_W)
    assert stored_new["placement_offset"] == pytest.approx(stored["placement_offset"])
    assert bpy.data.images[name].packed_file is not None
    assert "original is kept hidden" in settings.last_info and settings.last_notes == "remeshed to quads"

    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert f"{name} (original)" not in bpy.data.objects
    restored = bpy.data.objects[name]
    assert len(restored.data.polygons) == len(BOX_FACES) and not restored.hide_get() and not restored.hide_render
    assert bpy.data.objects["Label"].parent == restored


def test_bake_and_retopologize_say_why_they_are_greyed_out(stand_in):
    bake = addon_module("operators.bake")
    retopo = addon_module("operators.retopologize")
    assert "Select an object" in bake.why_not(bpy.context)
    cube = bpy.data.objects.new("Cube", bpy.data.meshes.new("Cube"))
    bpy.context.scene.collection.objects.link(cube)
    bpy.context.view_layer.objects.active = cube
    assert bake.why_not(bpy.context) == "'Cube' was not made by Image to 3D"
    assert not bpy.ops.image_to_3d.bake_from_model.poll() and not bpy.ops.image_to_3d.retopologize.poll()

    obj = generate(stand_in, textured=False)
    settings = bpy.context.scene.image_to_3d
    assert bake.why_not(bpy.context) == ""
    assert "Set Faces or Texture" in retopo.why_not(bpy.context)
    settings.faces = 1000
    assert retopo.why_not(bpy.context) == ""

    image = bpy.data.images["input_rgba.png"]
    image.name = "renamed.png"
    assert "source image 'input_rgba.png' is not in this file" in bake.why_not(bpy.context)
    image.name = "input_rgba.png"

    stand_in.job = addon_module("backend.client").Job("busy", Path(tempfile.mkdtemp()))
    stand_in.job.state = "running"
    assert bake.why_not(bpy.context) == retopo.why_not(bpy.context) == "A generation is already running"
    stand_in.job = None

    addon_module("preferences").get(bpy.context).backend_python = "/nonexistent/python"
    assert "Backend Python not found" in bake.why_not(bpy.context)

    del obj["image_to_3d"]["field_id"]
    assert "older Image to 3D" in bake.why_not(bpy.context)


def test_bake_from_edit_mode_bakes_what_is_seen_and_returns_to_object_mode(stand_in):
    obj = generate(stand_in, textured=False)
    assert bpy.ops.object.mode_set(mode="EDIT") == {"FINISHED"}
    bm = bmesh.from_edit_mesh(obj.data)
    bmesh.ops.triangulate(bm, faces=bm.faces[:])  # only in the edit mesh so far
    bmesh.update_edit_mesh(obj.data)
    stand_in.answer = bake_answer()
    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}
    assert set(stand_in.requests[-1]["mesh"]["loop_totals"]) == {3}, "the edit-mode mesh was sent"
    assert obj.mode == "OBJECT" and obj.data.uv_layers.active is not None
    assert len(loop_uvs(obj.data, obj.data.uv_layers.active)) == len(stand_in.requests[-1]["mesh"]["corner_verts"])


def test_retopologize_of_an_object_deleted_meanwhile_changes_nothing(stand_in):
    obj = generate(stand_in, textured=False)
    bpy.context.scene.image_to_3d.faces = 500
    counts = (len(bpy.data.meshes), len(bpy.data.materials), len(bpy.data.images))
    answer = generate_answer()

    def delete_then_answer(request, output_dir):
        bpy.data.objects.remove(obj)
        return answer(request, output_dir)

    stand_in.answer = delete_then_answer
    with pytest.raises(RuntimeError, match="is gone"):
        bpy.ops.image_to_3d.retopologize()
    assert "Retopologize failed" in bpy.context.scene.image_to_3d.last_error
    assert len(bpy.data.objects) == 0
    assert (len(bpy.data.meshes), len(bpy.data.materials), len(bpy.data.images)) == counts
