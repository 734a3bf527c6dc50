"""The device check (``make device-check``): one call on a GPU machine that proves the half-precision paths.

    python scripts/device_check.py [--out DIR] [--tiny] [--models triposr,openlrm,instantmesh,zero123pp]

1. the CUDA-marked tests (every ``skipif(not torch.cuda.is_available())`` test under tests/), in pytest;
2. per model, the benchmark in fp32 and in ``auto`` (on CUDA: bf16 for the transformers where the GPU has it,
   fp16 for Zero123++), the seconds without loading, and the mesh difference between the two
   (tests/benchmarks/bench_precision.py's measures): TripoSR full-size (../shared/tools/shaped_triposr_ckpt.py's
   shaped weights when found, else bench_triposr's random ones) at R=256, OpenLRM base, InstantMesh large stage 2,
   Zero123++ 10 steps (full-size UNet and VAE, random weights; a small CLIP: one call per image);
3. writes ``device_check.json`` and ``device_check.md`` (a table) to ``--out`` ($OUT when set, else out/device-check).

Without a GPU (or with ``--tiny``) the same steps run on the CPU with the tiny fixtures, Zero123++ 2 steps, so
that CI keeps it working (tests/test_device_check.py). Each model runs in its own process under a time budget
(BUDGET_S, under 8 minutes in all on a GPU machine). Exit status: 1 if a CUDA test failed, 3 if a model step
failed or ran out of time, else 0. Needs only what backend/requirements.txt and pytest/scipy give: no network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path[:0] = [str(ROOT), str(TESTS), str(TESTS / "benchmarks")]
MODELS = ("triposr", "openlrm", "instantmesh", "zero123pp")
# Seconds per step on a fresh GPU machine (model files written and read once, a warm-up run, then fp32 and auto);
# 60 + 110 + 80 + 80 + 110 = 440 s, under 8 minutes with the start-up.
BUDGET_S = {"cuda_tests": 60, "triposr": 110, "openlrm": 80, "instantmesh": 80, "zero123pp": 110}
TINY_BUDGET_S = {"cuda_tests": 60, "triposr": 60, "openlrm": 60, "instantmesh": 60, "zero123pp": 90}
SHAPED_TOOL = ("shared/tools/shaped_triposr_ckpt.py", "../shared/tools/shaped_triposr_ckpt.py",
               ".device-wheels/shared/tools/shaped_triposr_ckpt.py")
CUDA_SKIP = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")


def cuda_tests() -> list[str]:
    """Node ids of the CUDA-marked tests: a ``def test_…`` right after a CUDA skipif."""
    ids = []
    for path in sorted(TESTS.glob("test_*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if CUDA_SKIP.search(line):
                m = next((re.match(r"def (test_\w+)", x) for x in lines[i + 1:i + 4] if x.startswith("def ")), None)
                if m:
                    ids.append(f"tests/{path.name}::{m.group(1)}")
    return ids


def run_cuda_tests(out: Path, budget: float) -> dict:
    ids = cuda_tests()
    xml = out / "cuda_tests.xml"
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                            *ids], cwd=ROOT, capture_output=True, text=True, timeout=budget)
        status, tail = r.returncode, r.stdout[-2000:] + r.stderr[-1000:]
    except subprocess.TimeoutExpired:
        status, tail = "timeout", ""
    counts = {}
    if xml.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"ids": ids, "status": status, "ok": status == 0, "seconds": round(time.perf_counter() - t0, 1),
            **counts, "output_tail": tail if status != 0 else ""}


# -- one model, in its own process ----------------------------------------------------------------------------

def _stages():
    from backend.progress import Stages

    return Stages(None, None)


def _timed(fn, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def full_triposr(device, work: Path):
    """-> (precision -> mesh, what it is). R=256; the shaped checkpoint's threshold 25."""
    import bench_triposr
    from backend import preprocess
    from backend.models import triposr
    from backend.options import Options

    tool = next((ROOT / p for p in SHAPED_TOOL if (ROOT / p).is_file()), None)
    if tool is not None:
        subprocess.run([sys.executable, str(tool), str(work)], check=True, capture_output=True, timeout=120)
        threshold, what = 25.0, "TripoSR full-size, shaped weights (shaped_triposr_ckpt.py), R=256"
    else:
        threshold, what = bench_triposr.make_random_model(work), "TripoSR full-size, random weights, R=256"
    model = triposr.load(work, device)
    image = preprocess.load_image(bench_triposr.IMAGE)
    conditioning = preprocess.prepare(image, remove_background=False)
    return (lambda p: model.reconstruct(conditioning, Options(resolution=256, threshold=threshold, precision=p),
                                        _stages())), what, 256


def full_openlrm(device, work: Path):
    import bench_openlrm
    from backend import preprocess
    from backend.models import openlrm, registry
    from backend.options import Options

    threshold = bench_openlrm.make_random_model(work, "base")
    spec = registry.get("openlrm-mix-base")
    model = openlrm.load(work, device, default_source_size=spec.default_source_size)
    conditioning = preprocess.prepare(preprocess.load_image(bench_openlrm.IMAGE), recipe="openlrm",
                                      remove_background=False)
    res = spec.default_resolution
    return (lambda p: model.reconstruct(conditioning, Options(resolution=res, threshold=threshold, precision=p),
                                        _stages())), f"OpenLRM base, random weights, R={res}", res


def full_instantmesh(device, work: Path):
    import bench_instantmesh_stage2 as bench
    from backend.models import instantmesh
    from backend.options import Options

    bench.make_random_model(work, "large", "mesh")
    model = instantmesh.load(work / "instant-mesh-large.yaml", device)
    res = model.cfg.grid_res
    return (lambda p: model.reconstruct_views(bench.GRID, Options(precision=p), _stages())), \
        f"InstantMesh large stage 2, random weights, FlexiCubes {res}", res


def zero123pp_views(device, work: Path, full: bool, steps: int):
    """Zero123++ for ``steps`` steps; full: the full-size UNet (sudo-ai's config) and an SD-size VAE."""
    import zero123pp_tiny

    from backend.models.zero123pp import Zero123PlusPlus

    if full:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from backend.models import zero123pp_load as zl

        zero123pp_tiny.WIDTH = 1024  # the CLIP widths = the UNet's cross-attention width
        zero123pp_tiny.make_folder(work)
        config = zl._strip(zl.read_json(zero123pp_tiny.DATA / "zero123plus_unet_config.json"))
        UNet2DConditionModel.from_config(config).save_pretrained(work / "unet")
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      sample_size=512).save_pretrained(work / "vae")
    else:
        zero123pp_tiny.make_folder(work)
    rgba = __import__("numpy").zeros((96, 96, 4), "uint8")
    rgba[20:76, 30:66] = (200, 60, 30, 255)
    models = {}

    def run(precision):
        from backend import devices
        from backend.models.instantmesh_pipeline import VIEWS_HALF

        dtype = devices.resolve_precision(precision, device, half=VIEWS_HALF)
        if dtype not in models:
            models.clear()
            models[dtype] = Zero123PlusPlus.from_folder(work, None, device, dtype)
        return models[dtype].generate(rgba, steps=steps, seed=1, stages=None)

    size = "full-size UNet and VAE" if full else "tiny"
    return run, f"Zero123++ {size}, random weights, {steps} steps", steps


def run_model(name: str, device, tiny: bool) -> dict:
    import numpy as np

    import bench_precision
    from backend import devices

    with tempfile.TemporaryDirectory(prefix=f"device-check-{name}-") as tmp:
        work = Path(tmp)
        if name == "zero123pp":
            run, what, steps = zero123pp_views(device, work, full=not tiny, steps=2 if tiny else 10)
        elif tiny:
            run, what, steps = bench_precision.TINY[name](device), f"{name} tiny fixture", None
        else:
            run, what, steps = {"triposr": full_triposr, "openlrm": full_openlrm,
                                "instantmesh": full_instantmesh}[name](device, work)
        half = "fp16" if name == "zero123pp" else None
        auto = devices.precision_name(devices.resolve_precision("auto", device, half=half))
        row = {"model": name, "what": what, "device": str(device), "auto_is": auto}
        if device.type == "cuda":  # kernels compiled and memory pools grown outside the timings
            run("auto")
        for precision in ("fp32", "auto"):
            result, seconds = _timed(lambda: run(precision), device)
            row[precision] = {"seconds": round(seconds, 3)}
            if name == "zero123pp":
                row[precision]["steps_per_s"] = round(steps / seconds, 2)
                row[precision]["views"] = result
            else:
                row[precision].update(faces=int(len(result.faces)), mesh=result,
                                      stage_seconds={k: round(v, 3) for k, v in result.stats["seconds"].items()}
                                      if "seconds" in result.stats else {})
        ref, other = row["fp32"], row["auto"]
        if name == "zero123pp":
            diff = np.abs(other.pop("views").astype(int) - ref.pop("views").astype(int))
            row["difference"] = {"views_max": int(diff.max()), "views_mean": round(float(diff.mean()), 4)}
        else:
            res = steps or bench_precision.RESOLUTION[name]
            d = bench_precision.compare_meshes(other.pop("mesh"), ref.pop("mesh"), res)
            row["difference"] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()}
    return row


# -- the whole check --------------------------------------------------------------------------------------------

def table(report: dict) -> str:
    lines = [f"Device check: {report['device_name']} ({report['device']}), torch {report['torch']}, "
             f"{'tiny fixtures' if report['tiny'] else 'full-size models'}", "",
             f"CUDA tests: {len(report['cuda_tests']['ids'])} "
             f"(failures {report['cuda_tests'].get('failures', '?')}, errors {report['cuda_tests'].get('errors', '?')}"
             f", skipped {report['cuda_tests'].get('skipped', '?')}), status {report['cuda_tests']['status']}", "",
             "| model | auto | fp32 s | auto s | speed-up | faces fp32 / auto | Hausdorff (voxels) | colour mean/max |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["models"]:
        if "error" in row:
            lines.append(f"| {row['model']} | error: {row['error'][:80]} |||||||")
            continue
        f, a, d = row["fp32"], row["auto"], row["difference"]
        speed = f"{f['seconds'] / a['seconds']:.2f}×" if a["seconds"] else "-"
        if row["model"] == "zero123pp":
            lines.append(f"| {row['what']} | {row['auto_is']} | {f['seconds']} ({f['steps_per_s']} step/s) | "
                         f"{a['seconds']} ({a['steps_per_s']} step/s) | {speed} | - | - | views "
                         f"{d['views_mean']}/{d['views_max']} |")
        else:
            lines.append(f"| {row['what']} | {row['auto_is']} | {f['seconds']} | {a['seconds']} | {speed} | "
                         f"{d['faces_fp32']} / {d['faces']} | {d['hausdorff_voxels']:.2f} | "
                         f"{d['colour_mean']:.3f}/{d['colour_max']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "device-check"))
    p.add_argument("--tiny", action="store_true", help="the tiny fixtures on this machine's device (CI)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--_model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    if args._model:  # the child: one model, its row as JSON on the last line
        print(json.dumps(run_model(args._model, device, tiny)))
        return 0
    budget = TINY_BUDGET_S if tiny else BUDGET_S
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "tiny": tiny, "budget_s": budget,
              "reference": "not run: the reference implementations are not installed on this machine"}
    report["cuda_tests"] = run_cuda_tests(args.out, budget["cuda_tests"])
    print(f"CUDA tests: {report['cuda_tests']['status']} ({report['cuda_tests']['seconds']} s)", file=sys.stderr)
    report["models"] = []
    for name in args.models.split(","):
        step = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, __file__, "--_model", name] + (["--tiny"] if tiny else []),
                               cwd=ROOT, capture_output=True, text=True, timeout=budget[name],
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            row = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else \
                {"model": name, "error": f"exit {r.returncode}: {r.stderr.strip()[-1500:]}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"ran past its {budget[name]} s budget"}
        row["step_seconds"] = round(time.perf_counter() - step, 1)
        report["models"].append(row)
        print(f"{name}: {'error' if 'error' in row else 'ok'} ({row['step_seconds']} s)", file=sys.stderr)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    for name, text in (("device_check.json", json.dumps(report, indent=1)), ("device_check.md", table(report))):
        tmp = args.out / f".{name}.partial"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.out / name)
    print(table(report))
    if not report["cuda_tests"]["ok"]:
        return 1
    return 3 if any("error" in row for row in report["models"]) else 0


if __name__ == "__main__":
    sys.exit(main())
