"""Command line: ``python -m backend generate IMAGE -o OUT.{glb,ply,obj,npz}`` (InstantMesh: also
``generate --views GRID.png``, a ready-made six-view grid); ``check`` (the environment as
JSON), ``install`` (a managed environment), ``serve`` (the worker Blender talks to).

Exit status: 0 success, 2 bad input, 3 missing or invalid weights, 4 weights licence not accepted
(``--accept-licence``), 1 anything else.
A failed run leaves no output file behind (outputs are written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from .errors import BackendError, InputError

# Only generate needs numpy/torch; check and install must run in a bare Python.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend", description="Image to 3D backend")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="reconstruct a coloured (or textured) mesh from one image")
    g.add_argument("input", nargs="?",
                   help="image file (PNG/JPEG/WebP/TIFF...; RGBA with transparency skips background removal); "
                        "leave out with --views")
    g.add_argument("-o", "--output", required=True, help="output mesh, by extension: .glb .ply .obj .npz")
    g.add_argument("--model", default="triposr",
                   help="model id: triposr, openlrm-{obj,mix}-{small,base,large} or openlrm-{small,base,large} "
                        "(the mix weights), instantmesh-{large,base} (default: triposr)")
    g.add_argument("--weights", metavar="DIR", help="model folder in the official layout")
    g.add_argument("--resolution", type=int,
                   help="marching-cubes grid, 32..1024 (default: the model's, 256 TripoSR, 384 OpenLRM)")
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
    v = g.add_argument_group("multi-view models (instantmesh-*)")
    v.add_argument("--views", metavar="GRID.png",
                   help="a 960x640 grid of the six views (3 rows x 2 columns): reconstruct it directly, with no "
                        "input image, background removal or view generation")
    v.add_argument("--save-views", metavar="PATH.png", help="also write the generated six-view grid")
    v.add_argument("--steps", type=int, metavar="N", help="diffusion steps, 1..500 (default 75)")
    v.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale, 1..30 (default 4.0)")
    v.add_argument("--seed", type=int, metavar="S", help="random seed of the view generation (default 42)")
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
    g.add_argument("--no-remove-background", dest="remove_background", action="store_false",
                   help="do not run background removal (an opaque image is used as given)")
    g.add_argument("--u2net", metavar="FILE", help="background-removal model file (default ~/.u2net/u2net.onnx)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    g.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    sub.add_parser("serve", help="run the worker that Blender talks to (JSON lines on stdin/stdout)",
                   add_help=False)
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
    i.add_argument("--json", action="store_true", help="progress and the result as JSON lines")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from . import worker

        return worker.main(argv[1:])
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
            _accept_licence(registry.get(args.model), args.accept_licence)
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
                                 torch_index_url=args.torch_index_url, index_url=args.index_url, progress=progress)
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


def _accept_licence(spec, accept: bool) -> None:
    """Show a restrictive licence when the user accepts it, record it; refuse while it is not accepted."""
    from . import licences

    if accept and licences.get(spec.licence).needs_acceptance and spec.licence not in licences.accepted():
        print(licences.notice(spec.licence, spec.display_name), file=sys.stderr)
        licences.accept(spec.licence, spec.id)
        print(f"Licence {spec.licence} accepted; remembered in {licences.acceptance_file()}", file=sys.stderr)
    licences.ensure_accepted(spec.licence, spec.id, spec.display_name)


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


def _generate(args) -> int:
    from .pipeline import Options

    from . import mesh as meshio

    output = Path(args.output)
    started = time.perf_counter()
    try:
        if output.suffix.lower() not in meshio.FORMATS:
            raise InputError(f"unsupported output format {output.suffix or '(none)'!r}; "
                             f"use one of {', '.join(meshio.FORMATS)}")
        if not output.parent.resolve().is_dir():
            raise InputError(f"output folder does not exist: {output.parent}")
        from .models import registry

        _accept_licence(registry.get(args.model), args.accept_licence)
        options = Options(model=args.model, weights=args.weights, resolution=args.resolution,
                          threshold=args.threshold, foreground_ratio=args.foreground_ratio,
                          remove_background=args.remove_background, device=args.device, u2net_path=args.u2net,
                          source_size=args.source_size, views=args.views, save_views=args.save_views,
                          steps=args.steps, guidance=args.guidance, seed=args.seed, faces=args.faces,
                          quads=args.quads, texture=args.texture, dense=args.dense)
        from .pipeline import generate

        mesh = generate(args.input, options, progress=_progress_printer(args.quiet or args.json))
        if args.input and Path(args.input).resolve() in {p.resolve() for p in meshio.output_files(mesh, output)}:
            raise InputError(f"writing {output} would overwrite the input image {args.input}")
        meshio.save(mesh, output)
    except BackendError as e:
        return _fail(args, e.exit_status, e.to_dict())
    except KeyboardInterrupt:
        return _fail(args, 130, {"code": "cancelled", "message": "interrupted", "hint": ""})
    except Exception as e:  # a bug or an unforeseen failure: say so, keep the traceback for reports
        traceback.print_exc(file=sys.stderr)
        return _fail(args, 1, {"code": "internal", "message": f"{type(e).__name__}: {e}", "hint": ""})
    summary = {
        "ok": True,
        "output": str(output),
        "vertices": int(len(mesh.vertices)),
        "faces": int(len(mesh.faces)),
        **mesh.stats,
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
