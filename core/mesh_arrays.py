"""Mesh arrays as Blender wants them: scaled, resting on the origin, colours in linear RGBA.

numpy only (no bpy) so plain pytest covers it; ``import_mesh.py`` is the thin bpy adapter.
"""

from __future__ import annotations

import numpy as np


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB display values in [0, 1] -> linear values (the IEC 61966-2-1 curve Blender uses)."""
    c = np.clip(np.asarray(srgb, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(linear, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1 / 2.4) - 0.055).astype(np.float32)


def linear_rgba(srgb_colors: np.ndarray) -> np.ndarray:
    """(N, 3|4) sRGB colours -> (N, 4) linear RGBA float32 for a FLOAT_COLOR attribute (alpha kept or 1)."""
    colors = np.asarray(srgb_colors, dtype=np.float32)
    colors = colors.reshape(-1, colors.shape[-1] if colors.ndim == 2 else 3)
    rgba = np.ones((len(colors), 4), dtype=np.float32)
    rgba[:, :3] = srgb_to_linear(colors[:, :3])
    if colors.shape[1] == 4:
        rgba[:, 3] = np.clip(colors[:, 3], 0.0, 1.0)
    return rgba


def bounds(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    if len(vertices) == 0:
        return np.zeros(3, np.float32), np.zeros(3, np.float32)
    return vertices.min(axis=0), vertices.max(axis=0)


def scale_to_height(vertices: np.ndarray, target_height: float) -> np.ndarray:
    """Scale uniformly so the Z extent is ``target_height``; 0 (or a flat mesh) keeps model units."""
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    lo, hi = bounds(vertices)
    height = float(hi[2] - lo[2])
    if target_height <= 0 or height <= 1e-12:
        return vertices.copy()
    return (vertices * np.float32(target_height / height)).astype(np.float32)


def rest_on_origin(vertices: np.ndarray) -> np.ndarray:
    """Shift so the bounding box is centred on X and Y and its lowest point is at Z = 0: placed at the
    3D cursor, the object then stands on it."""
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    lo, hi = bounds(vertices)
    offset = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]], dtype=np.float32)
    return (vertices - offset).astype(np.float32)


def prepare(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, target_height: float = 0.0):
    """Everything the importer needs, as flat contiguous arrays ready for ``foreach_set``.

    Returns (positions float32 (N*3,), corner_verts int32 (M*3,), loop_starts int32 (M,), rgba float32 (N*4,)).
    """
    faces = np.asarray(faces, dtype=np.int32).reshape(-1, 3)
    vertices = rest_on_origin(scale_to_height(vertices, target_height))
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError("face index out of range")
    positions = np.ascontiguousarray(vertices, dtype=np.float32).ravel()
    corner_verts = np.ascontiguousarray(faces, dtype=np.int32).ravel()
    loop_starts = np.arange(0, 3 * len(faces), 3, dtype=np.int32)
    rgba = np.ascontiguousarray(linear_rgba(colors), dtype=np.float32).ravel()
    return positions, corner_verts, loop_starts, rgba
