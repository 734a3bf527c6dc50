"""Soak: many jobs through the local worker (or a shared server with several clients), random cancels, hostile
requests mixed in; prints JSON. Every good job must finish, every hostile one be refused, the backend's memory stay
flat, no process be left behind.

    .venv/bin/python tests/benchmarks/soak.py worker [--jobs 200] [--seed 1]
    .venv/bin/python tests/benchmarks/soak.py server [--jobs 200] [--clients 4]

The tiny TripoSR (tests/data/triposr_tiny) at resolution 48 and 64. About one job in eight is cancelled a random
moment after it starts. Five hostile requests, one of each kind: a bake on a mesh with infinite coordinates, a
bake .npz that declares a 3 GB array in 3 MB, an EPS file named .png, a 16-bit 16384² PNG, an option of the wrong
type. ``rss_growth_mb``: the backend's resident memory at the end less after the 20th job (warm).
Exit status 1 when any rule is broken (the JSON says which). Loopback only; it stops by itself.
"""

import argparse
import io
import json
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backend import client as wire  # noqa: E402
from backend import protocol  # noqa: E402

import bench_remote  # noqa: E402 - the server as that benchmark starts it

TINY = ROOT / "tests" / "data" / "triposr_tiny"
IMAGE = TINY / "input_rgba.png"
GOOD = {"weights": str(TINY), "remove_background": False, "device": "cpu"}
TOKEN = bench_remote.TOKEN
WARM_AFTER = 20


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def hostile_files(folder: Path) -> dict:
    """The hostile inputs, made once: name -> (op, image, options, mesh)."""
    (folder / "inf.npz").write_bytes(_polygons(np.inf))
    declared = folder / "declared.npz"  # a 3 MB zip member whose header declares 3 GB of float32
    with zipfile.ZipFile(declared, "w", zipfile.ZIP_DEFLATED) as z:
        header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 3), np.float32))
        header["shape"] = (250_000_000, 3)
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, header)
        z.writestr("vertices.npy", buffer.getvalue() + b"\0" * (3 << 20))
        for name in ("corner_verts", "loop_totals"):
            member = io.BytesIO()
            np.save(member, np.zeros(3, np.int32))
            z.writestr(f"{name}.npy", member.getvalue())
    (folder / "chair.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    rows = b"".join(b"\0" + b"\0" * (16384 * 2) for _ in range(16384))  # 16-bit grey, all zero
    (folder / "huge16.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16384, 16384, 16, 0, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b""))
    return {
        "bake_inf": ("bake", str(IMAGE), {"field_id": None, "texture": 512}, str(folder / "inf.npz")),
        "bake_declared": ("bake", str(IMAGE), {"field_id": None, "texture": 512}, str(declared)),
        "eps_named_png": ("generate", str(folder / "chair.png"), dict(GOOD, resolution=64), None),
        "png_16bit_16384": ("generate", str(folder / "huge16.png"), dict(GOOD, resolution=64), None),
        "wrong_type": ("generate", str(IMAGE), dict(GOOD, resolution="high"), None),
    }


def _polygons(value: float) -> bytes:
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    vertices[0, 0] = value
    buffer = io.BytesIO()
    np.savez(buffer, vertices=vertices, corner_verts=np.array([0, 1, 2], np.int32),
             loop_totals=np.array([3], np.int32))
    return buffer.getvalue()


def plan(jobs: int, hostile: dict, rng: random.Random) -> list:
    items = [("good", rng.random() < 0.125) for _ in range(jobs - len(hostile))]
    for name in hostile:
        items.insert(rng.randrange(WARM_AFTER, len(items) + 1), (name, False))
    return items


def run_client(transport, items: list, hostile: dict, rng: random.Random, field_id: str, record: list,
               on_job=None) -> None:
    for number, (name, cancel) in enumerate(items, 1):
        if name == "good":
            op, image, options, mesh = "generate", str(IMAGE), dict(GOOD, resolution=rng.choice((48, 64))), None
        else:
            op, image, options, mesh = hostile[name]
            options = {k: (field_id if k == "field_id" else v) for k, v in options.items()}
        started = time.monotonic()
        job = transport.submit(image, options, op=op, mesh=mesh)
        if cancel:
            time.sleep(rng.uniform(0.0, 0.6))
            transport.cancel()
        transport.wait(300)
        record.append({"name": name, "cancel": cancel, "state": job.state,
                       "code": (job.error or {}).get("code"), "seconds": round(time.monotonic() - started, 3)})
        job.cleanup()
        if on_job:
            on_job(number)


def judge(record: list) -> dict:
    good = [r for r in record if r["name"] == "good"]
    hostile = [r for r in record if r["name"] != "good"]
    broken = [r for r in good if not (r["state"] == protocol.DONE or (r["cancel"] and r["state"] == protocol.CANCELLED))]
    not_refused = [r for r in hostile if r["state"] != protocol.ERROR or r["code"] in ("internal", "worker_died")]
    return {"jobs": len(record), "good_done": sum(r["state"] == protocol.DONE for r in good),
            "cancelled": sum(r["state"] == protocol.CANCELLED for r in good), "good_broken": broken,
            "hostile": {r["name"]: [r["state"], r["code"], r["seconds"]] for r in hostile},
            "hostile_not_refused": not_refused,
            "max_job_seconds": max(r["seconds"] for r in record)}


def tree_rss(pids) -> int:
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            pass
    return total


def soak_worker(args, work: Path, hostile: dict, rng: random.Random) -> dict:
    worker = wire.Worker(sys.executable, ROOT, temp_dir=str(work / "jobs"))
    record, rss, pids = [], {}, set()
    try:
        first = worker.submit(str(IMAGE), dict(GOOD, resolution=48))
        worker.wait(300)
        field_id = first.stats["field_id"]

        def sample(number):
            pids.add(worker.pid)  # a cancel that does not land in time kills the worker: the next one is new
            if number == WARM_AFTER or number == len(items):
                rss[number] = tree_rss([worker.pid])

        items = plan(args.jobs, hostile, rng)
        run_client(worker, items, hostile, rng, field_id, record, sample)
    finally:
        worker.stop()
    time.sleep(1)
    orphans = sorted(pid for pid in pids if pid and psutil.pid_exists(pid))
    result = judge(record)
    values = list(rss.values())
    result.update(mode="worker", rss_warm_mb=round(values[0] / 2**20), rss_end_mb=round(values[-1] / 2**20),
                  rss_growth_mb=round((values[-1] - values[0]) / 2**20), workers=len(pids), orphans=orphans)
    return result


def soak_server(args, work: Path, hostile: dict, rng: random.Random) -> dict:
    process, url, ray_tmp, _ = bench_remote.start_server(work, replicas=1)
    records, rss = [], {}
    try:
        warm = wire.RemoteWorker(url, TOKEN, temp_dir=str(work / "warm"))
        first = warm.submit(str(IMAGE), dict(GOOD, resolution=48))
        warm.wait(300)
        field_id = first.stats["field_id"]
        per_client = args.jobs // args.clients
        plans = [plan(per_client, hostile if i == 0 else {}, random.Random(args.seed + i)) for i in range(args.clients)]
        done = [0]
        lock = threading.Lock()

        def sample(_):
            with lock:
                done[0] += 1
                if done[0] in (WARM_AFTER, per_client * args.clients):
                    rss[done[0]] = tree_rss([process.pid])

        threads = []
        for i in range(args.clients):
            record: list = []
            records.append(record)
            client = wire.RemoteWorker(url, TOKEN, temp_dir=str(work / f"client-{i}"))
            threads.append(threading.Thread(target=run_client, args=(client, plans[i], hostile,
                                                                     random.Random(args.seed * 10 + i), field_id,
                                                                     record, sample)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(3600)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
    time.sleep(2)
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if str(ray_tmp) in " ".join(p.info["cmdline"] or [])]
    result = judge([r for record in records for r in record])
    values = list(rss.values())
    result.update(mode="server", clients=args.clients, rss_warm_mb=round(values[0] / 2**20),
                  rss_end_mb=round(values[-1] / 2**20), rss_growth_mb=round((values[-1] - values[0]) / 2**20),
                  orphans=leftovers)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("worker", "server"))
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        work = Path(folder)
        hostile = hostile_files(work)
        if args.mode == "server":  # the server keeps its own files: no path of this machine
            for name, (op, image, options, mesh) in hostile.items():
                hostile[name] = (op, image, {k: v for k, v in options.items() if k not in protocol.LOCAL_OPTIONS},
                                 mesh)
            global GOOD
            GOOD = {k: v for k, v in GOOD.items() if k not in protocol.LOCAL_OPTIONS}
        result = (soak_server if args.mode == "server" else soak_worker)(args, work, hostile, rng)
    result["ok"] = (not result["good_broken"] and not result["hostile_not_refused"] and result["rss_growth_mb"] <= 100
                    and not result["orphans"])
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
