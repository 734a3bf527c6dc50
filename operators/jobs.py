"""The job engine of the operators: submit a job to the session's backend, follow it from a timer, finish it.

:func:`start_job` submits and registers ``TIMERS[job_id]`` (a ``bpy.app.timers`` callback). Each :func:`tick`
polls the client (never blocks), redraws the panel, and on completion hands the result to the job's
``on_done`` on the main thread and pushes one undo step. In background mode (scripts, tests, ``make demo``)
timers never fire, so :func:`begin_job` runs the same ticks itself until the job is done. Generate 3D, Bake
from Model and Retopologize start their jobs through :func:`begin_job`; a batch of images runs one job after
another through :func:`start_job`: the tick that ends one image's job starts the next (``then``), so the
worker keeps its model loaded from one image to the next.

A batch (module state like the session's worker, not scene data: undo and file loads leave it alone):
- each imported object is its own undo step, as a single Generate 3D is: Ctrl+Z removes the last object (the
  first one's step also holds the batch's new collection), never the user's work done in between;
- a failed image is listed with its reason (kept until the next Generate 3D) and the batch goes on;
- Cancel stops the job in flight and drops the images not started; the objects made so far stay.

May import: ``results`` (turning results into Blender data), the root modules (preferences, properties,
environment, import_mesh) and ``backend.client`` / ``backend.protocol``. Never a panel.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time

import bpy
from bpy.props import BoolProperty

from .. import environment, import_mesh, preferences
from ..backend.client import catalog, session
from ..backend.protocol import CANCELLED, DONE
from . import results

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


def backend_problem(context) -> str:
    """Why no job can start now ('' when one can): one at a time, and a backend to run it."""
    if getattr(context.scene, "image_to_3d", None) is None:
        return "No scene"
    if session.is_busy() or batch_running():
        return "A generation is already running"
    return preferences.backend_problem(context)  # Local: its Python; Remote: the server's URL, online access


def licence_problem(model_id: str) -> str:
    if catalog.licence_pending(model_id):
        spec = catalog.spec(model_id)
        return f"Accept the {spec.licence} licence of {spec.display_name} first (Accept Licence, in this panel)"
    return ""


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
    try:
        placement = import_mesh.stored_placement(stored)
    except ValueError as exc:  # a damaged .blend: never sent, the backend could not bake it in finite time
        return f"'{obj.name}' has a damaged placement ({exc}): generate it again"
    if not stored.get("field_id") or placement is None:
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
    bpy.app.timers.register(TIMERS[job.id], first_interval=environment.TICK_S, persistent=True)
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
        return environment.TICK_S
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




# ------------------------------------------------------------------------------------------------ batches

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
        self.row = results.Row()
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


def current_batch() -> Batch | None:
    return _run


def batch_running() -> bool:
    return _run is not None and _run.running


def forget_batch() -> None:
    """Drop the last batch's outcome (the next Generate 3D, disabling the add-on)."""
    global _run
    _run = None


def cancel_batch() -> None:
    """Start no further image; the caller cancels the job in flight."""
    if batch_running():
        _run.cancelled = True


def begin_batch(operator, context, paths, name: str, options: dict, settings: dict) -> set:
    """Start a batch (Generate 3D's execute when several images are chosen); in background mode, run it to its
    end unless the caller drives the timers."""
    global _run
    clear_outcome(context.scene.image_to_3d)
    _run = run = Batch(paths, name or "Batch", context.scene.name, context.view_layer.name, options, settings)
    advance_batch(run)
    if run.running and blocks(operator):
        run_ticks()
    if run.running:
        return {"FINISHED"}
    for file_name, reason in run.failures:
        operator.report({"WARNING"}, f"{file_name}: {reason}")
    if not run.imported:
        operator.report({"ERROR"}, run.summary())
        return {"CANCELLED"}
    operator.report({"WARNING"} if run.failures else {"INFO"}, run.summary())
    return {"FINISHED"}


def advance_batch(run: Batch) -> None:
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
            start_job(scene, view_layer, functools.partial(submit_batch_item, run, path), batch_item_info(run, path))
            return
        except (OSError, ValueError, RuntimeError) as exc:
            run.failures.append((os.path.basename(path), str(exc)))
    end_batch(run)


def end_batch(run: Batch) -> None:
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


def batch_item_info(run: Batch, path: str) -> dict:
    name = os.path.basename(path)
    return {
        "on_done": functools.partial(results.import_item, run),
        "undo": f"Generate 3D ({name}, {run.position} of {run.total})",
        "settings": dict(run.settings, image=name),
        "path": path,
        "on_failure": lambda message, hint: run.failures.append((name, message)),
        "then": functools.partial(after_batch_item, run),
    }


def after_batch_item(run: Batch, state: str) -> None:
    if state == CANCELLED:  # by Cancel, or the worker was stopped: the rest of the queue goes too
        run.cancelled = True
    advance_batch(run)


def submit_batch_item(run: Batch, path: str, worker, staging: str):
    return worker.submit(results.input_file(path, staging), run.options)




def unregister():
    """Disabling the add-on: stop following every job, forget the last batch."""
    for job_id in list(TIMERS):
        finish(job_id, unregister_timer=True)
    forget_batch()
