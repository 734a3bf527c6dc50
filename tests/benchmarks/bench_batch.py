"""Benchmark: images per minute of the batch against one CLI call per image, and through ``--ray local``,
printing JSON.

    .venv/bin/python tests/benchmarks/bench_batch.py [--images 4] [--models tiny,full] [--full-resolution 128]
        [--repeat 1] [--keep DIR] [--no-ray]

For each model (``tiny``: tests/data/triposr_tiny at R=64; ``full``: the full-size TripoSR with random weights
from bench_triposr.py, 1.7 GB, kept in --keep), the same N images (copies of the chair, each its own file) go
through ``python -m backend generate``:

- ``per_image_cli``: N calls, ``generate IMG -o OUT.glb`` each (a process start and a model load per image);
- ``batch``: one call, ``generate IN/ -o OUT/`` (the model loaded once);
- ``ray_local``: the same batch with ``--ray local`` (a local cluster started and ended inside the call; one
  worker with every CPU, so the difference from ``batch`` is Ray's overhead).

Wall-clock seconds per mode include everything a user waits for. Not a test: it asserts nothing, it measures.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "tests" / "data" / "triposr_tiny" / "input_rgba.png"
TINY = ROOT / "tests" / "data" / "triposr_tiny"


def backend(*args) -> float:
    """Run ``python -m backend generate ARGS``; its wall-clock seconds."""
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "backend", "generate", *map(str, args), "-q"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"generate {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr}")
    return time.perf_counter() - started


def rate(count: int, seconds: float) -> dict:
    return {"seconds": round(seconds, 2), "images_per_minute": round(count / seconds * 60, 2)}


def full_model(folder: Path) -> tuple:
    """The random full-size TripoSR of bench_triposr.py and a threshold that cuts a surface from it."""
    meta = folder / "threshold.json"
    if not (folder / "model.ckpt").exists() or not meta.exists():
        code = (f"import sys, json, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import bench_triposr as b; pathlib.Path({str(meta)!r}).write_text("
                f"json.dumps(b.make_random_model(pathlib.Path({str(folder)!r}))))")
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder, json.loads(meta.read_text())


def measure(weights: Path, model_args: list, count: int, work: Path, with_ray: bool, repeat: int) -> dict:
    """Each mode ``repeat`` times, round after round (so that a busy spell of the machine hits every mode),
    keeping each mode's best; with the load average over its runs, since other work on the machine shows."""
    inputs = work / "in"
    shutil.rmtree(work, ignore_errors=True)
    inputs.mkdir(parents=True)
    for i in range(count):
        shutil.copy(IMAGE, inputs / f"view{i}.png")
    common = ["--weights", weights, *model_args, "--device", "cpu"]
    modes = {
        "per_image_cli": lambda out: sum(backend(inputs / f"view{i}.png", "-o", out / f"view{i}.glb", *common)
                                         for i in range(count)),
        "batch": lambda out: backend(inputs, "-o", f"{out}/", *common),
    }
    if with_ray:
        modes["ray_local"] = lambda out: backend(inputs, "-o", f"{out}/", *common, "--ray", "local",
                                                 "--ray-cpus", os.cpu_count() or 1)
    best, loads = {}, {name: [] for name in modes}
    for round_ in range(repeat):
        for name, run in modes.items():
            out = work / f"{name}-{round_}"
            out.mkdir()
            seconds = run(out)
            best[name] = min(seconds, best.get(name, seconds))
            loads[name].append(round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
    return {name: {**rate(count, best[name]), "load_average_1min": loads[name]} for name in modes}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--models", default="tiny,full")
    p.add_argument("--tiny-resolution", type=int, default=64)
    p.add_argument("--full-resolution", type=int, default=128)
    p.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "triposr-random",
                   help="where the random full-size model is made once and kept")
    p.add_argument("--no-ray", action="store_true", help="leave out --ray local")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every mode; the best of each is kept")
    args = p.parse_args()
    with_ray = not args.no_ray and importlib.util.find_spec("ray") is not None
    import torch

    report = {"benchmark": "batch", "images": args.images, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "ray": with_ray, "models": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        for name in args.models.split(","):
            if name == "tiny":
                weights, model_args = TINY, ["--resolution", args.tiny_resolution]
            else:
                args.keep.mkdir(parents=True, exist_ok=True)
                weights, threshold = full_model(args.keep)
                model_args = ["--resolution", args.full_resolution, "--threshold", threshold]
            runs = measure(weights, model_args, args.images, work / name, with_ray, args.repeat)
            runs["resolution"] = model_args[1]
            runs["batch_speedup"] = round(runs["per_image_cli"]["seconds"] / runs["batch"]["seconds"], 2)
            if with_ray:
                runs["ray_overhead_seconds"] = round(runs["ray_local"]["seconds"] - runs["batch"]["seconds"], 2)
            report["models"][name] = runs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
