"""--precision: what auto picks per device, bad values refused, fp32 exactly the default's output on the CPU, and each
model's mesh in half precision against fp32 on the tiny fixtures (tests/benchmarks/bench_precision.py measures).

Tolerances, from the measurements on the tiny fixtures (printed by each test; the README has the table):
- faces within 1 % of fp32's (the issue's bound; measured: at most 0.9 %, InstantMesh in bf16);
- Hausdorff distance between the vertex sets, in voxels of the surface grid (the fp32 mesh's bounding-box diagonal
  over R·√3): bf16 6, fp16 2. The tiny fixtures are random networks whose field crosses the threshold at a shallow
  slope in hundreds of small fragments, so the worst vertex of one fragment moves several voxels where the
  transformer rounds to bf16's 8 bits (measured: OpenLRM 4.6 voxels; fp16's 11 bits: at most 0.8);
- vertex colours where both surfaces are the same point (within half a voxel: 99.7 % of the vertices or more), in
  bytes: mean 0.5; max bf16 32, fp16 8 (measured: mean at most 0.28; max 17 and 5, TripoSR);
- Zero123++'s views (reduced grid, 2 steps), in bytes: bf16 mean 4, max 64 (measured 2.6 and 41): the error
  of each step feeds the next; fp16 measured 0.23 and 4 (too slow on this CPU for the test: the benchmark has it).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import run_backend

from backend import devices
from backend.errors import InputError
from backend.models import registry
from backend.options import Options, check

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
import bench_precision as bench  # noqa: E402

CPU = torch.device("cpu")
FACES, VOXELS = 0.01, {"bf16": 6.0, "fp16": 2.0}
COLOUR_MEAN, COLOUR_MAX = 0.5, {"bf16": 32, "fp16": 8}


def test_auto_picks_per_device(monkeypatch):
    resolve = devices.resolve_precision
    assert resolve("auto", CPU) == torch.float32
    assert resolve("auto", torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve("auto", torch.device("cuda:1"), half="fp16") == torch.float16  # Zero123++'s choice
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve("auto", torch.device("cuda")) == torch.float16
    assert [resolve(p, torch.device("cuda")) for p in ("fp32", "fp16", "bf16")] == [
        torch.float32, torch.float16, torch.bfloat16]  # what is asked for, on every device


@pytest.mark.parametrize("value,message", [("fp8", "unknown precision 'fp8'"), ("half", "unknown precision"),
                                           ("FP16", "unknown precision"), (16, "precision must be text")])
def test_bad_values_are_bad_input(value, message):
    with pytest.raises(InputError, match=message) as e:
        check(Options(precision=value), registry.get("triposr"))
    assert e.value.code == "bad_input"


def test_cli_refuses_a_bad_precision(tmp_path):
    r = run_backend("generate", bench.DATA / "triposr_tiny" / "conditioning.png", "-o", tmp_path / "m.glb",
                    "--weights", bench.DATA / "triposr_tiny", "--precision", "half")
    assert r.returncode == 2 and "unknown precision 'half'" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", ["triposr", "openlrm", "instantmesh"])
def test_half_precision_mesh_against_fp32(model):
    run = bench.TINY[model](CPU)
    ref = run("fp32")
    assert ref.stats["precision"] == "fp32"
    if model == "triposr":  # auto is fp32 on the CPU: the very same numbers
        default = run("auto")
        assert np.array_equal(default.vertices, ref.vertices) and np.array_equal(default.faces, ref.faces)
        assert np.array_equal(default.colors, ref.colors) and default.stats["precision"] == "fp32"
    for precision in ("bf16", "fp16"):
        if not bench.half_supported(precision, CPU):
            print(f"{model} {precision}: not supported on this CPU")
            continue
        mesh = run(precision)
        assert mesh.stats["precision"] == precision
        d = bench.compare_meshes(mesh, ref, bench.RESOLUTION[model])
        print(f"{model} {precision}: faces {d['faces']} vs {d['faces_fp32']} ({100 * d['face_change']:.2f} %), "
              f"Hausdorff {d['hausdorff']:.4f} of the diagonal ({d['hausdorff_voxels']:.2f} voxels), colour mean "
              f"{d['colour_mean']:.3f} max {d['colour_max']:.0f} bytes ({100 * d['colour_matched']:.1f} % of the "
              f"vertices matched)")
        assert not np.array_equal(mesh.vertices, ref.vertices)  # the half path did run
        assert d["face_change"] <= FACES
        assert d["hausdorff_voxels"] <= VOXELS[precision]
        assert d["colour_mean"] <= COLOUR_MEAN and d["colour_max"] <= COLOUR_MAX[precision]


def test_zero123pp_views_in_bf16_against_fp32(tmp_path, monkeypatch):
    """A few steps on a reduced grid (half-precision convolutions are slow on a CPU; the full grid and the mesh
    made from it are in the benchmark): the weights really are bf16, and the views stay close."""
    import zero123pp_tiny

    from backend.models import instantmesh_pipeline, zero123pp

    monkeypatch.setattr(zero123pp, "GRID_HEIGHT", 96)
    monkeypatch.setattr(zero123pp, "GRID_WIDTH", 64)
    pipeline = instantmesh_pipeline.InstantMeshPipeline(zero123pp_tiny.make_instantmesh_folder(tmp_path), CPU,
                                                        "large")
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[20:76, 30:66] = (200, 60, 30, 255)
    views = {}
    for precision in ("fp32", "auto", "bf16"):
        views[precision] = pipeline.generate_views(rgba, Options(steps=2, seed=1, guidance=4.0, precision=precision),
                                                   None)
        assert pipeline.views_model.unet.dtype == devices.resolve_precision(precision, CPU)
    assert np.array_equal(views["auto"], views["fp32"])
    diff = np.abs(views["bf16"].astype(int) - views["fp32"])
    print(f"zero123pp bf16: views differ by mean {diff.mean():.3f}, max {diff.max()} bytes")
    assert 0 < diff.mean() <= 4 and diff.max() <= 64
