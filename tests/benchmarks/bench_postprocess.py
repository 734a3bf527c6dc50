"""Benchmark: post-processing on the full-size TripoSR with shaped random weights (a smooth object), through
the real CLI, printing JSON.

    .venv/bin/python tests/benchmarks/bench_postprocess.py [--model-dir DIR] [--faces 50000] [--texture 2048]

Makes the shaped checkpoint with ../shared/tools/shaped_triposr_ckpt.py (1.7 GB, kept in --model-dir), then
runs ``python -m backend generate`` at R=256 twice in fresh processes: as extracted, and with --faces and
--texture. Prints the seconds of each new stage, their sum, and both peak RSS figures (the difference is
what post-processing adds). Not a test: it asserts nothing, it measures.
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
NEW_STAGES = ("reducing", "unwrapping", "baking_texture")


def generate(folder: Path, out: Path, *extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "backend", "generate", str(IMAGE), "-o", str(out), "--weights",
                             str(folder), "--resolution", "256", "--threshold", "25", "--device", "cpu", "--json",
                             *map(str, extra)], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "triposr-shaped")
    p.add_argument("--faces", type=int, default=50_000)
    p.add_argument("--texture", type=int, default=2048)
    p.add_argument("--quads", action="store_true")
    args = p.parse_args()
    if not (args.model_dir / "model.ckpt").exists():
        subprocess.run([sys.executable, str(TOOL), str(args.model_dir)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain = generate(args.model_dir, Path(tmp) / "plain.npz")
        extra = ["--faces", args.faces, "--texture", args.texture] + (["--quads"] if args.quads else [])
        post = generate(args.model_dir, Path(tmp) / "post.glb", *extra)
    seconds = {s: post["seconds"].get(s, 0.0) for s in NEW_STAGES}
    print(json.dumps({
        "extracted_faces": plain["faces"], "faces": post["faces"], "texture": args.texture, "quads": post["quads"],
        "seconds": seconds, "postprocess_seconds": round(sum(seconds.values()), 3),
        "peak_rss_mb": {"as_extracted": plain["peak_rss_mb"], "post_processed": post["peak_rss_mb"],
                        "extra": round(post["peak_rss_mb"] - plain["peak_rss_mb"], 1)},
        "notes": post["notes"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
