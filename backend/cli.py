"""Command line: ``python -m backend generate IMAGE -o OUT.{glb,ply,obj,npz}`` and ``serve`` (the worker).

Exit status: 0 success, 2 bad input, 3 missing or invalid weights, 1 anything else.
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
from .mesh import FORMATS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend", description="Image to 3D backend")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="reconstruct a coloured mesh from one image")
    g.add_argument("input", help="image file (PNG/JPEG/WebP/TIFF...; RGBA with transparency skips background removal)")
    g.add_argument("-o", "--output", required=True, help=f"output mesh, by extension: {' '.join(FORMATS)}")
    g.add_argument("--model", default="triposr", help="model id (default: triposr)")
    g.add_argument("--weights", metavar="DIR", help="model folder in the official layout")
    g.add_argument("--resolution", type=int, help="marching-cubes grid, 32..1024 (default: the model's, 256 for TripoSR)")
    g.add_argument("--threshold", type=float, help="density threshold of the surface (default: the model's, 25.0 for TripoSR)")
    g.add_argument("--foreground-ratio", type=float, default=0.85, help="object size in the frame (default 0.85)")
    g.add_argument("--no-remove-background", dest="remove_background", action="store_false",
                   help="do not run background removal (an opaque image is used as given)")
    g.add_argument("--u2net", metavar="FILE", help="background-removal model file (default ~/.u2net/u2net.onnx)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    g.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    sub.add_parser("serve", help="run the worker that Blender talks to (JSON lines on stdin/stdout)",
                   add_help=False)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from . import worker

        return worker.main(argv[1:])
    args = _parser().parse_args(argv)
    return _generate(args)


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

    output = Path(args.output)
    started = time.perf_counter()
    try:
        if output.suffix.lower() not in FORMATS:
            raise InputError(f"unsupported output format {output.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
        if not output.parent.resolve().is_dir():
            raise InputError(f"output folder does not exist: {output.parent}")
        options = Options(model=args.model, weights=args.weights, resolution=args.resolution,
                          threshold=args.threshold, foreground_ratio=args.foreground_ratio,
                          remove_background=args.remove_background, device=args.device, u2net_path=args.u2net)
        from . import mesh as meshio
        from .pipeline import generate

        mesh = generate(args.input, options, progress=_progress_printer(args.quiet or args.json))
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
