"""Command line: ``python -m backend generate IMAGE -o OUT.{glb,ply,obj,npz}`` (InstantMesh: also
``generate --views GRID.png``, a ready-made six-view grid); a batch: ``generate A.png B.jpg refs/
'shots/*.png' -o OUT/ [--format glb|obj|ply|npz]``, in this process or on a Ray cluster (``--ray ADDRESS``);
``check`` (the environment as JSON), ``install`` (a managed environment), ``download`` (a model's files),
``serve`` (the worker Blender talks to).

Exit status: 0 success, 2 bad input, 3 missing or invalid weights, 4 weights licence not accepted
(``--accept-licence``), 5 a batch in which some images failed (each one reported; the others were written),
130 interrupted (Ctrl+C), 1 anything else. A batch that cannot start at all (its options, the weights, the
licence) exits 2, 3 or 4 as a single run does.
A failed run leaves no output file behind (outputs are written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from . import batch, hub, licences
from .errors import BackendError, InputError, WeightsError

# Only generate needs numpy/torch; check and install must run in a bare Python (batch imports the stdlib only).


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend", description="Image to 3D backend")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="reconstruct a coloured (or textured) mesh from one image, or from many",
                       epilog=f"Exit status: 0 done, 2 bad input, 3 missing or invalid weights, 4 licence not "
                              f"accepted, {batch.SOME_FAILED} a batch in which some images failed (reported; the "
                              f"others written), 130 interrupted, 1 anything else.")
    g.add_argument("input", nargs="*", metavar="INPUT",
                   help="image file (PNG/JPEG/WebP/TIFF...; RGBA with transparency skips background removal); "
                        "several, a folder (the images in it) or a quoted pattern ('shots/*.png', '**' recurses) "
                        "make a batch; leave out with --views")
    g.add_argument("-o", "--output", required=True,
                   help="output mesh, by extension: .glb .ply .obj .npz; for a batch a folder (ending in /, made if "
                        "missing) that gets OUT/<stem>.<format> per image, a repeated stem numbered <stem>-2, "
                        "<stem>-3... in input order")
    g.add_argument("--model", default="triposr",
                   help="model id: triposr, openlrm-{obj,mix}-{small,base,large} or openlrm-{small,base,large} "
                        "(the mix weights), instantmesh-{large,base}, triposg (default: triposr)")
    g.add_argument("--weights", metavar="DIR", help="model folder in the official layout")
    g.add_argument("--resolution", type=int,
                   help="marching-cubes grid, 32..1024 (default: the model's, 256 TripoSR, 384 OpenLRM; TripoSG: 128, "
                        "256, 512 (default) or 1024)")
    g.add_argument("--threshold", type=float,
                   help="density threshold of the surface (default: the model's, 25.0 TripoSR, 3.0 OpenLRM)")
    g.add_argument("--foreground-ratio", type=float,
                   help="object size in the frame (default: the model's, 0.85 TripoSR, 0.8 OpenLRM)")
    g.add_argument("--source-size", type=int, metavar="N",
                   help="side in pixels of the image the encoder sees, a multiple of its patch size "
                        "(default: the model's: TripoSR 512; OpenLRM small 224, base 336, large 448)")
    g.add_argument("--accept-licence", action="store_true",
                   help="accept the weights' licence where it restricts use (OpenLRM, InstantMesh: CC BY-NC 4.0, "
                        "non-commercial); remembered, so needed once")
    v = g.add_argument_group("diffusion models (instantmesh-*: the views; triposg: the shape)")
    v.add_argument("--views", metavar="GRID.png",
                   help="a 960x640 grid of the six views (3 rows x 2 columns): reconstruct it directly, with no "
                        "input image, background removal or view generation")
    v.add_argument("--save-views", metavar="PATH.png", help="also write the generated six-view grid")
    v.add_argument("--steps", type=int, metavar="N", help="diffusion steps, 1..500 (default 75 InstantMesh, 50 TripoSG)")
    v.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale, 1..30 (default 4.0 InstantMesh, "
                   "7.0 TripoSG; 1 = no guidance, half the work)")
    v.add_argument("--seed", type=int, metavar="S", help="random seed of the views or the shape (default 42)")
    o = g.add_argument_group("output (every model)")
    o.add_argument("--faces", type=int, metavar="N",
                   help="reduce to about N faces (quadric edge collapse), N >= 100 (default: as extracted)")
    o.add_argument("--quads", action="store_true",
                   help="with --faces: quad-dominant retopology (Instant Meshes); falls back to triangles, saying so")
    o.add_argument("--dense", action="store_true",
                   help="evaluate the density at every grid point instead of coarse to fine (the same mesh, "
                        "slower: for comparison, or as a fallback)")
    o.add_argument("--texture", type=int, metavar="SIZE",
                   help="bake a SIZE x SIZE colour texture from the model (512..4096) on a UV atlas; without "
                        "--faces the mesh is first reduced to 50,000 faces. GLB and OBJ carry it (OBJ: .mtl and "
                        ".png beside it), .npz holds it, PLY stays vertex-coloured")
    o.add_argument("--colours", choices=("field", "images"), default="field",
                   help="field: every colour from the model's field (default); images: painted from the pictures "
                        "the model saw (the input, InstantMesh's six views), the field where none sees the surface")
    g.add_argument("--no-remove-background", dest="remove_background", action="store_false",
                   help="do not run background removal (an opaque image is used as given)")
    g.add_argument("--u2net", metavar="FILE", help="background-removal model file (default ~/.u2net/u2net.onnx)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    g.add_argument("--precision", default="auto",
                   help="auto, fp32, fp16 or bf16: the precision of the transformers and the diffusion U-Net "
                        "(default auto: fp32 on the CPU, bf16 on CUDA where the GPU has it, else fp16; fp16 on "
                        "MPS); what the surface depends on stays fp32")
    g.add_argument("--offline", action="store_true",
                   help="never connect (as download --offline): missing files are named, with where to put them")
    g.add_argument("--json", action="store_true",
                   help="print one JSON summary on stdout; a batch: one line per image (event result, skipped or "
                        "error), then one summary line")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    b = g.add_argument_group("batch (several inputs, a folder or a pattern, or -o ending in /)")
    b.add_argument("--format", choices=batch.FORMATS, help="the batch's output format (default glb)")
    b.add_argument("--skip-existing", action="store_true",
                   help="leave out images whose output is already there: run the same command again to resume an "
                        "interrupted batch (Ctrl+C finishes the image in hand; twice stops at once; only complete "
                        "files are ever left)")
    b.add_argument("--ray", metavar="ADDRESS",
                   help="run the batch on a Ray cluster: auto (the cluster this machine is in), local (this machine "
                        "alone) or ray://HOST:PORT; one worker per GPU keeps the model loaded; the weights must be "
                        "readable on every node. Needs backend/requirements-ray.txt")
    b.add_argument("--ray-cpus", type=int, default=4, metavar="N",
                   help="on a cluster without GPUs, one worker per N CPUs (default 4)")
    sub.add_parser("serve", help="run the worker that Blender talks to (JSON lines on stdin/stdout)",
                   add_help=False)
    sub.add_parser("cluster-serve", help="a shared GPU server for Blender's Remote backend, on Ray Serve", add_help=False)
    sub.add_parser("check", help="print what this Python has (torch, devices, packages) as JSON")
    d = sub.add_parser("download", help="download a model's files into the model store, verified")
    d.add_argument("--model", required=True, help="model id, or u2net (background removal)")
    d.add_argument("--store", help="model store (default: $IMAGE_TO_3D_MODELS or the per-user data folder)")
    d.add_argument("--offline", action="store_true", help="never connect (fails, naming the files, if any is missing)")
    d.add_argument("--token", help="access token for gated repositories (default: $HF_TOKEN)")
    d.add_argument("--json", action="store_true", help="progress and the result as JSON lines")
    d.add_argument("--accept-licence", action="store_true",
                   help="accept the weights' licence where it restricts use (needed once)")
    i = sub.add_parser("install", help="create a managed backend environment with this Python")
    i.add_argument("--target", required=True, help="folder of the new virtual environment")
    i.add_argument("--flavor", default="auto", choices=["auto", "cuda", "rocm", "mps", "cpu"],
                   help="PyTorch build (default: detected)")
    i.add_argument("--torch-spec", default=None, help="pip requirement for torch (default 'torch>=2.3')")
    i.add_argument("--torch-index-url", help="package index for PyTorch ('pip': pip's own configuration)")
    i.add_argument("--index-url", help="package index for the other requirements (default: pip's)")
    i.add_argument("--wheels", metavar="DIR",
                   help="install from this wheelhouse folder alone, no network (make wheelhouse; put a torch "
                        "wheel for the machine there too)")
    i.add_argument("--json", action="store_true", help="progress and the result as JSON lines")
    return p


def main(argv=None) -> int:
    from .files import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM unwinds as Ctrl+C does: no temporary file is left behind
        return _main(argv)


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from . import worker

        try:
            return worker.main(argv[1:])
        except KeyboardInterrupt:  # Ctrl+C or SIGTERM: the job's temporaries are gone, end quietly
            return 130
    if argv[:1] == ["cluster-serve"]:
        from .server import main as server_main

        return server_main.main(argv[1:])
    args = _parser().parse_args(argv)
    return {"generate": _generate, "check": _check, "install": _install, "download": _download}[args.command](args)


def _download(args) -> int:
    from .hub import human_size
    from .models import registry

    def progress(done, total, rate):
        if args.json:
            print(json.dumps({"event": "progress", "bytes": done, "total": total, "rate": round(rate)}), flush=True)
        else:
            of = f" of {human_size(total)}" if total else ""
            print(f"\r{human_size(done)}{of} at {human_size(int(rate))}/s   ", end="", file=sys.stderr, flush=True)

    try:
        if args.model != "u2net":
            licences.accept_or_refuse(registry.get(args.model), args.accept_licence)
            _list_files(registry.get(args.model))
        folder = registry.fetch(args.model, args.store, token=args.token, online=False if args.offline else None,
                                progress=progress)
    except BackendError as e:
        if args.json:
            print(json.dumps({"event": "error", **e.to_dict()}), flush=True)
        return _fail(None, e.exit_status, e.to_dict())
    except KeyboardInterrupt:
        return _fail(None, 130, {"message": "interrupted; run the same command again to resume"})
    if args.json:
        print(json.dumps({"event": "result", "folder": str(folder)}), flush=True)
    else:
        print(f"\n{args.model}: files verified in {folder}", file=sys.stderr)
    return 0


def _list_files(spec) -> None:
    """What a download brings, on stderr (the log, under --json too): each file with its size ("about" where
    none is published yet)."""
    from .hub import human_size
    from .models import registry

    sizes = [(f.path, f.size or registry.APPROX_BYTES.get((f.repo, f.path))) for f in spec.files]
    exact = all(f.size is not None for f in spec.files)
    shown = ", ".join(f"{p} ({human_size(b) if b else 'small'})" for p, b in sizes)
    print(f"{spec.id}: {len(sizes)} files, {'' if exact else 'about '}{human_size(registry.approx_size(spec.files))}: "
          f"{shown}", file=sys.stderr)


def _check(args) -> int:
    from . import check

    report = check.report()
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def _install(args) -> int:
    from . import install

    def progress(message: str, fraction: float) -> None:
        if args.json:
            print(json.dumps({"event": "progress", "message": message, "fraction": fraction}), flush=True)
        else:
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    try:
        report = install.install(Path(args.target), flavor=args.flavor,
                                 torch_spec=args.torch_spec or install.DEFAULT_TORCH_SPEC,
                                 torch_index_url=args.torch_index_url, index_url=args.index_url,
                                 wheels=Path(args.wheels) if args.wheels else None, progress=progress)
    except BackendError as e:
        if args.json:
            print(json.dumps({"event": "error", **e.to_dict()}), flush=True)
        return _fail(None, e.exit_status, e.to_dict())
    python = install.venv_python(Path(args.target).expanduser().resolve())
    if args.json:
        print(json.dumps({"event": "result", "python": str(python), "check": report}), flush=True)
    else:
        print(f"backend environment ready: {python} (torch {report['torch']['version']}, device {report['device']})",
              file=sys.stderr)
    return 0


def _progress_printer(quiet: bool):
    last = {"stage": None, "tenth": -1}

    def show(stage: str, fraction: float, message: str) -> None:
        if quiet:
            return
        tenth = int(fraction * 10)
        if stage != last["stage"] or tenth > last["tenth"]:
            print(f"[{stage}] {fraction:4.0%} {message}", file=sys.stderr, flush=True)
            last.update(stage=stage, tenth=tenth)

    return show


def _options(args):
    from .options import Options

    return Options(model=args.model, weights=args.weights, resolution=args.resolution, threshold=args.threshold,
                   foreground_ratio=args.foreground_ratio, remove_background=args.remove_background,
                   device=args.device, precision=args.precision, u2net_path=args.u2net,
                   source_size=args.source_size, views=args.views, save_views=args.save_views, steps=args.steps, guidance=args.guidance, seed=args.seed,
                   faces=args.faces, quads=args.quads, texture=args.texture, dense=args.dense,
                   colours=args.colours)


def _is_batch(args) -> bool:
    out = args.output
    return (len(args.input) > 1 or out.endswith(("/", os.sep)) or Path(out).is_dir() or args.ray is not None
            or any(Path(i).is_dir() or (not Path(i).exists() and batch.has_wildcards(i)) for i in args.input))


def _check_weights_offline(args) -> None:
    """Offline, weights that are not here stop the run before anything else, saying so (nothing is fetched)."""
    from .models import registry

    try:
        registry.find_folder(registry.get(args.model), args.weights, views_only=args.views is not None)
    except WeightsError as e:
        raise WeightsError(f"{e.message}; online access is off (--offline): nothing is downloaded", e.hint) from None


def _generate(args) -> int:
    if args.offline:  # for every library in this process (and the Ray workers, which get these variables)
        os.environ.update(hub.OFFLINE_ENVIRONMENT)
    if _is_batch(args):
        return _generate_batch(args)
    from . import mesh as meshio

    output = Path(args.output)
    image = args.input[0] if args.input else None
    started = time.perf_counter()
    try:
        if output.suffix.lower() not in meshio.FORMATS:
            raise InputError(f"unsupported output format {output.suffix or '(none)'!r}; "
                             f"use one of {', '.join(meshio.FORMATS)}")
        if args.format and output.suffix.lower() != f".{args.format}":
            raise InputError(f"--format {args.format} does not match -o {output}: a single output's extension "
                             f"is its format (for a batch, end -o with /)")
        if not output.parent.resolve().is_dir():
            raise InputError(f"output folder does not exist: {output.parent}")
        if args.skip_existing and output.exists():
            print(f"skipped: {output} exists", file=sys.stderr)
            if args.json:
                print(json.dumps({"ok": True, "output": str(output), "skipped": True}))
            return 0
        from .models import registry

        licences.accept_or_refuse(registry.get(args.model), args.accept_licence)
        if args.offline:
            _check_weights_offline(args)
        options = _options(args)
        from .pipeline import generate

        mesh = generate(image, options, progress=_progress_printer(args.quiet or args.json))
        fields = batch.save_mesh(mesh, output, [image] if image else [])
    except BackendError as e:
        return _fail(args, e.exit_status, e.to_dict())
    except KeyboardInterrupt:
        return _fail(args, 130, {"code": "cancelled", "message": "interrupted", "hint": ""})
    except Exception as e:  # a bug or an unforeseen failure: say so, keep the traceback for reports
        traceback.print_exc(file=sys.stderr)
        return _fail(args, 1, {"code": "internal", "message": f"{type(e).__name__}: {e}", "hint": ""})
    summary = {
        "ok": True,
        **fields,
        "total_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {output} ({summary['vertices']} vertices, {summary['faces']} faces, "
              f"{summary['total_seconds']:.1f} s on {summary['device']})", file=sys.stderr)
        for note in summary.get("notes", ()):
            print(f"note: {note}", file=sys.stderr)
    return 0


def _batch_folder(args) -> Path:
    out = args.output
    folder = Path(out)
    if not (out.endswith(("/", os.sep)) or folder.is_dir()):
        if folder.suffix.lower().lstrip(".") in batch.FORMATS:
            raise InputError(f"a batch writes one file per image into a folder, and -o {out} names a file",
                             hint=f"End -o with / (-o {folder.with_suffix('')}/) and choose the format with "
                                  f"--format {folder.suffix.lower().lstrip('.')}.")
        if folder.exists():
            raise InputError(f"-o {out} is a file, not a folder for the batch's outputs")
    return folder


def _generate_batch(args) -> int:
    """Many images, the model loaded once: here, or on a Ray cluster with --ray (see backend/batch.py)."""
    report = batch.Report(0, args.json, args.quiet)
    try:
        folder = _batch_folder(args)
        if args.ray_cpus < 1:
            raise InputError(f"--ray-cpus must be at least 1, got {args.ray_cpus}")
        if args.views or args.save_views:
            raise InputError("--views and --save-views name one file: they are for a single run, not a batch")
        items = batch.plan(args.input, folder, args.format or "glb")
        report.total = len(items)
        options = _options(args)
        batch.check_options(options, here=args.ray is None)  # a cluster's GPUs are on its nodes, not here
        from .models import registry

        licences.accept_or_refuse(registry.get(args.model), args.accept_licence)
        if args.offline and args.ray is None:  # on a cluster, the weights are looked for on the nodes
            _check_weights_offline(args)
        folder.mkdir(parents=True, exist_ok=True)
        # stdout carries the JSON lines alone: what libraries print (Ray's messages among them) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr), batch.StopAfterCurrent() as stop:
            if args.ray is None:
                return batch.run_local(items, options, report, stop, args.skip_existing)
            from . import ray_batch

            options.accept_licence = True  # accepted here (or not needed): the nodes take the driver's word
            return ray_batch.run(items, options, report, stop, args.ray, args.ray_cpus, args.skip_existing)
    except BackendError as e:  # nothing could start (or, on a cluster, no worker could)
        status, error = e.exit_status, e.to_dict()
    except KeyboardInterrupt:
        report.interrupted = True
        return report.summary()
    except Exception as e:  # a bug or an unforeseen failure: say so, keep the traceback for reports
        traceback.print_exc(file=sys.stderr)
        status, error = 1, {"code": "internal", "message": f"{type(e).__name__}: {e}", "hint": ""}
    _fail(None, status, error)
    report.line(event="error", **error)
    return report.summary(status, started=False)


def _fail(args, status: int, error: dict) -> int:
    print(f"error: {error['message']}", file=sys.stderr)
    if error.get("hint"):
        print(f"hint: {error['hint']}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit_status": status, "error": error}))
    return status


def peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
