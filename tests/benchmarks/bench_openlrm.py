"""Benchmark: the full-size OpenLRM (base unless --size says otherwise) with random weights, through the
real CLI, printing JSON.

    .venv/bin/python tests/benchmarks/bench_openlrm.py [--size base] [--resolution 384] [--device cpu] [--keep DIR]

Writes random weights in the official layout (config.json + model.safetensors, 1.04 GB for base) to a
temporary folder, then runs ``python -m backend generate`` on an RGBA example (so the demo's recentring
runs too) in a fresh process and prints its summary: seconds per stage and the process's peak RSS.
Random weights give no meaningful object: the learned tokens and the upsampling kernel are smoothed
(see make_random_model) and the threshold is the 95th percentile of the density on a coarse grid (about
5 % of space inside). The licence is accepted in a temporary config folder.
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
IMAGE = ROOT / "tests" / "data" / "openlrm_tiny" / "preprocess" / "alpha_probe.png"
MANIFEST = ROOT / "tests" / "data" / "openlrm_state_dict_manifest_{}.json"
SOURCE_SIZES = {"small": 224, "base": 336, "large": 448}


def make_random_model(folder: Path, size: str) -> float:
    """Save random full-size weights + the official config; return a threshold that cuts a surface."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from backend import preprocess, surface
    from backend.models import openlrm

    torch.manual_seed(0)
    config = json.loads(Path(str(MANIFEST).format(size)).read_text())["_header"]["config_json"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model = openlrm.OpenLRM(openlrm.read_config(folder)).eval()
    with torch.no_grad():
        # Plain random weights give per-token noise and a 2x2 checkerboard: a "surface" of millions of
        # fragments (about 5 M vertices at 384), nothing like an object. Smooth both, as the parity
        # fixtures do, for a mesh of a realistic size (a few 100 k vertices).
        dim = model.pos_embed.shape[-1]
        coarse_tokens = torch.nn.functional.interpolate(torch.randn(3, dim, 4, 4), size=(32, 32), mode="bilinear",
                                                        align_corners=True)
        model.pos_embed.copy_(coarse_tokens.permute(0, 2, 3, 1).reshape(model.pos_embed.shape))
        kernel = model.upsampler.weight
        kernel.copy_(kernel.mean(dim=(2, 3), keepdim=True).expand_as(kernel))
    save_file(model.state_dict(), folder / "model.safetensors")
    conditioning = preprocess.prepare(Image.open(IMAGE), recipe="openlrm")
    features = model.encode(preprocess.to_openlrm_input(conditioning, SOURCE_SIZES[size]))
    planes = model.upsample(model.transform(features, model.embed_camera(openlrm.source_camera())))[0]
    coarse = np.stack([d.numpy() for d in model.field(planes).grid_density(surface.grid_coords(32, openlrm.RADIUS))])
    return float(np.percentile(coarse, 95))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="base", choices=list(SOURCE_SIZES))
    p.add_argument("--resolution", type=int, default=384)
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", type=Path, help="reuse/keep the random model in this folder")
    args = p.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix=f"openlrm-{args.size}-random-"))
    folder.mkdir(parents=True, exist_ok=True)
    config_dir = Path(tempfile.mkdtemp(prefix="openlrm-bench-config-"))
    try:
        meta = folder / "threshold.json"
        if not (folder / "model.safetensors").exists() or not meta.exists():
            # In a child process, so that building the model does not count toward the measured peak.
            code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests' / 'benchmarks')!r}); " \
                   f"import bench_openlrm as b, json, pathlib; " \
                   f"pathlib.Path({str(meta)!r}).write_text(json.dumps(" \
                   f"b.make_random_model(pathlib.Path({str(folder)!r}), {args.size!r})))"
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        threshold = json.loads(meta.read_text())
        out = folder / "bench.glb"
        r = subprocess.run(
            [sys.executable, "-m", "backend", "generate", str(IMAGE), "-o", str(out), "--weights", str(folder),
             "--model", f"openlrm-mix-{args.size}", "--resolution", str(args.resolution), "--threshold", str(threshold),
             "--device", args.device, "--accept-licence", "--json"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "IMAGE_TO_3D_CONFIG_DIR": str(config_dir)},
            capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        summary = json.loads(r.stdout)
        import torch

        summary.update(benchmark=f"openlrm-{args.size}-full-random-weights", torch=torch.__version__,
                       threads=torch.get_num_threads(), cpu_count=os.cpu_count())
        print(json.dumps(summary, indent=1))
        return 0
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
