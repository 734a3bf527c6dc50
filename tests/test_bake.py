"""The UV-space rasteriser and texture baker (backend/postprocess/bake.py).

The checks are independent of the implementation: a bilinear texture lookup written here, coverage found by
sampling points densely inside each triangle, nearest triangles found by brute force over all triangles.
"""

import threading
import time

import numpy as np
import pytest

from backend.postprocess import bake as bk

SIZE = 256


def bumpy_sphere(n_lat=12, n_lon=24):
    """A closed, displaced sphere with single pole vertices."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]])
    v = v * (1 + 0.15 * np.sin(3 * v[:, :1]) * np.cos(2 * v[:, 1:2]))
    ring_id = lambda i, j: 1 + i * n_lon + j % n_lon  # noqa: E731
    faces = [(0, ring_id(0, j), ring_id(0, j + 1)) for j in range(n_lon)]
    for i in range(n_lat - 2):
        for j in range(n_lon):
            a, b, c, d = ring_id(i, j), ring_id(i + 1, j), ring_id(i + 1, j + 1), ring_id(i, j + 1)
            faces += [(a, b, c), (a, c, d)]
    south = len(v) - 1
    faces += [(south, ring_id(n_lat - 2, j + 1), ring_id(n_lat - 2, j)) for j in range(n_lon)]
    return v.astype(np.float32), np.array(faces, dtype=np.int32)


def xatlas_layout(vertices, faces, size):
    """A real atlas, packed for this texture size with a 2-texel gap between charts."""
    xatlas = pytest.importorskip("xatlas")

    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding = size, 2
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, indices, uvs = atlas[0]
    return vertices[vmapping], indices.astype(np.int32), uvs[indices].astype(np.float32)


def cell_layout(vertices, faces):
    """Every triangle alone in its own grid cell, every other one with its UV winding reversed: all borders,
    both windings."""
    count = len(faces)
    grid = int(np.ceil(np.sqrt(count)))
    cell = np.arange(count)
    origin = np.stack([cell % grid, cell // grid], 1)[:, None, :].astype(np.float64)
    shape = np.array([[0.1, 0.1], [0.9, 0.15], [0.3, 0.9]])
    corners = np.where((cell % 2)[:, None, None] == 1, shape[::-1], shape)
    return vertices, faces, ((origin + corners) / grid).astype(np.float32)


@pytest.fixture(scope="module")
def sphere():
    return bumpy_sphere()


@pytest.fixture(scope="module", params=["xatlas", "cells"])
def layout(request, sphere):
    v, f = sphere
    return xatlas_layout(v, f, SIZE) if request.param == "xatlas" else cell_layout(v, f)


def colour_of(points):
    """A smooth colour field over the sphere's box, well inside [0, 1]."""
    p = np.asarray(points, dtype=np.float64)
    return np.stack([0.5 + 0.35 * np.sin(1.7 * p[:, 0] + 0.4),
                     0.5 + 0.35 * np.cos(1.3 * p[:, 1] - 0.8 * p[:, 2]),
                     0.5 + 0.3 * p[:, 2] * np.cos(p[:, 0])], 1)


def random_surface_points(faces, tri_uvs, vertices, count, seed=0):
    """Points on random triangles: inside, on edges and at corners. Returns 3D points and their UVs."""
    rng = np.random.default_rng(seed)
    tri = rng.integers(0, len(faces), count)
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)
    bary = np.stack([1 - s, s * (1 - r2), s * r2], 1)
    edge = rng.random(count) < 0.2  # on an edge: one weight 0
    bary[edge, rng.integers(0, 3, edge.sum())] = 0.0
    corner = rng.random(count) < 0.05
    bary[corner] = np.eye(3)[rng.integers(0, 3, corner.sum())]
    bary /= bary.sum(1, keepdims=True)
    points = np.einsum("nk,nkd->nd", bary, vertices[faces[tri]].astype(np.float64))
    uvs = np.einsum("nk,nkd->nd", bary, tri_uvs[tri].astype(np.float64))
    return points, uvs


def bilinear_taps(uvs, size):
    """The four texels (rows, cols) a bilinear lookup at each UV reads and their weights (clamp to edge)."""
    x = uvs[:, 0] * size - 0.5
    y = (1 - uvs[:, 1]) * size - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    rows = np.stack([y0, y0, y0 + 1, y0 + 1], 1)
    cols = np.stack([x0, x0 + 1, x0, x0 + 1], 1)
    weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    return np.clip(rows, 0, size - 1), np.clip(cols, 0, size - 1), weights


def bilinear(texture, uvs):
    rows, cols, weights = bilinear_taps(uvs, texture.shape[0])
    return (texture[rows, cols].astype(np.float64) * weights[..., None]).sum(1) / 255.0


def overlapped_texels(tri_uvs, size, step=0.2):
    """Texels that certainly overlap each triangle: those holding one of a dense set of points of the
    triangle (spacing under ``step`` texels), its corners and edges included. Returns a (size, size) bool."""
    hit = np.zeros((size, size), dtype=bool)
    for uv in tri_uvs.astype(np.float64):
        px = np.stack([uv[:, 0] * size, (1 - uv[:, 1]) * size], 1)
        extent = np.abs(px[:, None] - px[None]).max()
        n = max(2, int(np.ceil(extent / step)) + 1)
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        keep = i + j <= n - 1
        a, b = i[keep] / (n - 1), j[keep] / (n - 1)
        pts = (1 - a - b)[:, None] * px[0] + a[:, None] * px[1] + b[:, None] * px[2]
        cols = np.clip(np.floor(pts[:, 0]).astype(int), 0, size - 1)
        rows = np.clip(np.floor(pts[:, 1]).astype(int), 0, size - 1)
        hit[rows, cols] = True
    return hit


def texel_centres_uv(rows, cols, size):
    return np.stack([(cols + 0.5) / size, 1 - (rows + 0.5) / size], 1)


def barycentric_2d(uv_tris, points):
    """Barycentrics of points (n, 2) in triangles (n, 3, 2)."""
    a, b, c = uv_tris[:, 0], uv_tris[:, 1], uv_tris[:, 2]
    e1, e2, r = b - a, c - a, points - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    w1 = (r[:, 0] * e2[:, 1] - r[:, 1] * e2[:, 0]) / det
    w2 = (e1[:, 0] * r[:, 1] - e1[:, 1] * r[:, 0]) / det
    return np.stack([1 - w1 - w2, w1, w2], 1)


def distance_to_triangles(point, uv_tris):
    """Euclidean distance from one 2D point to each triangle (0 inside), by brute force."""
    bary = barycentric_2d(uv_tris, np.broadcast_to(point, (len(uv_tris), 2)))
    inside = (bary >= -1e-12).all(1)
    a, b = uv_tris, np.roll(uv_tris, -1, axis=1)
    e = b - a
    t = np.clip(((point - a) * e).sum(-1) / np.maximum((e * e).sum(-1), 1e-30), 0, 1)
    d = np.linalg.norm(point - (a + t[..., None] * e), axis=-1).min(1)
    return np.where(inside, 0.0, d)


# --- the baked texture reproduces the field -------------------------------------------------------------

def test_bilinear_lookups_match_the_colour_field(layout):
    v, f, tri_uvs = layout
    texture, mask = bk.bake(v, f, tri_uvs, SIZE, colour_of)
    assert texture.shape == (SIZE, SIZE, 3) and texture.dtype == np.uint8
    points, uvs = random_surface_points(f, tri_uvs, v, 20000)
    # Every texel a lookup reads with a non-zero weight was baked from the surface.
    rows, cols, weights = bilinear_taps(uvs, SIZE)
    assert mask[rows, cols][weights > 1e-9].all()
    error = np.abs(bilinear(texture, uvs) - colour_of(points))
    assert error.mean() <= 2 / 255
    assert np.quantile(error, 0.99) <= 1.5 / 255 and error.max() <= 4 / 255  # no seams at chart borders


def test_texel_centre_maps_to_its_surface_point():
    # One quad over the whole square, x = u and y = v: row 0 is the top (v near 1).
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]])
    samples = bk.texel_samples(v, f, v[f][..., :2], 4)
    assert samples.mask.all()
    first = (samples.rows == 0) & (samples.cols == 0)
    np.testing.assert_allclose(samples.positions[first], [[0.125, 0.875, 0.0]], atol=1e-6)
    np.testing.assert_allclose(samples.positions[:, 0], (samples.cols + 0.5) / 4, atol=1e-6)
    np.testing.assert_allclose(samples.positions[:, 1], 1 - (samples.rows + 0.5) / 4, atol=1e-6)
    # Row-major order, one sample per texel.
    np.testing.assert_array_equal(samples.rows * 4 + samples.cols, np.arange(16))


def test_colours_are_rounded_and_clipped():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    f = np.array([[0, 1, 2]])
    uv = np.array([[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]]], np.float32)
    fixed = lambda p: np.tile([100.4 / 255, 1.7, -0.5], (len(p), 1))  # noqa: E731
    texture, mask = bk.bake(v, f, uv, 16, fixed)
    assert mask.any()
    assert (texture[mask] == [100, 255, 0]).all()
    texture, mask = bk.bake(v, f, uv, 16, lambda p: np.tile([100.6 / 255, np.nan, 0.5], (len(p), 1)))
    assert (texture[mask] == [101, 0, 128]).all()


# --- coverage -------------------------------------------------------------------------------------------

def test_no_face_has_unbaked_texels_under_it(layout):
    v, f, tri_uvs = layout
    samples = bk.texel_samples(v, f, tri_uvs, SIZE)
    under = overlapped_texels(tri_uvs, SIZE)
    assert under.sum() > 1000
    assert not (under & ~samples.mask).any()


@pytest.mark.parametrize("reach", [0.0, 0.5])
def test_narrower_coverage_is_caught(layout, reach):
    """Mutation check: centre-only coverage leaves texels under faces unbaked, and the texel's own square
    still leaves bilinear lookups near chart borders reading unbaked texels; the checks above see both."""
    v, f, tri_uvs = layout
    mask = bk.texel_samples(v, f, tri_uvs, SIZE, reach=reach).mask
    under = overlapped_texels(tri_uvs, SIZE)
    _, uvs = random_surface_points(f, tri_uvs, v, 20000)
    rows, cols, weights = bilinear_taps(uvs, SIZE)
    unread = ~mask[rows, cols][weights > 1e-9]
    if reach == 0.0:
        assert (under & ~mask).sum() > 100
    else:
        assert not (under & ~mask).any()
    assert unread.sum() > 10


def test_each_texel_takes_the_containing_or_nearest_triangle(sphere):
    v, f, tri_uvs = cell_layout(*sphere)
    size = 64
    samples = bk.texel_samples(v, f, tri_uvs, size)
    centres = texel_centres_uv(samples.rows, samples.cols, size)
    uv_tris = tri_uvs.astype(np.float64)
    outside = 0
    for k in np.random.default_rng(1).choice(len(centres), 600, replace=False):
        distances = distance_to_triangles(centres[k], uv_tris)
        chosen = samples.triangle[k]
        assert distances[chosen] <= distances.min() + 1e-9 / size
        outside += distances.min() > 0
    assert outside > 50  # the sample did test texels outside every triangle
    # The position is the affine image of the closest UV point: it lies on the chosen 3D triangle, and a
    # centre inside its triangle maps exactly.
    bary = barycentric_2d(uv_tris[samples.triangle], centres)
    inside = (bary >= -1e-9).all(1)
    expected = np.einsum("nk,nkd->nd", bary[inside], v[f[samples.triangle[inside]]].astype(np.float64))
    np.testing.assert_allclose(samples.positions[inside], expected, atol=1e-5)
    corners = v[f[samples.triangle]].astype(np.float64)
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    off_plane = np.abs(((samples.positions - corners[:, 0]) * normal).sum(1))
    assert off_plane.max() < 1e-5


def test_degenerate_uv_triangles_are_harmless(sphere):
    v, f, tri_uvs = cell_layout(*sphere)
    reference = bk.texel_samples(v, f, tri_uvs, SIZE)
    # Zero-area UV triangles placed first, so that they would win every tie on index: a segment along a
    # real triangle's outer edge, one through texel centres inside a triangle, a point inside one, a segment
    # in empty space; and a triangle with NaN UVs.
    row, col = np.floor([(1 - tri_uvs[5, :, 1].mean()) * SIZE, tri_uvs[5, :, 0].mean() * SIZE])
    v_row = 1 - (row + 0.5) / SIZE
    extra = np.array([
        [tri_uvs[3, 0], tri_uvs[3, 1], (tri_uvs[3, 0] + tri_uvs[3, 1]) / 2],
        [[(col - 0.5) / SIZE, v_row], [(col + 1.5) / SIZE, v_row], [(col + 0.5) / SIZE, v_row]],
        [tri_uvs[5].mean(0)] * 3,
        [[0.999, 0.001], [0.999, 0.6], [0.999, 0.3]],
        [[np.nan, 0.2], [0.3, 0.2], [0.3, 0.4]],
    ], dtype=np.float32)
    faces = np.concatenate([f[:len(extra)], f])
    uvs = np.concatenate([extra, tri_uvs])
    samples = bk.texel_samples(v, faces, uvs, SIZE)
    assert np.isfinite(samples.positions).all()
    # Every texel of the real triangles keeps its triangle (away from the free segment, which may take the
    # texels nearer to it than to any triangle, and adds its own).
    assert samples.mask[reference.rows, reference.cols].all()
    lookup = np.full((SIZE, SIZE), -1)
    lookup[samples.rows, samples.cols] = samples.triangle - len(extra)
    away = reference.cols < SIZE - 3
    np.testing.assert_array_equal(lookup[reference.rows, reference.cols][away], reference.triangle[away])
    free_segment = 3
    assert (samples.triangle == free_segment).any()
    texture, _ = bk.bake(v, faces, uvs, 64, colour_of)
    assert texture.shape == (64, 64, 3)
    # Only degenerate triangles: no crash, no NaN.
    only = bk.texel_samples(v, f[:4], extra[:4], 32)
    assert np.isfinite(only.positions).all() and only.mask.any()


def test_chunking_does_not_change_the_result(monkeypatch, sphere):
    v, f, tri_uvs = cell_layout(*sphere)
    big = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], np.float32)  # spans many chunks on its own
    faces, uvs = np.concatenate([f, f[:1]]), np.concatenate([tri_uvs * 0.5 + 0.5, big])
    whole = bk.texel_samples(v, faces, uvs, 128)
    monkeypatch.setattr(bk, "CHUNK", 97)
    parts = bk.texel_samples(v, faces, uvs, 128)
    for name in ("rows", "cols", "triangle", "mask"):
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name))
    np.testing.assert_allclose(parts.positions, whole.positions, atol=1e-6)


def test_empty_input():
    samples = bk.texel_samples(np.zeros((0, 3)), np.zeros((0, 3), int), np.zeros((0, 3, 2)), 8)
    assert not samples.mask.any() and samples.positions.shape == (0, 3)
    texture, mask = bk.bake(np.zeros((0, 3)), np.zeros((0, 3), int), np.zeros((0, 3, 2)), 8, colour_of)
    assert texture.shape == (8, 8, 3) and not mask.any()


# --- gutters --------------------------------------------------------------------------------------------

def test_dilation_fills_every_texel_and_keeps_baked_ones():
    rng = np.random.default_rng(2)
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 5:30] = True
    mask[40:41, 50:52] = True
    # Garbage where nothing was baked; a constant colour where something was.
    texture = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    texture[mask] = (30, 200, 90)
    for passes in (0, 3, 100):
        out = bk.dilate(texture, mask, passes)
        assert (out == (30, 200, 90)).all()  # no texel kept its garbage
    # Varied baked colours: kept exactly, and the fill stays within their range.
    texture[mask] = rng.integers(40, 80, (mask.sum(), 3))
    out = bk.dilate(texture, mask, 4)
    np.testing.assert_array_equal(out[mask], texture[mask])
    assert out[~mask].min() >= 40 and out[~mask].max() <= 79


def test_gutter_rings_average_covered_neighbours():
    mask = np.zeros((9, 9), dtype=bool)
    texture = np.zeros((9, 9, 3), dtype=np.uint8)
    mask[4, 3], mask[4, 5] = True, True
    texture[4, 3], texture[4, 5] = (100, 0, 0), (200, 0, 0)
    out = bk.dilate(texture, mask, 1)
    assert tuple(out[4, 4]) == (150, 0, 0)  # touches both
    assert tuple(out[3, 2]) == (100, 0, 0) and tuple(out[5, 6]) == (200, 0, 0)  # touches one
    assert tuple(out[3, 4]) == (150, 0, 0)
    out = bk.dilate(texture, mask, 2)
    # The second ring averages the first: (2, 2) touches (3, 2) and (3, 3), both copies of (4, 3).
    assert tuple(out[2, 2]) == (100, 0, 0)


def test_rings_computed_in_chunks_give_the_same_bytes(monkeypatch):
    """Each ring is computed from the state before it, however many chunks it takes."""
    rng = np.random.default_rng(4)
    mask = rng.random((96, 96)) < 0.03
    texture = rng.integers(0, 256, (96, 96, 3)).astype(np.uint8)
    whole = bk.dilate(texture, mask, 6)
    monkeypatch.setattr(bk, "RING_CHUNK", 7)
    np.testing.assert_array_equal(bk.dilate(texture, mask, 6), whole)


def test_mip_levels_show_no_seams(sphere):
    """Box-filtered mip levels looked up bilinearly stay close to the field, even near chart borders: the
    gutters carry the charts' colours. With black gutters the same lookups are far off (the check can fail).
    (An atlas with a 2-texel gap between charts, as a packer leaves for filtering.)"""
    v, f, tri_uvs = xatlas_layout(*sphere, SIZE)
    texture, mask = bk.bake(v, f, tri_uvs, SIZE, colour_of)
    points, uvs = random_surface_points(f, tri_uvs, v, 20000, seed=3)
    truth = colour_of(points)

    def mip_error(image, level):
        img = image.astype(np.float64)
        for _ in range(level):
            img = img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2, 3).mean((1, 3))
        return np.quantile(np.abs(bilinear(np.rint(img), uvs) - truth), 0.99)

    for level, limit in ((1, 2 / 255), (2, 3 / 255)):
        assert mip_error(texture, level) <= limit
        assert mip_error(texture * mask[..., None], level) > 5 * limit


def test_default_padding_grows_with_size():
    assert bk.default_padding(256) == 2 and bk.default_padding(2048) == 8 and bk.default_padding(4096) == 16


# --- progress and cancel --------------------------------------------------------------------------------

class Cancelled(Exception):
    pass


def test_progress_is_reported_and_cancel_propagates(sphere):
    v, f, tri_uvs = cell_layout(*sphere)
    fractions = []
    calls = []

    def colour(points):
        assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 3
        calls.append(len(points))
        return colour_of(points)

    _, mask = bk.bake(v, f, tri_uvs, 128, colour, on_fraction=fractions.append, chunk=1000)
    assert len(calls) > 3 and max(calls) <= 1000 and sum(calls) == mask.sum()
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] == pytest.approx(1.0)

    calls.clear()

    def cancel_on_second_chunk(fraction):
        if len(calls) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        bk.bake(v, f, tri_uvs, 128, colour, on_fraction=cancel_on_second_chunk, chunk=1000)
    assert len(calls) == 2  # stopped at once: no colour query after the cancel

    def cancel_at_once(fraction):
        raise Cancelled

    calls.clear()
    with pytest.raises(Cancelled):  # a cancel while rasterising stops before any colour query
        bk.bake(v, f, tri_uvs, 128, colour, on_fraction=cancel_at_once)
    assert not calls


def whole_square_triangles(count, seed=0):
    """Triangles whose UV images each cover the whole square (and more): every texel under every one."""
    rng = np.random.default_rng(seed)
    base = np.array([[-0.05, -0.05], [2.2, -0.05], [-0.05, 2.2]])
    tri_uvs = (base + rng.uniform(-0.04, 0.04, (count, 3, 2))).astype(np.float32)
    return rng.random((3 * count, 3)).astype(np.float32), np.arange(3 * count).reshape(count, 3), tri_uvs


def test_a_cancel_lands_within_a_second_while_rasterising_huge_triangles():
    """150 triangles over the whole square at 4096²: 2.5 billion (triangle, texel) candidates. Before, the
    first cancel check came after the whole first stage (26 s)."""
    v, f, tri_uvs = whole_square_triangles(150)
    asked = []

    def on_fraction(fraction):
        if asked:
            raise Cancelled

    timer = threading.Timer(0.5, lambda: asked.append(time.monotonic()))
    timer.start()
    try:
        with pytest.raises(Cancelled):
            bk.bake(v, f, tri_uvs, 4096, colour_of, on_fraction=on_fraction)
    finally:
        timer.cancel()
    assert asked and time.monotonic() - asked[0] < 1.0


def test_no_step_of_a_large_bake_goes_a_second_without_a_cancel_check():
    """A whole-square triangle at 4096²: every step of bake() (both rasterising stages, the surface points,
    the colours, the fill) is a second or more long on a busy machine; the progress calls (where a cancel
    is raised) come a fraction of a second apart all through, up to the return."""
    v, f, tri_uvs = whole_square_triangles(1)
    times, fractions = [time.monotonic()], []

    def on_fraction(fraction):
        times.append(time.monotonic())
        fractions.append(fraction)

    bk.bake(v, f, tri_uvs, 4096, lambda p: np.full((len(p), 3), 0.5), on_fraction=on_fraction)
    times.append(time.monotonic())
    gaps = np.diff(times)
    assert gaps.max() < 1.0, f"{gaps.max():.2f} s without a check, after fraction {fractions[gaps.argmax() - 1]}"
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_the_gutter_fill_checks_for_a_cancel_all_along():
    """A sparse mask at 2048²: rings of millions of texels and a full push-pull pyramid."""
    rng = np.random.default_rng(0)
    mask = rng.random((2048, 2048)) < 0.05
    texture = rng.integers(0, 256, (2048, 2048, 3)).astype(np.uint8)
    times = [time.monotonic()]
    bk.dilate(texture, mask, 8, check=lambda: times.append(time.monotonic()))
    times.append(time.monotonic())
    assert np.diff(times).max() < 1.0 and len(times) > 10
