"""Benchmark: the full-size TripoSR with random weights, through the real CLI, printing JSON.

    .venv/bin/python tests/benchmarks/bench_triposr.py [--resolution 256] [--device cpu] [--keep DIR]

Writes a random checkpoint in the official layout (1.7 GB) to a temporary folder, then runs
``python -m backend generate`` on an RGBA example in a fresh process and prints its summary:
seconds per stage and the process's peak RSS. Random weights give no meaningful object, so the
threshold is set to the 95th percentile of the density on a coarse grid (about 5 % of space inside).
Not a test: it asserts nothing, it measures.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "tests" / "data" / "triposr_tiny" / "input_rgba.png"
CONFIG = ROOT / "backend" / "models" / "configs" / "triposr-config.yaml"


def make_random_model(folder: Path) -> float:
    """Save random full-size weights + the official config; return a threshold that cuts a surface."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from backend import preprocess, surface
    from backend.models import triposr

    torch.manual_seed(0)
    shutil.copy(CONFIG, folder / "config.yaml")
    model = triposr.TripoSR(triposr.read_config(folder))
    with torch.no_grad():
        model.tokenizer.embeddings.normal_(0, 1 / 32)
    torch.save(model.state_dict(), folder / "model.ckpt")
    model.eval()
    conditioning = preprocess.prepare(Image.open(IMAGE))
    planes = model.triplanes(model.encode(preprocess.to_model_input(conditioning, 512)))[0]
    coarse = np.stack([d.numpy() for d in model.field(planes).grid_density(surface.grid_coords(32, 0.87))])
    return float(np.percentile(coarse, 95))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", type=Path, help="reuse/keep the random model in this folder")
    args = p.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="triposr-random-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        meta = folder / "threshold.json"
        if not (folder / "model.ckpt").exists() or not meta.exists():
            # In a child process, so that building the model does not count toward the measured peak.
            code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests' / 'benchmarks')!r}); " \
                   f"import bench_triposr as b, json, pathlib; " \
                   f"pathlib.Path({str(meta)!r}).write_text(json.dumps(b.make_random_model(pathlib.Path({str(folder)!r}))))"
            subprocess.run([sys.executable, "-c", code], check=True)
        threshold = json.loads(meta.read_text())
        out = folder / "bench.glb"
        r = subprocess.run(
            [sys.executable, "-m", "backend", "generate", str(IMAGE), "-o", str(out), "--weights", str(folder),
             "--resolution", str(args.resolution), "--threshold", str(threshold), "--device", args.device, "--json"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        summary = json.loads(r.stdout)
        import torch

        summary.update(benchmark="triposr-full-random-weights", torch=torch.__version__,
                       threads=torch.get_num_threads(), cpu_count=os.cpu_count())
        print(json.dumps(summary, indent=1))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
