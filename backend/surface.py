"""Surface extraction from a density field: marching cubes, welding, vertex colours.

Two paths give the same mesh:

- **coarse to fine** (the default, :func:`coarse_to_fine`): the field is sampled on a coarse grid (every
  :func:`coarse_step` grid points); the blocks between coarse samples that the surface can pass through are
  halved level by level (each level evaluates the 19 samples between a block's corners and keeps the
  halves that can hold surface) down to single cells, the crossed cells are completed over their faces
  and triangulated. Cost follows the surface's area, not the volume: 2 to 3 times the corners of the
  crossed cells are evaluated, and memory is those samples, whatever the resolution.
- **dense** (:func:`dense_marching_cubes`, ``Options.dense``, ``generate --dense``): every grid point, one x
  slice at a time, triangulated in slabs. The comparison, and the fallback.

Marching cubes is our own (``marching_cubes.py``), on the field's device, with PyMCubes' vertex positions,
triangles and outward winding, as the references have them (surface where ``density == threshold``, inside
where density is higher). A cell's triangles and an edge's vertex depend only on the cell's eight values, so
the crossed cells alone, welded, give exactly the dense mesh, provided their values are the dense grid's
(both paths evaluate through ``grid_density_points``, whose values do not depend on which points are asked
together) and no crossed cell is missed. Faces are put in grid-cell order, so even the face order is the
dense path's.

Which blocks hold surface (the guard). A block is kept when density − threshold changes sign at its eight
corners, or when the corners come within a margin of the threshold. The margin is measured on the field,
on the scale of the models' raw output, level = log(density / threshold): at the coarse grid,
``MARGIN_SCALE`` × the largest curvature (sum over the axes of |second difference| of level) at the coarse
samples of the block and its 26 neighbours; each halving divides it by ``MARGIN_SHRINK`` (2: second
differences of a smooth field shrink 4× with the spacing, but across a kink between texels only 2×).
Between its corners a field departs from their (trilinear) interpolation by at most about 1/8 of its
second differences, so a margin of 8 times that bound covers what the corners cannot show; a thin sheet, a
speck or a bump that only grazes the threshold between samples bends the samples around it, and that
curvature opens the margin there, while a smooth slope (most of space) costs nothing.
Then the refinement check, over cells: a face on which the corners of a crossed cell change sign is crossed,
so the cell beyond it is crossed too; it is evaluated, and its faces followed, until none leads anywhere
new. A surface piece of which one cell was found is therefore complete, with no hole or seam (a piece the
halving only clips is found this way); only a piece that lies wholly inside dropped blocks *and* leaves too
little curvature on their samples can be missed. ``margin_scale=0`` turns the guard off (the mutation test:
a thin sheet is then lost).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import marching_cubes as mc

# Density kept for one marching-cubes slab (as float64); bounds memory whatever the resolution.
SLAB_BYTES = 32 << 20
# Grid cells per coarse block side: the power of two at or below R // BLOCKS_PER_AXIS, at least
# MIN_COARSE_STEP. 32 blocks per axis put a coarse sample every two texels of the models' 64×64 planes; the
# tiny models' tests (16×16 planes) show the guard holding up to that spacing.
MIN_COARSE_STEP, BLOCKS_PER_AXIS = 4, 32


def coarse_step(resolution: int) -> int:
    return max(MIN_COARSE_STEP, 1 << max(0, (resolution // BLOCKS_PER_AXIS).bit_length() - 1))


MARGIN_SCALE = 1.0  # the guard: margin = this × the local curvature of the coarse samples (0 turns it off;
# 0.5 loses pieces in tests/test_surface.py: the grazing bumps, the tiny TripoSR with 32-cell blocks)
# Each halving divides the margin by this. A smooth field's second differences shrink 4× per halving, but
# across a kink between texels of the planes (bilinear features) only 2×: with 4, the tiny random-weight
# TripoSR loses pieces once the coarse step reaches a texel.
MARGIN_SHRINK = 2.0
GROUP_POINTS = 1 << 18  # grid points evaluated between two progress calls (a cancel waits that long)
CHUNK_BLOCKS = 1 << 16  # blocks refined at once (bounds the memory of their samples' indices)


def grid_coords(resolution: int, radius: float) -> torch.Tensor:
    """The R grid positions along each axis, world units, as the reference computes them."""
    return torch.linspace(0, 1, resolution) * (2 * radius) - radius


def marching_cubes(field, resolution: int, threshold: float, on_fraction=None, dense: bool = False,
                   stats=None):
    """Triangulate the field's density at ``threshold``. Returns world vertices (N, 3) float64 and faces
    (M, 3) int32, welded, in the field's frame. Coarse to fine unless ``dense`` (or the field cannot be
    evaluated at chosen grid points, ``grid_density_points``). ``on_fraction(f)`` is called as work proceeds
    (it may raise to cancel). ``stats``, a dict, receives ``evaluations`` (field evaluations made) and,
    coarse to fine, ``blocks`` (coarse blocks kept), ``cells`` (crossed) and ``cells_by_faces`` (of those,
    found by the refinement check)."""
    try:
        if dense or not hasattr(field, "grid_density_points") or resolution <= 4 * MIN_COARSE_STEP:
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
        cells, faces = np.concatenate(self.cells), np.concatenate(self.faces)
        if len(cells) > 1 and (cells[1:] < cells[:-1]).any():  # pieces added out of grid order
            faces = faces[np.argsort(cells, kind="stable")]
        v, f = weld(np.concatenate(self.verts), faces)
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
    """:func:`marching_cubes` evaluating the field only where the surface can pass (see the module's
    docstring): coarse samples every ``step`` (a power of two) grid points, candidate blocks halved level by
    level down to cells, then the crossed cells closed over their faces. Memory: the samples of the
    candidate blocks, a few times the crossed cells, whatever the resolution."""
    step = step or coarse_step(resolution)
    if step < 2 or step & (step - 1):
        raise ValueError(f"the coarse step must be a power of two, got {step}")
    r = resolution
    halvings = step.bit_length() - 1
    # the coarse grid, each halving (the samples double with each), the cells and their triangles
    progress = _Progress(on_fraction, [2.0 ** i for i in range(halvings + 1)] + [2.0 ** (halvings - 1)])
    sampler = _Sampler(field, r, threshold)
    n = -(-(r - 1) // step)  # blocks per axis (the last one may be thinner)
    corners = torch.clamp(torch.arange(n + 1, device=sampler.device) * step, max=r - 1)
    coarse = sampler(((corners[:, None, None] * r + corners[None, :, None]) * r + corners[None, None, :]),
                     progress.part(0))
    chosen, margin = candidate_blocks(coarse, sampler.level(coarse), margin_scale)
    at = torch.nonzero(chosen)
    blocks = at * step
    values = torch.stack([coarse[at[:, 0] + i, at[:, 1] + j, at[:, 2] + k] for i, j, k in CHILDREN.tolist()],
                         dim=1).reshape(-1, 2, 2, 2)
    margins, size = margin[chosen], step
    for level in range(1, halvings + 1):
        blocks, values, margins = refine(sampler, blocks, values, margins, size, margin_scale,
                                         progress.part(level))
        size //= 2
    cells, values = close_over_faces(sampler, blocks, values)
    pieces = _Pieces(r, field.radius)
    for part, part_values in zip(cells.split(CHUNK_BLOCKS), values.split(CHUNK_BLOCKS)):
        pieces.add(part_values, part)
    progress.part(halvings + 1)(1.0)
    if stats is not None:
        stats.update(evaluations=int(sampler.evaluations), blocks=len(at), cells=len(cells),
                     cells_by_faces=len(cells) - len(blocks))
    return pieces.mesh()


class _Sampler:
    """density − threshold (float64, as the dense path computes it) at grid points given by linear index."""

    def __init__(self, field, resolution: int, threshold: float):
        self.field, self.resolution, self.threshold = field, resolution, threshold
        self.device = _mc_device(getattr(field, "device", torch.device("cpu")))
        self.coords = grid_coords(resolution, field.radius)
        self.evaluations = 0

    def level(self, g: torch.Tensor) -> torch.Tensor:
        """The scale the guard measures curvature on: a signed field's (``field.signed``: an SDF, TripoSG's)
        own value, evenly varying already; a density's :func:`log_level`."""
        return g if getattr(self.field, "signed", False) else log_level(g, self.threshold)

    def __call__(self, keys: torch.Tensor, on_fraction=None) -> torch.Tensor:
        """Values at the grid points ``keys`` (any shape), each distinct point evaluated once, in sorted
        groups (a group spans few x slices) with ``on_fraction`` after each."""
        r = self.resolution
        wanted, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        out = torch.empty(len(wanted), dtype=torch.float64, device=self.device)
        groups = wanted.split(GROUP_POINTS)
        for g, part in enumerate(groups):
            xs, a = torch.unique_consecutive(part // (r * r), return_inverse=True)
            density = self.field.grid_density_points(self.coords, xs, a, part // r % r, part % r)
            out[g * GROUP_POINTS:g * GROUP_POINTS + len(part)] = density.to(self.device, torch.float64) - self.threshold
            if on_fraction:
                on_fraction((g + 1) / len(groups))
        self.evaluations += len(wanted)
        return out[inverse].reshape(keys.shape)


class _Progress:
    """Progress over consecutive parts of the given relative costs, never going back."""

    def __init__(self, on_fraction, costs):
        self.on_fraction, self.done = on_fraction, 0.0
        self.ends = np.cumsum(costs) / np.sum(costs)

    def part(self, index: int):
        start, end = (self.ends[index - 1] if index else 0.0), self.ends[index]

        def report(fraction: float) -> None:
            self.done = max(self.done, start + (end - start) * fraction)
            if self.on_fraction:
                self.on_fraction(1.0 if index == len(self.ends) - 1 and fraction >= 1 else self.done)
        return report


def lattice(corner: torch.Tensor, spacing: int, along: int, resolution: int) -> torch.Tensor:
    """Linear indices (N, along, along, along) of the grid points corner + spacing × (i, j, k), i, j, k <
    ``along``, for blocks at ``corner`` (N, 3); points past the grid's end are clamped to it (a thinner block)."""
    r = resolution
    offsets = torch.arange(along, device=corner.device) * spacing
    x, y, z = ((corner[:, axis, None] + offsets).clamp(max=r - 1) for axis in range(3))
    return (x[:, :, None, None] * r + y[:, None, :, None]) * r + z[:, None, None, :]


def linear_index(at: torch.Tensor, resolution: int) -> torch.Tensor:
    return (at[:, 0] * resolution + at[:, 1]) * resolution + at[:, 2]


CHILDREN = torch.tensor([(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)])
_LATTICE_CORNER = torch.zeros((3, 3, 3), dtype=torch.bool)
_LATTICE_CORNER[::2, ::2, ::2] = True


def refine(sampler: _Sampler, blocks: torch.Tensor, values: torch.Tensor, margins: torch.Tensor, size: int,
           margin_scale: float, on_fraction) -> tuple:
    """The halves (size / 2) of candidate blocks the surface may cross: blocks (N, 3) with their corner
    values (N, 2, 2, 2) and margins (N,) -> the same for the halves kept. The 19 samples between each
    block's corners are evaluated; a half is kept when its eight corners change sign, or (above the cell
    level) when its corner level nearest zero lies within its margin, the block's / ``MARGIN_SHRINK``."""
    half, r = size // 2, sampler.resolution
    kept = [], [], []
    inner = ~_LATTICE_CORNER.to(blocks.device)
    chunks = list(zip(blocks.split(CHUNK_BLOCKS), values.split(CHUNK_BLOCKS), margins.split(CHUNK_BLOCKS)))
    for c, (corner, corner_values, margin) in enumerate(chunks):
        g = corner_values.new_empty((len(corner), 3, 3, 3))
        g[:, ::2, ::2, ::2] = corner_values
        g[:, inner] = sampler(lattice(corner, half, 3, r)[:, inner],
                              lambda f, c=c: on_fraction((c + f) / len(chunks)))
        # the eight halves' corners (N, 8, 2, 2, 2), halves in CHILDREN's order
        halves = g.unfold(1, 2, 1).unfold(2, 2, 1).unfold(3, 2, 1).reshape(len(g), 8, 2, 2, 2)
        flat = halves.reshape(len(g), 8, 8)
        keep = (flat <= 0).any(-1) & (flat > 0).any(-1)
        half_margin = margin / MARGIN_SHRINK
        if half > 1 and margin_scale:
            levels = sampler.level(flat)
            lo, hi = levels.amin(-1), levels.amax(-1)
            keep |= torch.where(lo > 0, lo, -hi) <= half_margin[:, None]
        at = corner[:, None, :] + CHILDREN.to(corner.device) * half  # (N, 8, 3)
        keep &= (at < r - 1).all(-1)  # a half past the grid's end (of a thinner block) has no cell
        for out, part in zip(kept, (at, halves, half_margin[:, None].expand(-1, 8))):
            out.append(part[keep])
    return tuple(torch.cat(parts) for parts in kept) if chunks else (blocks, values, margins)


def close_over_faces(sampler: _Sampler, cells: torch.Tensor, values: torch.Tensor) -> tuple:
    """The crossed cells (N, 3) with their corner values (N, 2, 2, 2), completed over their faces and sorted
    (x-major): a face on which the corners change sign is crossed, so the cell on its other side is crossed
    too; its corners are evaluated and its own faces followed, until none leads anywhere new. A surface
    piece of which one cell was found is therefore found whole (the refinement check)."""
    r = sampler.resolution
    keys = linear_index(cells, r)
    order = torch.argsort(keys)
    known, cells, values = keys[order], cells[order], values[order]
    found = [(cells, values)]
    frontier, frontier_keys, frontier_values = cells, known, values
    while len(frontier):
        inside = (frontier_values <= 0).reshape(len(frontier), 2, 2, 2)
        beyond = []
        for axis, stride in enumerate((r * r, r, 1)):
            for side in (0, 1):
                face = inside.select(axis + 1, side).reshape(len(frontier), 4)
                at = frontier[:, axis] + 2 * side - 1
                crossed = face.any(1) & ~face.all(1) & (at >= 0) & (at < r - 1)
                beyond.append(frontier_keys[crossed] + (2 * side - 1) * stride)
        beyond = torch.cat(beyond)
        where = torch.searchsorted(known, beyond).clamp(max=len(known) - 1)
        frontier_keys = torch.unique(beyond[known[where] != beyond])
        frontier = torch.stack([frontier_keys // (r * r), frontier_keys // r % r, frontier_keys % r], dim=1)
        frontier_values = sampler(lattice(frontier, 1, 2, r))
        known = torch.sort(torch.cat([known, frontier_keys])).values
        found.append((frontier, frontier_values))
    if len(found) == 2:  # nothing new (the last part is empty)
        return cells, values
    cells, values = (torch.cat(parts) for parts in zip(*found))
    order = torch.argsort(linear_index(cells, r))
    return cells[order], values[order]


def second_difference(padded: torch.Tensor, axis: int) -> torch.Tensor:
    """Second difference along ``axis`` of a grid padded by one on every side, at the inner points."""
    parts = []
    for shift in range(3):
        index = [slice(1, -1)] * 3
        index[axis] = slice(shift, padded.shape[axis] - 2 + shift)
        parts.append(padded[tuple(index)])
    return parts[0] - 2 * parts[1] + parts[2]


def log_level(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """log(density / threshold): the same sign as density − threshold, on the scale of the models' raw output
    (density = exp(raw) or softplus(raw)), where the field varies evenly; density − threshold itself is flat
    outside and steep inside, so its slopes say little about what lies between two samples."""
    return torch.log(torch.clamp(g + threshold, min=1e-30)) - math.log(threshold)


def block_corners(g: torch.Tensor):
    """Lowest and highest of the eight coarse corners of each block: (n, n, n) each."""
    corners = torch.stack([g[i:g.shape[0] - 1 + i, j:g.shape[1] - 1 + j, k:g.shape[2] - 1 + k]
                           for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    return corners.amin(0), corners.amax(0)


def candidate_blocks(g: torch.Tensor, level: torch.Tensor, margin_scale: float):
    """Blocks (n, n, n) the surface may cross, from the coarse samples (n+1)³ of g = density − threshold
    and of ``level``, an increasing function of density that is 0 at the threshold: a sign change of g at
    the corners, or the corner level nearest zero within the margin (local curvature of level × scale).
    Returns the blocks (bool) and their margins."""
    lo, hi = block_corners(g)
    crossing = (lo <= 0) & (hi > 0)
    if not margin_scale:
        return crossing, torch.zeros_like(g[1:, 1:, 1:])
    # Curvature at each coarse sample: the sum over axes of |second difference| (the edge value is
    # repeated at the border). Then the largest over the block's corners and its 26 neighbours' corners.
    padded = F.pad(level[None, None], (1,) * 6, mode="replicate")[0, 0]
    curvature = sum(second_difference(padded, axis).abs() for axis in range(3))
    margin = margin_scale * F.max_pool3d(block_corners(curvature)[1][None, None], 3, stride=1, padding=1)[0, 0]
    lo, hi = block_corners(level)
    nearest = torch.where(lo > 0, lo, -hi)  # distance of the corner levels to zero when they share a sign
    return crossing | (nearest <= margin), margin


def colored_surface(field, resolution: int, threshold: float, stages, dense: bool = False):
    """The pipeline's last two stages for any field: marching cubes (``dense``: every grid point), then the
    field's colour at every vertex. Returns vertices (N, 3) float64, faces (M, 3), colours (N, 3) float32,
    in the field's frame."""
    from .errors import InputError
    from .protocol import Stage

    stages.begin(Stage.SURFACE, f"marching cubes at {resolution}³" + (" (dense)" if dense else ""))
    vertices, faces = marching_cubes(field, resolution, threshold, on_fraction=stages.update, dense=dense)
    if len(faces) == 0:
        raise InputError(f"no surface found at threshold {threshold:g}: the model sees no object here",
                         hint="Lower the threshold, or use an image with one clear object.")
    stages.begin(Stage.COLOR, "colouring vertices")
    # float32 vertices, as the references query them
    _, colors = field.query(torch.from_numpy(vertices.astype(np.float32)))
    return vertices, faces, colors.cpu().numpy()


def weld(vertices: np.ndarray, faces: np.ndarray, decimals: int = 6):
    """Merge vertices equal to ``decimals`` (in grid units), drop faces that collapse and unused vertices.
    Vertices on a boundary shared by two slabs or blocks, or snapped to a grid point, arrive more than once.
    The vertices come out in lexicographic order of their rounded positions, the first of equal ones kept
    (``np.unique(axis=0)``'s result, by a stable lexsort: several times faster)."""
    rounded = np.round(vertices, decimals)
    order = np.lexsort(rounded.T[::-1])
    ordered = rounded[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    inverse = np.empty(len(order), dtype=np.int32)
    inverse[order] = np.cumsum(starts, dtype=np.int32) - 1
    first = order[starts]
    faces = inverse[faces]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    faces = faces[keep]
    used = np.zeros(len(first), dtype=bool)
    used[faces.reshape(-1)] = True
    new_index = np.cumsum(used, dtype=np.int32) - 1  # old welded index -> index among the used ones
    return vertices[first[used]], new_index[faces]
