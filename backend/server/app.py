"""The shared server's Ray Serve application, started by ``python -m backend cluster-serve``::

    the front (--host:--port; front.py: timeouts, the token before the body, a cap on connections without it)
    → Serve's HTTP proxy (127.0.0.1 only)
    → Ingress: the token, the size limit, the CLI's checks (the image decoded once), the queue, the stream
        → Generator × N: one job at a time, its model kept loaded (the worker's job code and events,
          backend/worker.py)
        → Board: what each Generator last reported (device, memory, its job's time), for /health

``POST /generate`` answers with the worker's JSON-line events (``progress``, ``log``, ``error``, ``result``); the
result carries the .npz (and the views of a multi-view model) in base64. While every Generator is busy a job
waits in Serve's queue and its stream says where (``progress`` of stage ``waiting_in_queue``). Closing the stream
cancels the job: Serve cancels the request, the Generator sets the job's cancel flag, and the pipeline stops
between two chunks. A Generator that dies mid-job gives an ``error`` event (``backend_lost``); Serve starts a new
one. Imports Ray: only the server and its replicas load this module.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ipaddress
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..protocol import GENERATE_PATH, HEALTH_PATH, SERVICE, Stage
from . import requests as serve_request

APP_NAME = "image_to_3d"
PROTOCOL = 1
KEEPALIVE_S = 5.0  # the longest silence on a stream (the client gives up after client.READ_TIMEOUT_S)
QUEUE_POLL_S = 0.25
RETRIES = 2  # a job whose Generator died before it started there is sent again (nothing of it ran)
REPORT_S = 5.0  # how often each Generator tells the Board its state
STALE_S = 4 * REPORT_S  # a Generator silent for longer is gone
LOST = {"code": "backend_lost", "message": "The backend was lost: the server's GPU worker died during the generation",
        "hint": "It may have run out of memory; the server starts a new one. Generate 3D again"}

logger = logging.getLogger("ray.serve")  # Serve writes it to each replica's log file


def build(config: dict, replicas: int, actor_options: dict):
    """The application: ``config`` holds ``models`` (ids, the first one loaded at start), ``weights`` (model id ->
    folder or None), ``token_sha256``, ``max_upload_bytes``, ``max_queue``, ``threads`` (torch's, per replica; None: its default) and
    ``device`` (``auto``: the replica's GPU; ``cpu`` for replicas given none)."""
    board = Board.bind()
    generator = Generator.options(num_replicas=replicas, ray_actor_options=actor_options).bind(config, board)
    return Ingress.bind(config, generator, board, replicas)


def keep_grpc_on_loopback() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to ``[::]`` (every interface), whatever the
    node's address. On a one-machine server (Ray on 127.0.0.1) bind it there too, so that nothing of the server
    listens beyond this machine. Called in each replica's constructor, before Serve starts that server."""
    from ray.serve._private import replica

    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "on_loopback", False):
        return

    def on_loopback(server, address: str):
        return original(server, address.replace("[::]:", "127.0.0.1:", 1))

    on_loopback.on_loopback = True
    replica.add_port_to_grpc_server = on_loopback


# -- the GPU side --------------------------------------------------------------------------------------------

class Relay:
    """The worker's :class:`~.worker.EventWriter` for a stream: each event goes to the request's asyncio queue
    (from the job's thread); a result takes its files along."""

    def __init__(self, loop, events: asyncio.Queue):
        self.loop, self.events = loop, events
        self.last = None  # the last event's kind (and an error's code), for the log

    def emit(self, event: str, **fields) -> None:
        if event == "result":
            fields["npz"] = base64.b64encode(Path(fields.pop("path")).read_bytes()).decode("ascii")
            views = fields.pop("views", None)
            fields["views_png"] = base64.b64encode(Path(views).read_bytes()).decode("ascii") if views else None
        self.last = fields.get("code", event)
        self.put({"event": event, **fields})

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the request's loop is gone (it was cancelled): nobody listens any more
            pass


@serve.deployment(max_ongoing_requests=1, graceful_shutdown_timeout_s=5, health_check_period_s=5,
                  max_constructor_retry_count=3)
class Generator:
    """One replica per GPU (or CPU share): the model stays loaded, one job at a time, run by the worker's code."""

    def __init__(self, config: dict, board):
        keep_grpc_on_loopback()
        from .. import devices
        from ..field import FieldCache
        from ..models import registry

        self.config, self.board = config, board
        self.model_cache: dict = {}
        self.field_cache = FieldCache()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")
        self.busy_since = None  # time.monotonic() when the running job started
        self.changed = threading.Event()  # a job started or ended: report now
        if config.get("threads"):
            import torch

            torch.set_num_threads(int(config["threads"]))
        self.device = devices.resolve(config.get("device", "auto"))
        spec = registry.get(config["models"][0])  # loaded now, as the local worker keeps it: the first job is warm
        model = registry.load(spec, config["weights"].get(spec.id), self.device, cache=self.model_cache)
        if spec.multiview:
            model.load_views_model()
        self.replica = serve.get_replica_context().replica_id.unique_id
        threading.Thread(target=self._report_every, daemon=True, name="report").start()
        logger.info("Generator %s ready on %s with %s", self.replica, self.device, spec.id)

    async def run(self, job: dict):
        """The job's events, as the worker emits them; the first one says the job left the queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        from ..worker import JobControl

        control = JobControl()
        control.try_begin(job["id"])
        future = loop.run_in_executor(self.executor, self._run, job, control, Relay(loop, events), events)
        yield {"event": "log", "level": "info", "message": f"job {job['id']} started on {self.device}"}
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            if not future.done():  # the stream was closed: the job stops between two chunks, as a local cancel
                control.request_cancel()

    def _run(self, job: dict, control, relay: Relay, events) -> None:
        """In the job thread: the mesh to bake on as a file, then the worker's own job code (its events, errors)."""
        from .. import worker

        self.busy_since = started = time.monotonic()
        self.changed.set()  # /health says busy from the job's start: a stuck job shows, its time growing
        folder = Path(tempfile.mkdtemp(prefix="job-"))
        try:
            # The image as the Ingress decoded it (requests.read_image): read once per request.
            request = {"op": job["op"], "id": job["id"], "image": job.get("image"), "mesh": None,
                       "output_dir": str(folder / "out")}
            (folder / "out").mkdir()
            if job.get("mesh") is not None:
                (folder / "mesh.npz").write_bytes(job["mesh"])
                request["mesh"] = str(folder / "mesh.npz")
            model = job["options"].get("model") or "triposr"
            from ..models import registry

            # The server's files, accepted licences (its operator accepted them at start) and devices.
            request["options"] = dict(job["options"], weights=self.config["weights"].get(registry.get(model).id),
                                      accept_licence=True)
            worker.run_job(request, control, relay, self.model_cache, self.field_cache)
        except Exception as exc:  # noqa: BLE001 - writing the upload failed (a full disk): the worker's error event
            relay.emit("error", id=job["id"], **worker.error_fields(exc))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            self.busy_since = None
            logger.info("job %s: %s after %.1f s", job["id"], relay.last, time.monotonic() - started)
            relay.put(None)
            self.changed.set()

    def describe(self) -> dict:
        """This replica's device, its memory and whether a job runs, for how long (what /health shows)."""
        import psutil

        if self.device.type == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(self.device)
            name = torch.cuda.get_device_name(self.device)
        else:
            memory = psutil.virtual_memory()
            free, total, name = memory.available, memory.total, "CPU" if self.device.type == "cpu" else "Apple GPU"
        since = self.busy_since
        return {"device": self.device.type, "name": name, "memory_total_mb": total // 2**20,
                "memory_free_mb": free // 2**20, "busy": since is not None,
                "job_s": None if since is None else round(time.monotonic() - since, 1)}

    def _report(self) -> None:
        try:
            self.board.report.remote(self.replica, self.describe()).result(timeout_s=REPORT_S)
        except Exception as exc:  # noqa: BLE001 - the Board restarting: the next report will do
            logger.debug("report to the board failed: %s", exc)

    def _report_every(self) -> None:
        while True:
            self.changed.clear()
            self._report()
            self.changed.wait(REPORT_S)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  logging_config={"enable_access_log": False})  # a report every REPORT_S per replica: no log line each
class Board:
    """What each Generator last reported; those silent for STALE_S are gone. ``job_s`` (how long its job has run)
    and ``report_s`` (how long ago it reported) are as of now: a replica stuck in a job that holds the GIL reports
    nothing more, and shows busy, both growing, until Serve's health check replaces it."""

    def __init__(self):
        keep_grpc_on_loopback()
        self.reports: dict = {}

    def report(self, replica: str, info: dict) -> None:
        self.reports[replica] = (time.monotonic(), info)

    def devices(self) -> list:
        now = time.monotonic()
        self.reports = {k: v for k, v in self.reports.items() if now - v[0] < STALE_S}
        shown = []
        for at, info in self.reports.values():
            silent = now - at
            job_s = None if info.get("job_s") is None else round(info["job_s"] + silent, 1)
            shown.append(dict(info, job_s=job_s, report_s=round(silent, 1)))
        return shown


# -- the HTTP side -------------------------------------------------------------------------------------------

def _refused(refusal: serve_request.Refusal) -> JSONResponse:
    """The refusal, naming the service, so that a client told 401 knows it reached this kind of server."""
    headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
    return JSONResponse({**refusal.body(), "service": SERVICE}, status_code=refusal.status, headers=headers)


def _line(event: dict) -> bytes:
    return (json.dumps(event) + "\n").encode("utf-8")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class Ingress:
    """The HTTP endpoints. One replica: its list of waiting jobs is the queue's order."""

    def __init__(self, config: dict, generator, board, replicas: int = 1):
        keep_grpc_on_loopback()
        from ..models import registry

        self.config, self.generator, self.board, self.replicas = config, generator, board, replicas
        self.token_digest = bytes.fromhex(config["token_sha256"])
        self.models = [{"id": m, "name": registry.get(m).display_name} for m in config["models"]]
        self.waiting: list = []  # the jobs not yet on a Generator, oldest first
        self.running = 0

    async def __call__(self, request: Request):
        # Every request, whatever it asks for (the front checked it already; Serve's proxy is reachable on loopback).
        refusal = serve_request.unauthorized(self.token_digest, request.headers.get("authorization"))
        if refusal is not None:
            return _refused(refusal)
        path = request.url.path.rstrip("/") or "/"
        if path == HEALTH_PATH and request.method in ("GET", "HEAD"):
            return await self._health()
        if path == GENERATE_PATH and request.method == "POST":
            return await self._generate(request)
        if path in (HEALTH_PATH, GENERATE_PATH):
            return _refused(serve_request.Refusal(405, "bad_request", f"{request.method} is not for {path}"))
        return _refused(serve_request.Refusal(404, "not_found", f"nothing at {path}; POST {GENERATE_PATH} or GET "
                                                                f"{HEALTH_PATH}"))

    async def _health(self) -> JSONResponse:
        """The models, the devices and their memory, the queue; nothing else (no names, addresses or versions)."""
        try:
            devices = await asyncio.wait_for(self.board.devices.remote(), timeout=REPORT_S)
        except Exception:  # noqa: BLE001 - the Board restarting: no devices to show for now
            devices = []
        body = {"service": SERVICE, "protocol": PROTOCOL, "models": self.models, "devices": devices,
                "queue": {"waiting": len(self.waiting), "running": self.running}}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def _generate(self, request: Request):
        try:
            body = await self._body(request)
            job = await asyncio.to_thread(serve_request.parse, body, tuple(self.config["models"]))
        except serve_request.Refusal as refusal:
            return _refused(refusal)
        if len(self.waiting) >= self.config["max_queue"]:
            return _refused(serve_request.Refusal(503, "busy", f"The server's queue is full ({len(self.waiting)} "
                                                  "jobs waiting)", "Try again in a while"))
        job["id"] = uuid.uuid4().hex[:12]
        # X-Accel-Buffering: a reverse proxy (nginx) must pass each event on at once, not buffer the stream.
        return StreamingResponse(self._events(job), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _body(self, request: Request) -> bytes:
        limit = self.config["max_upload_bytes"]
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise serve_request.too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise serve_request.too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _events(self, job: dict):
        """The job's stream: its place in the queue while it waits, then the Generator's events; something at least
        every KEEPALIVE_S. Cancelled (the client closed it) anywhere: the Generator's request is cancelled too."""
        ticket = job["id"]
        self.waiting.append(ticket)
        started, last_progress, position, waited_since = False, None, None, time.monotonic()
        try:
            for attempt in range(RETRIES + 1):
                stream = self.generator.options(stream=True).run.remote(job)
                pending, ended = None, False
                try:
                    while True:
                        if pending is None:
                            pending = asyncio.ensure_future(stream.__anext__())
                        done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S if started else QUEUE_POLL_S)
                        if not done:
                            if not started:
                                now = self.waiting.index(ticket) + 1
                                # A replica free for it: it is only slow to answer (a busy machine), not busy;
                                # the keepalive below still speaks when the wait is long.
                                if not waits_for_a_replica(now, self.running, self.replicas) \
                                        and time.monotonic() - waited_since <= KEEPALIVE_S:
                                    continue
                                if now != position or time.monotonic() - waited_since > KEEPALIVE_S:
                                    position, waited_since = now, time.monotonic()
                                    yield _line(queued(job["id"], position))
                            elif last_progress is not None:
                                yield _line(last_progress)  # the same again: the stream is alive
                            continue
                        task, pending = pending, None
                        try:
                            event = task.result()
                        except StopAsyncIteration:
                            ended = True
                            return
                        if not started:
                            started = True
                            self.waiting.remove(ticket)
                            self.running += 1
                        if event.get("event") == "progress":
                            last_progress = event
                        yield _line(event)
                except ray.exceptions.RayTaskError as exc:  # a bug in Generator.run itself
                    logger.exception("job %s failed on its Generator", job["id"])
                    yield _line({"event": "error", "id": job["id"], "code": "internal",
                                 "message": f"The server failed: {type(exc.cause).__name__}: {exc.cause}",
                                 "hint": "The server's log has the details"})
                    return
                except ray.exceptions.RayError as exc:  # its Generator died (or became unreachable)
                    if not started and attempt < RETRIES:
                        logger.warning("job %s: its Generator died before starting it (%s); sending it again",
                                       job["id"], type(exc).__name__)
                        await asyncio.sleep(1.0)
                        continue
                    logger.warning("job %s: its Generator was lost: %s", job["id"], type(exc).__name__)
                    yield _line(dict(LOST, event="error", id=job["id"]))
                    return
                finally:
                    if pending is not None:
                        pending.cancel()
                    if not ended:  # the client went away (or the Generator failed): its request goes too
                        stream.cancel()
        finally:
            if started:
                self.running -= 1
            elif ticket in self.waiting:
                self.waiting.remove(ticket)


def waits_for_a_replica(position: int, running: int, replicas: int) -> bool:
    """Whether the job at ``position`` in the line (1: first) finds every replica taken: the jobs ahead of it and
    the running ones fill them."""
    return position > replicas - running


def queued(job_id: str, position: int) -> dict:
    ahead = position - 1
    message = "next in line" if not ahead else f"{ahead} job{'s' if ahead > 1 else ''} ahead"
    return {"event": "progress", "id": job_id, "stage": Stage.QUEUED, "fraction": 0.0,
            "message": f"The server is busy: {message}", "position": position}
