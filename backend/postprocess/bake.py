"""Texture baking in UV space: which texels a mesh covers, where each one sits on the surface, and colours.

Texel space: texel (row, col) is the unit square [col, col + 1] x [row, row + 1] with its centre at
``uv = ((col + 0.5) / size, 1 - (row + 0.5) / size)``; row 0 is the top of the image, v points up.

Coverage is conservative. A bilinear lookup at a point reads every texel whose centre lies less than one
texel away along both axes, so a texel is baked when the square of half-width ``reach`` (1 by default)
around its centre meets a triangle. A texel whose centre lies outside every triangle takes the closest
point of the nearest one, so the ring just outside a chart continues the chart's own colours. The UV map is
affine on each triangle, so a point of the UV triangle is a point of the 3D triangle.

Rasterising is vectorised scanline work in bounded chunks, with no loop over triangles: each triangle is cut
into (triangle, row) spans, each span into (triangle, texel) candidates. It runs in two stages. First the
texels whose centre lies inside a triangle (distance 0; these are final). Then the rest of every triangle's
footprint, skipping texels already settled, where the triangle nearest to the texel centre wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

# Half-width, in texels, of the square around a texel centre that must meet a triangle for the texel to be
# baked: 1 is the footprint of a bilinear lookup, 0.5 the texel's own square, 0 its centre only.
BILINEAR_REACH = 1.0
# Items (spans or texels) handled at once: bounds the rasteriser's working memory at any size.
CHUNK = 1 << 19
# Points handed to colour_fn at once.
COLOUR_CHUNK = 1 << 18
# Shares of bake()'s progress: rasterising, then colour queries (the field), then the gutter fill.
RASTER_SHARE, FILL_SHARE = 0.05, 0.03
# Gutter texels (each averaging 8 neighbours) computed at once: a cancel check between such chunks.
RING_CHUNK = 1 << 18
# A UV triangle is degenerate (a segment or a point) when its doubled area is below this fraction of its
# longest edge squared: it has no inside, but it may still claim the texels along it.
DEGENERATE = 1e-9
# Distance (texels) added to a degenerate triangle's claims, so that a real triangle wins a tie.
DEGENERATE_PENALTY = 1e-3
# Slack (texels) on the span ends, so rounding never drops a texel that just touches a triangle.
_EPS = 1e-7
_UNCLAIMED = np.iinfo(np.int64).max


@dataclass
class TexelSamples:
    """The covered texels in row-major order, the surface point baked into each and its triangle."""

    rows: np.ndarray  # int32 (K,), row 0 at the top
    cols: np.ndarray  # int32 (K,)
    positions: np.ndarray  # float32 (K, 3), on the surface
    triangle: np.ndarray  # int32 (K,), the triangle each texel was baked from
    mask: np.ndarray  # bool (size, size), True where baked


def _runs(counts: np.ndarray, limit: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Items of consecutive runs (run i has counts[i] items), at most ``limit`` at a time, as (run index,
    index within the run). A long run is split across chunks."""
    ends = np.cumsum(counts, dtype=np.int64)
    starts = ends - counts
    total = int(ends[-1]) if len(ends) else 0
    for start in range(0, total, limit):
        item = np.arange(start, min(start + limit, total), dtype=np.int64)
        run = np.searchsorted(ends, item, side="right")
        yield run, item - starts[run]


class _UVLayout:
    """The UV triangles in texel space (x right, y down, one unit per texel)."""

    def __init__(self, tri_uvs: np.ndarray, size: int):
        uv = np.asarray(tri_uvs, dtype=np.float64).reshape(-1, 3, 2)
        pts = np.stack([uv[..., 0] * size, (1.0 - uv[..., 1]) * size], axis=-1)
        self.finite = np.isfinite(pts).all(axis=(1, 2))
        pts[~self.finite] = 0.0
        edge0, edge2 = pts[:, 1] - pts[:, 0], pts[:, 2] - pts[:, 0]
        area2 = edge0[:, 0] * edge2[:, 1] - edge0[:, 1] * edge2[:, 0]
        longest2 = ((np.roll(pts, -1, axis=1) - pts) ** 2).sum(axis=-1).max(axis=1)
        self.degenerate = np.abs(area2) <= DEGENERATE * longest2
        self.area2 = np.where(self.degenerate, 1.0, area2)  # signed; never divided by when degenerate
        self.pts = pts
        self.size = size

    def footprint(self, tris: np.ndarray, reach: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(triangle, row, col) of every texel whose square of half-width ``reach`` meets one of ``tris``,
        in chunks. Within a row band the triangle's x extent is exact (its clipped polygon's corners), and
        the square meets the triangle iff the centre is within ``reach`` of that extent."""
        size = self.size
        ys = self.pts[tris, :, 1]
        row0 = np.clip(np.ceil(ys.min(axis=1) - reach - 0.5 - _EPS), 0, size).astype(np.int64)
        row1 = np.clip(np.floor(ys.max(axis=1) + reach - 0.5 + _EPS), -1, size - 1).astype(np.int64)
        # A row span expands to several texels, so fewer spans than texels are taken at a time.
        for run, offset in _runs(np.maximum(row1 - row0 + 1, 0), max(1, CHUNK // 8)):
            tri = tris[run]
            row = row0[run] + offset
            lo, hi = self._band_extent(tri, row + 0.5 - reach, row + 0.5 + reach)
            col0 = np.clip(np.ceil(lo - reach - 0.5 - _EPS), 0, size).astype(np.int64)
            col1 = np.clip(np.floor(hi + reach - 0.5 + _EPS), -1, size - 1).astype(np.int64)
            for span, dx in _runs(np.maximum(col1 - col0 + 1, 0), CHUNK):
                yield tri[span], row[span], col0[span] + dx

    def footprint_bound(self, tris: np.ndarray, reach: float) -> int:
        """At least as many (triangle, texel) pairs as :meth:`footprint` yields: each triangle's bounding box
        of texels, clipped to the texture (progress is the share of this done)."""
        p = self.pts[tris]
        lo = np.clip(np.ceil(p.min(axis=1) - reach - 0.5 - _EPS), 0, self.size)
        hi = np.clip(np.floor(p.max(axis=1) + reach - 0.5 + _EPS), -1, self.size - 1)
        return int(np.maximum(hi - lo + 1, 0).prod(axis=1).sum())

    def _band_extent(self, tri, y0, y1):
        """x extent of each triangle's part within y0 <= y <= y1 (+inf, -inf where there is none): the
        extremes over its corners inside the band and its edges' crossings of the band's two lines."""
        p = self.pts[tri]  # (n, 3, 2)
        q = np.roll(p, -1, axis=1)
        px, py, qx, qy = p[..., 0], p[..., 1], q[..., 0], q[..., 1]
        xs = [np.where((py >= y0[:, None] - _EPS) & (py <= y1[:, None] + _EPS), px, np.nan)]
        rise = qy - py
        safe = np.where(rise != 0, rise, 1.0)
        for line in (y0, y1):
            t = (line[:, None] - py) / safe
            crosses = (rise != 0) & (t >= 0) & (t <= 1)
            xs.append(np.where(crosses, px + t * (qx - px), np.nan))
        xs = np.concatenate(xs, axis=1)
        seen = ~np.isnan(xs)
        lo = np.where(seen, xs, np.inf).min(axis=1)
        hi = np.where(seen, xs, -np.inf).max(axis=1)
        return lo, hi

    def surface_maps(self, corners: np.ndarray) -> np.ndarray:
        """Per triangle, the affine map from texel space onto its 3D triangle (``corners`` (T, 3, 3)), as
        (origin, d/dx, d/dy) (T, 3, 3): point = origin + x d/dx + y d/dy. Zero for degenerate triangles."""
        p = self.pts
        e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
        d1, d2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
        scale = np.where(self.degenerate, 0.0, 1.0 / self.area2)[:, None]
        ddx = (e2[:, 1:] * d1 - e1[:, 1:] * d2) * scale
        ddy = (e1[:, :1] * d2 - e2[:, :1] * d1) * scale
        origin = corners[:, 0] - p[:, 0, :1] * ddx - p[:, 0, 1:] * ddy
        return np.stack([origin, ddx, ddy], axis=1)

    def closest_on_edges(self, tri, x, y):
        """Barycentrics of the point of each triangle's boundary closest to (x, y), and its distance
        (texels, plus the penalty for a degenerate triangle). Zero-length edges are points."""
        p = self.pts[tri]
        edges = np.roll(p, -1, axis=1) - p
        rel = np.stack([x, y], axis=-1)[:, None, :] - p
        length2 = (edges * edges).sum(axis=-1)
        t = np.clip((rel * edges).sum(axis=-1) / np.where(length2 > 0, length2, 1.0), 0.0, 1.0)
        gap = rel - t[..., None] * edges
        d2 = (gap * gap).sum(axis=-1)
        edge = d2.argmin(axis=1)
        rows = np.arange(len(tri))
        t = t[rows, edge]
        bary = np.zeros((len(tri), 3))
        bary[rows, edge] = 1.0 - t
        bary[rows, (edge + 1) % 3] += t
        return bary, np.sqrt(d2[rows, edge]) + self.degenerate[tri] * DEGENERATE_PENALTY


def texel_samples(vertices, triangles, tri_uvs, size: int, *, reach: float = BILINEAR_REACH,
                  on_fraction: Optional[Callable[[float], None]] = None) -> TexelSamples:
    """The texels a UV-mapped triangle mesh covers in a ``size`` x ``size`` texture and the surface point
    baked into each. A texel is covered when the square of half-width ``reach`` around its centre meets a
    triangle's UV image; of the triangles that claim it, one containing its centre wins, else the nearest.
    ``on_fraction(f)`` is called after every chunk of work (bounded by texel count, so a fraction of a second
    apart however large the triangles) and may raise to cancel."""
    size = int(size)
    if size <= 0:
        raise ValueError("the texture size must be positive")
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    triangles = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
    tri_uvs = np.asarray(tri_uvs, dtype=np.float64).reshape(-1, 3, 2)
    if len(tri_uvs) != len(triangles):
        raise ValueError("one UV triangle per triangle expected")
    report = on_fraction or (lambda f: None)
    layout = _UVLayout(tri_uvs, size)

    # Each texel keeps its best claim as one int64, (float32 distance bits, triangle): non-negative
    # float32 bits order like the floats, so the smallest key is the nearest triangle (lowest index on ties).
    best = np.full(size * size, _UNCLAIMED, dtype=np.int64)
    report(0.0)
    solid = np.flatnonzero(layout.finite & ~layout.degenerate)
    share = _Share(report, 0.0, 0.4, layout.footprint_bound(solid, 0.0))
    for tri, row, col in layout.footprint(solid, 0.0):
        np.minimum.at(best, row * size + col, tri)
        share.add(len(tri))
    settled = best != _UNCLAIMED  # centre inside a triangle: distance 0, nothing can beat it
    report(0.4)

    if reach > 0 or layout.degenerate.any():
        near = np.flatnonzero(layout.finite)
        share = _Share(report, 0.4, 0.7, layout.footprint_bound(near, reach))
        for tri, row, col in layout.footprint(near, reach):
            share.add(len(tri))
            texel = row * size + col
            keep = np.flatnonzero(~settled[texel])
            if not len(keep):
                continue
            tri, texel = tri[keep], texel[keep]
            _, dist = layout.closest_on_edges(tri, (texel % size) + 0.5, (texel // size) + 0.5)
            bits = dist.astype(np.float32).view(np.int32).astype(np.int64)
            np.minimum.at(best, texel, (bits << 32) | tri)
    report(0.7)

    # The claimed texels in row-major order, their winners and whether their centre is inside: gathered a
    # band of texels at a time (gathers over a 4096² texture take seconds in all).
    claimed = best != _UNCLAIMED
    count = int(np.count_nonzero(claimed))
    flat, winner, inside = np.empty(count, np.int64), np.empty(count, np.int32), np.empty(count, bool)
    rows, cols = np.empty(count, np.int32), np.empty(count, np.int32)
    band, done = CHUNK, 0
    for start in range(0, size * size, band):
        here = np.flatnonzero(claimed[start:start + band])
        into = slice(done, done + len(here))
        flat[into] = here + start
        winner[into] = (best[start:start + band][here] & 0xFFFFFFFF).astype(np.int32)
        inside[into] = settled[start:start + band][here]
        rows[into], cols[into] = flat[into] // size, flat[into] % size
        done += len(here)
        report(0.7 + 0.05 * min(start + band, size * size) / (size * size))
    del best, settled

    # The winners' surface points: a centre inside its triangle maps through the triangle's affine map;
    # one outside takes the closest point of the triangle's boundary.
    maps = layout.surface_maps(vertices[triangles])
    positions = np.empty((len(flat), 3), dtype=np.float32)
    for start in range(0, len(flat), CHUNK):
        part = slice(start, start + CHUNK)
        tri, texel, centre = winner[part], flat[part], inside[part]
        x, y = (texel % size) + 0.5, (texel // size) + 0.5
        m = maps[tri[centre]]
        out = np.empty((len(tri), 3))
        out[centre] = m[:, 0] + x[centre, None] * m[:, 1] + y[centre, None] * m[:, 2]
        edge = ~centre
        bary, _ = layout.closest_on_edges(tri[edge], x[edge], y[edge])
        out[edge] = np.einsum("nk,nkd->nd", bary, vertices[triangles[tri[edge]]])
        positions[part] = out
        report(0.75 + 0.25 * min(start + CHUNK, len(flat)) / len(flat))
    report(1.0)
    return TexelSamples(rows=rows, cols=cols, positions=positions, triangle=winner,
                        mask=claimed.reshape(size, size))


class _Share:
    """Progress through one stage, from ``start`` to ``stop``, as the share of ``total`` items done."""

    def __init__(self, report, start: float, stop: float, total: int):
        self.report, self.start, self.stop, self.total, self.done = report, start, stop, max(int(total), 1), 0

    def add(self, count: int) -> None:
        self.done += int(count)
        self.report(self.start + (self.stop - self.start) * min(self.done / self.total, 1.0))


def default_padding(size: int) -> int:
    """Gutter passes by default: enough for the mip levels a viewer uses at normal distances (level L
    averages 2^L texels, so a gutter of 2^L keeps level L free of the push-pull fill)."""
    return max(2, int(size) // 256)


_NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]


def dilate(texture: np.ndarray, mask: np.ndarray, passes: int, check: Optional[Callable[[], None]] = None
           ) -> np.ndarray:
    """Fill the texels outside ``mask``: ``passes`` rings of averages of their covered 8-neighbours, then
    every texel still empty from a push-pull over a mip pyramid. Texels under ``mask`` keep their values.
    Returns a new texture of the same dtype (bytes are rounded). ``check()`` is called between steps of a
    fraction of a second and may raise to cancel."""
    check = check or (lambda: None)
    texture = np.asarray(texture)
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    source = texture.reshape(height, width, -1)
    # One float buffer with a one-texel border (spares bounds checks in the rings); empty texels hold 0
    # until filled, so the buffer is always colour premultiplied by coverage.
    padded = np.zeros((height + 2, width + 2, source.shape[2]), dtype=np.float32)
    colour = padded[1:-1, 1:-1]
    colour[...] = source
    check()
    colour[~mask] = 0.0
    check()
    filled = _grow_rings(padded, mask, int(passes), check)
    _push_pull(colour, filled, check)
    if np.issubdtype(texture.dtype, np.integer):
        info = np.iinfo(texture.dtype)
        np.clip(np.rint(colour, out=colour), info.min, info.max, out=colour)
        check()
    out = colour.astype(texture.dtype)
    check()
    # Exact, whatever the float round trip did (a where= of the image's own shape: a broadcast one is slow).
    np.copyto(out, source, where=np.repeat(mask[..., None], source.shape[2], axis=2))
    return out.reshape(texture.shape)


def _grow_rings(padded: np.ndarray, mask: np.ndarray, passes: int, check=lambda: None) -> np.ndarray:
    """``passes`` rings of gutter, in place in ``padded`` (the image with a one-texel border, 0 where
    empty): each empty texel touching a filled one (8-neighbourhood) takes the mean of those neighbours; a
    ring is computed from the previous state only. Works on the frontier, so the cost follows the gutter,
    not the image; a ring is computed :data:`RING_CHUNK` texels at a time. Returns the filled texels."""
    height, width = mask.shape
    if passes <= 0 or not mask.any() or mask.all():
        return mask
    padded_w = width + 2
    full = np.zeros((height + 2, padded_w), dtype=bool)
    full[1:-1, 1:-1] = mask
    inner = np.zeros_like(full)
    inner[1:-1, 1:-1] = True
    flat_filled, inner = full.ravel(), inner.ravel()
    flat_colour = padded.reshape(-1, padded.shape[2])
    steps = np.array([dr * padded_w + dc for dr, dc in _NEIGHBOURS])

    near = np.zeros_like(full)
    for dr, dc in _NEIGHBOURS:
        near[1:-1, 1:-1] |= full[1 + dr:height + 1 + dr, 1 + dc:width + 1 + dc]
    frontier = np.flatnonzero(near.ravel() & ~flat_filled & inner)
    del near
    queued = np.zeros_like(flat_filled)
    for _ in range(passes):
        if not len(frontier):
            break
        ring = np.empty((len(frontier), flat_colour.shape[1]), dtype=flat_colour.dtype)
        for start in range(0, len(frontier), RING_CHUNK):  # every value from the state before the ring
            around = frontier[start:start + RING_CHUNK, None] + steps  # (n, 8)
            count = np.count_nonzero(flat_filled[around], axis=1)
            ring[start:start + len(around)] = flat_colour[around].sum(axis=1) / count[:, None]
            check()
        flat_colour[frontier] = ring
        flat_filled[frontier] = True
        del ring
        for start in range(0, len(frontier), RING_CHUNK):
            nxt = (frontier[start:start + RING_CHUNK, None] + steps).ravel()
            nxt = nxt[~flat_filled[nxt] & inner[nxt]]
            queued[nxt] = True  # deduplicates without sorting
            check()
        frontier = np.flatnonzero(queued)
        queued[frontier] = False
        check()
    return full[1:-1, 1:-1]


def _halve(image: np.ndarray) -> np.ndarray:
    """Sums of 2x2 blocks (a missing row or column of an odd size counts as 0)."""
    h, w = image.shape[:2]
    out = np.zeros(((h + 1) // 2, (w + 1) // 2) + image.shape[2:], dtype=np.float32)
    for dr in (0, 1):
        for dc in (0, 1):
            part = image[dr::2, dc::2]
            out[:part.shape[0], :part.shape[1]] += part
    return out


def _push_pull(colour: np.ndarray, filled: np.ndarray, check=lambda: None) -> None:
    """Fill every texel outside ``filled``, in place (``colour`` is 0 there): average the filled texels down
    a pyramid of 2x2 blocks (pull), then give each empty texel its parent's colour, coarsest level first
    (push). Far from any chart the fill is the mean of a wide neighbourhood, so coarse mip levels stay
    close to the charts' colours."""
    if filled.all() or not filled.any():
        return  # nothing to fill, or nothing to fill from (left at 0)
    levels = [(_halve(colour), _halve(filled.astype(np.float32)))]  # premultiplied colour, weight
    check()
    while max(levels[-1][1].shape) > 1:
        premul, weight = levels[-1]
        levels.append((_halve(premul), _halve(weight)))
    premul, weight = levels[-1]
    fill = premul / weight[..., None]  # the coarsest level holds every filled texel: weight > 0
    for premul, weight in reversed(levels[:-1]):
        h, w = weight.shape
        parent = fill.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
        mean = premul / np.maximum(weight, 1e-30)[..., None]
        fill = np.where((weight > 0)[..., None], mean, parent)
        check()
    # The finest level: only the empty texels change, each to its parent's colour.
    h, w = filled.shape
    parent = fill.repeat(2, axis=0).repeat(2, axis=1)[:h, :w]
    check()
    np.copyto(colour, parent, where=np.repeat(~filled[..., None], colour.shape[2], axis=2))


def bake(vertices, triangles, tri_uvs, size: int, colour_fn: Callable[[np.ndarray], np.ndarray],
         on_fraction: Optional[Callable[[float], None]] = None, padding: Optional[int] = None, *,
         reach: float = BILINEAR_REACH, chunk: int = COLOUR_CHUNK):
    """Bake ``colour_fn`` (points (K, 3) float32 -> sRGB (K, 3) in [0, 1]) into a ``size`` x ``size`` texture
    over the mesh's UV layout. Returns the texture (size, size, 3) uint8, gutters filled, and the mask of
    the texels baked from the surface. ``on_fraction(f)`` is called between chunks (a fraction of a second
    apart) and may raise to cancel; nothing is returned then. ``padding`` is the number of averaged gutter
    rings (by default :func:`default_padding`); beyond them every texel is filled by push-pull."""
    size = int(size)
    padding = default_padding(size) if padding is None else int(padding)
    report = on_fraction or (lambda f: None)
    samples = texel_samples(vertices, triangles, tri_uvs, size, reach=reach,
                            on_fraction=lambda f: report(RASTER_SHARE * f))

    flat = samples.rows.astype(np.int64) * size + samples.cols
    texture = np.zeros((size * size, 3), dtype=np.uint8)
    count = len(flat)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        rgb = np.asarray(colour_fn(samples.positions[start:stop]), dtype=np.float32).reshape(stop - start, 3)
        rgb = np.nan_to_num(rgb, nan=0.0, posinf=1.0, neginf=0.0)
        texture[flat[start:stop]] = np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        report(RASTER_SHARE + (1.0 - RASTER_SHARE - FILL_SHARE) * stop / count)
    mask = samples.mask
    del samples, flat  # the surface points are the largest arrays: free them before the fill
    texture = dilate(texture.reshape(size, size, 3), mask, padding, check=lambda: report(1.0 - FILL_SHARE))
    report(1.0)
    return texture, mask
