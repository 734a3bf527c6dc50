"""Shared test helpers (plain module: the tests folder is on sys.path under pytest's default import mode)."""

from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

DATA = Path(__file__).parent / "data"
TINY = DATA / "triposr_tiny"


def weld_points(v, tol=1e-6):
    return np.unique(np.round(np.asarray(v, np.float64) / tol), axis=0) * tol


def assert_same_mesh(vertices, faces, ref_vertices, ref_faces):
    """Order-independent comparison, as the fixture README asks: welded point sets within 1e-5, face counts
    within 0.5 %."""
    a, b = weld_points(vertices), weld_points(ref_vertices)
    gap = max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max())
    assert gap <= 1e-5, f"vertex sets differ by {gap}"
    assert abs(len(faces) - len(ref_faces)) <= 0.005 * len(ref_faces)
