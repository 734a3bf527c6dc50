"""FlexiCubes surface extraction (inference only), written from the algorithm's description.

Dual Marching Cubes on a deformed voxel grid: every connected patch of the marching-cubes surface inside a
cube gives one dual vertex, the β-weighted mean of its edges' α-weighted zero crossings; every grid edge
with a sign change that is shared by four cubes gives a quad of their dual vertices, split into two
triangles along the diagonal with the larger γ product, wound to face positive SDF (outwards).

The lookup tables are derived here from first principles (:func:`derive_tables`), not copied:
- edge groups per case: the crossed edges of a cube, linked across each face by the marching-cubes face
  segments; an ambiguous face (two diagonal inside corners) cuts off each inside corner;
- "tunnel" cases: one ambiguous face whose two segments belong to the same patch. If two such cubes are
  neighbours across that face, the dual edge between them would be shared by four quads (non-manifold), so
  both use the complementary case's grouping (which separates the face the other way).

Conventions shared with the network's outputs (they index its channels): corner c = (c & 1, c >> 1 & 1,
c >> 2 & 1) in (x, y, z); the 12 edges in :data:`EDGES` order (β channel e is edge e, α channel c is
corner c); cube (i, j, k) has linear index (i·R + j)·R + k, as do the (R+1)³ vertices.
The layout of the reference's FlexiCubes (InstantMesh's ``src/models/geometry``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CORNERS = tuple((c & 1, c >> 1 & 1, c >> 2 & 1) for c in range(8))
# Edge e joins corners EDGES[e]; the pair order is the orientation the crossing formula and winding use.
EDGES = ((0, 1), (1, 5), (4, 5), (0, 4), (2, 3), (3, 7), (6, 7), (2, 6), (2, 0), (3, 1), (7, 5), (6, 4))
WEIGHT_SCALE = 0.5
CUBES_PER_CHUNK = 1 << 16


@dataclass(frozen=True)
class Tables:
    edge_group: np.ndarray  # (256, 12) int8: patch index of each crossed edge, -1 where not crossed
    num_patches: np.ndarray  # (256,) int8: dual vertices per case (0..4)
    tunnel: np.ndarray  # (256,) bool: one ambiguous face joined by one patch
    tunnel_offset: np.ndarray  # (256, 3) int8: the neighbour cube across that face
    tunnel_case: np.ndarray  # (256,) int16: the case whose grouping replaces it (the complement)


def _faces():
    """The 6 faces: (corners on it, its edges, offset to the neighbour cube across it)."""
    out = []
    for axis in range(3):
        for side in (0, 1):
            corners = [c for c in range(8) if CORNERS[c][axis] == side]
            edges = [e for e, (a, b) in enumerate(EDGES) if a in corners and b in corners]
            offset = [0, 0, 0]
            offset[axis] = 1 if side else -1
            out.append((corners, edges, tuple(offset)))
    return out


def _patches(case: int):
    """Edge groups of one case and the offsets of its tunnel faces."""
    inside = [(case >> c) & 1 for c in range(8)]
    crossed = [e for e, (a, b) in enumerate(EDGES) if inside[a] != inside[b]]
    parent = {e: e for e in crossed}

    def root(e):
        while parent[e] != e:
            e = parent[e]
        return e

    ambiguous = []
    for corners, edges, offset in _faces():
        face_edges = [e for e in edges if e in parent]
        if len(face_edges) == 4:  # two diagonal inside corners: each inside corner gets its own segment
            ambiguous.append((offset, face_edges))
            pairs = [[e for e in face_edges if c in EDGES[e]] for c in corners if inside[c]]
        elif face_edges:
            pairs = [face_edges]
        else:
            pairs = []
        for a, b in pairs:
            parent[root(a)] = root(b)
    groups = {}
    for e in crossed:
        groups.setdefault(root(e), []).append(e)
    tunnels = [offset for offset, face_edges in ambiguous if len({root(e) for e in face_edges}) == 1]
    return sorted(groups.values()), tunnels


def derive_tables() -> Tables:
    edge_group = np.full((256, 12), -1, np.int8)
    num_patches = np.zeros(256, np.int8)
    tunnel = np.zeros(256, bool)
    tunnel_offset = np.zeros((256, 3), np.int8)
    for case in range(256):
        groups, tunnels = _patches(case)
        num_patches[case] = len(groups)
        for g, edges in enumerate(groups):
            edge_group[case, edges] = g
        if tunnels:
            assert len(tunnels) == 1  # by construction of the cube: at most one such face
            tunnel[case], tunnel_offset[case] = True, tunnels[0]
    return Tables(edge_group, num_patches, tunnel, tunnel_offset, 255 - np.arange(256, dtype=np.int16))


TABLES = derive_tables()


def grid_axis(res: int, scale: float) -> torch.Tensor:
    """Vertex coordinates along one axis, exactly as the reference makes them: corner/res + cube/res,
    rounded to 5 decimals (to merge duplicates), shifted by -0.5 and scaled, in float32."""
    k = torch.arange(res + 1)
    cube = k.clamp(max=res - 1)
    t = cube.float() / res + (k - cube).float() / res
    return (torch.round(t * 1e5) / 1e5 - 0.5) * scale


def grid_vertices(res: int, scale: float, index: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (N, 3) of the vertices with linear ``index`` (all (res+1)³ when None), x-major."""
    axis, n = grid_axis(res, scale), res + 1
    if index is None:
        index = torch.arange(n ** 3)
    return torch.stack([axis[index // (n * n)], axis[index // n % n], axis[index % n]], dim=-1)


def _corner_offsets(res: int) -> torch.Tensor:
    n = res + 1
    return torch.tensor([x * n * n + y * n + z for x, y, z in CORNERS])


def cube_corners(cubes: torch.Tensor, res: int) -> torch.Tensor:
    """Linear cube ids (M,) -> their 8 corner vertex ids (M, 8), in corner order."""
    i, j, k = cubes // (res * res), cubes // res % res, cubes % res
    origin = (i * (res + 1) + j) * (res + 1) + k
    return origin[:, None] + _corner_offsets(res)


def case_ids(inside: torch.Tensor, res: int, cubes: torch.Tensor) -> torch.Tensor:
    """inside (bool, (res+1)³ vertices) -> the 8-bit case of each cube in ``cubes`` (bit c = corner c)."""
    bits = inside[cube_corners(cubes, res)].long()
    return (bits << torch.arange(8)).sum(-1)


def surface_cubes(sdf: torch.Tensor, res: int):
    """Cubes with corners on both sides (inside = sdf < 0) -> (ids ascending, case ids after the tunnel
    fix). Only the SDF is needed, so the heavier heads can be evaluated on these cubes alone."""
    n = res + 1
    inside = (sdf.reshape(n, n, n) < 0)
    count = torch.zeros(res, res, res, dtype=torch.uint8)
    for x, y, z in CORNERS:
        count += inside[x:x + res, y:y + res, z:z + res]
    cubes = torch.nonzero(((count > 0) & (count < 8)).reshape(-1))[:, 0]
    inside = inside.reshape(-1)
    cases = case_ids(inside, res, cubes)
    tunnel = torch.from_numpy(TABLES.tunnel)[cases]
    if tunnel.any():
        which = torch.nonzero(tunnel)[:, 0]
        ijk = torch.stack([cubes[which] // (res * res), cubes[which] // res % res, cubes[which] % res], -1)
        nb = ijk + torch.from_numpy(TABLES.tunnel_offset).long()[cases[which]]
        ok = ((nb >= 0) & (nb < res)).all(-1)
        which, nb = which[ok], nb[ok]
        nb_case = case_ids(inside, res, (nb[:, 0] * res + nb[:, 1]) * res + nb[:, 2])
        flip = torch.from_numpy(TABLES.tunnel)[nb_case]
        cases[which[flip]] = torch.from_numpy(TABLES.tunnel_case).long()[cases[which[flip]]]
    return cubes, cases


def normalize_weights(weights: torch.Tensor):
    """Raw (M, 21) -> β (M, 12), α (M, 8), γ (M,), as FlexiCubes' inference with weight_scale 0.5."""
    beta = torch.tanh(weights[:, :12]) * WEIGHT_SCALE + 1
    alpha = torch.tanh(weights[:, 12:20]) * WEIGHT_SCALE + 1
    gamma = torch.sigmoid(weights[:, 20]) * WEIGHT_SCALE + (1 - WEIGHT_SCALE) / 2
    return beta, alpha, gamma


def dual_vertices(corner_pos: torch.Tensor, corner_sdf: torch.Tensor, cases: torch.Tensor, beta, alpha):
    """Per surface cube: corner positions (M, 8, 3), corner SDF (M, 8), cases (M,), β (M, 12), α (M, 8)
    -> dual vertices (V, 3) and the dual vertex of each (cube, edge) (M, 12; -1 where not crossed)."""
    group = torch.from_numpy(TABLES.edge_group).long()[cases]  # (M, 12)
    count = torch.from_numpy(TABLES.num_patches).long()[cases]
    first = torch.cumsum(count, 0) - count
    vd_of_edge = torch.where(group >= 0, first[:, None] + group, -1)
    total = int(count.sum())
    acc = corner_pos.new_zeros(total, 3)
    beta_sum = corner_pos.new_zeros(total)
    a, b = (torch.tensor(side) for side in zip(*EDGES))
    for lo in range(0, len(cases), CUBES_PER_CHUNK):
        hi = min(lo + CUBES_PER_CHUNK, len(cases))
        w = corner_sdf[lo:hi] * alpha[lo:hi]  # α-weighted SDF at the corners
        wa, wb = w[:, a, None], w[:, b, None]
        xa, xb = corner_pos[lo:hi, a], corner_pos[lo:hi, b]
        crossing = (xa * wb - xb * wa) / (wb - wa)  # (m, 12, 3), the zero of the linear interpolant
        sel = vd_of_edge[lo:hi] >= 0
        idx = vd_of_edge[lo:hi][sel]
        acc.index_add_(0, idx, crossing[sel] * beta[lo:hi][sel][:, None])
        beta_sum.index_add_(0, idx, beta[lo:hi][sel])
    return acc / beta_sum[:, None], vd_of_edge


# Grid edges starting at a cube's corner 0, one per axis: (its edge index in that cube, the three other
# cubes around it as offsets, with the edge's index in each). The four cubes are listed by ascending
# linear index; the quad goes round them in the order 0, 1, 3, 2.
_EDGE_RINGS = (
    (0, ((0, -1, -1, 6), (0, -1, 0, 4), (0, 0, -1, 2))),  # x edge
    (8, ((-1, 0, -1, 10), (-1, 0, 0, 9), (0, 0, -1, 11))),  # y edge
    (3, ((-1, -1, 0, 5), (-1, 0, 0, 1), (0, -1, 0, 7))),  # z edge
)
QUAD_SPLIT_02 = (0, 1, 2, 0, 2, 3)
QUAD_SPLIT_13 = (0, 1, 3, 3, 1, 2)


def quads_to_triangles(cubes: torch.Tensor, corner_sdf: torch.Tensor, vd_of_edge: torch.Tensor,
                       gamma: torch.Tensor, res: int) -> torch.Tensor:
    """Faces (F, 3) over the dual vertices: one quad per crossed edge that has a surface cube on all four
    sides, wound so that the right-hand normal points to the edge's positive end."""
    ijk = torch.stack([cubes // (res * res), cubes // res % res, cubes % res], -1)
    faces = []
    for edge, ring in _EDGE_RINGS:
        a, b = EDGES[edge]
        crossed = vd_of_edge[:, edge] >= 0
        members = [torch.nonzero(crossed)[:, 0]]
        others = []
        for dx, dy, dz, other_edge in ring:
            nb = ijk[members[0]] + torch.tensor([dx, dy, dz])
            others.append((nb, other_edge))
        ok = torch.ones(len(members[0]), dtype=torch.bool)
        for nb, _ in others:
            ok &= (nb >= 0).all(-1)
        slots = []
        for nb, other_edge in others:
            lin = (nb[:, 0] * res + nb[:, 1]) * res + nb[:, 2]
            pos = torch.searchsorted(cubes, lin.clamp(min=0)).clamp(max=len(cubes) - 1)
            ok &= cubes[pos] == lin  # every cube around a crossed edge is a surface cube, if it exists
            slots.append(vd_of_edge[pos, other_edge])
        own = members[0]
        quad = torch.stack(slots + [vd_of_edge[own, edge]], -1)[ok]  # ascending cube order
        outward_first = corner_sdf[own, a][ok] > 0  # the edge's first end is outside
        quad = torch.where(outward_first[:, None], quad[:, [0, 1, 3, 2]], quad[:, [2, 3, 1, 0]])
        faces.append(quad)
    quad = torch.cat(faces)
    g = gamma[quad]
    split = (g[:, 0] * g[:, 2] > g[:, 1] * g[:, 3])[:, None]
    tri = torch.where(split, quad[:, list(QUAD_SPLIT_02)], quad[:, list(QUAD_SPLIT_13)])
    return tri.reshape(-1, 3)


def per_vertex_gamma(cases: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """γ of each dual vertex: its cube's."""
    count = torch.from_numpy(TABLES.num_patches).long()[cases]
    return torch.repeat_interleave(gamma, count)


def extract(cubes, cases, corner_pos, corner_sdf, weights, res: int):
    """Surface cubes (ids ascending, cases), their deformed corner positions (M, 8, 3), corner SDF (M, 8)
    and raw weights (M, 21) -> vertices (V, 3), faces (F, 3) int64. Like the reference, every dual vertex
    is returned, also those of cubes whose quads fall outside the grid (unused by any face)."""
    if len(cubes) == 0:
        return corner_pos.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)
    beta, alpha, gamma = normalize_weights(weights)
    vertices, vd_of_edge = dual_vertices(corner_pos, corner_sdf, cases, beta, alpha)
    faces = quads_to_triangles(cubes, corner_sdf, vd_of_edge, per_vertex_gamma(cases, gamma), res)
    return vertices, faces
