"""Retopologize: make the active object again from the same field with the panel's Output settings.

A generate request with the settings stored on the object, its ``field_id`` and the panel's Faces / Quads /
Texture: the backend reuses the cached field (no encoding; it recomputes the field from the source image
when the cache no longer holds it), extracts the surface again and reduces / remeshes / textures it. The new
object takes the old one's place; the old one is kept, hidden, so nothing the artist did to it is lost.
"""

from __future__ import annotations

import bpy

from .. import import_mesh, properties
from . import jobs, results
from .job_options import stored_job_options

ORIGINAL_SUFFIX = " (original)"


def why_not(context) -> str:
    reason = jobs.generated_object_problem(context)
    if reason:
        return reason
    settings = context.scene.image_to_3d
    problem = properties.faces_problem(settings)
    if problem:
        return problem
    if not settings.faces and settings.texture == "NONE":
        return "Set Faces or Texture under Output first (as extracted, untextured, it would come out the same)"
    return ""


class IMAGE_TO_3D_OT_retopologize(jobs.JobOperator, bpy.types.Operator):
    """Make the active object again from its model's field with the Output settings (Faces, Quads, Texture), \
without running the model again. The new object takes its place, name, transform and collections; the old \
one is kept, hidden in viewport and render, as "<name> (original)". One undo restores it"""

    bl_idname = "image_to_3d.retopologize"
    bl_label = "Retopologize"
    reason = staticmethod(why_not)

    def execute(self, context):
        obj = context.active_object
        stored = import_mesh.stored_settings(obj)
        output = properties.output_options(context.scene.image_to_3d)
        options = dict(stored_job_options(stored, context), **output)
        image = bpy.data.images[stored["image"]]
        info = {
            "on_done": replace_object,
            "undo": "Retopologize",
            "failure": ("Retopologize failed", "The object is unchanged; Retopologize again"),
            "object": obj.name,
            "settings": dict(stored, **output),  # the result's settings: None drops an old budget or texture
        }
        return jobs.begin_job(self, context, lambda worker, staging: worker.submit(
            results.image_file_for_worker(image, staging), options), info)


def replace_object(scene, info, job) -> str:
    """The new object where the old one was (same name, transform, parent, collections, children); the old one
    renamed "<name> (original)" and hidden. Its mesh is placed with the old placement, so both overlap
    exactly. Nothing changes if any step fails."""
    old = bpy.data.objects.get(info["object"])
    if old is None:
        raise RuntimeError(f"'{info['object']}' is gone (deleted or renamed while retopologizing)")
    if not results.to_object_mode(old):
        raise RuntimeError(f"'{old.name}' could not leave {old.mode.title()} Mode")
    settings = info["settings"]
    name = old.name
    mesh, image, place = results.result_mesh(name, job, settings, import_mesh.stored_placement(settings))
    view_layer = scene.view_layers.get(info["view_layer"]) or scene.view_layers[0]
    new = None
    old.name = name + ORIGINAL_SUFFIX  # frees the name for the new object
    try:
        new = import_mesh.new_object(name, mesh, results.result_settings(settings, job, place, image), image)
        new.rotation_mode = old.rotation_mode
        new.parent = old.parent
        new.parent_type, new.parent_bone = old.parent_type, old.parent_bone
        new.matrix_parent_inverse = old.matrix_parent_inverse.copy()
        new.matrix_basis = old.matrix_basis.copy()
        import_mesh.link_selected(new, view_layer, list(old.users_collection) or [scene.collection])
        for child in list(old.children):
            child.parent = new  # same transform as the old parent: the child stays where it is
    except Exception:
        for child in list(new.children) if new is not None else ():
            child.parent = old
        import_mesh.discard(new, *mesh.materials, image, mesh)
        old.name = name
        raise
    hide(old, scene)
    faces = job.stats.get("faces")
    return (f"{new.name}: {faces} faces in {results.seconds_since(info)}; the original is kept hidden as "
            f"'{old.name}'")


def hide(obj, scene) -> None:
    """Hidden in the viewport (the eye, in every view layer it is in) and in renders."""
    obj.hide_render = True
    for view_layer in scene.view_layers:
        if obj.name in view_layer.objects:
            obj.select_set(False, view_layer=view_layer)
            obj.hide_set(True, view_layer=view_layer)


CLASSES = (IMAGE_TO_3D_OT_retopologize,)
register, unregister = bpy.utils.register_classes_factory(CLASSES)
