"""``python -m backend serve``: the long-lived worker behind Blender's Generate 3D.

The wire (its words: ``protocol.py``; README.md, "The wire"): one JSON object per line. Requests arrive on
stdin, events leave on a private copy of fd 1; fd 1 itself is pointed at stderr first, so a stray ``print`` or
a C library cannot corrupt the channel.

Requests::

    {"op": "generate", "id": "job-1", "image": "/abs/in.png", "output_dir": "/abs/job-dir", "options": {...}}
    {"op": "bake", "id": "job-2", "image": "/abs/in.png", "mesh": "/abs/mesh.npz", "output_dir": ..., "options": {...}}
    {"op": "cancel", "id": "job-1"}        # honoured between chunks of work
    {"op": "shutdown"}                     # also: stdin closed (the client went away)

Events: ``ready``, ``progress`` (stage, fraction, message), ``result`` (path of the .npz, stats, and
``views``: the six generated views as a PNG grid, for multi-view models),
``error`` (code, message, hint), ``log``. Every job event carries the job ``id``.

``bake`` (Bake from Model) takes a polygon mesh in the generated mesh's frame (``vertices``, ``corner_verts``,
``loop_totals`` and optionally ``uvs`` per loop) and answers with an .npz of ``texture`` and ``uvs``, sampled
from the generation's field (``options.field_id``). Every generation's field is kept in a
:class:`~.field.FieldCache`; its id is ``stats["field_id"]`` of the result.

One job runs at a time on the main thread; a reader thread takes requests so that ``cancel`` can be seen
while a job runs. Loaded models stay in ``model_cache`` between jobs (a warm worker skips loading). Its client
gone, the worker ends within CLIENT_GONE_GRACE_S (+1 s) even if the job does not stop (``orphan_guard``).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path

from . import orphan_guard, protocol
from .errors import BackendError, Cancelled, InputError, error_fields
from .options import parse as parse_options
PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress events a second per stage, plus every stage change
# Once the client is gone (stdin closed, or shutdown) the job in flight has this long to see the cancel (one chunk
# of work takes well under it); a job stuck in a native call that never checks (xatlas on a hostile mesh) is
# ended with the process, which would otherwise outlive Blender (by orphan_guard when the call holds the GIL).
# The status is none of errors.py's (1-4, 130).
CLIENT_GONE_GRACE_S = 5.0
CLIENT_GONE_EXIT_STATUS = 75


class EventWriter:
    """Writes one JSON line per event to the protocol stream; safe to call from any thread."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, **fields}, default=str)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # the client is gone; the reader sees EOF and ends the worker


def claim_protocol_stream():
    """Keep a private copy of fd 1 for events and send everything else written to fd 1 to stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(protocol_fd, "w", encoding="utf-8", buffering=1)


class JobControl:
    """What the reader thread and the job loop share: the job in flight and its cancel flag."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current_id = None
        self.cancel = threading.Event()
        self.idle = threading.Event()  # no job in flight
        self.idle.set()
        self.requests: queue.Queue = queue.Queue()

    def try_begin(self, job_id) -> bool:
        with self.lock:
            if self.current_id is not None:
                return False
            self.current_id = job_id
            self.cancel.clear()
            self.idle.clear()
            return True

    def finish(self) -> None:
        with self.lock:
            self.current_id = None
            self.idle.set()

    def request_cancel(self, job_id=None) -> None:
        with self.lock:
            if self.current_id is not None and job_id in (None, self.current_id):
                self.cancel.set()


def read_requests(stream, control: JobControl, events: EventWriter) -> None:
    """Reader thread: route each request; on EOF cancel the job in flight and end the loop, and the process if
    that job has not stopped within CLIENT_GONE_GRACE_S."""
    for line in stream:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
            op = request["op"]
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
            events.emit(protocol.ERROR_EVENT, id=None, code="bad_request", message=f"not a request: {line[:200]}",
                        hint="")
            continue
        if op in protocol.JOB_OPS:
            job_id = request.get("id")
            if control.try_begin(job_id):
                control.requests.put(request)
            else:
                events.emit(protocol.ERROR_EVENT, id=job_id, code="busy", message="another generation is running",
                            hint="Wait for it to finish or cancel it")
        elif op == protocol.OP_CANCEL:
            control.request_cancel(request.get("id"))
        elif op == protocol.OP_SHUTDOWN:
            break
        elif op == protocol.OP_PING:
            events.emit(protocol.LOG, level="info", message="pong")
        else:
            events.emit(protocol.ERROR_EVENT, id=request.get("id"), code="bad_request", message=f"unknown op {op!r}",
                        hint="")
    control.request_cancel()
    control.requests.put(None)
    if not control.idle.wait(CLIENT_GONE_GRACE_S):
        print(f"worker: the job did not stop within {CLIENT_GONE_GRACE_S:g} s of the client leaving; exiting",
              file=sys.stderr, flush=True)
        os._exit(CLIENT_GONE_EXIT_STATUS)


def describe_runtime() -> dict:
    """Versions, devices and memory for the ``ready`` event: ``python -m backend check``'s report (it never
    fails: a worker without torch still starts and reports the problem on the first job)."""
    from . import check

    return {"pid": os.getpid(), **check.report()}


class ProgressThrottle:
    """Forwards pipeline progress as events: every stage change, then at most every PROGRESS_INTERVAL_S."""

    def __init__(self, events: EventWriter, job_id):
        self._events, self._job_id = events, job_id
        self._stage, self._last = None, 0.0

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if stage == self._stage and fraction < 1.0 and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._stage, self._last = stage, now
        self._events.emit(protocol.PROGRESS, id=self._job_id, stage=stage, fraction=round(float(fraction), 4),
                          message=message)


def _draws_views(model_id: str) -> bool:
    from .models import registry

    return registry.get(model_id).multiview


def run_job(request: dict, control: JobControl, events: EventWriter, model_cache: dict, field_cache=None) -> None:
    job_id = request.get("id")
    started = time.perf_counter()
    try:
        if not request.get("output_dir"):  # never the worker's own working folder
            raise InputError("the request names no output folder (output_dir)")
        output_dir = Path(request["output_dir"])
        if not output_dir.is_dir():
            raise InputError(f"output folder does not exist: {output_dir}")
        options = parse_options(request.get("options"))
        job = {protocol.OP_GENERATE: _generate, protocol.OP_BAKE: _bake}[request.get("op", protocol.OP_GENERATE)]
        models_before = set(model_cache)
        path, stats, views = job(request, options, output_dir, ProgressThrottle(events, job_id),
                                 control.cancel.is_set, model_cache, field_cache)
        if control.cancel.is_set():
            raise Cancelled()
        # "hit": the model came from this worker's cache (no loading); "miss": it was loaded now.
        stats.update(model_cache="miss" if set(model_cache) - models_before or not model_cache else "hit",
                     total_seconds=round(time.perf_counter() - started, 3))
        outcome = {"event": protocol.RESULT, "id": job_id, "path": str(path), "stats": stats, "views": views}
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error event; the worker lives on
        if not isinstance(exc, BackendError):
            traceback.print_exc(file=sys.stderr)
        outcome = {"event": protocol.ERROR_EVENT, "id": job_id, **error_fields(exc)}
    # Free before answering: a client that submits the next job on this answer must not find the worker busy.
    control.finish()
    events.emit(outcome.pop("event"), **outcome)


def _generate(request, options, output_dir: Path, progress, cancelled, model_cache, field_cache):
    from . import mesh as mesh_io
    from .pipeline import generate

    image = request.get("image")
    if not image and not options.field_id:
        raise InputError("no image given")
    if options.save_views is None and options.views is None and _draws_views(options.model):
        options.save_views = str(output_dir / protocol.VIEWS_FILE)
    mesh = generate(image or None, options, progress=progress, cancelled=cancelled, model_cache=model_cache,
                    field_cache=field_cache)
    if cancelled():
        raise Cancelled()
    path = mesh_io.save(mesh, output_dir / protocol.RESULT_FILES[protocol.OP_GENERATE])
    stats = dict(mesh.stats, vertices=int(len(mesh.vertices)), faces=int(len(mesh.faces)))
    views = options.save_views if options.save_views and Path(options.save_views).is_file() else None
    return path, stats, views


def _bake(request, options, output_dir: Path, progress, cancelled, model_cache, field_cache):
    import numpy as np

    from .mesh import atomic_output
    from .mesh_input import load_bake_mesh
    from .pipeline import bake

    if not options.field_id:
        raise InputError("Bake from Model needs the generation's field id (options.field_id)")
    polygons = load_bake_mesh(request.get("mesh") or "")  # checked from the headers on: bad_input if unfit
    try:
        uvs, texture, stats = bake(request.get("image") or None, options, progress=progress, cancelled=cancelled,
                                   model_cache=model_cache, field_cache=field_cache, **polygons)
    except ValueError as e:  # a malformed mesh
        raise InputError(f"the mesh to bake on is not valid: {e}") from None
    if cancelled():
        raise Cancelled()
    path = output_dir / protocol.RESULT_FILES[protocol.OP_BAKE]
    with atomic_output(path) as f:
        np.savez(f, uvs=uvs, texture=texture)
    return path, stats, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend serve",
                                     description="Run the worker: JSON-line requests on stdin, events on stdout.")
    parser.parse_args(argv or [])

    events = EventWriter(claim_protocol_stream())
    # The same guard from outside, for a job whose native call holds the GIL (the reader cannot run then); a second
    # later, so that the reader's own exit comes first where it can.
    guard = orphan_guard.start(CLIENT_GONE_GRACE_S + 1)
    control = JobControl()
    reader = threading.Thread(target=read_requests, args=(sys.stdin, control, events), name="requests", daemon=True)
    events.emit(protocol.READY, **describe_runtime())
    reader.start()

    from .field import FieldCache

    model_cache: dict = {}
    field_cache = FieldCache()
    while True:
        request = control.requests.get()
        if request is None:
            break
        run_job(request, control, events, model_cache, field_cache)
    orphan_guard.stop(guard)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
