"""Benchmark: each model's mesh in half precision against fp32, on the tiny fixtures (any device).

    .venv/bin/python tests/benchmarks/bench_precision.py [--device cpu] [--precisions bf16,fp16] [--models ...]

Per model (TripoSR, OpenLRM, InstantMesh stage 2, Zero123++ a few steps then stage 2 in fp32) and precision:
face counts, the symmetric Hausdorff distance between the vertex sets (relative to the fp32 mesh's bounding-box
diagonal), the vertex colour difference in bytes (each vertex against its nearest fp32 vertex), and for Zero123++
the views grid's difference in bytes. Prints one JSON object. tests/test_precision.py and
scripts/device_check.py use these functions; the tolerances live in the test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
MODELS = ("triposr", "openlrm", "instantmesh", "zero123pp")
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def compare_meshes(mesh, ref, resolution: int = 64) -> dict:
    """``mesh`` against ``ref`` (both :class:`backend.mesh.Mesh` or (vertices, faces, colours) in [0, 1]), both
    extracted on a ``resolution``³ grid. Colours are compared where the two surfaces are the same point (a vertex
    within half a voxel of its nearest fp32 vertex): elsewhere a moved fragment's nearest vertex is another point."""
    v, f, c = _parts(mesh)
    rv, rf, rc = _parts(ref)
    out = {"faces": int(len(f)), "faces_fp32": int(len(rf)),
           "face_change": abs(len(f) - len(rf)) / max(1, len(rf))}
    if len(v) == 0 or len(rv) == 0:
        return dict(out, hausdorff=float("inf"), hausdorff_voxels=float("inf"), colour_max=255.0,
                    colour_mean=255.0, colour_matched=0.0)
    diagonal = float(np.linalg.norm(rv.max(0) - rv.min(0)))
    to_ref, nearest = nearest_points(rv, v)
    from_ref = nearest_points(v, rv)[0]
    voxel = diagonal / (resolution * 3 ** 0.5)  # the grid's step, taking the mesh's box for the grid's
    same = to_ref <= voxel / 2
    colour = np.abs(np.rint(c[same] * 255) - np.rint(rc[nearest[same]] * 255))
    hausdorff = float(max(to_ref.max(), from_ref.max()))
    return dict(out, hausdorff=hausdorff / diagonal, hausdorff_voxels=hausdorff / voxel,
                colour_max=float(colour.max(initial=0)), colour_mean=float(colour.mean()) if len(colour) else 0.0,
                colour_matched=float(same.mean()))


def nearest_points(points, queries):
    """(distance, index) of each query's nearest point: scipy's k-d tree, or where scipy is not installed (the
    device check's machine) brute force with torch in chunks, on the GPU when there is one."""
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        p = torch.as_tensor(points, dtype=torch.float64, device=device)
        dist, index = [], []
        for q in torch.as_tensor(queries, dtype=torch.float64, device=device).split(4096):
            d, i = torch.cdist(q, p).min(dim=1)
            dist.append(d.cpu())
            index.append(i.cpu())
        return torch.cat(dist).numpy(), torch.cat(index).numpy()
    return cKDTree(points).query(queries)


def _parts(mesh):
    if isinstance(mesh, tuple):
        return tuple(np.asarray(x, np.float64) for x in mesh)
    return (np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces),
            np.asarray(mesh.colors, np.float64))


def _stages():
    from backend.progress import Stages

    return Stages(None, None)


# -- the tiny models: a loaded model and a function precision -> mesh ----------------------------------------

def tiny_triposr(device):
    from PIL import Image

    from backend.models import triposr
    from backend.options import Options

    model = triposr.load(DATA / "triposr_tiny", device)
    conditioning = np.asarray(Image.open(DATA / "triposr_tiny" / "conditioning.png").convert("RGB"))
    return lambda precision: model.reconstruct(conditioning, Options(resolution=RESOLUTION["triposr"], threshold=25.0,
                                                                     precision=precision), _stages())


def tiny_openlrm(device):
    from backend import preprocess
    from backend.models import openlrm
    from backend.options import Options

    folder = DATA / "openlrm_tiny"
    model = openlrm.load(folder, device)
    with np.load(folder / "expected.npz") as e:
        threshold = float(e["mesh_thres"])
    conditioning = preprocess.prepare(preprocess.load_image(folder / "input.png"), recipe="openlrm",
                                      remove_background=False)
    return lambda precision: model.reconstruct(conditioning, Options(resolution=RESOLUTION["openlrm"], threshold=threshold,
                                                                     source_size=224, precision=precision),
                                               _stages())


def tiny_instantmesh(device):
    from backend.models import instantmesh
    from backend.options import Options

    folder = DATA / "instantmesh_tiny"
    model = instantmesh.load(folder / "tiny_config.yaml", device)
    grid = folder / "views_grid_960x640.png"
    return lambda precision: model.reconstruct_views(grid, Options(resolution=RESOLUTION["instantmesh"], precision=precision),
                                                     _stages())


def tiny_zero123pp(device, steps: int = 3):
    """Zero123++ (a tiny random UNet/VAE/CLIP in the official layout) for ``steps`` steps, then the tiny stage 2
    in fp32 on the grid. The mesh result carries the grid as ``.views``."""
    import zero123pp_tiny

    from backend.models import instantmesh_pipeline
    from backend.options import Options

    folder = Path(tempfile.mkdtemp(prefix="zero123pp-tiny-"))
    zero123pp_tiny.make_instantmesh_folder(folder)
    pipeline = instantmesh_pipeline.InstantMeshPipeline(folder, device, "large")
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[20:76, 30:66] = (200, 60, 30, 255)

    def run(precision):
        pipeline.load_views_model(precision)
        grid = pipeline.generate_views(rgba, Options(steps=steps, seed=1, guidance=4.0, precision=precision),
                                       _stages())
        mesh = pipeline.lrm.reconstruct_views(grid, Options(resolution=RESOLUTION["zero123pp"], precision="fp32"),
                                                  _stages())
        mesh.views = grid
        return mesh

    return run


RESOLUTION = {"triposr": 64, "openlrm": 64, "instantmesh": 32, "zero123pp": 32}
TINY = {"triposr": tiny_triposr, "openlrm": tiny_openlrm, "instantmesh": tiny_instantmesh,
        "zero123pp": tiny_zero123pp}


def half_supported(precision: str, device) -> bool:
    """Whether this device runs ``precision`` (fp16 matrix products on an old CPU may not exist)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    try:
        x = torch.ones(8, 8, device=device)
        with torch.autocast(torch.device(device).type, dtype=dtype):
            return bool(torch.isfinite((x @ x).float()).all())
    except (RuntimeError, TypeError):
        return False


def measure(model: str, device, precisions=("bf16", "fp16")) -> dict:
    """fp32 then each precision on one tiny model -> {precision: comparison + seconds}."""
    run = TINY[model](device)
    t0 = time.perf_counter()
    ref = run("fp32")
    out = {"fp32": {"faces": int(len(ref.faces)), "seconds": round(time.perf_counter() - t0, 3)}}
    for precision in precisions:
        if not half_supported(precision, device):
            out[precision] = {"skipped": "not supported on this device"}
            continue
        t0 = time.perf_counter()
        mesh = run(precision)
        row = compare_meshes(mesh, ref, RESOLUTION[model])
        row["seconds"] = round(time.perf_counter() - t0, 3)
        if hasattr(ref, "views"):
            diff = np.abs(mesh.views.astype(int) - ref.views.astype(int))
            row.update(views_max=int(diff.max()), views_mean=float(diff.mean()))
        out[precision] = row
    return out


def main() -> int:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="bf16,fp16")
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args()
    device = torch.device(args.device)
    result = {m: measure(m, device, args.precisions.split(",")) for m in args.models.split(",")}
    print(json.dumps({"device": str(device), "torch": torch.__version__, "models": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
