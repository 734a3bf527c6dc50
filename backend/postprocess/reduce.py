"""Reduce a triangle mesh to about N faces by quadric edge collapse (fast-simplification).

fast-simplification (the PyVista project's wrapper of Fast-Quadric-Mesh-Simplification) is chosen over
pyfqmr and pymeshlab: it has wheels for Linux (x86-64, aarch64), Windows and macOS (x86-64, arm64) on
CPython 3.11 and 3.13, takes a target face count directly, needs nothing but numpy, and is about 0.1 s
for 140k -> 50k faces. pymeshlab brings a whole MeshLab build (over 100 MB); pyfqmr wraps the same algorithm
with wheels as wide, but fast-simplification is maintained by a larger project (PyVista).
"""

from __future__ import annotations

import numpy as np

MIN_FACES = 100
# The reduction's deadline per input face (native.deadline): measured 1.5 us (1M -> 100k faces, 1.5 s) on a
# busy two-core machine; about 13 times that.
REDUCE_S_PER_FACE = 2e-5


def reduce(vertices: np.ndarray, faces: np.ndarray, target: int, check=None):
    """-> vertices (V, 3) float32, faces (F, 3) int32 with F close to ``target`` (a few percent either way),
    unused vertices dropped. ``target`` must be below the mesh's face count. The reduction runs in a child
    process (:mod:`.native`): ``check()`` is polled meanwhile and may raise to cancel."""
    from . import native

    out = native.call("backend.postprocess.reduce:simplify",
                      {"points": np.asarray(vertices, np.float64), "triangles": np.asarray(faces, np.int32)},
                      {"target": int(target)}, seconds=native.deadline(len(faces), REDUCE_S_PER_FACE), check=check,
                      what=f"the reduction of {len(faces):,} faces", hint="Ask for a smaller output (Faces), or a "
                      "lower resolution.")
    return drop_unused(out["points"].astype(np.float32), out["triangles"].astype(np.int32))


def simplify(points, triangles, target: int) -> dict:
    """In the child process: fast-simplification's quadric edge collapse to about ``target`` faces."""
    import fast_simplification

    points, triangles = fast_simplification.simplify(points, triangles, target_count=target)
    return {"points": points, "triangles": triangles}


def drop_unused(vertices: np.ndarray, faces: np.ndarray):
    """Vertices no face uses removed, faces renumbered (-1 pads kept)."""
    used = np.zeros(len(vertices) + 1, dtype=bool)  # the extra slot absorbs -1 pads
    used[faces.reshape(-1)] = True
    used = used[:-1]
    new_index = np.full(len(vertices) + 1, -1, dtype=np.int32)
    new_index[:-1][used] = np.arange(int(used.sum()), dtype=np.int32)
    return vertices[used], new_index[faces]
