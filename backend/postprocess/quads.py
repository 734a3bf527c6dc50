"""Quad-dominant retopology with Instant Meshes (pynanoinstantmeshes), as Stable Fast 3D does.

Instant Meshes ends with a regular subdivision into a pure quad mesh, so its face count is about 3.6 times
the vertex count it is asked for: the request is sized from the face budget. Its result is checked (fewer
faces than the input, mostly quads); a failed check raises :class:`QuadsFailed` and the caller falls back to
the triangle reduction. pynanoinstantmeshes has wheels for Linux x86-64, Windows x86-64 and macOS arm64
only: elsewhere it is missing, which is reported the same way.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ..errors import BackendError
from .reduce import drop_unused, reduce

FACES_PER_VERTEX = 3.6  # measured: Instant Meshes' quad count per requested vertex
MIN_QUAD_SHARE = 0.9
# Instant Meshes works on a pre-reduced copy: much faster on a 4M-face extraction, same result at the budget.
PRE_REDUCE_FACTOR, PRE_REDUCE_MIN = 8, 200_000
# Instant Meshes' deadline per face (native.deadline): measured 19 us (200k faces -> 20k, 3.8 s) on a busy
# two-core machine; about ten times that.
QUADS_S_PER_FACE = 2e-4


class QuadsFailed(Exception):
    """Instant Meshes is missing, failed, or gave a mesh that is not what was asked for."""


def quad_remesh(vertices: np.ndarray, faces: np.ndarray, target: int, check=None):
    """-> vertices (V, 3) float32, faces (F, 4) int32 (-1 in column 3 for a triangle), about ``target`` faces.
    Instant Meshes runs in a child process (:mod:`.native`): ``check()`` is polled meanwhile and may raise to
    cancel; a cancel or a deadline passed is raised as such, not as :class:`QuadsFailed`."""
    from . import native

    if importlib.util.find_spec("pynanoinstantmeshes") is None:
        raise QuadsFailed("Instant Meshes (pynanoinstantmeshes) is not installed for this platform")
    faces_before = len(faces)
    limit = max(PRE_REDUCE_FACTOR * target, PRE_REDUCE_MIN)
    if len(faces) > limit:
        vertices, faces = reduce(vertices, faces, limit, check)
    try:
        out = native.call("backend.postprocess.quads:remesh",
                          {"vertices": np.ascontiguousarray(vertices, np.float32),
                           "faces": np.ascontiguousarray(faces, np.uint32)},
                          {"vertex_count": max(4, round(target / FACES_PER_VERTEX))}, check=check,
                          seconds=native.deadline(max(len(faces), target), QUADS_S_PER_FACE),
                          what=f"Instant Meshes on {len(faces):,} faces",
                          hint="Ask for fewer faces, or leave Quads off (triangles).")
    except BackendError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the C++ code means: no quads
        raise QuadsFailed(f"Instant Meshes failed ({e})") from None
    v, f = np.asarray(out["vertices"], np.float32), np.asarray(out["faces"], np.int64).astype(np.int32)
    if f.ndim != 2 or f.shape[1] != 4 or len(f) == 0:
        raise QuadsFailed("Instant Meshes returned no faces")
    v, f = drop_unused(v, clean(f))
    check_quads(f, faces_before)
    return v, f


def remesh(vertices, faces, vertex_count: int) -> dict:
    """In the child process (its stdout, where Instant Meshes prints its progress, goes nowhere)."""
    import pynanoinstantmeshes

    v, f = pynanoinstantmeshes.remesh(vertices, faces, vertex_count=vertex_count, deterministic=True)
    return {"vertices": v, "faces": f}


def clean(faces: np.ndarray) -> np.ndarray:
    """Instant Meshes' quads (M, 4) as Blender accepts them: a quad with a corner repeated next to itself is the
    triangle of its other three (-1 padded); one with a corner repeated across it, or with two repeats, is no
    face; a face with the same corners as an earlier one is dropped."""
    same_as_next = faces == np.roll(faces, -1, axis=1)  # corner i equals corner i + 1
    ordered = np.sort(faces, axis=1)
    distinct = 4 - (ordered[:, 1:] == ordered[:, :-1]).sum(axis=1)
    quads = faces[distinct == 4]
    tri_rows = (distinct == 3) & (same_as_next.sum(axis=1) == 1)
    drop = np.roll(same_as_next[tri_rows], 1, axis=1)  # the second corner of the repeated pair goes
    triangles = np.full((int(tri_rows.sum()), 4), -1, np.int32)
    triangles[:, :3] = faces[tri_rows][~drop].reshape(-1, 3)
    out = np.concatenate([quads, triangles])
    _, first = np.unique(np.sort(out, axis=1), axis=0, return_index=True)
    return out[np.sort(first)]


def check_quads(faces: np.ndarray, faces_before: int) -> None:
    """Fewer faces than before, most of them quads; else :class:`QuadsFailed`."""
    if len(faces) == 0 or len(faces) >= faces_before:
        raise QuadsFailed(f"Instant Meshes gave {len(faces)} faces from {faces_before}")
    share = float((faces[:, 3] >= 0).mean())
    if share < MIN_QUAD_SHARE:
        raise QuadsFailed(f"only {share:.0%} of Instant Meshes' faces are quads")
