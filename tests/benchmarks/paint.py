"""Benchmark: what ``--colours images`` adds beside the field's bake, on the full-size TripoSR with shaped random
weights (a smooth object), through the real CLI, printing JSON.

    .venv/bin/python tests/benchmarks/paint.py [--model-dir DIR] [--faces 50000] [--texture 2048] [--threads 2]

Makes the shaped checkpoint with ../shared/tools/shaped_triposr_ckpt.py (1.7 GB, kept in --model-dir), then runs
``python -m backend generate`` at R=256 with --faces and --texture twice in fresh processes limited to
``--threads`` cores: ``--colours field`` and ``--colours images``. The field's bake is the ``baking_texture``
stage; painting replaces it with the ``painting`` stage (depth buffers, the views' weights, the field at the
texels, the vertex colours): the difference is what painting adds. Not a test: it measures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT.parent / "shared" / "tools" / "shaped_triposr_ckpt.py"
IMAGE = ROOT / "tests" / "data" / "triposr_tiny" / "input_rgba.png"


def generate(folder: Path, out: Path, threads: int, *extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cpus = ["taskset", "-c", f"0-{threads - 1}"] if sys.platform.startswith("linux") else []
    result = subprocess.run([*cpus, sys.executable, "-m", "backend", "generate", str(IMAGE), "-o", str(out),
                             "--weights", str(folder), "--resolution", "256", "--threshold", "25", "--device", "cpu",
                             "--json", *map(str, extra)], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "triposr-shaped")
    p.add_argument("--faces", type=int, default=50_000)
    p.add_argument("--texture", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not (args.model_dir / "model.ckpt").exists():
        subprocess.run([sys.executable, str(TOOL), str(args.model_dir)], check=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for colours in ("field", "images"):
            runs[colours] = generate(args.model_dir, Path(tmp) / f"{colours}.glb", args.threads, "--faces", args.faces,
                                     "--texture", args.texture, "--colours", colours)
    field, images = runs["field"]["seconds"], runs["images"]["seconds"]
    bake, paint = field.get("baking_texture", 0.0), images.get("painting", 0.0) + images.get("baking_texture", 0.0)
    print(json.dumps({
        "faces": runs["images"]["faces"], "texture": args.texture, "threads": args.threads,
        "field_bake_seconds": round(bake, 3), "painting_seconds": round(paint, 3),
        "painting_adds_seconds": round(paint - bake, 3),
        "total_seconds": {k: v["total_seconds"] for k, v in runs.items()},
        "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in runs.items()},
        "colour_sources": runs["images"].get("colour_sources"), "views": runs["images"].get("views"),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
