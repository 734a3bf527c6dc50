"""Surface extraction from a density field: marching cubes, welding, vertex colours.

Two paths give the same mesh:

- **coarse to fine** (the default, :func:`coarse_to_fine`): the field is sampled on a coarse grid (every
  :func:`coarse_step` grid points); the blocks between coarse samples that the surface can pass through are
  evaluated at full resolution and triangulated, a batch at a time. Cost follows the surface's area, not
  the volume, and memory is the coarse grid plus one batch, whatever the resolution.
- **dense** (:func:`dense_marching_cubes`, ``Options.dense``, ``generate --dense``): every grid point, one x
  slice at a time, triangulated in slabs. The comparison, and the fallback.

Marching cubes is our own (``marching_cubes.py``), on the field's device, with PyMCubes' vertex positions,
triangles and outward winding, as the references have them (surface where ``density == threshold``, inside
where density is higher). A cell's triangles and an edge's vertex depend only on the cell's eight values, so
blocks that share their boundary samples, welded, give exactly the dense mesh, provided the block values are
the dense grid's (both paths evaluate through ``grid_density_where``, whose values do not depend on which
points are asked together)
and no block holding surface is skipped. Faces are put in grid-cell order, so even the face order is the
dense path's.

Which blocks hold surface (the guard). A block is evaluated when density − threshold changes sign at its
eight coarse corners, or when the corners come within a margin of the threshold. The margin is measured on
the field, on the scale of the models' raw output, level = log(density / threshold): ``MARGIN_SCALE`` × the
largest curvature (sum over the axes of |second difference| of level) at the coarse samples of the block and
its 26 neighbours. Between its corners a field departs from their (trilinear) interpolation by at most
about 1/8 of its second differences, so a margin of 8 times that bound covers what the corners cannot show;
a thin sheet, a speck or a bump that only grazes the threshold between samples bends the samples around it,
and that curvature opens the margin there, while a smooth slope (most of space) costs nothing.
Then the refinement check, a dilation driven by the fine samples: after a block is evaluated, a face on
which its full-resolution samples change sign means the surface goes on through that face, so the
neighbour is evaluated too, until no face leaks. A surface piece once found is therefore complete, with no
hole or seam at a block boundary; only a piece that lies wholly inside unevaluated blocks *and* leaves too
little curvature on the coarse samples can be missed. ``margin_scale=0`` turns the guard off (the mutation
test: a thin sheet is then lost).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import marching_cubes as mc

# Density kept for one marching-cubes slab (as float64); bounds memory whatever the resolution.
SLAB_BYTES = 32 << 20
# Grid cells per block side (coarse samples every that many grid points): R // 64, at least 4. Measured on
# the shaped TripoSR: 4 is best at 256, 8 at 512 (9.6 M evaluations against 14.4 M with 4), 16 at 1024
# (63 M against 103 M with 8): finer blocks follow the surface closer but the coarse grid and the margin grow.
MIN_COARSE_STEP, BLOCKS_PER_AXIS = 4, 64


def coarse_step(resolution: int) -> int:
    return max(MIN_COARSE_STEP, resolution // BLOCKS_PER_AXIS)


MARGIN_SCALE = 1.0  # the guard: margin = this × the local curvature of the coarse samples (0 turns it off)
GROUP_POINTS = 1 << 18  # grid points of the blocks handled between two progress calls (a cancel waits that long)
SLICES_PER_CALL = 8  # x slices per field call for the coarse samples (bounds the call's memory)


def grid_coords(resolution: int, radius: float) -> torch.Tensor:
    """The R grid positions along each axis, world units, as the reference computes them."""
    return torch.linspace(0, 1, resolution) * (2 * radius) - radius


def marching_cubes(field, resolution: int, threshold: float, on_fraction=None, dense: bool = False,
                   stats=None):
    """Triangulate the field's density at ``threshold``. Returns world vertices (N, 3) float64 and faces
    (M, 3) int32, welded, in the field's frame. Coarse to fine unless ``dense`` (or the field cannot be
    evaluated at chosen grid points, ``grid_density_where``). ``on_fraction(f)`` is called as work proceeds
    (it may raise to cancel). ``stats``, a dict, receives ``evaluations`` (field evaluations made) and
    ``blocks``."""
    try:
        if dense or not hasattr(field, "grid_density_where") or resolution <= 4 * MIN_COARSE_STEP:
            if stats is not None:
                stats.update(evaluations=resolution ** 3, blocks=None)
            return dense_marching_cubes(field, resolution, threshold, on_fraction)
        return coarse_to_fine(field, resolution, threshold, on_fraction, stats=stats)
    finally:
        getattr(field, "forget_grid", lambda: None)()


class _Pieces:
    """Triangulated pieces of one grid, welded and put in cell order at the end (:meth:`mesh`)."""

    def __init__(self, resolution: int, radius: float):
        self.resolution, self.radius = resolution, radius
        self.verts, self.faces, self.cells, self.n_verts = [], [], [], 0

    def add(self, values: torch.Tensor, offsets: torch.Tensor) -> None:
        """Blocks (B, X, Y, Z) of density − threshold (float64) at grid points ``offsets`` (B, 3)."""
        r = self.resolution
        v, f, cells = mc.march_blocks(values, offsets.to(values.device), (r, r, r))
        if len(f):
            self.verts.append(v.cpu().numpy())
            self.faces.append(f.cpu().numpy().astype(np.int32) + np.int32(self.n_verts))  # int32: half the memory
            self.cells.append(cells.cpu().numpy())
            self.n_verts += len(v)

    def mesh(self):
        """Welded world vertices (N, 3) float64 and faces (M, 3) int32, faces in grid-cell order."""
        if not self.faces:
            return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int32)
        order = np.argsort(np.concatenate(self.cells), kind="stable")
        v, f = weld(np.concatenate(self.verts), np.concatenate(self.faces)[order])
        return v / (self.resolution - 1) * (2 * self.radius) - self.radius, f


def _mc_device(device: torch.device) -> torch.device:
    """Where marching cubes runs: beside the density, except on MPS, which has no float64."""
    return torch.device("cpu") if device.type == "mps" else device


def dense_marching_cubes(field, resolution: int, threshold: float, on_fraction=None):
    """:func:`marching_cubes` on every grid point (:func:`grid_slices`), triangulated slab by slab.
    ``on_fraction(f)`` is called after each x slice."""
    coords = grid_coords(resolution, field.radius)
    per_slab = max(2, SLAB_BYTES // (resolution * resolution * 8))
    pieces = _Pieces(resolution, field.radius)
    slab, start = [], 0  # slices of the current slab; ``start`` is the x index of slab[0]
    for i, density in enumerate(grid_slices(field, coords)):
        slab.append(density.to(_mc_device(density.device), torch.float64) - threshold)
        if len(slab) == per_slab:
            pieces.add(torch.stack(slab)[None], torch.tensor([[start, 0, 0]]))
            slab, start = slab[-1:], i  # cells between two slabs need the shared slice on both sides
        if on_fraction:
            on_fraction((i + 1) / resolution)
    if len(slab) >= 2:
        pieces.add(torch.stack(slab)[None], torch.tensor([[start, 0, 0]]))
    return pieces.mesh()


def grid_slices(field, coords: torch.Tensor):
    """The field's density on the grid, one x slice at a time: through ``grid_density_where`` (the arithmetic
    the coarse-to-fine path uses, so both paths see the same values bit for bit) when the field has it."""
    if not hasattr(field, "grid_density_where"):
        yield from field.grid_density(coords)
        return
    everywhere = torch.ones((1, len(coords), len(coords)), dtype=torch.bool)
    for i in range(len(coords)):
        yield field.grid_density_where(coords, torch.tensor([i]), everywhere)[0]


def coarse_to_fine(field, resolution: int, threshold: float, on_fraction=None, step: int | None = None,
                   margin_scale: float = MARGIN_SCALE, stats=None):
    """:func:`marching_cubes` evaluating full resolution only in blocks the surface can pass through
    (see the module's docstring), one x slab of blocks at a time, each grid point once. Memory: the coarse
    grid and one slab, whatever the resolution."""
    coords = grid_coords(resolution, field.radius)
    step = step or coarse_step(resolution)
    n = -(-(resolution - 1) // step)  # blocks per axis (the last one may be thinner)
    corners = np.minimum(np.arange(n + 1) * step, resolution - 1)
    coarse = coarse_values(field, coords, corners, threshold)
    pending = candidate_blocks(coarse, log_level(coarse, threshold), margin_scale)
    seen = pending.copy()  # queued or done
    evaluations, blocks = coarse.size, 0
    pieces = _Pieces(resolution, field.radius)
    along = np.arange(step + 1)
    per_group = max(1, GROUP_POINTS // (step + 1) ** 3)
    device = _mc_device(getattr(field, "device", torch.device("cpu")))  # where the slab is kept
    shared = None  # (x index, values, valid columns) of the last slab's last slice: the next slab's first
    progress = 0.0
    while pending.any():
        bx = int(np.flatnonzero(pending.any(axis=(1, 2)))[0])  # lowest slab first; refinement may go back
        todo = np.argwhere(pending[bx])
        pending[bx] = False
        x0 = bx * step
        xs = np.arange(x0, min(x0 + step, resolution - 1) + 1)
        # density − threshold on the slab's slices (float64), valid in the (y, z) columns evaluated so far
        slab = torch.empty((len(xs), resolution, resolution), dtype=torch.float64, device=device)
        done = np.zeros(resolution * resolution, dtype=bool)
        first_known = np.zeros(resolution * resolution, dtype=bool)  # columns the last slab gave slice 0
        if shared is not None and shared[0] == x0:
            slab[0], first_known = shared[1], shared[2]
        groups = np.array_split(todo, -(-len(todo) // per_group))
        for g, group in enumerate(groups):
            # the (y, z) columns of the group's blocks not evaluated yet, each through all the slab's slices
            yy, zz = (np.minimum(group[:, a, None] * step + along, resolution - 1) for a in (0, 1))
            columns = np.unique((yy[:, :, None] * resolution + zz[:, None, :]).reshape(-1))
            columns = columns[~done[columns]]
            done[columns] = True
            a_, c_ = np.meshgrid(np.arange(len(xs)), columns, indexing="ij")
            keep = (a_ > 0) | ~first_known[c_]
            a_, c_ = torch.from_numpy(a_[keep]), torch.from_numpy(c_[keep])
            if len(a_):
                density = field.grid_density_points(coords, torch.from_numpy(xs), a_, c_ // resolution,
                                                    c_ % resolution)
                slab[a_, c_ // resolution, c_ % resolution] = density.to(device, torch.float64) - threshold
                evaluations += len(a_)
            # padded blocks at the far end repeat the last slice; marching cubes leaves those cells out
            xl = torch.from_numpy(np.minimum(along, len(xs) - 1))
            values = slab[xl[None, :, None, None], torch.from_numpy(yy)[:, None, :, None],
                          torch.from_numpy(zz)[:, None, None, :]]
            blocks += len(group)
            pieces.add(values, torch.from_numpy(np.concatenate([np.full((len(group), 1), bx), group], axis=1) * step))
            leaks = leaking_faces(values, bx, group, n)
            new = leaks[~seen[tuple(leaks.T)]]
            seen[tuple(new.T)] = pending[tuple(new.T)] = True
            # refinement going back does not move the progress backwards
            progress = max(progress, (bx + (g + 1) / len(groups)) / n)
            if on_fraction:
                on_fraction(progress)
        shared = (int(xs[-1]), slab[-1], done)
    if stats is not None:
        stats.update(evaluations=int(evaluations), blocks=int(blocks))
    return pieces.mesh()


def coarse_values(field, coords: torch.Tensor, corners: np.ndarray, threshold: float) -> np.ndarray:
    """density − threshold (float64, as the dense path computes it) at the coarse samples, a few x at a time."""
    r = len(coords)
    square = np.zeros((r, r), dtype=bool)
    square[np.ix_(corners, corners)] = True
    out = []
    for i in range(0, len(corners), SLICES_PER_CALL):
        xs = corners[i:i + SLICES_PER_CALL]
        mask = torch.from_numpy(np.broadcast_to(square, (len(xs), r, r)).copy())
        out.append(field.grid_density_where(coords, torch.from_numpy(xs), mask)[:, corners][:, :, corners].cpu())
    return torch.cat(out).numpy().astype(np.float64) - threshold


def log_level(g: np.ndarray, threshold: float) -> np.ndarray:
    """log(density / threshold): the same sign as density − threshold, on the scale of the models' raw output
    (density = exp(raw) or softplus(raw)), where the field varies evenly; density − threshold itself is flat
    outside and steep inside, so its slopes say little about what lies between two samples."""
    return np.log(np.maximum(g + threshold, 1e-30)) - np.log(threshold)


def block_corners(g: np.ndarray):
    """Lowest and highest of the eight coarse corners of each block: (n, n, n) each."""
    corners = [g[i:g.shape[0] - 1 + i, j:g.shape[1] - 1 + j, k:g.shape[2] - 1 + k]
               for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    return np.minimum.reduce(corners), np.maximum.reduce(corners)


def candidate_blocks(g: np.ndarray, level: np.ndarray, margin_scale: float) -> np.ndarray:
    """Blocks (n, n, n) the surface may cross, from the coarse samples (n+1)³ of g = density − threshold
    and of ``level``, an increasing function of density that is 0 at the threshold: a sign change of g at
    the corners, or the corner level nearest zero within the margin (local curvature of level × scale)."""
    lo, hi = block_corners(g)
    crossing = (lo <= 0) & (hi > 0)
    if not margin_scale:
        return crossing
    # Curvature at each coarse sample: the sum over axes of |second difference| (the edge value is
    # repeated at the border). Then the largest over the block's corners and its 26 neighbours' corners.
    padded = np.pad(level, 1, mode="edge")
    curvature = sum(np.abs(np.diff(padded, n=2, axis=axis))[tuple(slice(1, -1) if a != axis else slice(None)
                                                                    for a in range(3))]
                    for axis in range(3))
    variation = F.max_pool3d(torch.from_numpy(block_corners(curvature)[1])[None, None], 3, stride=1,
                             padding=1)[0, 0].numpy()
    lo, hi = block_corners(level)
    nearest = np.where(lo > 0, lo, -hi)  # distance of the corner levels to zero when they share a sign
    return crossing | (nearest <= margin_scale * variation)


def leaking_faces(values: torch.Tensor, bx: int, batch: np.ndarray, n: int) -> np.ndarray:
    """Neighbours (K, 3) of the blocks (bx, batch[b]) across faces where the block's samples (values[b])
    change sign: the surface goes on there (the refinement check). A padded block's far face repeats its
    last samples; it lies at the grid's end, where there is no neighbour."""
    blocks = np.concatenate([np.full((len(batch), 1), bx), batch], axis=1)
    out = []
    for axis in range(3):
        for side, face in ((-1, values.select(axis + 1, 0)), (1, values.select(axis + 1, -1))):
            flat = face.reshape(len(batch), -1)
            neighbours = blocks[((flat > 0).any(1) & (flat <= 0).any(1)).cpu().numpy()]
            neighbours[:, axis] += side
            out.append(neighbours[(neighbours[:, axis] >= 0) & (neighbours[:, axis] < n)])
    return np.concatenate(out)


def colored_surface(field, resolution: int, threshold: float, stages, dense: bool = False):
    """The pipeline's last two stages for any field: marching cubes (``dense``: every grid point), then the
    field's colour at every vertex. Returns vertices (N, 3) float64, faces (M, 3), colours (N, 3) float32,
    in the field's frame."""
    from .errors import InputError
    from .stages import COLOR, SURFACE

    stages.begin(SURFACE, f"marching cubes at {resolution}³" + (" (dense)" if dense else ""))
    vertices, faces = marching_cubes(field, resolution, threshold, on_fraction=stages.update, dense=dense)
    if len(faces) == 0:
        raise InputError(f"no surface found at threshold {threshold:g}: the model sees no object here",
                         hint="Lower the threshold, or use an image with one clear object.")
    stages.begin(COLOR, "colouring vertices")
    # float32 vertices, as the references query them
    _, colors = field.query(torch.from_numpy(vertices.astype(np.float32)))
    return vertices, faces, colors.cpu().numpy()


def weld(vertices: np.ndarray, faces: np.ndarray, decimals: int = 6):
    """Merge vertices equal to ``decimals`` (in grid units), drop faces that collapse and unused vertices.
    Vertices on a boundary shared by two slabs or blocks, or snapped to a grid point, arrive more than once."""
    _, first, inverse = np.unique(np.round(vertices, decimals), axis=0, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1).astype(np.int32)[faces]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    faces = faces[keep]
    used = np.zeros(len(first), dtype=bool)
    used[faces.reshape(-1)] = True
    new_index = np.cumsum(used, dtype=np.int32) - 1  # old welded index -> index among the used ones
    return vertices[first[used]], new_index[faces]
