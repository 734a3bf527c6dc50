"""A shared server (``python -m backend cluster-serve``) over HTTP or HTTPS: the same jobs and events as the
local worker, each job one streamed ``POST /generate``; and ``health``, what the server offers (Check).

Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import collections
import http.client
import json
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from pathlib import Path

from .. import files
from ..protocol import AUTHORIZATION, BEARER, CANCELLED, EVENTS_TYPE, GENERATE_PATH, HEALTH_PATH, LOCAL_OPTIONS, \
    OP_GENERATE, RESULT_FILES, RUNNING, SERVICE, VIEWS_FILE
from .jobs import EOF, Job, Transport
from .pipe import STOP_GRACE_S

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 90.0  # the server sends an event at least every few seconds (server/app.py KEEPALIVE_S)
REMOTE_CANCEL_GRACE_S = 2.0  # a cancelled job is over once its stream is closed; no longer than this


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
    from .. import __version__

    headers = {"User-Agent": f"image_to_3d/{__version__}", "Accept": f"{EVENTS_TYPE}, application/json"}
    if token:
        headers[AUTHORIZATION] = f"{BEARER}{token}"
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


class RemoteWorker(Transport):
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

    def submit(self, image_path: str, options: dict, op: str = OP_GENERATE, mesh: str | None = None) -> Job:
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
            events.put(EOF)

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
    return files.write_bytes(path, data)


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
