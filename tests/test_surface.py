"""Coarse-to-fine surface extraction against the dense path: the same mesh on the tiny models and on fields
made to break it (a thin sheet, hundreds of specks, a surface that grazes the threshold, flat regions at
the threshold), the guard's mutation test, and box evaluation against the dense grid."""

import numpy as np
import pytest
import torch
from support import DATA, TINY, run_backend

from backend import surface
from backend.models import openlrm, triposr

OPENLRM_PACKED = DATA / "openlrm_tiny" / "packed"


def assert_same_as_dense(field, resolution, threshold, **kwargs):
    """Coarse to fine gives the dense mesh: same counts, vertices within 1e-6 of the diagonal, the same
    faces, identical colours where the field has them. Returns the coarse-to-fine stats."""
    dense_v, dense_f = surface.marching_cubes(field, resolution, threshold, dense=True)
    stats = {}
    v, f = surface.coarse_to_fine(field, resolution, threshold, stats=stats, **kwargs)
    assert len(dense_f) > 0
    assert (len(v), len(f)) == (len(dense_v), len(dense_f)), "face or vertex count differs from the dense path"
    # Both paths weld through the same sorted unique (the same vertex order) and put faces in grid-cell
    # order: the same faces, in the same order, with the same winding.
    diagonal = np.linalg.norm(dense_v.max(0) - dense_v.min(0))
    assert np.abs(v - dense_v).max() <= 1e-6 * diagonal
    assert np.array_equal(f, dense_f)
    if hasattr(field, "query"):
        colours = field.query(torch.from_numpy(v.astype(np.float32)))[1]
        dense_colours = field.query(torch.from_numpy(dense_v.astype(np.float32)))[1]
        assert torch.equal(colours, dense_colours)
    return stats


# --- the tiny models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def triposr_field():
    with np.load(TINY / "expected.npz") as e:
        codes = torch.from_numpy(e["scene_codes"][0])
    return triposr.load(TINY, torch.device("cpu")).field(codes)


@pytest.fixture(scope="module")
def openlrm_field():
    with np.load(OPENLRM_PACKED / "expected.npz") as e:
        planes, threshold = torch.from_numpy(e["planes"][0]), float(e["mesh_thres"])
    return openlrm.load(OPENLRM_PACKED, torch.device("cpu")).field(planes), threshold


@pytest.mark.parametrize("resolution", [48, 96, 128])
def test_triposr_same_as_dense(triposr_field, resolution):
    assert_same_as_dense(triposr_field, resolution, 25.0)


def test_triposr_same_as_dense_with_the_blocks_of_high_resolutions(triposr_field):
    """32-cell coarse blocks (five halvings), as at R=1024 (coarse_step), on a grid that ends inside a block."""
    assert [surface.coarse_step(r) for r in (64, 256, 384, 512, 1024)] == [4, 8, 8, 16, 32]
    assert_same_as_dense(triposr_field, 121, 25.0, step=32)


def test_a_coarse_step_that_cannot_be_halved_is_refused(triposr_field):
    with pytest.raises(ValueError, match="power of two"):
        surface.coarse_to_fine(triposr_field, 64, 25.0, step=6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_on_cuda_the_same_as_dense_on_cuda():
    """The whole coarse-to-fine path on the GPU (samples, halving, faces, marching cubes), against the dense
    path there."""
    with np.load(TINY / "expected.npz") as e:
        codes = torch.from_numpy(e["scene_codes"][0]).cuda()
    field = triposr.load(TINY, torch.device("cuda")).field(codes)
    stats = assert_same_as_dense(field, 96, 25.0)
    assert stats["evaluations"] < 96 ** 3


@pytest.mark.parametrize("resolution", [64, 100])
def test_openlrm_same_as_dense(openlrm_field, resolution):
    field, threshold = openlrm_field
    assert_same_as_dense(field, resolution, threshold)


def test_any_subset_of_points_gets_the_dense_grids_values(triposr_field):
    """A grid point gets the same value however it is asked for (a whole slice, a few scattered points,
    several slices at once): bit for bit the dense path's slices, and grid_density's up to float rounding."""
    resolution = 64
    coords = surface.grid_coords(resolution, triposr_field.radius)
    dense = torch.stack(list(surface.grid_slices(triposr_field, coords)))
    torch.testing.assert_close(dense, torch.stack(list(triposr_field.grid_density(coords))), rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(0)
    for share in (0.002, 0.05, 0.6):
        xs = torch.from_numpy(np.sort(rng.choice(resolution, 5, replace=False)))
        mask = torch.from_numpy(rng.random((5, resolution, resolution)) < share)
        some = triposr_field.grid_density_where(coords, xs, mask)
        assert torch.equal(some[mask], dense[xs][mask]) and some[~mask].isnan().all()


# --- synthetic fields made to break it ----------------------------------------------------------------

class Field:
    """A density given as a function of broadcast coordinates (x, y, z) -> density, float32; the box
    evaluation and the dense slices compute it with the same elementwise arithmetic."""

    radius = 1.0

    def __init__(self, density):
        self.density = density

    def grid_density(self, coords):
        for x in coords:
            yield self.density(x, coords[:, None], coords[None, :])

    def grid_density_where(self, coords, xs, mask):
        values = self.density(coords[xs][:, None, None], coords[None, :, None], coords[None, None, :])
        return torch.where(mask, values.expand(mask.shape), torch.nan)

    def grid_density_points(self, coords, xs, a, j, k):
        return self.density(coords[xs[a]], coords[j], coords[k])


RES = 64
STEP = 8  # the synthetic fields below put their features between coarse samples 8 grid points apart
H = 2.0 / (RES - 1)  # grid spacing
GRID = surface.grid_coords(RES, 1.0)


def between_coarse_samples(index: float) -> float:
    """World coordinate of a fractional grid index (coarse samples lie at multiples of 8)."""
    return -1.0 + index * H


def thin_sheet(step):
    """Density crossing 1 in a slightly curved sheet 0.75 × ``step`` grid cells thick (less than the
    ``step`` between coarse samples), between two coarse x planes, over a floor of 0.01."""
    x0 = between_coarse_samples(3.5 * step)

    def density(x, y, z):
        d = x - (x0 + 0.0025 * step * torch.sin(2 * y) * torch.cos(3 * z))
        return 0.01 + np.e * torch.exp(-(d / (0.375 * step * H)) ** 2)

    return Field(density)


@pytest.mark.parametrize("step", [surface.MIN_COARSE_STEP, STEP])
def test_thin_sheet(step):
    stats = assert_same_as_dense(thin_sheet(step), RES, 1.0, step=step)
    n = -(-(RES - 1) // step)
    assert stats["blocks"] < 0.7 * n ** 3  # and blocks away from the sheet were skipped


@pytest.mark.parametrize("step", [surface.MIN_COARSE_STEP, STEP])
def test_thin_sheet_is_lost_without_the_guard(step):
    """The mutation: with the margin off, the coarse samples never straddle the sheet, nothing is found."""
    field = thin_sheet(step)
    dense_v, dense_f = surface.marching_cubes(field, RES, 1.0, dense=True)
    v, f = surface.coarse_to_fine(field, RES, 1.0, margin_scale=0.0, step=step)
    assert len(dense_f) > 1000 and len(f) < len(dense_f)
    with pytest.raises(AssertionError):
        assert_same_as_dense(field, RES, 1.0, margin_scale=0.0, step=step)


def wobbly_ball():
    """One smooth closed surface, not aligned with the grid."""
    def density(x, y, z):
        r2 = x ** 2 + (1.3 * y) ** 2 + (0.8 * z) ** 2
        return torch.exp(2.0 * (1 - r2 / 0.6 ** 2) + 0.4 * torch.sin(5 * x) * torch.sin(4 * y + 1) * torch.sin(3 * z))

    return Field(density)


def test_the_refinement_check_finds_the_cells_the_halving_misses():
    """With the margin off, halving keeps only blocks whose corners change sign, which drops the cells the
    surface merely clips; following crossed faces finds every one of them: the dense mesh."""
    stats = assert_same_as_dense(wobbly_ball(), RES, 1.0, margin_scale=0.0, step=STEP)
    assert stats["cells_by_faces"] > 20


def test_the_refinement_check_mutation(monkeypatch):
    """The same without following faces (the cells are only sorted): cells and faces go missing."""
    def sort_only(sampler, cells, values):
        order = torch.argsort(surface.linear_index(cells, sampler.resolution))
        return cells[order], values[order]

    monkeypatch.setattr(surface, "close_over_faces", sort_only)
    dense_v, dense_f = surface.marching_cubes(wobbly_ball(), RES, 1.0, dense=True)
    v, f = surface.coarse_to_fine(wobbly_ball(), RES, 1.0, margin_scale=0.0, step=STEP)
    assert 0 < len(f) < len(dense_f)


def test_hundreds_of_specks():
    """About 340 blobs, 3 to 4 grid cells across (smaller than a coarse cell): one per cell of a lattice
    unrelated to the coarse grid, each jittered by a hash of its cell."""
    spacing, sigma = 0.3, 2.5 * H

    def density(x, y, z):
        total = 0.0
        cells = [torch.round(c / spacing) for c in (x, y, z)]
        jitter = torch.sin(12.9898 * cells[0] + 78.233 * cells[1] + 37.719 * cells[2])
        for axis, (c, cell) in enumerate(zip((x, y, z), cells)):
            centre = (cell + 0.25 * torch.sin(jitter * (axis + 2.3) * 43758.5453)) * spacing
            total = total + (c - centre) ** 2
        return 0.05 + 1.6 * torch.exp(-total / sigma ** 2)

    field = Field(density)
    dense_v, dense_f = surface.marching_cubes(field, RES, 1.0, dense=True)
    assert len(dense_f) > 300 * 20  # the specks are really there, each a few dozen faces
    assert_same_as_dense(field, RES, 1.0)
    assert_same_as_dense(field, RES, 1.0, step=STEP)


def test_surface_that_grazes_the_threshold():
    """Bumps whose peak exceeds the threshold by 1e-1 .. 1e-4, centred between coarse samples."""
    peaks = [(between_coarse_samples(20), between_coarse_samples(44), between_coarse_samples(12), 1e-1),
             (between_coarse_samples(36), between_coarse_samples(20), between_coarse_samples(52), 1e-2),
             (between_coarse_samples(52), between_coarse_samples(52), between_coarse_samples(28), 1e-3),
             (between_coarse_samples(12), between_coarse_samples(28), between_coarse_samples(44), 1e-4)]

    def density(x, y, z):
        level = torch.full(torch.broadcast_shapes(x.shape, y.shape, z.shape), -8.0)
        for cx, cy, cz, excess in peaks:
            bump = excess - ((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (3 * H) ** 2
            level = torch.maximum(level, bump)
        return torch.exp(level)

    field = Field(density)
    assert_same_as_dense(field, RES, 1.0)
    assert_same_as_dense(field, RES, 1.0, step=STEP)


def test_flat_regions_at_the_threshold():
    """Half the cube ripples 1e-3 about the threshold (a surface in every block), a slab sits exactly on
    it (outside, as marching cubes counts equality), and a ball is inside."""
    def density(x, y, z):
        ripple = 1.0 + 1e-3 * torch.sin(9 * x) * torch.sin(7 * y + 1) * torch.sin(8 * z + 2)
        ball = torch.exp(3.0 * (1 - ((x - 0.5) ** 2 + y ** 2 + z ** 2) / 0.3 ** 2))
        flat = torch.where(x < -0.3, ripple, torch.where(x < 0.0, torch.ones_like(ripple), ball))
        return flat

    field = Field(density)
    assert_same_as_dense(field, RES, 1.0)
    assert_same_as_dense(field, RES, 1.0, step=STEP)


def test_dense_option_reaches_the_dense_path(triposr_field, monkeypatch):
    calls = []
    monkeypatch.setattr(surface, "dense_marching_cubes", lambda *a, **k: calls.append(a) or (np.zeros((0, 3)),
                                                                                                  np.zeros((0, 3), dtype=np.int32)))
    surface.marching_cubes(triposr_field, 48, 25.0)
    assert not calls
    surface.marching_cubes(triposr_field, 48, 25.0, dense=True)
    assert len(calls) == 1


def test_progress_rises_and_can_cancel(triposr_field):
    seen = []
    surface.marching_cubes(triposr_field, 64, 25.0, on_fraction=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0

    def cancel(fraction):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        surface.marching_cubes(triposr_field, 64, 25.0, on_fraction=cancel)


def test_the_cli_dense_option_gives_the_same_file(tmp_path):
    """``generate --dense`` (every grid point) and the default (coarse to fine): the same .npz arrays."""
    meshes = []
    for extra in ([], ["--dense"]):
        out = tmp_path / f"m{len(meshes)}.npz"
        r = run_backend("generate", TINY / "input_rgba.png", "-o", out, "--weights", TINY, "--resolution", "96",
                        "--json", *extra)
        assert r.returncode == 0, r.stderr
        with np.load(out) as m:
            meshes.append({k: m[k] for k in ("vertices", "faces", "colors")})
    assert len(meshes[0]["faces"]) > 1000
    for key in meshes[0]:
        assert np.array_equal(meshes[0][key], meshes[1][key]), key
