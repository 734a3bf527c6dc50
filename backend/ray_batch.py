"""The batch on a Ray cluster: ``python -m backend generate ... -o OUT/ --ray auto|local|ray://HOST:PORT``.

One actor per GPU (or per ``--ray-cpus`` CPUs where the cluster has no GPU) loads the model once and keeps it.
The driver streams the images to them, one at a time per actor, as bytes (the inputs need only be readable
where the driver runs); each actor runs :func:`batch.reconstruct` on its image — the local batch's own
per-image function — and ships the mesh back, and the driver writes it with :func:`batch.save_mesh`. So the
names and the files are the local batch's, and OUT need only exist on the driver's machine (no shared
storage for the results, no half-written file on a node that dies).

Faults: an image whose actor dies under it (a crash, an out-of-memory kill, a node lost) is sent again, at most
:data:`CRASH_RETRIES` times, and the dead actor is replaced. An image the pipeline refuses (a bad image) is
reported and not retried. An actor that cannot load the model (weights missing on its node) is retired with
an error naming the node; when no actor can, nothing runs. The run ends with every input done or reported.

Ray is an optional extra (``backend/requirements-ray.txt``), imported only here, only for ``--ray``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import batch
from .errors import BackendError, InputError

CRASH_RETRIES = 2  # an image is sent again at most this many times after its actor died under it
START_FAILURES = 3  # replacement actors that die while starting, in a row, before no more are made
START_TIMEOUT_S = 900.0  # no actor ready and none working for this long: the cluster cannot run one
POLL_S = 1.0
REQUIREMENTS = "backend/requirements-ray.txt"
# Where the weights and settings are found: the driver's choices hold on the nodes too (shared storage).
PASSED_ENVIRONMENT = ("IMAGE_TO_3D_MODELS", "IMAGE_TO_3D_CONFIG_DIR", "IMAGE_TO_3D_OFFLINE", "HF_HOME",
                      "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class RayMissing(BackendError):
    code = "missing_package"


def require_ray():
    try:
        import ray
    except ImportError as e:
        raise RayMissing(f"--ray needs the Ray package, which this Python lacks ({e})",
                         hint=f"Install it into the backend Python: `python -m pip install -r {REQUIREMENTS}` "
                              f"(the same version on every node of the cluster).") from None
    return ray


def runtime_env() -> dict:
    """The job's environment on every node: this backend package (so the nodes run the driver's code) and the
    settings that say where the weights are."""
    env = {k: os.environ[k] for k in PASSED_ENVIRONMENT if k in os.environ}
    return {"py_modules": [str(Path(__file__).resolve().parent)], "env_vars": env}


# Without it, Ray gives its processes this machine's network address even for a cluster of this machine
# alone (and some of them listen on every interface). Read when Ray is imported.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
CLUSTER_HINT = ("Start one with `ray start --head` (workers: `ray start --address HEAD:6379`), then use --ray auto "
                "on the head node or --ray ray://HEAD:10001 elsewhere; or --ray local for this machine alone.")


@contextlib.contextmanager
def connected(address: str, env_vars: Optional[dict] = None, hint: str = CLUSTER_HINT):
    """Ray initialised for ``address`` (``local``: a cluster of this machine alone, everything of it on
    127.0.0.1, ended with the run; ``auto`` or ``ray://host:port``: an existing cluster), shut down at the
    end; ``env_vars`` are added to the job's environment on every node. A Ray session the caller already
    started is used as it is."""
    if address == "local":
        os.environ.update(LOOPBACK_RAY)
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    env = runtime_env()
    env["env_vars"].update(env_vars or {})
    options = dict(runtime_env=env, logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False)
    if address == "local":
        options.update(address="local", _node_ip_address="127.0.0.1")
    else:
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot connect to the Ray cluster at {address!r}: {e}", hint=hint) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def actor_shape(resources: dict, cpus_per_actor: int, use_gpus: bool = True) -> tuple:
    """(how many actors, the resources of each): one per GPU; without GPUs (or with --device cpu) one per
    ``cpus_per_actor`` CPUs."""
    gpus = int(resources.get("GPU", 0)) if use_gpus else 0
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    per_actor = max(1, min(int(cpus_per_actor), cpus))
    return max(1, cpus // per_actor), {"num_cpus": per_actor}


class ReconstructionWorker:
    """A Ray actor: one loaded model, kept for every image it is given. Made remote by :func:`run`."""

    def __init__(self, options: dict, threads: Optional[int] = None):
        from .options import Options

        if threads:  # CPU actors: use the CPUs Ray gave this actor, not every core of the node
            import torch

            torch.set_num_threads(threads)
        self.options = Options(**options)
        self.model_cache: dict = {}

    def where(self) -> dict:
        import ray

        return {"node": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def warm_up(self) -> dict:
        """Load the model. Returns where this actor runs and its device, or the error (the weights not on this
        node, most likely) and its exit status."""
        try:
            device = batch.load_model(self.options, self.model_cache)
        except Exception as e:  # noqa: BLE001 - reported by the driver, with the node's name
            return {"error": batch.error_fields(e), "exit_status": getattr(e, "exit_status", 1), **self.where()}
        return {"device": str(device), **self.where()}

    def reconstruct(self, name: str, data: bytes) -> dict:
        """One image (its file name as the user gave it, and its bytes) -> {"mesh"} or {"error"}."""
        scratch = Path(tempfile.mkdtemp(prefix="image_to_3d-ray-"))
        image = scratch / Path(name).name  # the user's file name, so that messages name it as a local run does
        try:
            image.write_bytes(data)
            return {"mesh": batch.reconstruct(image, self.options, self.model_cache), **self.where()}
        except Exception as e:  # noqa: BLE001 - a bad image is an answer, not a crash
            error = {k: v.replace(str(image), name) if isinstance(v, str) else v
                     for k, v in batch.error_fields(e).items()}
            return {"error": error, **self.where()}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        from .preprocess import load_image

        load_image(path)  # raises the error a local run gives (not found, a folder, unreadable)
        raise


def weights_hint(options, error: dict) -> str:
    where = f"--weights {options.weights}" if options.weights else "the model store (IMAGE_TO_3D_MODELS)"
    return (f"The weights must be readable on every node: put them on storage the nodes share (the same path for "
            f"{where}), or run `python -m backend download --model {options.model}` on each node. "
            f"{error.get('hint', '')}").strip()


class _Run:
    """The driver's loop: actors starting, idle and busy; the images waiting; what each image cost."""

    def __init__(self, ray, options, report: batch.Report, stop, cpus_per_actor: int, inputs):
        self.ray, self.options, self.report, self.stop = ray, options, report, stop
        self.inputs = inputs
        self.count, resources = actor_shape(ray.cluster_resources(), cpus_per_actor, options.device != "cpu")
        threads = None if "num_gpus" in resources else resources["num_cpus"]
        # max_restarts=0: a dead actor is replaced here, where its image is known and sent again.
        self.actor_class = ray.remote(max_restarts=0, max_task_retries=0, **resources)(ReconstructionWorker)
        self.actor_args = (options.to_dict(), threads)
        self.resources = resources
        self.waiting: collections.deque = collections.deque()
        self.crashes: collections.Counter = collections.Counter()
        self.pending: dict = {}  # ObjectRef -> (actor, item or None for a warm-up, when sent)
        self.idle: list = []
        self.actors: dict = {}  # actor -> where it runs, once started
        self.start_failures = 0
        self.setup_errors: dict = {}  # message -> (error, exit status) of the actors that could not load the model
        self.last_event = time.monotonic()

    def start_actor(self) -> None:
        actor = self.actor_class.remote(*self.actor_args)
        self.pending[actor.warm_up.remote()] = (actor, None, time.perf_counter())

    def run(self, todo) -> None:
        self.waiting.extend(todo)
        each = f"{self.resources['num_gpus']} GPU" if "num_gpus" in self.resources else \
            f"{self.resources['num_cpus']} CPU"
        self.report.note(f"Ray: {self.count} worker(s), {each} each")
        for _ in range(self.count):
            self.start_actor()
        try:
            while self.waiting or any(item for _, item, _ in self.pending.values()):
                if self.stop.requested:
                    self.report.interrupted = True
                    self.waiting.clear()  # what is in flight finishes and is written; the rest is not run
                self.dispatch()
                if not self.pending:
                    break  # no actor left: what is waiting is reported below
                ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    self.collect(ref)
                if not ready and self.stalled():
                    break
            self.give_up()
        finally:
            for actor in [a for a, _, _ in self.pending.values()] + list(self.actors):
                with contextlib.suppress(Exception):  # already gone
                    self.ray.kill(actor, no_restart=True)

    def dispatch(self) -> None:
        while self.idle and self.waiting:
            item = self.waiting.popleft()
            try:
                data = read_input(item.input)
            except Exception as e:  # noqa: BLE001 - a bad input, reported like any other
                self.report.error(item, batch.error_fields(e))
                continue
            actor = self.idle.pop()
            self.pending[actor.reconstruct.remote(str(item.input), data)] = (actor, item, time.perf_counter())
            where = self.actors.get(actor, {})
            self.report.say(f"{self.report.prefix(item)} · sent to {where.get('node')} (pid {where.get('pid')})")

    def collect(self, ref) -> None:
        actor, item, sent = self.pending.pop(ref)
        self.last_event = time.monotonic()
        try:
            answer = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # not a crash: the answer could not be made or read
            if item is None:
                self.retire(actor, {"error": batch.error_fields(e), "exit_status": 1, "node": "?"})
            else:
                self.report.error(item, batch.error_fields(e))
                self.idle.append(actor)
            return
        except self.ray.exceptions.RayError as e:  # the actor, its process or its node died
            self.replace(actor, item, e)
            return
        if item is None:
            if "error" in answer:
                self.retire(actor, answer)
            else:
                self.start_failures = 0
                self.actors[actor] = answer
                self.idle.append(actor)
                self.report.note(f"Ray worker ready on {answer['node']} (pid {answer['pid']}, {answer['device']})")
            return
        self.idle.append(actor)
        if "error" in answer:
            self.report.error(item, answer["error"], node=answer["node"])
            return
        try:
            fields = batch.save_mesh(answer["mesh"], item.output, self.inputs)
        except Exception as e:  # noqa: BLE001
            self.report.error(item, batch.error_fields(e), node=answer["node"])
            return
        self.report.result(item, fields, time.perf_counter() - sent, node=answer["node"])

    def retire(self, actor, answer: dict) -> None:
        """An actor that could not load the model is not replaced: another one would fail there too."""
        error = dict(answer["error"], message=f"{answer['error']['message']} (on the Ray node {answer['node']})")
        if error.get("code") == "weights":
            error["hint"] = weights_hint(self.options, error)
        if error["message"] not in self.setup_errors:  # once per node, not once per GPU
            print(f"error: a Ray worker cannot start: {error['message']}", file=sys.stderr, flush=True)
        self.setup_errors.setdefault(error["message"], (error, answer.get("exit_status", 1)))
        self.ray.kill(actor, no_restart=True)

    def replace(self, actor, item, exc) -> None:
        where = self.actors.pop(actor, {}).get("node", "its node")
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if item is None:
            self.start_failures += 1
            self.report.note(f"a Ray worker died while starting ({cause})")
        else:
            self.crashes[item.number] += 1
            if self.crashes[item.number] <= CRASH_RETRIES:
                self.report.note(f"{self.report.prefix(item)} · its Ray worker died ({cause}): sending it again "
                                f"({self.crashes[item.number]} of {CRASH_RETRIES})")
                self.waiting.appendleft(item)
            else:
                self.report.error(item, {"code": "worker_crashed", "message": f"the Ray worker died on this image "
                                         f"{self.crashes[item.number]} times, the last on {where}: {cause}",
                                         "hint": "It may need more memory than a worker has: try a lower "
                                                 "--resolution, or run it alone without --ray."})
        if self.start_failures < START_FAILURES and self.waiting:
            self.start_actor()

    def stalled(self) -> bool:
        """Nothing working and no actor ready for START_TIMEOUT_S: the cluster cannot give us one."""
        busy = any(item for _, item, _ in self.pending.values())
        return not busy and not self.idle and time.monotonic() - self.last_event > START_TIMEOUT_S

    def give_up(self) -> None:
        """Report every image still waiting: why no actor could take it."""
        if not self.waiting:
            return
        first_setup_error = next(iter(self.setup_errors.values()), None)
        if first_setup_error and not self.actors and not self.report.done:
            raise _SetupFailed(*first_setup_error)
        error = {"code": "no_worker", "message": "no Ray worker was left to run this image",
                 "hint": f"The cluster could not start one with {self.resources} "
                         f"(see the errors above, and `ray status`)."}
        if first_setup_error:
            error["message"] += f": {first_setup_error[0]['message']}"
        while self.waiting:
            self.report.error(self.waiting.popleft(), error)


class _SetupFailed(BackendError):
    def __init__(self, error: dict, exit_status: int):
        super().__init__(error["message"], error.get("hint", ""))
        self.code, self.exit_status = error.get("code", "internal"), exit_status


def run(items, options, report: batch.Report, stop, address: str, cpus_per_actor: int = 4,
        skip_existing: bool = False) -> int:
    """The batch on the cluster at ``address``; the same report and exit status as :func:`batch.run_local`."""
    if options.device.startswith("cuda:"):  # an actor sees only the GPU Ray gave it, as cuda:0
        options = dataclasses.replace(options, device="cuda")
    todo = [item for item in items if batch.runs(item, skip_existing)]
    for item in items:
        if not batch.runs(item, skip_existing):
            batch.report_not_run(item, report)
    if not todo:
        return report.summary()
    with connected(address) as ray:
        _Run(ray, options, report, stop, cpus_per_actor, [item.input for item in items]).run(todo)
    return report.summary()
