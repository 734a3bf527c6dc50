"""A batch of images: Generate 3D for each, one after another, in the session's warm worker.

A queue on the Blender side: the tick that ends one image's job starts the next one (``then`` in
``generate.tick``), so the worker keeps its model loaded from one image to the next. The objects stand in a
row along +X from the 3D cursor, each clear of the previous one's bounds, in a new collection named after the
batch that is made with the first object (a batch in which every image fails leaves no empty collection).

- Undo: each imported object is its own undo step, as a single Generate 3D is: Ctrl+Z removes the last
  object (the first one's step also holds the new collection). The user may keep working while a batch runs,
  and a step per object never undoes their work done in between.
- A failed image is listed with its reason (kept until the next Generate 3D) and the batch goes on.
- Cancel stops the job in flight and drops the images not started; the objects made so far stay.

The batch is module state (like the session's worker), not scene data: undo and file loads leave it alone.
"""

from __future__ import annotations

import functools
import os

import bpy

from .. import import_mesh
from ..backend.client import CANCELLED
from . import generate

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


class Batch:
    """One run over a list of image files; names and plain values only (never bpy structs)."""

    def __init__(self, paths, name: str, scene: str, view_layer: str, options: dict, settings: dict):
        self.paths = list(paths)
        self.name = name  # of the collection it makes
        self.scene, self.view_layer = scene, view_layer
        self.options = options  # sent for every image
        self.settings = settings  # stored on every object, with its image
        self.index = -1  # the image in flight
        self.imported: list[str] = []  # paths of the images made into objects
        self.failures: list[tuple[str, str]] = []  # (file name, reason)
        self.collection = ""  # its name once made (Blender may suffix it)
        self.row = Row()
        self.cancelled = False
        self.running = True

    @property
    def total(self) -> int:
        return len(self.paths)

    @property
    def position(self) -> int:
        """The image in flight, counted from 1: "image <position> of <total>"."""
        return self.index + 1

    def summary(self) -> str:
        """E.g. "3 of 4 imported, 1 failed" or "1 of 3 imported, 2 cancelled"."""
        parts = [f"{len(self.imported)} of {self.total} imported"]
        if self.failures:
            parts.append(f"{len(self.failures)} failed")
        left = self.total - len(self.imported) - len(self.failures)
        if left:
            parts.append(f"{left} cancelled")
        return ", ".join(parts)


_run: Batch | None = None  # the batch in flight, or the last one (its failures stay listed)


def current() -> Batch | None:
    return _run


def running() -> bool:
    return _run is not None and _run.running


def forget() -> None:
    """Drop the last batch's outcome (the next Generate 3D, disabling the add-on)."""
    global _run
    _run = None


def cancel() -> None:
    """Start no further image; the caller cancels the job in flight."""
    if running():
        _run.cancelled = True


def begin(operator, context, paths, name: str, options: dict, settings: dict) -> set:
    """Start a batch (Generate 3D's execute when several images are chosen); in background mode, run it to its
    end unless the caller drives the timers."""
    global _run
    generate.clear_outcome(context.scene.image_to_3d)
    _run = run = Batch(paths, name or "Batch", context.scene.name, context.view_layer.name, options, settings)
    advance(run)
    if run.running and generate.blocks(operator):
        generate.run_ticks()
    if run.running:
        return {"FINISHED"}
    for file_name, reason in run.failures:
        operator.report({"WARNING"}, f"{file_name}: {reason}")
    if not run.imported:
        operator.report({"ERROR"}, run.summary())
        return {"CANCELLED"}
    operator.report({"WARNING"} if run.failures else {"INFO"}, run.summary())
    return {"FINISHED"}


def advance(run: Batch) -> None:
    """Start the next image. One that cannot start is listed as failed and the next is tried; the batch ends
    when none is left, it was cancelled, or its scene is gone."""
    while not run.cancelled and run.index + 1 < run.total:
        scene = bpy.data.scenes.get(run.scene)
        if scene is None:
            break
        run.index += 1
        path = run.paths[run.index]
        view_layer = scene.view_layers.get(run.view_layer) or scene.view_layers[0]
        try:
            generate.start_job(scene, view_layer, functools.partial(submit, run, path), item_info(run, path))
            return
        except (OSError, ValueError, RuntimeError) as exc:
            run.failures.append((os.path.basename(path), str(exc)))
    end(run)


def end(run: Batch) -> None:
    """The batch's line in the panel: an error only when nothing was imported because images failed."""
    run.running = False
    scene = bpy.data.scenes.get(run.scene)
    if scene is None:
        return
    settings = scene.image_to_3d
    if not run.imported and run.failures:
        settings.last_error = run.summary()
        settings.last_hint = "Each image's reason is listed above"
    else:
        settings.last_info = run.summary()


def item_info(run: Batch, path: str) -> dict:
    name = os.path.basename(path)
    return {
        "on_done": functools.partial(import_item, run),
        "undo": f"Generate 3D ({name}, {run.position} of {run.total})",
        "settings": dict(run.settings, image=name),
        "path": path,
        "on_failure": lambda message, hint: run.failures.append((name, message)),
        "then": functools.partial(after_item, run),
    }


def after_item(run: Batch, state: str) -> None:
    if state == CANCELLED:  # by Cancel, or the worker was stopped: the rest of the queue goes too
        run.cancelled = True
    advance(run)


def submit(run: Batch, path: str, worker, staging: str):
    return worker.submit(input_file(path, staging), run.options)


def input_file(path: str, staging: str) -> str:
    """A file the worker can read: the image file itself, or (EXR and other formats only Blender reads) its
    pixels saved as PNG through a temporary image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a file: {path}")
    if os.path.splitext(path)[1].lower() in generate.READABLE_SUFFIXES:
        return os.path.abspath(path)
    image = bpy.data.images.load(path, check_existing=False)
    try:
        return generate.image_file_for_worker(image, staging)
    finally:
        bpy.data.images.remove(image)


def import_item(run: Batch, scene, info: dict, job) -> str:
    """The object of one image, in the batch's collection, next in the row; with its source image in the file
    (Bake from Model and Retopologize need it). Nothing is left over if a step fails."""
    view_layer = generate.result_view_layer(scene, info)
    parent = generate.active_collection(scene, view_layer)
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
        line = generate.import_result(scene, dict(info, settings=dict(info["settings"], image=image.name)), job,
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


def batch_collection(run: Batch, scene, parent):
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
