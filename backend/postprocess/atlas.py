"""A UV atlas from xatlas, packed into one square texture, for triangles, quads or any polygons.

xatlas's Python binding takes triangles only, so polygons are unwrapped as their fan triangles. A polygon
whose triangles land in different charts would have no single UV per corner: such a polygon becomes a chart
of its own (projected on its plane), and a second xatlas pass packs the charts again from those UVs. Every
polygon is kept, with one UV per corner.
"""

from __future__ import annotations

import numpy as np

FILL = 0.7  # share of the square that xatlas's packing usually covers: the first guess of its scale
MAX_TRIES = 6


def padding_for(size: int) -> int:
    """Texels kept between charts, scaled with the texture (4 at 1024): bilinear filtering and the first mip
    levels then never mix two charts."""
    return max(2, size // 256)


def polygons(faces: np.ndarray):
    """(M, 3) or (M, 4) faces with -1 pads -> (corner_verts (L,), loop_totals (M,))."""
    faces = np.asarray(faces)
    keep = faces >= 0
    return faces[keep].astype(np.int64), keep.sum(axis=1).astype(np.int64)


def fan(loop_totals: np.ndarray):
    """Fan triangles of each polygon as loop indices (T, 3), and the polygon of each triangle (T,)."""
    totals = np.asarray(loop_totals, np.int64)
    starts = np.cumsum(totals) - totals
    per = np.maximum(totals - 2, 0)
    poly = np.repeat(np.arange(len(totals)), per)
    i = np.arange(len(poly)) - np.repeat(np.cumsum(per) - per, per) + 1  # 1 .. k-2 within each polygon
    s = starts[poly]
    return np.stack([s, s + i, s + i + 1], axis=1), poly


def unwrap_faces(vertices: np.ndarray, faces: np.ndarray, size: int):
    """-> (uvs (M, K, 2) per face corner with v up, polygons re-charted) for Mesh-style faces."""
    corner_verts, totals = polygons(faces)
    loop_uvs, recharted = unwrap(vertices, corner_verts, totals, size)
    uvs = np.zeros((*faces.shape, 2), np.float32)
    uvs[np.asarray(faces) >= 0] = loop_uvs
    return uvs, recharted


def unwrap(vertices: np.ndarray, corner_verts: np.ndarray, loop_totals: np.ndarray, size: int):
    """-> (uvs (L, 2) per loop in [0, 1], v up; number of polygons that needed a chart of their own)."""
    vertices = np.ascontiguousarray(vertices, np.float32)
    corner_verts = np.asarray(corner_verts, np.int64)
    tri_loops, tri_poly = fan(loop_totals)
    tris = corner_verts[tri_loops]
    ids, uv, texels_per_unit = _atlas(vertices, tris, None, size)
    # Each loop takes the atlas vertex of one of its triangle corners; a polygon is whole when they all agree.
    loop_id = np.full(len(corner_verts), -1, np.int64)
    loop_id[tri_loops.reshape(-1)] = ids.reshape(-1)
    broken = np.zeros(len(loop_totals), bool)
    broken[tri_poly[(loop_id[tri_loops] != ids).any(axis=1)]] = True
    if not broken.any():
        return uv[loop_id], 0
    # UVs in surface units, as xatlas's first pass laid them out; broken polygons get their own planar chart.
    loop_uv = uv[loop_id] * size / texels_per_unit
    starts = np.cumsum(loop_totals) - loop_totals
    for p in np.flatnonzero(broken):  # a few percent of the polygons, along chart borders
        loops = np.arange(starts[p], starts[p] + loop_totals[p])
        loop_uv[loops] = _planar(vertices[corner_verts[loops]])
    # Second pass: one atlas vertex per distinct (vertex, uv) corner; xatlas charts them by their UVs and packs.
    keys = np.concatenate([corner_verts[:, None].astype(np.float64), loop_uv.astype(np.float64)], axis=1)
    _, first, corner_of = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    corner_of = corner_of.reshape(-1)
    ids2, uv2, _ = _atlas(vertices[corner_verts[first]], corner_of[tri_loops], loop_uv[first], size)
    out = np.empty((len(corner_verts), 2), np.float32)
    out[tri_loops.reshape(-1)] = uv2[ids2.reshape(-1)]
    return out, int(broken.sum())


def _planar(points: np.ndarray) -> np.ndarray:
    """A polygon's corners projected on its own plane, in surface units."""
    centre = points.mean(axis=0)
    normal = np.zeros(3)
    for a, b in zip(points, np.roll(points, -1, axis=0)):  # Newell's normal: any polygon, any corner order
        normal += np.cross(a - centre, b - centre)
    normal /= max(np.linalg.norm(normal), 1e-20)
    e1 = points[1] - points[0]
    e1 = e1 - normal * (e1 @ normal)
    e1 /= max(np.linalg.norm(e1), 1e-20)
    e2 = np.cross(normal, e1)
    rel = points - points[0]
    return np.stack([rel @ e1, rel @ e2], axis=1)


def _atlas(vertices: np.ndarray, tris: np.ndarray, vertex_uvs, size: int):
    """xatlas on triangles -> (per-corner ids into the atlas vertices (T, 3), their UVs (V', 2) in [0, 1] with
    v up, the texels per surface unit used). With ``vertex_uvs``, the charts are those UVs' islands."""
    import xatlas

    if vertex_uvs is None:
        a, b, c = vertices[tris[:, 0]], vertices[tris[:, 1]], vertices[tris[:, 2]]
    else:
        flat = np.concatenate([vertex_uvs, np.zeros((len(vertex_uvs), 1))], axis=1)
        a, b, c = flat[tris[:, 0]], flat[tris[:, 1]], flat[tris[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum()
    texels_per_unit = float(np.sqrt(FILL * size * size / max(area, 1e-20)))
    tris32 = np.ascontiguousarray(tris, np.uint32)
    for _ in range(MAX_TRIES):
        atlas = xatlas.Atlas()
        if vertex_uvs is None:
            atlas.add_mesh(vertices, tris32)
        else:
            atlas.add_mesh(vertices, tris32, uvs=np.ascontiguousarray(vertex_uvs, np.float32))
        charts, pack = xatlas.ChartOptions(), xatlas.PackOptions()
        charts.use_input_mesh_uvs = vertex_uvs is not None
        pack.resolution = size
        pack.texels_per_unit = texels_per_unit
        pack.padding = padding_for(size)
        pack.bilinear = True
        atlas.generate(chart_options=charts, pack_options=pack)
        if atlas.atlas_count == 1:
            break
        texels_per_unit *= 0.85  # the charts did not fit one square: smaller
    else:
        raise RuntimeError(f"xatlas could not pack the charts into one {size}² texture")
    mapping, indices, uv = atlas[0]
    if len(indices) != len(tris) or not np.array_equal(mapping[indices], tris):
        raise RuntimeError("xatlas reordered the triangles")  # the corner UVs would be wrong
    # xatlas normalises by the atlas size with rows downward: flip to v up.
    uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1).astype(np.float32)
    return indices.astype(np.int64), uv, texels_per_unit
