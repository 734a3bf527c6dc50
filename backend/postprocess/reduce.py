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


def reduce(vertices: np.ndarray, faces: np.ndarray, target: int):
    """-> vertices (V, 3) float32, faces (F, 3) int32 with F close to ``target`` (a few percent either way),
    unused vertices dropped. ``target`` must be below the mesh's face count."""
    import fast_simplification

    points, tris = fast_simplification.simplify(np.asarray(vertices, np.float64), np.asarray(faces, np.int32),
                                                target_count=int(target))
    return drop_unused(points.astype(np.float32), tris.astype(np.int32))


def drop_unused(vertices: np.ndarray, faces: np.ndarray):
    """Vertices no face uses removed, faces renumbered (-1 pads kept)."""
    used = np.zeros(len(vertices) + 1, dtype=bool)  # the extra slot absorbs -1 pads
    used[faces.reshape(-1)] = True
    used = used[:-1]
    new_index = np.full(len(vertices) + 1, -1, dtype=np.int32)
    new_index[:-1][used] = np.arange(int(used.sum()), dtype=np.int32)
    return vertices[used], new_index[faces]
