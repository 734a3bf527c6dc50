"""Benchmark: what ``--colours images`` adds beside the field's bake, on the full-size TripoSR with shaped random
weights (a smooth object), printing JSON.

    taskset -c 0,1 .venv/bin/python tests/benchmarks/paint.py [--model-dir DIR] [--faces 50000] [--texture 2048]

Makes the shaped checkpoint with ../shared/tools/shaped_triposr_ckpt.py (1.7 GB, kept in --model-dir), runs the
model at R=256 on the tiny fixture's picture, reduces to --faces and unwraps once, then times in one process,
alternating, ``--repeat`` times each (the least is reported: this machine is shared): the field's bake of the
texture (what ``--colours field`` does), and the painting (placing the picture, the vertex colours and the
painted texture, the field read at the same texels as the bake reads it). The difference is what painting adds;
the field read alone at those texels is timed too, so that each path's own work shows apart from it.
Not a test: it measures.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TOOL = ROOT.parent / "shared" / "tools" / "shaped_triposr_ckpt.py"
IMAGE = ROOT / "tests" / "data" / "triposr_tiny" / "input_rgba.png"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "triposr-shaped")
    p.add_argument("--faces", type=int, default=50_000)
    p.add_argument("--texture", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    if not (args.model_dir / "model.ckpt").exists():
        subprocess.run([sys.executable, str(TOOL), str(args.model_dir)], check=True)

    import torch

    from backend import pipeline
    from backend.mesh import triangulate
    from backend.options import Options
    from backend.postprocess import bake
    from backend.postprocess.atlas import unwrap_faces
    from backend.postprocess.colours import painting_for
    from backend.postprocess.reduce import reduce
    from backend.progress import Stages

    stages = Stages(None, None)
    options = Options(weights=str(args.model_dir), resolution=256, threshold=25.0, device="cpu",
                      colours="images")
    sources = {}
    _, model, planes, _, options = pipeline._field(IMAGE, options, stages, {}, None, sources)
    mesh = model.mesh_from(planes, options, stages)
    field = model.colour_field(planes)
    vertices, faces = reduce(mesh.vertices, mesh.faces, args.faces, stages.check)
    faces, uvs, _, _ = unwrap_faces(vertices, faces, args.texture)
    tris, tri_uvs = triangulate(faces, uvs)
    field_colours = field(vertices)  # both modes colour the reduced vertices from the field
    timings = {"field_bake": [], "painting": [], "field_at_texels": []}
    for _ in range(args.repeat):
        t = time.perf_counter()  # the part both share: the field read at every covered texel
        field(bake.texel_samples(vertices, tris, tri_uvs, args.texture).positions)
        timings["field_at_texels"].append(time.perf_counter() - t)
        t = time.perf_counter()
        bake.bake(vertices, tris, tri_uvs, args.texture, field)
        timings["field_bake"].append(time.perf_counter() - t)
        t = time.perf_counter()
        painting = painting_for(model, sources["picture"], None, vertices, faces, stages)
        painting.vertices(vertices, faces, field_colours, stages)
        painting.texture(vertices, faces, tris, tri_uvs, args.texture, field, stages)
        timings["painting"].append(time.perf_counter() - t)
    best = {k: round(min(v), 3) for k, v in timings.items()}
    print(json.dumps({
        "extracted_faces": int(len(mesh.faces)), "faces": int(len(faces)), "texture": args.texture,
        "threads": torch.get_num_threads(), "picture": list(sources["picture"].shape[:2]),
        "field_bake_seconds": best["field_bake"], "painting_seconds": best["painting"],
        "painting_adds_seconds": round(best["painting"] - best["field_bake"], 3),
        "field_at_texels_seconds": best["field_at_texels"],
        "painting_own_seconds": round(best["painting"] - best["field_at_texels"], 3),
        "field_bake_own_seconds": round(best["field_bake"] - best["field_at_texels"], 3),
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in timings.items()},
        "colour_sources": painting.shares, "views": painting.about,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
