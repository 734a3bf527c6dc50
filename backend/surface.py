"""Surface extraction from a density field: marching cubes slab by slab, welding, vertex colours.

The grid is evaluated one x slice at a time and triangulated in slabs (neighbouring slabs share a slice),
so memory stays bounded at any resolution: the full R³ density grid never exists. Marching cubes is our
own (``marching_cubes.py``), on the field's device, with PyMCubes' vertex positions and outward winding, as
the references have them (surface where ``density == threshold``, inside where density is higher).
"""

from __future__ import annotations

import numpy as np
import torch

from . import marching_cubes as mc

# Density kept for one marching-cubes slab (as float64); bounds memory whatever the resolution.
SLAB_BYTES = 32 << 20


def grid_coords(resolution: int, radius: float) -> torch.Tensor:
    """The R grid positions along each axis, world units, as the reference computes them."""
    return torch.linspace(0, 1, resolution) * (2 * radius) - radius


def marching_cubes(field, resolution: int, threshold: float, on_fraction=None):
    """Triangulate ``field.grid_density`` at ``threshold``. Returns world vertices (N, 3) float64 and faces
    (M, 3) int32, welded, in the field's frame. ``on_fraction(f)`` is called after each x slice (it may
    raise to cancel)."""
    coords = grid_coords(resolution, field.radius)
    per_slab = max(2, SLAB_BYTES // (resolution * resolution * 8))
    verts, faces, n_verts = [], [], 0
    slab, start = [], 0  # slices of the current slab; ``start`` is the x index of slab[0]

    def triangulate():
        nonlocal n_verts
        v, f = mc.marching_cubes(torch.stack(slab), offset=(start, 0, 0))
        if len(f):
            verts.append(v.cpu().numpy())
            faces.append(f.cpu().numpy().astype(np.int32) + np.int32(n_verts))  # int32: half a big mesh's memory
            n_verts += len(v)

    for i, density in enumerate(field.grid_density(coords)):
        slab.append(density.to(_mc_device(density.device), torch.float64) - threshold)
        if len(slab) == per_slab:
            triangulate()
            slab, start = slab[-1:], i  # cells between two slabs need the shared slice on both sides
        if on_fraction:
            on_fraction((i + 1) / resolution)
    if len(slab) >= 2:
        triangulate()
    if not faces:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int32)
    v, f = weld(np.concatenate(verts), np.concatenate(faces))
    return v / (resolution - 1) * (2 * field.radius) - field.radius, f


def _mc_device(device: torch.device) -> torch.device:
    """Where marching cubes runs: beside the density, except on MPS, which has no float64."""
    return torch.device("cpu") if device.type == "mps" else device


def colored_surface(field, resolution: int, threshold: float, stages):
    """The pipeline's last two stages for any field: marching cubes, then the field's colour at every
    vertex. Returns vertices (N, 3) float64, faces (M, 3), colours (N, 3) float32, in the field's frame."""
    from .errors import InputError
    from .stages import COLOR, SURFACE

    stages.begin(SURFACE, f"marching cubes at {resolution}³")
    vertices, faces = marching_cubes(field, resolution, threshold, on_fraction=stages.update)
    if len(faces) == 0:
        raise InputError(f"no surface found at threshold {threshold:g}: the model sees no object here",
                         hint="Lower the threshold, or use an image with one clear object.")
    stages.begin(COLOR, "colouring vertices")
    # float32 vertices, as the references query them
    _, colors = field.query(torch.from_numpy(vertices.astype(np.float32)))
    return vertices, faces, colors.cpu().numpy()


def weld(vertices: np.ndarray, faces: np.ndarray, decimals: int = 6):
    """Merge vertices equal to ``decimals`` (in grid units), drop faces that collapse and unused vertices.
    Vertices on a slice shared by two slabs, or snapped to a grid corner, arrive more than once."""
    _, first, inverse = np.unique(np.round(vertices, decimals), axis=0, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1).astype(np.int32)[faces]
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    faces = faces[keep]
    used = np.zeros(len(first), dtype=bool)
    used[faces.reshape(-1)] = True
    new_index = np.cumsum(used, dtype=np.int32) - 1  # old welded index -> index among the used ones
    return vertices[first[used]], new_index[faces]
