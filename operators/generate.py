"""Generate 3D: send the image to the worker, follow the job from a timer, import the result.

``execute()`` starts the job and registers ``TIMERS[job_id]`` (a ``bpy.app.timers`` callback). Each tick
polls the client (never blocks), copies the progress into the panel, and on completion hands the result to
the job's ``on_done`` on the main thread and pushes one undo step. In background mode (scripts, tests,
``make demo``) timers never fire, so ``execute()`` runs the same ticks itself until the job is done.
Bake from Model and Retopologize (their own files) start their jobs through :func:`begin_job` and share
this timer, progress, cancel and error handling; a batch of images (``batch.py``) runs one job after
another through :func:`start_job`.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time

import bpy
from bpy.props import BoolProperty

from .. import catalog, environment, import_mesh, preferences, properties, session
from ..backend.client import CANCELLED, DONE
from ..core import png
from . import batch

TICK_S = 0.1
READABLE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}

# What to do about an error, when the backend did not say more.
DEFAULT_HINTS = {
    "weights": "Check the Model Folder in the add-on preferences: it must hold the model's files",
    "bad_input": "Check the image and the generation settings",
    "internal": "The backend's log (Blender's console) has the details",
}
# Hints the backend words for its command line, said the Blender way.
BLENDER_HINTS = {
    "licence_not_accepted": "Accept the licence with the Accept Licence button in the Image to 3D panel (or in "
                            "the add-on preferences); it is remembered",
}

TIMERS: dict = {}  # job id -> the registered timer function
JOBS: dict = {}  # job id -> what the tick needs (names, never bpy structs)


def temp_root() -> str:
    """Job folders live under Blender's session temp folder (removed when Blender exits)."""
    return os.path.join(bpy.app.tempdir or tempfile.gettempdir(), "image_to_3d")


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


def model_folder(weights_dir: str, model: str) -> str | None:
    """The Model Folder preference for this model: its sub-folder named like the model id, or the folder
    itself when it holds the model's files. None lets the backend search the model store, then the Hugging
    Face cache (so a Model Folder holding only some models does not hide the others)."""
    if not weights_dir:
        return None
    folder = catalog.user_folder_for(model, bpy.path.abspath(weights_dir))
    return os.path.abspath(folder) if folder is not None else None


def job_options(settings, prefs) -> dict:
    """What the worker is sent: None where the model's own default applies, nothing the model cannot use
    (the backend refuses those)."""
    device = job_device(settings, prefs)
    options = {
        "model": settings.model,
        "weights": model_folder(prefs.weights_dir if prefs else "", settings.model),
        "resolution": int(settings.resolution) if settings.use_custom_resolution else None,
        "foreground_ratio": round(float(settings.foreground_ratio), 4) if settings.use_custom_foreground_ratio
        else None,
        "remove_background": bool(settings.remove_background),
        "device": device,
    }
    if catalog.uses_threshold(settings.model):
        options["threshold"] = round(float(settings.threshold), 6) if settings.use_custom_threshold else None
    if catalog.draws_views(settings.model):
        options.update(steps=int(settings.steps), guidance=round(float(settings.guidance), 4), seed=int(settings.seed))
    else:
        options["source_size"] = int(settings.source_size) or None
    options.update(properties.output_options(settings))
    return options


def job_device(settings, prefs) -> str:
    return settings.device if settings.device != "DEFAULT" else (prefs.device if prefs else "auto")


# What shapes a generation's field: sent again (as stored on the object) when it is re-baked or retopologized.
FIELD_SETTINGS = ("model", "resolution", "threshold", "foreground_ratio", "remove_background", "source_size",
                  "steps", "guidance", "seed")


def stored_job_options(stored: dict, context) -> dict:
    """A request's options from the settings stored on a generated object. Where the weights are and which
    device runs them are this machine's, from the preferences and the panel now (a file made on a GPU machine
    can be re-baked on a laptop); everything that shapes the field is the object's."""
    settings, prefs = context.scene.image_to_3d, preferences.get(context)
    options = {name: stored[name] for name in FIELD_SETTINGS if name in stored}
    options["weights"] = model_folder(prefs.weights_dir if prefs else "", options.get("model", ""))
    options["device"] = job_device(settings, prefs)
    if stored.get("field_id"):
        options["field_id"] = str(stored["field_id"])
    return options


def backend_problem(context) -> str:
    """Why no job can start now ('' when one can): one at a time, and a backend to run it."""
    if getattr(context.scene, "image_to_3d", None) is None:
        return "No scene"
    if session.is_busy() or batch.running():
        return "A generation is already running"
    return preferences.backend_problem(context)  # Local: its Python; Remote: the server's URL, online access


def licence_problem(model_id: str) -> str:
    if catalog.licence_pending(model_id):
        spec = catalog.spec(model_id)
        return f"Accept the {spec.licence} licence of {spec.display_name} first (Accept Licence, in this panel)"
    return ""


def why_not(context) -> str:
    """Why Generate 3D cannot run now ('' when it can)."""
    settings = getattr(context.scene, "image_to_3d", None)
    if settings is None:
        return "No scene"
    if session.is_busy() or batch.running():
        return "A generation is already running"
    if settings.image is None and not settings.batch:
        return "Choose an image first"
    return (licence_problem(settings.model) or properties.faces_problem(settings) or backend_problem(context))


def generated_object_problem(context) -> str:
    """Why the active object cannot be re-baked or retopologized ('' when it can): Image to 3D made it, its
    field can be found again, and its source image is in this file (the field is recomputed from it when the
    backend's cache no longer holds it)."""
    obj = context.active_object
    if obj is None:
        return "Select an object made by Image to 3D"
    stored = import_mesh.stored_settings(obj)
    if stored is None or obj.type != "MESH":
        return f"'{obj.name}' was not made by Image to 3D"
    if not stored.get("field_id") or import_mesh.stored_placement(stored) is None:
        return f"'{obj.name}' was made by an older Image to 3D: generate it again"
    image_name = stored.get("image", "")
    if not image_name or bpy.data.images.get(image_name) is None:
        return f"Its source image '{image_name}' is not in this file"
    return licence_problem(stored.get("model", "")) or backend_problem(context)


class JobOperator:
    """What Generate 3D, Bake from Model and Retopologize share: the undo step comes with the result (not now),
    a switch for background mode, and a poll that says why it cannot run (``reason(context)``, '' when it can)."""

    bl_options = {"REGISTER"}

    run_async: BoolProperty(
        name="Return at Once", default=False, options={"HIDDEN", "SKIP_SAVE"},
        description="In background mode, return while the job runs (the caller drives the timer)")

    @classmethod
    def poll(cls, context):
        reason = cls.reason(context)
        if reason:
            cls.poll_message_set(reason)
        return not reason


class IMAGE_TO_3D_OT_generate(JobOperator, bpy.types.Operator):
    """Reconstruct a coloured mesh from the image (or from each image of the batch, one after another) \
with the chosen model, in a background process"""

    bl_idname = "image_to_3d.generate"
    bl_label = "Generate 3D"
    reason = staticmethod(why_not)

    def execute(self, context):
        settings = context.scene.image_to_3d
        batch.forget()  # the last batch's list of failed images goes with the next Generate
        options = job_options(settings, preferences.get(context))
        if settings.batch:
            paths = [bpy.path.abspath(item.filepath) for item in settings.batch]
            return batch.begin(self, context, paths, settings.batch_name, options,
                               generation_settings(settings, options))
        image = settings.image
        info = {
            "on_done": import_result,
            "undo": "Generate 3D",
            "settings": dict(generation_settings(settings, options), image=image.name),
        }
        return begin_job(self, context, lambda worker, staging: worker.submit(
            image_file_for_worker(image, staging), options), info)


def generation_settings(settings, options: dict) -> dict:
    """What is stored on a generated object, but its image: the values sent, the model's defaults where None
    was sent (the result's own report of what it used replaces these, see result_settings)."""
    return dict(properties.effective(settings), **{k: v for k, v in options.items() if v is not None},
                smooth_shading=bool(settings.smooth_shading), target_height=float(settings.target_height))


def begin_job(operator, context, submit, info: dict) -> set:
    """Start a job and follow it from a timer (or, in background mode, to its end unless ``run_async``).

    ``submit(worker, staging_dir)`` sends the request and returns the Job. ``info`` holds names and plain
    values only (never bpy structs, which undo and file loads invalidate), ``on_done(scene, info, job)``,
    which turns the result into Blender data and returns the line the panel shows, ``undo``, the name of
    the undo step it makes, and optionally ``failure``: (what failed, hint) when ``on_done`` raises. A batch's
    jobs (``start_job``) also have ``on_failure(message, hint)``, which takes the place of the panel's error,
    and ``then(state)``, called when the job has ended, which starts the next image."""
    settings = context.scene.image_to_3d
    clear_outcome(settings)
    try:
        job = start_job(context.scene, context.view_layer, submit, info)
    except (OSError, ValueError, RuntimeError) as exc:
        settings.last_error = str(exc)
        settings.last_hint = START_HINT
        operator.report({"ERROR"}, settings.last_error)
        return {"CANCELLED"}

    if blocks(operator):
        run_ticks()
        if settings.last_error:
            operator.report({"ERROR"}, f"{settings.last_error} ({settings.last_hint})" if settings.last_hint
                            else settings.last_error)
            return {"CANCELLED"}
        if job.state != DONE:
            return {"CANCELLED"}
        operator.report({"INFO"}, settings.last_info)
    return {"FINISHED"}


START_HINT = "Check the image and the backend Python in the add-on preferences"


def clear_outcome(settings) -> None:
    settings.last_error = settings.last_hint = settings.last_info = settings.last_notes = ""


def start_job(scene, view_layer, submit, info: dict):
    """Submit a job to the session's worker (started if needed) and register the timer that follows it.
    Raises OSError, ValueError or RuntimeError when it cannot start, leaving nothing behind."""
    context = bpy.context
    staging = None
    try:
        worker = session.backend_for(preferences.remote_server(context), preferences.backend_python(context),
                                     temp_root(), env=environment.process_env(preferences.get(context)))
        os.makedirs(worker.temp_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="input-", dir=worker.temp_dir)
        job = submit(worker, staging)
    except (OSError, ValueError, RuntimeError):
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    JOBS[job.id] = dict(info, scene=scene.name, view_layer=view_layer.name, staging=staging,
                        started=time.monotonic())
    TIMERS[job.id] = functools.partial(tick, job.id)
    # persistent: the job is still followed (and its worker cleaned up) if another file is opened meanwhile
    bpy.app.timers.register(TIMERS[job.id], first_interval=TICK_S, persistent=True)
    return job


def blocks(operator) -> bool:
    """Background mode runs the job to its end inside the operator, unless the caller drives the timer."""
    return bpy.app.background and not getattr(operator, "run_async", False)


def run_ticks() -> None:
    """Timers never fire in background mode: run the same ticks here until no job is followed (a batch
    starts its next job from the tick that ends the previous one)."""
    while TIMERS:
        timer = next(iter(TIMERS.values()))
        while timer() is not None:
            time.sleep(0.02)
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)


def seconds_since(info) -> str:
    return f"{time.monotonic() - info['started']:.1f} s"


def tick(job_id: str):
    """One step of the job on the main thread. Returns the delay to the next tick, or None when done."""
    info = JOBS.get(job_id)
    worker = session.current()
    job = worker.job if worker is not None else None
    if info is None or job is None or job.id != job_id:  # its worker was stopped or replaced
        finish(job_id)
        if info and info.get("then"):
            info["then"](CANCELLED)
        return None
    worker.poll()
    scene = bpy.data.scenes.get(info["scene"])
    settings = scene.image_to_3d if scene else None
    redraw_panels()
    if not job.finished:
        return TICK_S
    try:
        if settings is None:
            pass  # the scene was deleted meanwhile: nothing to import into
        elif job.state == DONE:
            settings.last_info = info["on_done"](scene, info, job)
            settings.last_notes = "\n".join(str(note) for note in job.stats.get("notes") or ())
            bpy.ops.ed.undo_push(message=info["undo"])
        elif job.state == CANCELLED:
            settings.last_info = "Cancelled"
            session.stop()  # a cancelled job leaves no worker behind (and frees its memory)
        else:
            code = job.error.get("code")
            failed(settings, info, job.error["message"],
                   BLENDER_HINTS.get(code) or job.error.get("hint") or DEFAULT_HINTS.get(code, ""))
            print(f"Image to 3D: {job.error['code']}: {job.error['message']}\n--- backend log ---\n"
                  f"{worker.log_tail(40)}\n---")
    except Exception as exc:  # noqa: BLE001 - an import failure must reach the panel, not the console only
        if settings is None:
            raise
        what, hint = info.get("failure", ("Import failed", "The generated file could not be turned into a mesh"))
        failed(settings, info, f"{what}: {exc}", hint)
    finally:
        job.cleanup()
        finish(job_id)
        if info.get("then"):  # a batch goes on with its next image (or ends)
            info["then"](job.state)
        redraw_panels()
    return None


def failed(settings, info, message: str, hint: str) -> None:
    """A job that failed: the panel's error, or, for a batch's image, a line in the batch's list."""
    if info.get("on_failure"):
        info["on_failure"](message, hint)
    else:
        settings.last_error, settings.last_hint = message, hint


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


def finish(job_id: str, unregister_timer: bool = False) -> None:
    """Forget a job and delete its staged input. A tick that ends returns None, which removes its timer;
    ``unregister_timer`` is for callers outside the timer (background mode, disabling the add-on)."""
    info = JOBS.pop(job_id, None)
    if info:
        shutil.rmtree(info["staging"], ignore_errors=True)
    timer = TIMERS.pop(job_id, None)
    if unregister_timer and timer is not None and bpy.app.timers.is_registered(timer):
        bpy.app.timers.unregister(timer)


def redraw_panels() -> None:
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", ()):
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


def register():
    bpy.utils.register_class(IMAGE_TO_3D_OT_generate)


def unregister():
    for job_id in list(TIMERS):
        finish(job_id, unregister_timer=True)
    batch.forget()
    bpy.utils.unregister_class(IMAGE_TO_3D_OT_generate)
