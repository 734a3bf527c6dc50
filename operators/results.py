"""Turning a job's input and result into Blender data: the image file the backend reads, the generated object
(whole or not at all), and a batch's objects in a row in their own collection.

May import the root modules (import_mesh, properties) and ``backend.client``; never ``jobs`` or an operator.
"""

from __future__ import annotations

import os
import time

import bpy

from .. import import_mesh, properties
from ..backend.client import png

READABLE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# What shapes a generation's field: sent again (as stored on the object) when it is re-baked or retopologized.
FIELD_SETTINGS = ("model", "resolution", "threshold", "foreground_ratio", "remove_background", "source_size",
                  "steps", "guidance", "seed")


def image_file_for_worker(image: bpy.types.Image, job_dir: str) -> str:
    """A file the worker can read: the image's own file when it is one, else its pixels saved as PNG."""
    if image.source == "FILE" and not image.packed_file:
        path = bpy.path.abspath(image.filepath, library=image.library)
        if os.path.isfile(path) and os.path.splitext(path)[1].lower() in READABLE_SUFFIXES:
            return os.path.abspath(path)
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"image '{image.name}' has no pixels")
    pixels = bpy_image_pixels(image, width, height)
    path = os.path.join(job_dir, "input.png")
    png.write_pixels(path, pixels, width, height, linear=image.is_float)
    return path


def bpy_image_pixels(image, width, height):
    import numpy as np

    pixels = np.empty(width * height * image.channels, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    if image.channels != 4:  # grey or RGB buffers: expand to RGBA
        pixels = pixels.reshape(-1, image.channels)
        rgba = np.ones((len(pixels), 4), dtype=np.float32)
        rgba[:, :3] = pixels[:, :3] if image.channels >= 3 else pixels[:, :1]
        pixels = rgba
    return pixels


def input_file(path: str, staging: str) -> str:
    """A file the worker can read: the image file itself, or (EXR and other formats only Blender reads) its
    pixels saved as PNG through a temporary image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a file: {path}")
    if os.path.splitext(path)[1].lower() in READABLE_SUFFIXES:
        return os.path.abspath(path)
    image = bpy.data.images.load(path, check_existing=False)
    try:
        return image_file_for_worker(image, staging)
    finally:
        bpy.data.images.remove(image)


def seconds_since(info) -> str:
    return f"{time.monotonic() - info['started']:.1f} s"


def import_result(scene, info, job, collection=None, where=None) -> str:
    """The object (and, from a multi-view model, its views image), added whole or not at all: in
    ``collection`` (else the active one), at ``where(mesh)`` (else the 3D cursor)."""
    settings = info["settings"]
    stem = os.path.splitext(settings["image"] or "Generated")[0]
    views = import_mesh.keep_views(job.views_path, f"{stem} views") if job.views_path else None
    try:
        obj = add_result_object(scene, info, job, stem, views, collection, where)
    except Exception:
        import_mesh.discard(views)
        raise
    return (f"{obj.name}: {job.stats.get('vertices')} vertices, {job.stats.get('faces')} faces"
            f" in {seconds_since(info)}"
            f" (model {'reused' if job.stats.get('model_cache') == 'hit' else 'loaded'})"
            + (f"; views in image '{views.name}'" if views is not None else ""))


def result_settings(settings: dict, job, place, image=None) -> dict:
    """What is stored on the object: the settings used (None dropped: ID properties cannot hold it), the
    texture size it has (what came back, which Bake from Model reuses), the key of the field the backend
    cached, and the placement that maps its frame to the object's."""
    stored = {k: v for k, v in settings.items() if v is not None and k != "texture"}
    # What the backend says it used is the truth (a model folder's own config can differ from the catalog's
    # defaults): sent again, these give the same field when the cache has lost it.
    stored.update({k: job.stats[k] for k in FIELD_SETTINGS if job.stats.get(k) is not None})
    if image is not None:
        stored["texture"] = int(image.size[0])
    if job.stats.get("field_id"):
        stored["field_id"] = str(job.stats["field_id"])
    if job.stats.get("views"):
        stored["colour_views"] = properties.views_summary(job.stats)
    scale, offset = place
    stored["placement_scale"] = float(scale)
    stored["placement_offset"] = [float(x) for x in offset]
    return stored


def result_mesh(name: str, job, settings: dict, place=None):
    """The worker's result as a mesh (and its texture image, when textured), nothing left over on failure."""
    result = import_mesh.load_npz(job.result_path)
    mesh, place = import_mesh.build_mesh(name, result["vertices"], result["faces"], result["colors"],
                                         target_height=settings.get("target_height", 0.0),
                                         smooth=settings.get("smooth_shading", True), uvs=result["uvs"],
                                         place=place)
    image = None
    if result["texture"] is not None:
        try:
            image = import_mesh.texture_image(name, result["texture"])
        except Exception:
            import_mesh.discard(mesh)
            raise
    return mesh, image, place


def add_result_object(scene, info, job, stem, views, collection=None, where=None):
    settings = info["settings"]
    mesh, image, place = result_mesh(settings["image"] or "Generated", job, settings)
    view_layer = result_view_layer(scene, info)
    if collection is None:
        collection = active_collection(scene, view_layer)
    stored = result_settings(settings, job, place, image)
    if views is not None:
        stored["views_image"] = views.name
    try:
        location = where(mesh) if where is not None else None
        return import_mesh.add_object(scene, view_layer, collection, f"{stem} 3D", mesh, stored, image,
                                      location=location)
    except Exception:
        import_mesh.discard(image, mesh)
        raise


def result_view_layer(scene, info):
    return scene.view_layers.get(info["view_layer"]) or scene.view_layers[0]


def active_collection(scene, view_layer):
    """Where a new object goes: the active collection when Blender shows this scene and view layer (its
    active object is put in Object Mode first), else the scene's own collection."""
    context = bpy.context
    if context.scene != scene or context.view_layer != view_layer:
        return scene.collection
    if context.object is not None:
        to_object_mode(context.object)
    return context.view_layer.active_layer_collection.collection


def to_object_mode(obj) -> bool:
    """Put ``obj`` in Object Mode (from Edit, Sculpt, Paint…), so that new data goes in: edit-mode data would
    overwrite it on leaving. Returns whether it is in Object Mode now."""
    if obj.mode == "OBJECT":
        return True
    try:
        with bpy.context.temp_override(active_object=obj, object=obj):
            bpy.ops.object.mode_set(mode="OBJECT")
    except (RuntimeError, TypeError):
        pass
    return obj.mode == "OBJECT"




# ------------------------------------------------------------------------------------------------ a batch's row

GAP = 0.1  # between two neighbours of the row, as a fraction of the wider one


class Row:
    """Objects side by side along +X from where the first one stands (the 3D cursor)."""

    def __init__(self):
        self.origin = None  # where the first object stands
        self.end = 0.0  # world X of the last object's +X side
        self.width = 0.0  # the last object's width

    def place(self, cursor, low: float, high: float) -> tuple:
        """Where the next object goes, spanning [low, high] along its local X (taken with ``add``)."""
        if self.origin is None:
            return tuple(cursor)
        gap = GAP * max(self.width, high - low)
        return (self.end + gap - low, self.origin[1], self.origin[2])

    def add(self, location, low: float, high: float) -> None:
        if self.origin is None:
            self.origin = tuple(location)
        self.end, self.width = location[0] + high, high - low


def import_item(run, scene, info: dict, job) -> str:
    """The object of one image, in the batch's collection, next in the row; with its source image in the file
    (Bake from Model and Retopologize need it). Nothing is left over if a step fails."""
    view_layer = result_view_layer(scene, info)
    parent = active_collection(scene, view_layer)
    count = len(bpy.data.images)
    image = bpy.data.images.load(info["path"], check_existing=True)
    new_image = image if len(bpy.data.images) > count else None
    collection, new_collection = batch_collection(run, scene, parent)
    spans = {}

    def where(mesh):
        spans["x"] = import_mesh.x_range(mesh)
        spans["at"] = run.row.place(scene.cursor.location, *spans["x"])
        return spans["at"]

    try:
        line = import_result(scene, dict(info, settings=dict(info["settings"], image=image.name)), job,
                                      collection, where)
    except Exception:
        import_mesh.discard(new_collection, new_image)
        raise
    if image.users == 0:  # the object names it, which is no user: keep it when the file is saved
        image.use_fake_user = True
    run.row.add(spans["at"], *spans["x"])
    run.collection = collection.name
    run.imported.append(info["path"])
    return line


def batch_collection(run, scene, parent):
    """The batch's collection and, when it was made now, the same again (else None)."""
    existing = bpy.data.collections.get(run.collection) if run.collection else None
    if existing is not None and existing in scene.collection.children_recursive:
        return existing, None
    collection = bpy.data.collections.new(run.name)
    try:
        parent.children.link(collection)
    except Exception:
        bpy.data.collections.remove(collection)
        raise
    return collection, collection
