"""Client for the backend worker (``python -m backend serve``); stdlib only.

Blender imports this as ``<extension>.backend.client``, so it must never import torch, numpy or bpy.
Nothing here blocks for long: :meth:`Worker.poll` is called from a Blender timer on the main thread and
only drains what the reader threads have queued. :meth:`Worker.wait` blocks, for scripts and tests.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parent.parent

# Job states.
QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINAL_STATES = (DONE, ERROR, CANCELLED)

CANCEL_GRACE_S = 10.0  # a cancelled job that has not stopped by then is ended by killing the worker
STOP_GRACE_S = 3.0
LOG_LINES = 400
_EOF = object()


class Job:
    """One generation as the client sees it; updated by :meth:`Worker.poll`."""

    def __init__(self, job_id: str, job_dir: Path):
        self.id = job_id
        self.job_dir = job_dir
        self.state = QUEUED
        self.stage = ""
        self.fraction = 0.0
        self.message = ""
        self.result_path: str | None = None
        self.views_path: str | None = None  # multi-view models: the generated views (PNG grid)
        self.stats: dict = {}
        self.error: dict | None = None  # {"code", "message", "hint"}
        self.cancel_requested_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def fail(self, code: str, message: str, hint: str = "") -> None:
        self.state = ERROR
        self.error = {"code": code, "message": message, "hint": hint}

    def cleanup(self) -> None:
        """Delete the job folder (the result file included): call once the result is imported."""
        shutil.rmtree(self.job_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state} {self.stage} {self.fraction:.2f} {self.error or ''}>"


def default_env(extension_root: Path = EXTENSION_ROOT, base: dict | None = None) -> dict:
    """The worker's environment, built explicitly: the parent's (Blender's PYTHONPATH/PYTHONHOME dropped,
    they would point the worker at Blender's own Python) plus the extension root on PYTHONPATH."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE")}
    env["PYTHONPATH"] = str(extension_root)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class Worker:
    """A ``python -m backend serve`` subprocess with one job at a time.

    The process is started lazily by :meth:`submit` and kept between jobs (its model cache stays warm)
    until :meth:`stop`. A worker that dies is reported on the job in flight and started afresh next time.
    """

    def __init__(self, python: str, extension_root: Path | str = EXTENSION_ROOT, env: dict | None = None,
                 temp_dir: str | None = None, cancel_grace: float = CANCEL_GRACE_S):
        self.python = str(python)
        self.extension_root = Path(extension_root)
        self.env = env if env is not None else default_env(self.extension_root)
        self.temp_dir = temp_dir
        self.cancel_grace = cancel_grace
        self.process: subprocess.Popen | None = None
        self.ready_info: dict | None = None
        self.job: Job | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._exit_seen_at: float | None = None
        self._group_killed = False

    # -- process --------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        if self.running:
            return
        self._reap()
        if not self.python or not Path(self.python).is_file():
            raise FileNotFoundError(f"backend Python not found: {self.python or '(not set)'}")
        self._events = queue.Queue()
        self.ready_info = None
        self._group_killed = False
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # its own process group: killing it takes any children too
        else:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        self.process = subprocess.Popen(
            [self.python, "-m", "backend", "serve"],
            cwd=str(self.extension_root), env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        for target, stream in ((self._read_events, self.process.stdout), (self._read_log, self.process.stderr)):
            threading.Thread(target=target, args=(stream, self._events), daemon=True,
                             name=f"image_to_3d-{target.__name__}").start()

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """Ask the worker to exit (frees all its memory), then kill its process group if it lingers."""
        if self.process is None:
            return
        if self.running:
            self._send({"op": "shutdown"})
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.job is not None and not self.job.finished:
            self.job.state, self.job.error = CANCELLED, None
            self.job.cleanup()

    def kill(self) -> None:
        """Kill the worker's whole process group now and reap it (once per process: after that its
        group id may be reused by an unrelated process)."""
        process = self.process
        if process is None or self._group_killed:
            return
        self._group_killed = True
        if process.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            except (ProcessLookupError, PermissionError):
                pass
        elif os.name == "posix":
            # The leader is gone; children it left in its group go too.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._reap()

    def _reap(self) -> None:
        process = self.process
        if process is None:
            return
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            return
        for stream in (process.stdin, process.stdout, process.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def _send(self, request: dict) -> bool:
        with self._write_lock:
            try:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError, AttributeError):
                return False

    @staticmethod
    def _read_events(stream, events: queue.Queue) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "log", "level": "warning", "message": f"unparsed: {line[:500]}"}
            events.put(event)
        events.put(_EOF)

    def _read_log(self, stream, _events) -> None:
        for line in stream:
            self.log.append(line.rstrip("\n"))

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])

    # -- jobs -----------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.finished

    def submit(self, image_path: str, options: dict, op: str = "generate", mesh: str | None = None) -> Job:
        """Start a job: ``generate`` (an image -> a mesh) or ``bake`` (a texture from a generation's field on
        the polygon mesh in the .npz ``mesh``). The worker is started first if needed. Returns at once."""
        if self.busy:
            raise RuntimeError("a generation is already running")
        self.start()
        if self.temp_dir:
            os.makedirs(self.temp_dir, exist_ok=True)
        job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=self.temp_dir))
        job = Job(f"job-{os.getpid()}-{next(self._ids)}", job_dir)
        self.job = job
        request = {"op": op, "id": job.id, "image": str(image_path) if image_path else None,
                   "output_dir": str(job_dir), "options": options}
        if mesh is not None:
            request["mesh"] = str(mesh)
        sent = self._send(request)
        if sent:
            job.state = RUNNING
        # If sending failed the worker is dying: poll() reports it with its log.
        return job

    def cancel(self) -> None:
        """Ask the job in flight to stop between chunks; poll() kills the worker if it does not in time."""
        job = self.job
        if job is None or job.finished:
            return
        if job.cancel_requested_at is None:
            job.cancel_requested_at = time.monotonic()
        self._send({"op": "cancel", "id": job.id})

    def poll(self) -> list[dict]:
        """Apply every event received since the last call to the job; never blocks. Returns the events."""
        seen = []
        worker_gone = False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event is _EOF:
                worker_gone = True
                continue
            seen.append(event)
            self._apply(event)
        job = self.job
        if job is not None and not job.finished:
            if worker_gone or self._exited_without_eof():
                self._report_dead_worker(job)
            elif job.cancel_requested_at is not None and time.monotonic() - job.cancel_requested_at > self.cancel_grace:
                self.kill()
                job.state = CANCELLED
                job.cleanup()
        return seen

    def _apply(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            self.ready_info = event
            return
        if kind == "log":
            self.log.append(f"[worker] {event.get('message', '')}")
            return
        job = self.job
        if job is None or job.finished or event.get("id") not in (job.id, None):
            return
        if kind == "progress":
            job.stage = event.get("stage", job.stage)
            job.fraction = float(event.get("fraction", 0.0))
            job.message = event.get("message", "")
        elif kind == "result":
            job.result_path = event.get("path")
            job.views_path = event.get("views")
            job.stats = event.get("stats") or {}
            job.state = DONE
            job.fraction = 1.0
        elif kind == "error":
            if event.get("code") == "cancelled":
                job.state = CANCELLED
            else:
                job.fail(event.get("code", "internal"), event.get("message", "unknown error"), event.get("hint", ""))
            job.cleanup()

    def _exited_without_eof(self) -> bool:
        """Fallback for a pipe held open by a stray grandchild: the worker itself exited a while ago."""
        if self.process is None or self.process.poll() is None:
            self._exit_seen_at = None
            return False
        if self._exit_seen_at is None:
            self._exit_seen_at = time.monotonic()
        return time.monotonic() - self._exit_seen_at > 2.0

    def _report_dead_worker(self, job: Job) -> None:
        try:
            returncode = self.process.wait(2)
        except subprocess.TimeoutExpired:
            returncode = None
        self.kill()  # anything the worker left in its process group goes too
        job.cleanup()
        if job.cancel_requested_at is not None:
            job.state = CANCELLED
            return
        if returncode is not None and returncode < 0:
            how = f"was killed (signal {-returncode})"
        else:
            how = f"exited (status {returncode})"
        started = self.ready_info is not None
        last = self.log_tail(1).strip()
        if started:
            message = f"The backend worker {how} during the generation"
            hint = "It may have run out of memory. Generate 3D again to restart it"
        else:
            message = f"The backend worker {how} before it was ready"
            hint = "Check the backend Python in the add-on preferences (it needs torch and the backend requirements)"
        if last:
            hint += f". Last log line: {last[-300:]}"
        job.fail("worker_died" if started else "worker_start_failed", message, hint)

    def wait(self, timeout: float | None = None, interval: float = 0.02) -> Job:
        """Block until the job in flight is finished (scripts, tests and Blender's background mode)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if self.job is None or self.job.finished:
                return self.job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job did not finish in {timeout} s: {self.job!r}")
            time.sleep(interval)

    def __del__(self):  # last resort: never leave a worker behind
        try:
            self.kill()
        except Exception:  # noqa: BLE001
            pass

