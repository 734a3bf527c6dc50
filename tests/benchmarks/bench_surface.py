"""Benchmark: surface extraction, dense against coarse to fine, on the shaped full-size TripoSR (or a shaped
full-size OpenLRM base field), printing JSON.

    .venv/bin/python tests/benchmarks/bench_surface.py --weights /tmp/triposr-shaped [--resolution 256 512 1024]
        [--dense-up-to 512] [--cache DIR]
    .venv/bin/python tests/benchmarks/bench_surface.py --field openlrm-base --resolution 384

The weights folder is made once with ``../shared/tools/shaped_triposr_ckpt.py DIR`` (a smooth object). The
triplanes of ``examples/chair.png`` are computed once and kept with the decoder in ``--cache``; every
measurement then runs in a fresh process that loads only that field, so its peak RSS is the extraction's
(plus the field's small baseline, printed as ``baseline_rss_mb``). For each resolution: extraction seconds
of both paths, their ratio, field evaluations as a fraction of R³ and against the corners of the crossed
cells (the least any extraction giving this mesh must evaluate), peak RSS, and whether the meshes agree;
a last line gives how seconds, faces and those corners grow from one resolution to the next;
``dense_before`` is the dense path as it was before coarse to fine (the whole-grid ``grid_density``).
The dense path is skipped above ``--dense-up-to`` (it grows as R³). Not a test: it asserts nothing.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples" / "chair.png"
THRESHOLD = 25.0


def make_field(weights: Path, cache: Path) -> Path:
    """Triplanes of the example image + the decoder, saved as one TriplaneField."""
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from backend import preprocess
    from backend.models import triposr

    path = cache / "field.pt"
    if path.exists():
        return path
    model = triposr.load(weights, torch.device("cpu"))
    conditioning = preprocess.prepare(Image.open(IMAGE))
    with torch.no_grad():
        planes = model.triplanes(model.encode(preprocess.to_model_input(conditioning, 512)))[0]
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.field(planes), path)
    return path


class _GridOnly:
    """The field with only its whole-grid evaluation (``grid_density``): the dense path as it was before
    coarse to fine (its values differ from the boxes' by float rounding)."""

    def __init__(self, field):
        self.radius, self.grid_density = field.radius, field.grid_density


def make_openlrm_field(cache: Path) -> Path:
    """A full-size OpenLRM base field (planes 3×48×64×64, decoder 144→64→64→64→4 with ReLU, softplus density:
    the shapes of the official checkpoint's manifest) shaped like ../shared/tools/shaped_triposr_ckpt.py shapes
    TripoSR: channel 0 of each plane a smooth 2-D field, the decoder carrying their sum through its ReLUs in
    their linear range, so the density is a smooth lumpy object; the other units give random colours. Every
    weight is used in full, so the cost per evaluation is the real model's."""
    import torch

    sys.path.insert(0, str(ROOT))
    from backend.models import openlrm, triplane

    path = cache / "openlrm_base_field.pt"
    if path.exists():
        return path
    g = torch.Generator().manual_seed(0)
    channels, size, width, offset = 48, 64, 64, 20.0
    planes = 0.02 * torch.randn(3, channels, size, size, generator=g)
    u = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(u, u, indexing="ij")
    base = 1.5 - 2.5 * (rows ** 2 + cols ** 2)
    for p, (cu, cv, spread, height) in enumerate(((0.3, -0.2, 0.25, 0.8), (-0.3, 0.4, 0.2, 0.7), (0.2, 0.5, 0.3, 0.6))):
        planes[p, 0] = base + height * torch.exp(-((rows - cu) ** 2 + (cols - cv) ** 2) / (2 * spread ** 2))
    mlp = triplane.mlp_layers(3 * channels, width, openlrm.DECODER_HIDDEN_LAYERS, activation="relu")
    with torch.no_grad():
        linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
        for m in linears:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
            m.bias.zero_()
        first, last = linears[0], linears[-1]
        first.weight[0] = 0
        first.weight[0, [0, channels, 2 * channels]] = 1.0
        first.bias[0] = offset
        for m in linears[1:-1]:
            m.weight[0] = 0
            m.weight[:, 0] = 0
            m.weight[0, 0] = 1.0
        last.weight[0] = 0
        last.weight[:, 0] = 0
        last.weight[0, 0] = 1.0
        last.bias[0] = -offset
    field = triplane.TriplaneField(planes, mlp, openlrm.RADIUS, density_bias=-1.0,
                                   plane_axes=triplane.EG3D_PLANE_AXES, density_activation="softplus",
                                   color_margin=0.001)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(field, path)
    return path


FIELDS = {"triposr": 25.0, "openlrm-base": 3.0}  # the models' thresholds


def measure(field_path: Path, resolution: int, dense: bool, out: Path, grid_only: bool = False,
            threshold: float = THRESHOLD) -> None:
    """One extraction in this process: seconds, evaluations, peak RSS; the mesh saved for comparison."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from backend import surface

    field = torch.load(field_path, weights_only=False)
    if grid_only:
        field = _GridOnly(field)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats, crossed = {}, []
    closing = surface.close_over_faces

    def close_and_keep(*args):  # keeps the crossed cells, to count their corners
        cells, values = closing(*args)
        crossed.append(cells)
        return cells, values

    surface.close_over_faces = close_and_keep
    started = time.perf_counter()
    vertices, faces = surface.marching_cubes(field, resolution, threshold, dense=dense, stats=stats)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.savez(out, vertices=vertices, faces=faces)
    row = {"seconds": round(seconds, 2), "evaluations_fraction": round(stats["evaluations"] / resolution ** 3, 4),
           "blocks": stats["blocks"], "faces": int(len(faces)), "vertices": int(len(vertices)),
           "baseline_rss_mb": round(baseline), "peak_rss_mb": round(peak)}
    if crossed:
        # The least any extraction giving this mesh must evaluate: every corner of every crossed cell.
        corners = len(torch.unique(surface.lattice(crossed[0], 1, 2, resolution)))
        row.update(crossed_cell_corners=corners, evaluations_over_corners=round(stats["evaluations"] / corners, 2))
    print(json.dumps(row))


def run_child(field_path: Path, resolution: int, dense: bool, out: Path, grid_only: bool = False,
              threshold: float = THRESHOLD) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(field_path), "--resolution", str(resolution),
           "--out", str(out), "--threshold", str(threshold)] + (["--dense"] if dense else []) + (
        ["--grid-only"] if grid_only else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(dense_npz: Path, fine_npz: Path) -> dict:
    import numpy as np

    a, b = np.load(dense_npz), np.load(fine_npz)
    same_counts = a["faces"].shape == b["faces"].shape and a["vertices"].shape == b["vertices"].shape
    out = {"same_face_count": bool(a["faces"].shape == b["faces"].shape)}
    if same_counts:
        diagonal = np.linalg.norm(a["vertices"].max(0) - a["vertices"].min(0))
        out["max_vertex_gap_over_diagonal"] = float(np.abs(a["vertices"] - b["vertices"]).max() / diagonal)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", type=Path, default=Path("/tmp/triposr-shaped"))
    p.add_argument("--cache", type=Path, default=Path("/tmp/bench-surface"))
    p.add_argument("--resolution", type=int, nargs="+", default=[256])
    p.add_argument("--dense-up-to", type=int, default=512)
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--grid-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threshold", type=float, default=THRESHOLD, help=argparse.SUPPRESS)
    p.add_argument("--field", choices=sorted(FIELDS), default="triposr")
    p.add_argument("--threads", type=int, help="torch threads in every measurement (default: torch's own)")
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        os.environ["IMAGE_TO_3D_BENCH_THREADS"] = str(args.threads)  # for the measuring children
    if args.measure:
        if os.environ.get("IMAGE_TO_3D_BENCH_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["IMAGE_TO_3D_BENCH_THREADS"]))
        measure(args.measure, args.resolution[0], args.dense, args.out, args.grid_only, args.threshold)
        return 0
    threshold = FIELDS[args.field]
    field_path = make_field(args.weights, args.cache) if args.field == "triposr" else make_openlrm_field(args.cache)
    seconds = {}
    for resolution in args.resolution:
        row = {"field": args.field, "resolution": resolution, "threshold": threshold, "threads": args.threads}
        fine_npz = args.cache / f"{args.field}-fine{resolution}.npz"
        row["coarse_to_fine"] = run_child(field_path, resolution, False, fine_npz, threshold=threshold)
        if resolution <= args.dense_up_to:
            dense_npz = args.cache / f"{args.field}-dense{resolution}.npz"
            row["dense"] = run_child(field_path, resolution, True, dense_npz, threshold=threshold)
            row["speedup"] = round(row["dense"]["seconds"] / row["coarse_to_fine"]["seconds"], 2)
            row.update(compare(dense_npz, fine_npz))
            # the dense path as it was before coarse to fine (whole-grid evaluation)
            before_npz = args.cache / f"{args.field}-before{resolution}.npz"
            row["dense_before"] = run_child(field_path, resolution, True, before_npz, grid_only=True,
                                            threshold=threshold)
            row["speedup_over_before"] = round(row["dense_before"]["seconds"] / row["coarse_to_fine"]["seconds"], 2)
            row["before_vs_coarse_to_fine"] = compare(before_npz, fine_npz)
        print(json.dumps(row), flush=True)
        seconds[resolution] = row["coarse_to_fine"]
    # Growth per step of resolution: seconds, and the least evaluations the exact mesh needs.
    ordered = sorted(seconds)
    growth = {f"{hi}/{lo}": {key: round(seconds[hi][key] / seconds[lo][key], 2)
                             for key in ("seconds", "faces", "crossed_cell_corners")}
              for lo, hi in zip(ordered, ordered[1:])}
    if growth:
        print(json.dumps({"field": args.field, "coarse_to_fine_growth": growth}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
