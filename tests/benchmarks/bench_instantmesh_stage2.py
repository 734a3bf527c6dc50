"""Benchmark: InstantMesh stage 2 (large mesh variant unless --size/--variant say otherwise) with random
full-size weights on the fixture's 960×640 views grid, printing JSON (seconds per stage, peak RSS).

    .venv/bin/python tests/benchmarks/bench_instantmesh_stage2.py [--size large] [--variant mesh|nerf]
        [--resolution 128 (nerf: 256)] [--keep DIR]

Writes random weights in the official layout (``{'state_dict': ...}`` with the ``lrm_generator.`` prefix,
1.5 GB for large) and a config in the official form to a temporary folder, in a child process. A second,
fresh process loads them (as a user's run would: memory-mapped, strict) and runs stage 2, so the peak RSS
is that of a real run. Random weights give no meaningful object: the learned tokens and the upsampling
kernel are smoothed (as in bench_openlrm.py), and the SDF's (or the density's) last bias is shifted so that
about 10 % of the grid is inside. Not a test: it asserts nothing, it measures.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRID = ROOT / "tests" / "data" / "instantmesh_tiny" / "views_grid_960x640.png"
MANIFEST = ROOT / "tests" / "data" / "instant{}_state_dict_manifest_{}.json"
INSIDE_FRACTION = 0.10


def make_random_model(folder: Path, size: str, variant: str = "mesh") -> None:
    import numpy as np
    import torch
    import yaml

    sys.path.insert(0, str(ROOT))
    from backend.models import instantmesh as im

    torch.manual_seed(0)
    manifest = json.loads(Path(str(MANIFEST).format(variant, size)).read_text())
    params = manifest["model_params"]
    model = im.MODEL_CLASSES[variant](im.config_from_params(params, kind=variant)).eval()
    with torch.no_grad():
        t = model.transformer
        dim = t.pos_embed.shape[-1]
        coarse = torch.nn.functional.interpolate(torch.randn(3, dim, 4, 4), size=(32, 32), mode="bilinear",
                                                 align_corners=True)
        t.pos_embed.copy_(coarse.permute(0, 2, 3, 1).reshape(t.pos_embed.shape))
        t.deconv.weight.copy_(t.deconv.weight.mean(dim=(2, 3), keepdim=True).expand_as(t.deconv.weight))
        planes = model.triplanes(model.encode(im.views_from_grid(GRID), im.input_cameras()))
        if variant == "mesh":
            sdf = model.grid_sdf(planes, 32, model.cfg.grid_scale)
            model.heads.net_sdf[-1].bias -= float(np.quantile(sdf.numpy(), INSIDE_FRACTION))
        else:  # σ = softplus(raw − 1) reaches the iso level 10 at raw ≈ 11
            axis = torch.linspace(-1, 1, 32)
            points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
            raw = model.head("net", planes, points)[:, 0].numpy()
            model.heads.net[-1].bias[0] += 11.0 - float(np.quantile(raw, 1 - INSIDE_FRACTION))
    torch.save({"state_dict": {"lrm_generator." + k: v for k, v in model.state_dict().items()}},
               folder / f"instant_{variant}_{size}.ckpt")
    config = {"model_config": {"target": manifest["model_class"], "params": params},
              "infer_config": {"model_path": f"ckpts/instant_{variant}_{size}.ckpt"}}
    (folder / f"instant-{variant}-{size}.yaml").write_text(yaml.safe_dump(config))


def run(folder: Path, size: str, variant: str, resolution: int) -> dict:
    """In the measured process: load as a user would, then stage 2."""
    import torch

    sys.path.insert(0, str(ROOT))
    from backend.models import instantmesh as im
    from backend.options import Options
    from backend.progress import Stages

    t0 = time.perf_counter()
    model = im.load(folder / f"instant-{variant}-{size}.yaml", torch.device("cpu"))
    load_s = time.perf_counter() - t0
    stages = Stages(None, None)
    t0 = time.perf_counter()
    mesh = model.reconstruct_views(GRID, Options(resolution=resolution), stages)
    stages.end()
    total = time.perf_counter() - t0
    return {"benchmark": f"instant{variant}-{size}-stage2-full-random-weights", "resolution": resolution,
            "device": "cpu", "load_seconds": round(load_s, 3), "stage2_seconds": round(total, 3),
            "seconds": {k: round(v, 3) for k, v in stages.seconds.items()},
            "vertices": len(mesh.vertices), "faces": len(mesh.faces),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="large", choices=["large", "base"])
    p.add_argument("--variant", default="mesh", choices=["mesh", "nerf"])
    p.add_argument("--resolution", type=int, help="the surface grid (default: the model's, mesh 128, nerf 256)")
    p.add_argument("--keep", type=Path, help="reuse/keep the random model in this folder")
    p.add_argument("--_run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.resolution = args.resolution or {"mesh": 128, "nerf": 256}[args.variant]
    if args._run:
        print(json.dumps(run(args.keep, args.size, args.variant, args.resolution), indent=1))
        return 0
    folder = args.keep or Path(tempfile.mkdtemp(prefix=f"instant{args.variant}-{args.size}-random-"))
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        if not (folder / f"instant_{args.variant}_{args.size}.ckpt").exists():
            code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests' / 'benchmarks')!r}); " \
                   f"import bench_instantmesh_stage2 as b, pathlib; " \
                   f"b.make_random_model(pathlib.Path({str(folder)!r}), {args.size!r}, {args.variant!r})"
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
        r = subprocess.run([sys.executable, __file__, "--_run", "--keep", str(folder), "--size", args.size,
                            "--variant", args.variant, "--resolution", str(args.resolution)],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        print(r.stdout, end="")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
