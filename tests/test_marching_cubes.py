"""Our marching cubes (backend/marching_cubes.py) against PyMCubes 0.1.6, the references' own: the same
vertices bit for bit, the same triangles in the same order with the same winding, on every cell case, on
random fields (with values exactly at the level) and on the slabs and blocks the surface is cut into."""

import numpy as np
import pytest
import torch

from backend import marching_cubes as mc
from backend import surface


def _pymcubes(values: np.ndarray):
    import mcubes  # here: the device check runs the CUDA test below where PyMCubes (it needs scipy) is not installed

    v, f = mcubes.marching_cubes(values, 0.0)
    return v, f.astype(np.int64)


def _assert_same(values: np.ndarray, ours=None):
    """Ours == PyMCubes on ``values``: as many vertices, and each face's corners at the same positions in
    the same order (so the same triangles, order and winding)."""
    pv, pf = _pymcubes(values)
    ov, of = ours if ours is not None else (t.numpy() for t in mc.marching_cubes(torch.from_numpy(values)))
    assert len(ov) == len(pv) and len(of) == len(pf)
    assert np.array_equal(ov[of], pv[pf])
    assert len(np.unique(of)) == len(ov)  # every vertex used
    return len(pf)


def test_every_cell_case_matches_pymcubes():
    rng = np.random.default_rng(1)
    for case in range(256):
        values = rng.uniform(0.05, 1.0, (2, 2, 2))
        for m, corner in enumerate(mc.CORNERS):
            if case >> m & 1:
                values[corner] *= -1  # inside
        assert _assert_same(values) == int(mc.TRIANGLE_COUNTS[case]), case


@pytest.mark.parametrize("shape", [(3, 3, 3), (7, 5, 9), (24, 31, 17)])
def test_random_fields_match_pymcubes(shape):
    rng = np.random.default_rng(sum(shape))
    assert _assert_same(rng.standard_normal(shape)) > 0
    # values exactly at the level (inside, by PyMCubes' rule value <= 0) and ties between neighbours
    assert _assert_same(np.round(rng.standard_normal(shape) * 2) / 2) > 0


def test_a_smooth_surface_matches_pymcubes():
    g = np.linspace(-1, 1, 48)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    values = np.sqrt(x ** 2 + (1.3 * y) ** 2 + z ** 2) - 0.7 + 0.08 * np.sin(7 * x) * np.cos(5 * z)
    assert _assert_same(values) > 5000


def test_blocks_give_the_whole_grids_vertices_and_triangles():
    """A block at ``offset`` gives the vertices and triangles the whole grid has there, so blocks (sharing
    their boundary samples) cover the whole grid's mesh, in the whole grid's order once sorted by cell."""
    rng = np.random.default_rng(5)
    values = rng.standard_normal((13, 11, 12))
    whole_v, whole_f = _pymcubes(values)
    corners = []
    for x0 in range(0, 12, 4):
        for y0 in range(0, 10, 5):
            for z0 in range(0, 11, 3):
                block = values[x0:x0 + 5, y0:y0 + 6, z0:z0 + 4]
                v, f = mc.marching_cubes(torch.from_numpy(np.ascontiguousarray(block)), offset=(x0, y0, z0))
                corners.append(v.numpy()[f.numpy()])
    ours = np.concatenate(corners)
    theirs = whole_v[whole_f]
    key = lambda tris: np.lexsort(tris.reshape(len(tris), -1).T)  # noqa: E731 (faces as sortable rows)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours[key(ours)], theirs[key(theirs)])


class _Field:
    """A density field on a grid, given slice by slice like the models' ``grid_density``."""

    radius = 0.87

    def __init__(self, density: np.ndarray):
        self.density = torch.from_numpy(density.astype(np.float32))

    def grid_density(self, coords):
        assert len(coords) == len(self.density)
        yield from self.density


def test_surface_extraction_is_unchanged(monkeypatch):
    """surface.marching_cubes (slabs of our marching cubes, welded) == the way it was: PyMCubes on the
    whole grid, welded, in world units. Small slabs, so that many slab boundaries are crossed."""
    monkeypatch.setattr(surface, "SLAB_BYTES", 40 * 40 * 8 * 3)
    g = np.linspace(-1, 1, 40)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    density = 30 * np.exp(-4 * (x ** 2 + y ** 2 + (z - 0.1) ** 2)) + np.where(np.abs(x - 0.3) < 0.02, 40, 0)
    density[5:9, 5:9, 5:9] = 25.0  # exactly at the threshold: vertices snap to grid points and are welded
    field = _Field(density)
    vertices, faces = surface.marching_cubes(field, 40, 25.0)

    v, f = _pymcubes(density.astype(np.float32).astype(np.float64) - 25.0)
    v, f = surface.weld(v, f.astype(np.int32))
    assert len(faces) == len(f) > 1000
    assert np.array_equal(faces, f)
    assert np.allclose(vertices, v / 39 * (2 * field.radius) - field.radius, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_on_cuda_the_same_as_on_cpu():
    values = torch.from_numpy(np.random.default_rng(2).standard_normal((40, 33, 37)))
    cpu = mc.marching_cubes(values)
    gpu = mc.marching_cubes(values.cuda())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
