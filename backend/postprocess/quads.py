"""Quad-dominant retopology with Instant Meshes (pynanoinstantmeshes), as Stable Fast 3D does.

Instant Meshes ends with a regular subdivision into a pure quad mesh, so its face count is about 3.6 times
the vertex count it is asked for: the request is sized from the face budget. Its result is checked (fewer
faces than the input, mostly quads); a failed check raises :class:`QuadsFailed` and the caller falls back to
the triangle reduction. pynanoinstantmeshes has wheels for Linux x86-64, Windows x86-64 and macOS arm64
only: elsewhere it is missing, which is reported the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from .reduce import drop_unused, reduce

FACES_PER_VERTEX = 3.6  # measured: Instant Meshes' quad count per requested vertex
MIN_QUAD_SHARE = 0.9
# Instant Meshes works on a pre-reduced copy: much faster on a 4M-face extraction, same result at the budget.
PRE_REDUCE_FACTOR, PRE_REDUCE_MIN = 8, 200_000


class QuadsFailed(Exception):
    """Instant Meshes is missing, failed, or gave a mesh that is not what was asked for."""


def quad_remesh(vertices: np.ndarray, faces: np.ndarray, target: int):
    """-> vertices (V, 3) float32, faces (F, 4) int32 (-1 in column 3 for a triangle), about ``target`` faces."""
    try:
        import pynanoinstantmeshes
    except ImportError:
        raise QuadsFailed("Instant Meshes (pynanoinstantmeshes) is not installed for this platform") from None
    faces_before = len(faces)
    limit = max(PRE_REDUCE_FACTOR * target, PRE_REDUCE_MIN)
    if len(faces) > limit:
        vertices, faces = reduce(vertices, faces, limit)
    with _stdout_to_stderr():  # it prints its progress on fd 1, which is the CLI's --json channel
        try:
            v, f = pynanoinstantmeshes.remesh(np.ascontiguousarray(vertices, np.float32),
                                              np.ascontiguousarray(faces, np.uint32),
                                              vertex_count=max(4, round(target / FACES_PER_VERTEX)),
                                              deterministic=True)
        except Exception as e:  # noqa: BLE001 - any failure of the C++ code means: no quads
            raise QuadsFailed(f"Instant Meshes failed ({e})") from None
    v, f = np.asarray(v, np.float32), np.asarray(f, np.int64).astype(np.int32)
    if f.ndim != 2 or f.shape[1] != 4 or len(f) == 0:
        raise QuadsFailed("Instant Meshes returned no faces")
    # A degenerate quad (a repeated corner) is a triangle: keep it as one, -1 padded.
    tri = (f[:, 3] == f[:, 2]) | (f[:, 3] == f[:, 0])
    f[tri, 3] = -1
    f = f[~((f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]))]
    v, f = drop_unused(v, f)
    check(f, faces_before)
    return v, f


def check(faces: np.ndarray, faces_before: int) -> None:
    """Fewer faces than before, most of them quads; else :class:`QuadsFailed`."""
    if len(faces) == 0 or len(faces) >= faces_before:
        raise QuadsFailed(f"Instant Meshes gave {len(faces)} faces from {faces_before}")
    share = float((faces[:, 3] >= 0).mean())
    if share < MIN_QUAD_SHARE:
        raise QuadsFailed(f"only {share:.0%} of Instant Meshes' faces are quads")


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
