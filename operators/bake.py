"""Bake from Model: a colour texture for the active object's current mesh, from the field of the model that
made it.

The artist may have edited the object (decimated, subdivided, sculpted, unwrapped it by hand): its mesh as it
is now (the mesh data, not the modifier result) goes to the worker in the backend's frame, with its active
UV map when it has one. The colours come from the model's field, never from the old vertex colours. The
backend keeps each generation's field cached under the ``field_id`` stored on the object and recomputes it
from the source image and the stored settings when it is gone.
"""

from __future__ import annotations

import os

import bpy
import numpy as np

from .. import import_mesh
from ..backend.client import mesh_arrays
from ..backend.options import DEFAULT_BAKE_SIZE
from . import jobs, results
from .job_options import stored_job_options

MESH_FILE = "bake_mesh.npz"


def bake_size(settings, stored: dict) -> int:
    """The panel's Texture size; else the size the object was textured at; else 1024."""
    if settings.texture != "NONE":
        return int(settings.texture)
    return int(stored.get("texture") or DEFAULT_BAKE_SIZE)


def why_not(context) -> str:
    reason = jobs.generated_object_problem(context)
    if reason:
        return reason
    if not context.active_object.data.polygons:
        return f"'{context.active_object.name}' has no faces to bake onto"
    return ""


def write_mesh_file(obj, stored: dict, uv_map, folder: str) -> str:
    """The object's mesh data as the worker's bake request wants it (see ``mesh_arrays.bake_request``)."""
    mesh = obj.data
    positions = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.attributes["position"].data.foreach_get("vector", positions)
    corner_verts = np.empty(len(mesh.loops), dtype=np.int32)
    mesh.loops.foreach_get("vertex_index", corner_verts)
    loop_totals = np.empty(len(mesh.polygons), dtype=np.int32)
    mesh.polygons.foreach_get("loop_total", loop_totals)
    uvs = None
    if uv_map is not None:
        uvs = np.empty(len(mesh.loops) * 2, dtype=np.float32)
        uv_map.data.foreach_get("uv", uvs)
    scale, offset = import_mesh.stored_placement(stored)
    arrays = mesh_arrays.bake_request(positions, corner_verts, loop_totals, scale, offset, uvs)
    path = os.path.join(folder, MESH_FILE)
    np.savez(path, **arrays)
    return path


class IMAGE_TO_3D_OT_bake_from_model(jobs.JobOperator, bpy.types.Operator):
    """Bake a colour texture onto the active object's current mesh from the model that made it (no vertex \
colours involved). Its active UV map is used; a mesh without one gets new UVs. The texture size is the \
Output's Texture"""

    bl_idname = "image_to_3d.bake_from_model"
    bl_label = "Bake from Model"
    reason = staticmethod(why_not)

    def execute(self, context):
        obj = context.active_object
        # Bake what the artist sees: edit-mode changes reach the mesh data on leaving (the texture arrives in
        # Object Mode anyway).
        if not results.to_object_mode(obj):
            self.report({"ERROR"}, f"'{obj.name}' could not leave {obj.mode.title()} Mode")
            return {"CANCELLED"}
        stored = import_mesh.stored_settings(obj)
        size = bake_size(context.scene.image_to_3d, stored)
        options = dict(stored_job_options(stored, context), texture=size)
        image = bpy.data.images[stored["image"]]
        uv_map = obj.data.uv_layers.active
        info = {
            "on_done": apply_bake,
            "undo": "Bake from Model",
            "failure": ("Bake failed", "Bake from Model again (the object must keep its faces meanwhile)"),
            "object": obj.name,
            "uv_map": uv_map.name if uv_map is not None else None,
            "loops": len(obj.data.loops),
        }

        def submit(worker, staging):
            mesh_path = write_mesh_file(obj, stored, uv_map, staging)
            return worker.submit(results.image_file_for_worker(image, staging), options, op="bake", mesh=mesh_path)

        return jobs.begin_job(self, context, submit, info)


def apply_bake(scene, info, job) -> str:
    """Put the baked texture on the object: a packed image named after it, Image Texture -> Base Color; the
    returned UVs become a new UV map if the mesh had none. Checked first: the object is still there, with
    the mesh that was baked."""
    obj = bpy.data.objects.get(info["object"])
    if obj is None or obj.type != "MESH":
        raise RuntimeError(f"'{info['object']}' is gone (deleted or renamed while baking)")
    with np.load(job.result_path) as data:
        texture, uvs = data["texture"], data["uvs"]
    if not results.to_object_mode(obj):
        raise RuntimeError(f"'{obj.name}' could not leave {obj.mode.title()} Mode")
    mesh = obj.data
    if len(mesh.loops) != info["loops"] or len(uvs) != len(mesh.loops):
        raise RuntimeError(f"the mesh of '{obj.name}' changed while baking")
    uv_name, new_uv = info["uv_map"], None
    if uv_name is not None and mesh.uv_layers.get(uv_name) is None:
        raise RuntimeError(f"the UV map '{uv_name}' of '{obj.name}' is gone")

    image = import_mesh.texture_image(obj.name, texture)
    previous = texture_image_of(obj)
    try:
        if uv_name is None:
            new_uv = import_mesh.add_uv_map(mesh, uvs)
            uv_name = new_uv.name
        import_mesh.use_texture(obj, image, uv_name)
    except Exception:
        if new_uv is not None:
            mesh.uv_layers.remove(new_uv)
        import_mesh.discard(image)
        raise
    if previous is not None and previous != image and previous.users == 0:
        # The texture it replaces: nothing uses it any more. Undo brings it back.
        bpy.data.images.remove(previous)
        image.name = obj.name
    stored = obj[import_mesh.SETTINGS_KEY]
    stored["texture"] = int(texture.shape[1])
    if job.stats.get("field_id"):
        stored["field_id"] = str(job.stats["field_id"])
    height, width = texture.shape[:2]
    return (f"{obj.name}: baked a {width}×{height} texture in {results.seconds_since(info)}"
            + (" onto new UVs" if new_uv is not None else f" through UV map '{uv_name}'"))


def texture_image_of(obj):
    material = obj.active_material
    node = material.node_tree.nodes.get(import_mesh.TEXTURE_NODE) if material and material.node_tree else None
    return node.image if node is not None else None


CLASSES = (IMAGE_TO_3D_OT_bake_from_model,)
register, unregister = bpy.utils.register_classes_factory(CLASSES)
