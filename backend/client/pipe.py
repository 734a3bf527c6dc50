"""The local worker: ``python -m backend serve`` in its own process group, JSON lines over its pipes.

Standard library only. The process is started by the first job and kept warm (its models stay loaded) until
:meth:`Worker.stop`; killing it is how its memory (VRAM included) is freed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

from ..protocol import CANCELLED, OP_CANCEL, OP_GENERATE, OP_SHUTDOWN, RUNNING
from .jobs import Job, Transport, read_lines

EXTENSION_ROOT = Path(__file__).resolve().parent.parent.parent
CANCEL_GRACE_S = 10.0  # a cancelled job that has not stopped by then is ended by killing the worker
STOP_GRACE_S = 3.0


def default_env(extension_root: Path = EXTENSION_ROOT, base: dict | None = None) -> dict:
    """The worker's environment, built explicitly: the parent's (Blender's PYTHONPATH/PYTHONHOME dropped,
    they would point the worker at Blender's own Python) plus the extension root on PYTHONPATH."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE")}
    env["PYTHONPATH"] = str(extension_root)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class Worker(Transport):
    """A ``python -m backend serve`` subprocess with one job at a time.

    The process is started lazily by :meth:`submit` and kept between jobs (its model cache stays warm)
    until :meth:`stop`. A worker that dies is reported on the job in flight and started afresh next time.
    """

    def __init__(self, python: str, extension_root: Path | str = EXTENSION_ROOT, env: dict | None = None,
                 temp_dir: str | None = None, cancel_grace: float = CANCEL_GRACE_S):
        super().__init__(temp_dir)
        self.python = str(python)
        self.extension_root = Path(extension_root)
        self.env = env if env is not None else default_env(self.extension_root)
        self.cancel_grace = cancel_grace
        self.process: subprocess.Popen | None = None
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
        for target, stream in ((read_lines, self.process.stdout), (self._read_log, self.process.stderr)):
            threading.Thread(target=target, args=(stream, self._events), daemon=True,
                             name=f"image_to_3d-{target.__name__}").start()

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """Ask the worker to exit (frees all its memory), then kill its process group if it lingers."""
        if self.process is None:
            return
        if self.running:
            self._send({"op": OP_SHUTDOWN})
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

    def _read_log(self, stream, _events) -> None:
        for line in stream:
            self.log.append(line.rstrip("\n"))

    # -- jobs -----------------------------------------------------------------------------------------

    def submit(self, image_path: str, options: dict, op: str = OP_GENERATE, mesh: str | None = None) -> Job:
        """Start a job: ``generate`` (an image -> a mesh) or ``bake`` (a texture from a generation's field on
        the polygon mesh in the .npz ``mesh``). The worker is started first if needed. Returns at once."""
        if self.busy:
            raise RuntimeError("a generation is already running")
        self.start()
        job = self._new_job()
        request = {"op": op, "id": job.id, "image": str(image_path) if image_path else None,
                   "output_dir": str(job.job_dir), "options": options}
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
        self._send({"op": OP_CANCEL, "id": job.id})

    def poll(self) -> list[dict]:
        """Apply every event received since the last call to the job; never blocks. Returns the events."""
        seen, worker_gone = self._drain()
        job = self.job
        if job is not None and not job.finished:
            if worker_gone or self._exited_without_eof():
                self._report_dead_worker(job)
            elif job.cancel_requested_at is not None and time.monotonic() - job.cancel_requested_at > self.cancel_grace:
                self.kill()
                job.state = CANCELLED
                job.cleanup()
        return seen

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

    def __del__(self):  # last resort: never leave a worker behind
        try:
            self.kill()
        except Exception:  # noqa: BLE001
            pass
