"""A UV atlas from xatlas, packed into one square texture, for triangles, quads or any polygons.

xatlas's Python binding takes triangles only, so polygons are unwrapped as their fan triangles. A polygon
whose triangles land in different charts would have no single UV per corner: xatlas runs again with such
polygons set apart (vertices of their own, unfolded flat), so that each becomes a chart of its own. Every polygon is kept,
with one UV per corner.
"""

from __future__ import annotations

import numpy as np

MAX_FAN_SEARCH = 32  # polygons with more corners keep the fan from their first
FILL = 0.55  # texel density: charts covering this share of the square come out about its size once packed
PADDING_HEADROOM = 1.4  # the packed atlas is scaled to the square, at most by about this much
PASSES = 3  # xatlas runs: the first, then with the polygons it cut set apart (unfolded flat), twice at most
# xatlas's deadline per triangle (native.deadline): measured 0.26 ms (50k triangles, 13 s) to 0.5 ms (200k,
# 98 s) on a busy two-core machine; it grows faster than the count, so ten times the larger rate.
XATLAS_S_PER_FACE = 5e-3


def padding_for(size: int) -> int:
    """Texels kept between charts, scaled with the texture (4 at 1024): bilinear filtering and the first mip
    levels then never mix two charts."""
    return max(2, size // 256)


def polygons(faces: np.ndarray):
    """(M, 3) or (M, 4) faces with -1 pads -> (corner_verts (L,), loop_totals (M,))."""
    faces = np.asarray(faces)
    keep = faces >= 0
    return faces[keep].astype(np.int64), keep.sum(axis=1).astype(np.int64)


def fan(loop_totals: np.ndarray, corner_points: np.ndarray = None):
    """Fan triangles of each polygon as loop indices (T, 3), and the polygon of each triangle (T,).

    With ``corner_points`` (L, 3), each polygon's fan starts at the corner that gives its thinnest triangle the
    most area: a fan from a corner in line with its neighbours (an edge midpoint, as Blender's Subdivide leaves)
    has triangles of no area, which the atlas cannot chart."""
    totals = np.asarray(loop_totals, np.int64)
    starts = np.cumsum(totals) - totals
    per = np.maximum(totals - 2, 0)
    poly = np.repeat(np.arange(len(totals)), per)
    i = np.arange(len(poly)) - np.repeat(np.cumsum(per) - per, per) + 1  # 1 .. k-2 within each polygon
    k, s = totals[poly], starts[poly]
    turn = np.zeros(len(totals), np.int64)
    if corner_points is not None:
        for size in np.unique(totals[(totals > 3) & (totals <= MAX_FAN_SEARCH)]):
            turn[totals == size] = _best_start(corner_points, starts[totals == size], int(size))
    r = turn[poly]
    return np.stack([s + r % k, s + (r + i) % k, s + (r + i + 1) % k], axis=1), poly


def _best_start(corner_points, starts, size: int) -> np.ndarray:
    """For polygons of ``size`` corners beginning at loop ``starts``: the fan start whose smallest triangle is
    largest."""
    corners = corner_points[starts[:, None] + np.arange(size)]  # (P, size, 3)
    best = np.full(len(starts), -1.0)
    choice = np.zeros(len(starts), np.int64)
    for r in range(size):
        turned = np.roll(corners, -r, axis=1)
        a = turned[:, :1]
        areas = np.linalg.norm(np.cross(turned[:, 1:-1] - a, turned[:, 2:] - a), axis=2).min(axis=1)
        better = areas > best * (1 + 1e-6)  # ties keep the first start, as without the search
        best[better], choice[better] = areas[better], r
    return choice


def unwrap_faces(vertices: np.ndarray, faces: np.ndarray, size: int, check=None):
    """Mesh-style faces -> (faces, uvs (M', K, 2) per face corner with v up, polygons set apart, quads split).
    A quad that xatlas still cuts in two becomes its two triangles (the second appended at the end)."""
    faces = np.asarray(faces)
    corner_verts, totals = polygons(faces)
    loop_uvs, alone, broken, tri_uvs = unwrap(vertices, corner_verts, totals, size, check)
    uvs = np.zeros((*faces.shape, 2), np.float32)
    uvs[faces >= 0] = loop_uvs
    if not broken.any():
        return faces, uvs, alone, 0
    tri_loops, tri_poly = fan(totals, np.asarray(vertices)[corner_verts])  # as unwrap() made them
    quads = np.flatnonzero(broken)
    first = np.searchsorted(tri_poly, quads)  # a broken quad's two triangles: first, first + 1
    faces, uvs = faces.copy(), uvs.copy()
    faces[quads] = -1
    faces[quads, :3] = corner_verts[tri_loops[first]]
    uvs[quads] = 0.0
    uvs[quads, :3] = tri_uvs[first]
    extra = np.full((len(quads), faces.shape[1]), -1, np.int32)
    extra[:, :3] = corner_verts[tri_loops[first + 1]]
    extra_uvs = np.zeros((len(quads), faces.shape[1], 2), np.float32)
    extra_uvs[:, :3] = tri_uvs[first + 1]
    return np.concatenate([faces, extra]), np.concatenate([uvs, extra_uvs]), alone, len(quads)


def unwrap(vertices: np.ndarray, corner_verts: np.ndarray, loop_totals: np.ndarray, size: int, check=None):
    """-> (uvs (L, 2) per loop in [0, 1], v up; the number of polygons set apart; a mask of the polygons xatlas
    still cut, whose loops have no single UV each; the UVs per fan-triangle corner (T, 3, 2)). ``check()`` is
    called all along (xatlas's run included) and may raise to cancel."""
    vertices = np.ascontiguousarray(vertices, np.float32)
    corner_verts = np.asarray(corner_verts, np.int64)
    tri_loops, tri_poly = fan(loop_totals, vertices[corner_verts])
    alone = np.zeros(len(loop_totals), bool)
    for _ in range(PASSES):
        # Polygons set apart get vertices of their own: xatlas then sees them as separate pieces of surface.
        mesh_vertex = corner_verts.copy()
        apart = np.repeat(alone, loop_totals)
        mesh_vertex[apart] = len(vertices) + np.arange(int(apart.sum()))
        points = np.concatenate([vertices, _flattened(vertices, corner_verts, loop_totals, alone, check)])
        ids, uv = _atlas(points, mesh_vertex[tri_loops], size, check)
        # Each loop takes the atlas vertex of one of its triangle corners; a polygon is whole when they all agree.
        loop_id = np.full(len(corner_verts), -1, np.int64)
        loop_id[tri_loops.reshape(-1)] = ids.reshape(-1)
        broken = np.zeros(len(loop_totals), bool)
        broken[tri_poly[(loop_id[tri_loops] != ids).any(axis=1)]] = True
        if not broken.any() or _ == PASSES - 1:
            return uv[loop_id], int(alone.sum()), broken, uv[ids]
        alone |= broken


def _flattened(vertices, corner_verts, loop_totals, polygons_apart, check=None) -> np.ndarray:
    """The corners of the polygons set apart, each polygon unfolded flat on a spot of its own: xatlas cuts a chart
    where it cannot flatten it, and a flat polygon it need not cut. Unfolding keeps every triangle's shape, so
    the polygon's texel density is the surface's."""
    starts = np.cumsum(loop_totals) - loop_totals
    out = []
    # Far from the surface and from each other: xatlas links corners that share a position.
    spacing = 2.0 * float(np.abs(vertices).max() + 1.0)
    side = int(np.ceil(np.sqrt(polygons_apart.sum())))
    for k, p in enumerate(np.flatnonzero(polygons_apart)):
        if check is not None:  # a loop in Python: tens of microseconds a polygon
            check()
        points = vertices[corner_verts[starts[p]:starts[p] + loop_totals[p]]].astype(np.float64)
        flat = _unfold(points, check)
        centre = points.mean(axis=0)
        normal, following = 0, np.roll(points, -1, axis=0)
        for start in range(0, len(points), 4096):  # in order, as one sum: the same bits, with cancel checks
            if check is not None and start:
                check()
            part = slice(start, start + 4096)
            normal = sum((np.cross(a - centre, b - centre) for a, b in zip(points[part], following[part])), normal)
        e1 = points[1] - points[0]
        e1 -= normal * (e1 @ normal) / max(normal @ normal, 1e-30)
        e1 /= max(np.linalg.norm(e1), 1e-30)
        e2 = np.cross(normal / max(np.linalg.norm(normal), 1e-30), e1)
        spot = spacing * np.array([1 + k % side, 1 + k // side, 1.0])
        out.append(spot + flat[:, :1] * e1 + flat[:, 1:] * e2)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 3), np.float32)


def _unfold(points: np.ndarray, check=None) -> np.ndarray:
    """A polygon's fan triangles (0, i, i+1) laid flat one after another, each hinged on the edge it shares with
    the one before and turned to its far side: every triangle keeps its shape, and none folds over the last."""
    out = np.zeros((len(points), 2))
    out[1, 0] = np.linalg.norm(points[1] - points[0])
    for i in range(2, len(points)):
        if check is not None and i % 4096 == 0:  # a polygon may have a great many corners
            check()
        r0 = np.linalg.norm(points[i] - points[0])
        r1 = np.linalg.norm(points[i] - points[i - 1])
        hinge = out[i - 1] - out[0]
        length = max(np.linalg.norm(hinge), 1e-30)
        along = (r0 * r0 - r1 * r1 + length * length) / (2 * length)
        across = np.sqrt(max(r0 * r0 - along * along, 0.0))
        axis = hinge / length
        normal = np.array([-axis[1], axis[0]])
        if i > 2 and (out[i - 2] - out[0]) @ normal > 0:  # the previous triangle is on this side
            normal = -normal
        out[i] = out[0] + axis * along + normal * across
    return out


def _atlas(vertices: np.ndarray, tris: np.ndarray, size: int, check=None):
    """xatlas on triangles -> (per-corner ids into the atlas vertices (T, 3), their UVs (V', 2) in [0, 1], v up).

    xatlas packs into an atlas of the size it needs at a given texel density (one run; packing into a fixed
    square instead needs guesses and reruns, about 5 s each at 50k faces), which is then scaled to the square.
    The padding asked for allows for that scale. xatlas runs in a child process (:mod:`.native`): ``check()``
    is polled meanwhile and may raise to cancel."""
    from . import native

    a, b, c = vertices[tris[:, 0]], vertices[tris[:, 1]], vertices[tris[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum()
    density = float(np.sqrt(FILL * size * size / max(area, 1e-20)))
    if not np.isfinite(density) or density <= 0:  # xatlas would never return (inf or NaN coordinates)
        raise ValueError(f"the surface's area ({area:g}) gives no texel density for the UV atlas")
    out = native.call("backend.postprocess.atlas:xatlas_generate",
                      {"vertices": vertices, "tris": np.ascontiguousarray(tris, np.uint32)},
                      {"texels_per_unit": density, "padding": int(np.ceil(padding_for(size) * PADDING_HEADROOM))},
                      seconds=native.deadline(len(tris), XATLAS_S_PER_FACE), check=check,
                      what=f"the UV atlas (xatlas) of {len(tris):,} triangles",
                      hint="Use fewer faces (Faces under Output) or unwrap the object in Blender first.")
    mapping, indices, uv = out["mapping"], out["indices"], out["uv"]
    if int(out["count"]) != 1 or len(indices) != len(tris) or not np.array_equal(mapping[indices], tris):
        raise RuntimeError("xatlas did not give one atlas of the triangles in order")  # the UVs would be wrong
    # xatlas normalises by its atlas's width and height, rows downward: one scale for both axes, then v up.
    width, height = int(out["width"]), int(out["height"])
    side = max(width, height)
    uv = np.stack([uv[:, 0] * (width / side), 1.0 - uv[:, 1] * (height / side)], axis=1).astype(np.float32)
    return indices.astype(np.int64), uv


def xatlas_generate(vertices, tris, texels_per_unit: float, padding: int) -> dict:
    """In the child process: xatlas's atlas of one mesh at the given texel density."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, tris)
    pack = xatlas.PackOptions()
    pack.texels_per_unit = texels_per_unit
    pack.padding = padding
    pack.bilinear = True
    atlas.generate(pack_options=pack)
    mapping, indices, uv = atlas[0]
    return {"mapping": mapping, "indices": indices, "uv": uv, "count": atlas.atlas_count, "width": atlas.width,
            "height": atlas.height}
