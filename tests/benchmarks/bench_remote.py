"""Benchmark: what the shared server's HTTP path costs against the local worker, and its throughput with two
clients, printing JSON.

    .venv/bin/python tests/benchmarks/bench_remote.py [--runs 20] [--resolution 64] [--jobs-per-client 10]
        [--replicas 1]

The tiny TripoSR (tests/data/triposr_tiny), warm on both sides (two jobs first, not counted):

- ``local``: ``client.Worker`` (``python -m backend serve`` over pipes); ``remote``: ``client.RemoteWorker``
  against ``python -m backend cluster-serve`` on 127.0.0.1 (a Ray of this machine; one CPU replica unless
  ``--replicas``), over HTTP (the image up, the .npz back in base64). Local and remote jobs alternate, both kept
  running, ``--runs`` of each.
- For each: ``round_trip_s``, seconds from ``submit`` to the result file in the job folder, and ``transport_s``,
  that less the pipeline's own time (the result's ``total_seconds``): what the wire costs, whatever the model
  takes (on a loaded machine the model's time varies far more than the wire's).
- ``overhead_s``: the HTTP path's transport less the pipe's (medians), per job.
- ``throughput``: jobs per minute through the server with one client, then with two clients at once (each
  ``--jobs-per-client`` jobs; with one replica the second client's jobs wait in its queue).

Wall-clock seconds as a user waits for them. Not a test: it asserts nothing, it measures.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend import client as wire  # noqa: E402
from backend import protocol  # noqa: E402

TINY = ROOT / "tests" / "data" / "triposr_tiny"
IMAGE = TINY / "input_rgba.png"
TOKEN = "bench-remote-token-" + "5" * 24


def timed_jobs(transport, options: dict, count: int) -> list:
    """(round trip, the pipeline's own seconds) of each of ``count`` jobs, one after another."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        job = transport.submit(str(IMAGE), options)
        transport.wait(600)
        if job.state != protocol.DONE:
            raise SystemExit(f"a job failed: {job.error}")
        seconds.append((time.perf_counter() - started, job.stats["total_seconds"]))
        job.cleanup()
    return seconds


def summary(jobs: list) -> dict:
    round_trips, transports = [t for t, _ in jobs], [t - pipeline for t, pipeline in jobs]
    return {"runs": len(jobs), "round_trip_s": {"median": round(statistics.median(round_trips), 4),
                                                 "min": round(min(round_trips), 4), "max": round(max(round_trips), 4)},
            "transport_s": {"median": round(statistics.median(transports), 4), "min": round(min(transports), 4),
                            "max": round(max(transports), 4)}}


def start_server(work: Path, replicas: int) -> tuple:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    log = work / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp), protocol.TOKEN_ENV: TOKEN}
    args = ["--port", str(port), "--weights", str(TINY), "--replicas", str(replicas)]
    if replicas > 1:
        args += ["--cpus-per-replica", str(max(1, (os.cpu_count() or 2) // replicas))]
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "backend", "cluster-serve", *args], cwd=ROOT, env=env,
                                   stdout=out, stderr=out)
    started = time.perf_counter()
    while "ready at" not in log.read_text():
        if process.poll() is not None or time.perf_counter() - started > 600:
            raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return process, f"http://127.0.0.1:{port}", ray_tmp, time.perf_counter() - started


def throughput(url: str, options: dict, clients: int, jobs: int, work: Path) -> dict:
    jobs_done, failures = [], []

    def one_client(index: int) -> None:
        transport = wire.RemoteWorker(url, TOKEN, temp_dir=str(work / f"client-{clients}-{index}"))
        try:
            jobs_done.extend(timed_jobs(transport, options, jobs))
        except SystemExit as e:
            failures.append(str(e))

    started = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(failures[0])
    return {"clients": clients, "jobs": clients * jobs, "seconds": round(elapsed, 2),
            "jobs_per_minute": round(clients * jobs / elapsed * 60, 1),
            "median_round_trip_s": round(statistics.median(t for t, _ in jobs_done), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--jobs-per-client", type=int, default=10)
    p.add_argument("--replicas", type=int, default=1)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    os.environ["IMAGE_TO_3D_FIELDS"] = str(work / "fields")  # the generations' fields, for both sides: not the user's
    options = {"weights": str(TINY), "resolution": args.resolution, "remove_background": False, "device": "cpu"}
    result = {"model": "triposr (tiny, tests/data/triposr_tiny)", "resolution": args.resolution,
              "cpu_count": os.cpu_count(), "replicas": args.replicas}
    local = wire.Worker(sys.executable, ROOT, temp_dir=str(work / "local"))
    process, url, ray_tmp, startup = start_server(work, args.replicas)
    try:
        result["server_startup_s"] = round(startup, 1)
        remote = wire.RemoteWorker(url, TOKEN, temp_dir=str(work / "remote"))
        for transport in (local, remote):
            timed_jobs(transport, options, 2)  # warm: the model loaded
        pairs = [(timed_jobs(local, options, 1)[0], timed_jobs(remote, options, 1)[0]) for _ in range(args.runs)]
        local.stop()
        result["local"] = summary([a for a, _ in pairs])
        result["remote"] = summary([b for _, b in pairs])
        result["overhead_s"] = round(result["remote"]["transport_s"]["median"] -
                                     result["local"]["transport_s"]["median"], 4)
        result["throughput"] = [throughput(url, options, clients, args.jobs_per_client, work) for clients in (1, 2)]
    finally:
        local.stop()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
