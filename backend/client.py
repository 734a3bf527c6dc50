"""Client for the backend; stdlib only. Two transports with one interface (``submit``, ``poll``, ``cancel``,
``stop``, ``wait`` and :class:`Job`): :class:`Worker`, the local worker process (``python -m backend serve``,
JSON lines over pipes), and :class:`RemoteWorker`, a shared server (``python -m backend cluster-serve``: the
same JSON-line events, streamed over HTTP).

Blender imports this as ``<extension>.backend.client``, so it must never import torch, numpy or bpy.
Nothing here blocks for long: :meth:`Worker.poll` is called from a Blender timer on the main thread and
only drains what the reader threads have queued. :meth:`Worker.wait` blocks, for scripts and tests.
"""

from __future__ import annotations

import base64
import binascii
import collections
import http.client
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parent.parent

# Job states.
QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINAL_STATES = (DONE, ERROR, CANCELLED)

CANCEL_GRACE_S = 10.0  # a cancelled job that has not stopped by then is ended by killing the worker
STOP_GRACE_S = 3.0
LOG_LINES = 400
_EOF = object()

# The shared server's wire (backend/serve_app.py): the worker's events as JSON lines in a streamed response.
GENERATE_PATH, HEALTH_PATH = "/generate", "/health"
SERVICE = "image_to_3d"  # what /health calls itself, so that Check knows it reached this server
TOKEN_ENV = "IMAGE_TO_3D_SERVER_TOKEN"  # the token, for the server and for `python -m backend.client health`
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 90.0  # the server sends an event at least every few seconds (serve_app.KEEPALIVE_S)
REMOTE_CANCEL_GRACE_S = 2.0  # a cancelled job is over once its stream is closed; no longer than this
# Options that name this machine's files or devices: the server uses its own weights and GPUs.
LOCAL_OPTIONS = ("weights", "u2net_path", "device")
RESULT_FILES = {"generate": "mesh.npz", "bake": "bake.npz"}  # written into the job folder, as the worker does
VIEWS_FILE = "views.png"


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


class _Transport:
    """What both transports share: the job in flight, the queue of events its reader threads fill, the log."""

    def __init__(self, temp_dir: str | None):
        self.temp_dir = temp_dir
        self.job: Job | None = None
        self.ready_info: dict | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.finished

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])

    def _new_job(self) -> Job:
        if self.temp_dir:
            os.makedirs(self.temp_dir, exist_ok=True)
        job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=self.temp_dir))
        job = Job(f"job-{os.getpid()}-{next(self._ids)}", job_dir)
        self.job = job
        return job

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

    def poll(self) -> list[dict]:
        raise NotImplementedError

    def _drain(self) -> tuple[list[dict], bool]:
        """Apply every queued event to the job; never blocks. -> (the events, whether the stream ended)."""
        seen, ended = [], False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return seen, ended
            if event is _EOF:
                ended = True
                continue
            seen.append(event)
            self._apply(event)


class Worker(_Transport):
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

    # -- jobs -----------------------------------------------------------------------------------------

    def submit(self, image_path: str, options: dict, op: str = "generate", mesh: str | None = None) -> Job:
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
        self._send({"op": "cancel", "id": job.id})

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



class RemoteError(Exception):
    """The server could not be asked (unreachable, refused, not this server): a message, a hint and a code."""

    def __init__(self, code: str, message: str, hint: str = ""):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}


UNREACHABLE_HINT = ("Check the Server URL in the add-on preferences (Backend: Remote) and that the server runs "
                    "(python -m backend cluster-serve); Check asks it what it offers")
LOST = ("backend_lost", "The backend was lost: the connection to the server ended during the generation",
        "The server may have lost its GPU worker (it starts a new one) or restarted: Generate 3D again")
UNAUTHORIZED_HINT = ("Copy the server's token (printed on its first start, kept in its token file) into the "
                     "add-on preferences: Backend › Token")


def server_url(url: str) -> urllib.parse.SplitResult:
    """``http(s)://host[:port][/prefix]``, checked: ValueError saying what is wrong."""
    parts = urllib.parse.urlsplit((url or "").strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a server URL: {url!r} (expected e.g. http://gpu-box:8765 or https://gpu.studio.lan)")
    parts.port  # noqa: B018 - raises ValueError on a bad port
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"the server URL takes no query, fragment or user name: {url!r}")
    return parts


def _connection(parts: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
    if parts.scheme == "https":  # TLS in front of the server (a reverse proxy): certificates are verified
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def _headers(token: str | None, content_type: str | None = None) -> dict:
    from . import __version__

    headers = {"User-Agent": f"image_to_3d/{__version__}", "Accept": "application/x-ndjson, application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if content_type:
        headers["Content-Type"] = content_type
    return headers


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate was not accepted ({exc.verify_message})"
    if isinstance(exc, socket.gaierror):
        return "the host name is not known"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "nothing listens there (connection refused)"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def error_of_response(response: http.client.HTTPResponse, url: str) -> dict:
    """An error event from a refused request (401, 4xx, 5xx): the server's own words where it sent them."""
    try:
        body = json.loads(response.read(65536) or b"{}")
    except (ValueError, OSError, http.client.HTTPException):
        body = {}
    error = body if isinstance(body, dict) and body.get("message") else {}
    if response.status == 401:
        error = {"code": "unauthorized", "message": error.get("message") or "The server refused the token",
                 "hint": UNAUTHORIZED_HINT}
    elif not error:
        error = {"code": "server_error" if response.status >= 500 else "bad_request",
                 "message": f"The server at {url} answered {response.status} {response.reason}",
                 "hint": "Is this an Image to 3D server? Check asks it what it offers"}
    return {"event": "error", "code": error.get("code") or "bad_request", "message": error["message"],
            "hint": error.get("hint", "")}


def request_body(op: str, image_path: str | None, options: dict, mesh: str | None = None) -> bytes:
    """``POST /generate``'s JSON: the files inline (base64), the options without this machine's paths and device."""
    body = {"op": op, "options": {k: v for k, v in (options or {}).items() if k not in LOCAL_OPTIONS}}
    if image_path:
        body["image"] = base64.b64encode(Path(image_path).read_bytes()).decode("ascii")
        body["image_name"] = Path(image_path).name
    if mesh is not None:
        body["mesh"] = base64.b64encode(Path(mesh).read_bytes()).decode("ascii")
    return json.dumps(body).encode("utf-8")


class RemoteWorker(_Transport):
    """A shared server (``python -m backend cluster-serve``) over HTTP or HTTPS, with :class:`Worker`'s interface.

    Each job is one ``POST /generate`` (the token in ``Authorization: Bearer``) whose response streams the worker's
    events; a reader thread queues them for :meth:`poll` and writes the result's files into the job folder, as the
    local worker does. Closing the stream is the cancel. Nothing runs on this machine: there is no process to
    start, stop or keep warm (the server's replicas keep their models loaded).
    """

    pid = None

    def __init__(self, url: str, token: str, temp_dir: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S):
        super().__init__(temp_dir)
        self.url = url.strip().rstrip("/")
        self.parts = server_url(self.url)
        self.token = token
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._lock = threading.Lock()  # the connection in use, the cancel, the result files
        self._connection: http.client.HTTPConnection | None = None
        self._reader: threading.Thread | None = None
        self._failure: tuple | None = None

    @property
    def running(self) -> bool:
        """A job's stream is open (there is no local process)."""
        return self._reader is not None and self._reader.is_alive()

    def start(self) -> None:
        """Nothing to start: each job opens its own connection."""

    def submit(self, image_path: str, options: dict, op: str = "generate", mesh: str | None = None) -> Job:
        """Send the job; returns at once. The image (and a bake's mesh) are read now: OSError if they cannot be."""
        if self.busy:
            raise RuntimeError("a generation is already running")
        body = request_body(op, image_path, options, mesh)
        job = self._new_job()
        self._events, self._failure = queue.Queue(), None
        job.state = RUNNING
        self._reader = threading.Thread(target=self._exchange, args=(job, body, RESULT_FILES.get(op, "result.npz"),
                                                                     self._events),
                                        daemon=True, name="image_to_3d-remote")
        self._reader.start()
        return job

    def _exchange(self, job: Job, body: bytes, result_name: str, events: queue.Queue) -> None:
        """Reader thread: the request, then each event line of the response until it ends."""
        connection, streaming = None, False
        try:
            connection = _connection(self.parts, self.connect_timeout)
            with self._lock:
                if job.cancel_requested_at is not None:
                    return
                self._connection = connection
            connection.connect()
            connection.sock.settimeout(self.read_timeout)
            connection.request("POST", self.parts.path.rstrip("/") + GENERATE_PATH, body=body,
                               headers=_headers(self.token, "application/json"))
            response = connection.getresponse()
            streaming = True
            if response.status != 200:
                events.put(dict(error_of_response(response, self.url), id=job.id))
                return
            for line in response:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    self.log.append(f"[server] unparsed: {line[:300]!r}")
                    continue
                event["id"] = job.id  # the server's own job id is its business
                if event.get("event") == "result":
                    event = self._keep_files(job, event, result_name)
                events.put(event)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if job.cancel_requested_at is None:
                if streaming:
                    self._failure = LOST if not isinstance(exc, TimeoutError) else (
                        LOST[0], f"The backend was lost: the server sent nothing for {self.read_timeout:.0f} s",
                        LOST[2])
                else:
                    self._failure = ("server_unreachable", f"Cannot reach the server at {self.url}: {_reason(exc)}",
                                     UNREACHABLE_HINT)
                self.log.append(f"[server] {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._connection = None
            if connection is not None:
                connection.close()
            events.put(_EOF)

    def _keep_files(self, job: Job, event: dict, result_name: str) -> dict:
        """The result's mesh (and views) as files in the job folder, under their final names only once complete."""
        with self._lock:
            if job.cancel_requested_at is not None:
                return {"event": "log", "message": "a result arrived after the cancel"}
            try:
                event["path"] = str(_write_atomic(job.job_dir / result_name, base64.b64decode(event.pop("npz"))))
                views = event.pop("views_png", None)
                event["views"] = str(_write_atomic(job.job_dir / VIEWS_FILE, base64.b64decode(views))) if views \
                    else None
            except (KeyError, TypeError, binascii.Error, OSError) as exc:
                return {"event": "error", "id": job.id, "code": "bad_response",
                        "message": f"The server's result could not be kept: {exc}", "hint": ""}
        return event

    def cancel(self) -> None:
        """Close the job's stream: the server stops the job between two chunks of work."""
        job = self.job
        if job is None or job.finished:
            return
        with self._lock:
            if job.cancel_requested_at is None:
                job.cancel_requested_at = time.monotonic()
            connection = self._connection
        _abort(connection)

    def poll(self) -> list[dict]:
        """Apply every event received since the last call to the job; never blocks. Returns the events."""
        seen, ended = self._drain()
        job = self.job
        if job is not None and not job.finished:
            cancelled = job.cancel_requested_at is not None
            if cancelled and (ended or time.monotonic() - job.cancel_requested_at > REMOTE_CANCEL_GRACE_S):
                with self._lock:
                    job.state = CANCELLED
                    job.cleanup()
            elif ended:
                job.fail(*(self._failure or LOST))
                job.cleanup()
        return seen

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """End the job in flight (as cancelled); nothing else is held here."""
        self.cancel()
        reader = self._reader
        if reader is not None:
            reader.join(timeout)
        job = self.job
        if job is not None and not job.finished:
            with self._lock:
                job.state, job.error = CANCELLED, None
                job.cleanup()

    kill = stop


def _abort(connection: http.client.HTTPConnection | None) -> None:
    """Close a connection another thread is reading from (a plain close would not wake that thread)."""
    sock = getattr(connection, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _write_atomic(path: Path, data: bytes) -> Path:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def health(url: str, token: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> dict:
    """The server's ``GET /health``: its models, devices (memory) and queue, for a ``token`` it accepts.
    Raises :class:`RemoteError` (``unauthorized`` when it refuses the token, or there is none)."""
    try:
        parts = server_url(url)
    except ValueError as e:
        raise RemoteError("bad_url", str(e), "Use the address the server printed, e.g. http://gpu-box:8765") from None
    connection = _connection(parts, timeout)
    try:
        connection.request("GET", parts.path.rstrip("/") + HEALTH_PATH, headers=_headers(token))
        response = connection.getresponse()
        body = response.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        raise RemoteError("server_unreachable", f"Cannot reach the server at {url}: {_reason(exc)}",
                          UNREACHABLE_HINT) from None
    finally:
        connection.close()
    try:
        report = json.loads(body)
    except ValueError:
        report = None
    if response.status == 401 and isinstance(report, dict) and report.get("service") == SERVICE:
        raise RemoteError("unauthorized", report.get("message") or "The server refused the token",
                          UNAUTHORIZED_HINT)
    if response.status != 200 or not isinstance(report, dict) or report.get("service") != SERVICE:
        raise RemoteError("not_this_server", f"{url} is not an Image to 3D server (it answered {response.status} "
                          f"{response.reason} to {HEALTH_PATH})", "Check the URL: the address cluster-serve printed")
    return report


def health_summary(report: dict | None, error: dict | None = None) -> tuple[str, str, list]:
    """(level "OK"/"WARNING"/"ERROR", one line, what to do) for the preferences, as for the local Check."""
    if report is None:
        error = error or {}
        return "ERROR", error.get("message") or "The server did not answer", [error["hint"]] if error.get("hint") \
            else []
    models = ", ".join(m.get("name") or m.get("id", "?") for m in report.get("models", ())) or "no models"
    devices = report.get("devices") or []
    by_name = collections.Counter(d.get("name") or d.get("device", "?") for d in devices)
    free = sum(d.get("memory_free_mb") or 0 for d in devices)
    if devices:
        shown = ", ".join(f"{n} × {name}" if n > 1 else name for name, n in by_name.items())
        devices_text = f"{shown} ({free / 1024:.0f} GB free)" if free else shown
    else:
        devices_text = "no replica up yet"
    queue_ = report.get("queue") or {}
    waiting, running = int(queue_.get("waiting", 0)), int(queue_.get("running", 0))
    queue_text = f"{running} running, {waiting} waiting" if running or waiting else "idle"
    line = f"Server: {models} · {devices_text} · {queue_text}"
    todo, level = [], "OK"
    if not devices:
        level = "WARNING"
        todo.append("No replica has reported yet: the server may still be loading its model")
    return level, line, todo


def _main(argv: list[str]) -> int:
    """``python -m backend.client health URL`` (the token in $TOKEN_ENV, never on a command line):
    one JSON line, the ``result`` with the report or the ``error``. Blender's Check for the Remote backend."""
    if argv[:1] != ["health"] or len(argv) != 2:
        print("usage: python -m backend.client health URL", file=sys.stderr)
        return 2
    try:
        report = health(argv[1], os.environ.get(TOKEN_ENV) or None)
    except RemoteError as e:
        print(json.dumps({"event": "error", **e.to_dict()}), flush=True)
        return 1
    print(json.dumps({"event": "result", "health": report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
