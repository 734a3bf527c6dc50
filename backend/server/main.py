"""``python -m backend cluster-serve``: the backend as a shared GPU server on Ray Serve, for Blender's Remote backend.

One machine (the default: a Ray of this machine alone, every part of it on 127.0.0.1) or a Ray cluster
(``--address auto`` on the head node of ``ray start --head``). One replica per GPU (``--gpus-per-replica``, or
``--replicas N``), each keeping its model loaded; jobs beyond them wait in a queue. Every request needs the token
(``Authorization: Bearer``); see :mod:`.token`. The application itself is :mod:`.app`; the public port is
:mod:`.front`'s (timeouts, the token before the body), which passes requests to Serve's proxy on 127.0.0.1.

Exit status: 0 after Ctrl+C (or SIGTERM), 2 a bad option, 3 missing weights, 4 a licence to accept, 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import BackendError, InputError, first_line
from ..files import sigterm_as_interrupt
from . import front, token as serve_token

REQUIREMENTS = "backend/requirements-serve.txt"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765
DEFAULT_MAX_UPLOAD_MB = 64
DEFAULT_MAX_QUEUE = 100
# Passed to every replica (on other nodes too): where the weights, the fields and the licences are, offline mode.
PASSED_ENVIRONMENT = ("IMAGE_TO_3D_FIELDS",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m backend cluster-serve",
        description="Serve Generate 3D to many Blender sessions from this machine's GPUs, or a Ray cluster's.",
        epilog="The token: --token-file, else $IMAGE_TO_3D_SERVER_TOKEN, else the server's own file (made, and "
               "shown once, on the first start). TLS: put a reverse proxy in front (README: A shared GPU server).")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--models", default="triposr",
                   help="comma-separated model ids the server offers; the first is loaded when a replica starts "
                        "(default triposr)")
    p.add_argument("--weights", metavar="DIR",
                   help="model folder in the official layout (one model), or a folder of one sub-folder per model id; "
                        "default: the model store, then the Hugging Face cache (on a cluster: of every node)")
    p.add_argument("--replicas", type=int, metavar="N", help="number of replicas (default: one per GPU share)")
    p.add_argument("--gpus-per-replica", type=float, metavar="G",
                   help="GPUs each replica takes: 1 (the default where there are GPUs), 0.5 for two small models per "
                        "GPU, 2 for a model that needs two; 0 runs on the CPU")
    p.add_argument("--cpus-per-replica", type=int, metavar="N",
                   help="CPU cores each replica takes (default 1 with a GPU; without, all of them shared out)")
    p.add_argument("--address", metavar="ADDRESS",
                   help="an existing Ray cluster: auto (the one this machine is in) or ray://HEAD:10001; default: a "
                        "Ray of this machine alone, on 127.0.0.1")
    p.add_argument("--token-file", metavar="FILE", help="read the token from FILE (one line)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help="largest request body (the image, or a mesh to bake on), in MB "
                        f"(default {DEFAULT_MAX_UPLOAD_MB})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"jobs that may wait for a replica; more get 503 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--accept-licence", action="store_true",
                   help="accept the licence of a served model where it restricts use (OpenLRM, InstantMesh: CC BY-NC "
                        "4.0); remembered")
    p.add_argument("--offline", action="store_true", help="never connect: the weights must be on the machines")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
        _check_port_free(args.host, args.port)  # the front's, on this machine (Serve's proxy is on loopback)
        ray, serve = _require_serve(local=args.address is None)
        token, origin, created = serve_token.resolve(args.token_file)  # made only once the server can start
        os.environ.pop(serve_token.ENV, None)  # Ray's processes inherit this environment; only a digest goes on
    except BackendError as e:
        return _fail(e.exit_status, e.message, e.hint)
    if args.token_file and serve_token.loose_permissions(args.token_file):
        print(f"warning: {args.token_file} can be read by other users of this machine: chmod 600 it", file=sys.stderr)
    config["token_sha256"] = serve_token.digest(token).hex()
    if not ipaddress.ip_address(_resolved(args.host)).is_loopback:
        print(f"warning: listening on {args.host}: anyone who can reach this machine can try a token. Use this behind "
              "a TLS reverse proxy on a network you trust (README: A shared GPU server)", file=sys.stderr)

    try:
        with _ray(args.address), sigterm_as_interrupt():  # after ray.init, which sets a SIGTERM handler of its own
            return _serve(ray, serve, args, config, token, origin, created)
    except BackendError as e:
        return _fail(e.exit_status, e.message, e.hint)
    except KeyboardInterrupt:  # while Ray was starting
        return 130


def _serve(ray, serve, args, config: dict, token: str, origin: str, created: bool) -> int:
    """Deploy the application, say where it is, and keep it up until Ctrl+C or SIGTERM; then take it down."""
    from . import app as serve_app

    replicas, actor_options = _shape(ray.cluster_resources(), args)
    # A replica without a GPU share runs on the CPU even where the machine has GPUs (they are others' to use), with
    # as many torch threads as cores it was given; one with a GPU keeps torch's default, as the local worker does.
    on_cpu = not actor_options["num_gpus"]
    config.update(device="cpu" if on_cpu else "auto", threads=actor_options["num_cpus"] if on_cpu else None)
    print(f"Starting {replicas} replica{'s' if replicas > 1 else ''} ({_describe_shape(actor_options)}), "
          f"loading {config['models'][0]}...", file=sys.stderr, flush=True)
    running = None
    try:
        # Serve's proxy on loopback only; the public port is the front's (front.py: timeouts, the token first).
        proxy = ("127.0.0.1", _free_loopback_port())
        serve.start(http_options={"host": proxy[0], "port": proxy[1], "location": "HeadOnly"})
        serve.run(serve_app.build(config, replicas, actor_options), name=serve_app.APP_NAME, route_prefix="/")
        _wait_for_proxy(proxy)
        family = socket.AF_INET6 if ":" in _resolved(args.host) else socket.AF_INET
        running = front.start(front.listen(args.host, args.port, family), proxy,
                              bytes.fromhex(config["token_sha256"]), config["max_upload_bytes"])
        _announce(args, config, replicas, token, origin, created)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the server...", file=sys.stderr, flush=True)
        return 0
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 - a replica that cannot start (its weights, its GPU): say why
        return _fail(1, f"the server could not start: {first_line(e, 500)}",
                     "The replicas' log is in Ray's session folder (logs/serve/)")
    finally:
        if running is not None:
            running.stop()
        _stop(serve, serve_app.APP_NAME, args.address)


def _config(args) -> dict:
    """The served models (checked: known, licence accepted, weights there when this machine runs them), limits."""
    from ..hub import OFFLINE_ENVIRONMENT
    from ..licences import accept_or_refuse
    from ..models import registry

    if args.offline:
        os.environ.update(OFFLINE_ENVIRONMENT)
    if args.replicas is not None and args.replicas < 1:
        raise InputError(f"--replicas must be at least 1, got {args.replicas}")
    if args.gpus_per_replica is not None and args.gpus_per_replica < 0:
        raise InputError(f"--gpus-per-replica cannot be negative, got {args.gpus_per_replica}")
    if args.cpus_per_replica is not None and args.cpus_per_replica < 1:
        raise InputError(f"--cpus-per-replica must be at least 1, got {args.cpus_per_replica}")
    if not 0 < args.max_upload_mb <= 4096:
        raise InputError(f"--max-upload-mb must be between 0 and 4096, got {args.max_upload_mb:g}")
    if args.max_queue < 0:
        raise InputError(f"--max-queue cannot be negative, got {args.max_queue}")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    ids = [m.strip() for m in args.models.split(",") if m.strip()]
    if not ids:
        raise InputError("--models names no model")
    specs = list({spec.id: spec for spec in map(registry.get, ids)}.values())
    weights = {spec.id: _weights_for(spec.id, args.weights, len(specs)) for spec in specs}
    for spec in specs:
        accept_or_refuse(spec, args.accept_licence)
        if args.address is None:  # here; on a cluster each node looks for its own
            registry.find_folder(spec, weights[spec.id])
    return {"models": [spec.id for spec in specs], "weights": weights,
            "max_upload_bytes": int(args.max_upload_mb * 2**20), "max_queue": args.max_queue}


def _weights_for(model_id: str, folder: str | None, count: int) -> str | None:
    if not folder:
        return None
    nested = Path(folder).expanduser() / model_id
    if nested.is_dir():
        return str(nested.resolve())
    if count > 1:
        raise InputError(f"--weights {folder} has no sub-folder {model_id}/: with several models it must hold one "
                         "sub-folder per model id")
    return str(Path(folder).expanduser().resolve())


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_proxy(address: tuple, timeout: float = 60.0) -> None:
    """Serve's proxy runs on the head node; the front forwards to it over loopback, so it must be on this machine."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise InputError("Ray Serve's HTTP proxy is not on this machine",
                                 hint="Run cluster-serve on the cluster's head node (--address auto there)") from None
            time.sleep(0.2)


def _resolved(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None)[0][4][0]
    except socket.gaierror:
        raise InputError(f"--host {host!r} is not an address of this machine") from None


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in _resolved(host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                             hint="Another program uses that port (another server?): choose one with --port") from None


def _require_serve(local: bool):
    if local:  # read when Ray is imported: set before
        from ..ray_batch import LOOPBACK_RAY

        os.environ.update(LOOPBACK_RAY)
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None or \
            importlib.util.find_spec("starlette") is None:
        raise BackendError("cluster-serve needs Ray Serve, which this Python does not have",
                           hint=f"Install it into the backend Python: `python -m pip install -r {REQUIREMENTS}` "
                                "(the same version on every node of a cluster)")
    import ray
    from ray import serve

    return ray, serve


def _ray(address: str | None):
    """Ray for the server: this machine alone on 127.0.0.1 (ended with the server), or an existing cluster."""
    from .. import ray_batch

    return ray_batch.connected(
        address or "local", {k: os.environ[k] for k in PASSED_ENVIRONMENT if k in os.environ},
        hint="Start one with `ray start --head` (workers: `ray start --address HEAD:6379`), then run "
             "cluster-serve --address auto on the head node")


def _shape(resources: dict, args) -> tuple[int, dict]:
    """How many replicas, and each one's Ray resources, from the cluster's GPUs and CPUs."""
    gpus, cpus = float(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    share = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if gpus >= 1 else 0.0)
    if share > gpus:
        raise InputError(f"each replica would take {share:g} GPU{'s' if share != 1 else ''}, and the cluster has "
                         f"{gpus:g}", hint="Lower --gpus-per-replica (0: on the CPU)")
    replicas = args.replicas or (max(1, int(gpus // share)) if share else 1)
    per_cpu = args.cpus_per_replica or (1 if share else max(1, cpus // replicas))
    if share and replicas * share > gpus + 1e-9:
        raise InputError(f"{replicas} replicas × {share:g} GPU need {replicas * share:g} GPUs; the cluster has "
                         f"{gpus:g}",
                         hint="Fewer --replicas, or a smaller --gpus-per-replica")
    if replicas * per_cpu > cpus:
        raise InputError(f"{replicas} replicas × {per_cpu} CPU cores need {replicas * per_cpu}; the cluster has {cpus}",
                         hint="Fewer --replicas, or fewer --cpus-per-replica")
    return replicas, {"num_gpus": share, "num_cpus": per_cpu}


def _describe_shape(actor_options: dict) -> str:
    gpus = actor_options["num_gpus"]
    where = f"{gpus:g} GPU" if gpus else "CPU only"
    return f"{where}, {actor_options['num_cpus']} CPU core{'s' if actor_options['num_cpus'] > 1 else ''} each"


def _announce(args, config, replicas: int, token: str, origin: str, created: bool) -> None:
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Image to 3D server ready at http://{host}:{args.port} ({', '.join(config['models'])}; {replicas} "
          f"replica{'s' if replicas > 1 else ''})", flush=True)
    if created:  # the only time the token is shown
        print(f"New token (shown this once; kept in {origin}, readable by you only):\n{token}", flush=True)
    else:
        print(f"Token: from {origin}", flush=True)
    print("Ctrl+C stops it.", file=sys.stderr, flush=True)


def _stop(serve, app_name: str, address: str | None) -> None:
    """A Ray of our own goes with ray.shutdown(); on a shared cluster only our application goes."""
    try:
        if address is None:
            serve.shutdown()
        else:
            serve.delete(app_name)
    except Exception as e:  # noqa: BLE001 - already gone (Ray lost): nothing left to stop
        print(f"note: stopping Serve: {first_line(e, 500)}", file=sys.stderr)


def _fail(status: int, message: str, hint: str = "") -> int:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return status
