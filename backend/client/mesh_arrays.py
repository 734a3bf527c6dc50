"""Mesh arrays as Blender wants them: scaled, resting on the origin, faces as loops (triangles and quads),
colours in linear RGBA, UVs per loop, textures as Blender pixel buffers; and the way back to the backend's
frame for a bake request.

numpy only (no bpy) so plain pytest covers it; ``import_mesh.py`` is the thin bpy adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..colour import srgb_to_linear


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


def _height_scale(lo: np.ndarray, hi: np.ndarray, target_height: float) -> float:
    """The uniform scale that makes the Z extent ``target_height``; 1 for 0 (model units) or a flat mesh."""
    height = float(hi[2] - lo[2])
    return float(target_height / height) if target_height > 0 and height > 1e-12 else 1.0


def _rest_offset(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """What to subtract so the box is centred on X and Y with its lowest point at Z = 0."""
    return np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]], dtype=np.float32)


def scale_to_height(vertices: np.ndarray, target_height: float) -> np.ndarray:
    """Scale uniformly so the Z extent is ``target_height``; 0 (or a flat mesh) keeps model units."""
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    return (vertices * np.float32(_height_scale(*bounds(vertices), target_height))).astype(np.float32)


def rest_on_origin(vertices: np.ndarray) -> np.ndarray:
    """Shift so the bounding box is centred on X and Y and its lowest point is at Z = 0: placed at the
    3D cursor, the object then stands on it."""
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    return (vertices - _rest_offset(*bounds(vertices))).astype(np.float32)


@dataclass
class MeshArrays:
    """Flat contiguous arrays ready for ``foreach_set``, and the placement that made the positions:
    object-local = backend_vertex * scale - offset."""

    positions: np.ndarray  # float32 (N*3,)
    corner_verts: np.ndarray  # int32 (L,), L = loop_totals.sum()
    loop_starts: np.ndarray  # int32 (P,)
    loop_totals: np.ndarray  # int32 (P,), 3 or 4
    rgba: np.ndarray  # float32 (N*4,), linear
    uvs: np.ndarray | None  # float32 (L*2,), one UV per loop
    scale: float
    offset: np.ndarray  # float32 (3,)


def placement(vertices: np.ndarray, target_height: float = 0.0) -> tuple[float, np.ndarray]:
    """(scale, offset) such that ``vertices * scale - offset`` is scaled to ``target_height`` (0: model units)
    and rests on the origin (see :func:`scale_to_height` and :func:`rest_on_origin`)."""
    lo, hi = bounds(vertices)
    scale = _height_scale(lo, hi, target_height)
    return scale, _rest_offset(lo * np.float32(scale), hi * np.float32(scale))  # the scaled mesh's bounds


def to_backend_frame(local: np.ndarray, scale: float, offset) -> np.ndarray:
    """Object-local positions back in the frame the backend made them in (the inverse of the placement)."""
    local = np.asarray(local, dtype=np.float64).reshape(-1, 3)
    return ((local + np.asarray(offset, dtype=np.float64)) / float(scale)).astype(np.float32)


def face_loops(faces: np.ndarray, vertex_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Triangles (M, 3) or quad-dominant faces (M, 4, -1 in the last column for a triangle) ->
    (corner_verts (L,), loop_totals (F,), kept (M,) the faces kept, corners (M, K) the corners that are loops).

    Blender takes a polygon that names a vertex twice for corrupt data, so a corner equal to the next one is
    dropped (a quad (a, a, b, c) is the triangle (a, b, c)) and a face left with fewer than three distinct
    corners, or with a vertex twice apart, is dropped whole."""
    faces = np.asarray(faces)
    width = faces.shape[1] if faces.ndim == 2 and faces.shape[1] in (3, 4) else 3
    faces = faces.astype(np.int32, copy=False).reshape(-1, width)
    corners = faces >= 0
    if width == 4 and not corners[:, :3].all():
        raise ValueError("only the fourth corner of a face may be empty (-1)")
    if width == 3 and not corners.all():
        raise ValueError("face index out of range")
    if corners.any() and faces.max() >= vertex_count:
        raise ValueError("face index out of range")
    following = np.roll(faces, -1, axis=1)
    if width == 4:
        triangle = ~corners[:, 3]
        following[triangle, 2] = faces[triangle, 0]  # a triangle's third corner is followed by its first
    corners &= faces != following
    kept = corners.sum(axis=1) >= 3
    if width == 4:  # a vertex twice but not in a row: across a quad's diagonal
        kept &= ~(corners[:, 3] & ((faces[:, 0] == faces[:, 2]) | (faces[:, 1] == faces[:, 3])))
    if not kept.all():
        corners &= kept[:, None]
    corner_verts = np.ascontiguousarray(faces[corners], dtype=np.int32)  # row by row: each face's loops in order
    return corner_verts, corners.sum(axis=1)[kept].astype(np.int32), kept, corners


def loop_starts(loop_totals: np.ndarray) -> np.ndarray:
    totals = np.asarray(loop_totals, dtype=np.int32)
    starts = np.zeros(len(totals), dtype=np.int32)
    np.cumsum(totals[:-1], out=starts[1:])
    return starts


def prepare(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, target_height: float = 0.0,
            uvs: np.ndarray | None = None, place: tuple[float, np.ndarray] | None = None) -> MeshArrays:
    """Everything the importer needs. ``uvs`` are per face corner (M, K, 2) as the backend sends them;
    ``place`` reuses a placement (scale, offset) instead of computing one from these vertices, so that a
    remade mesh lands exactly where the one it replaces was."""
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    scale, offset = place if place is not None else placement(vertices, target_height)
    offset = np.asarray(offset, dtype=np.float32).reshape(3)
    local = (vertices * np.float32(scale) - offset).astype(np.float32)
    corner_verts, totals, _, corners = face_loops(faces, len(vertices))
    loop_uvs = None
    if uvs is not None:
        uvs = np.asarray(uvs, dtype=np.float32).reshape(corners.shape[0], corners.shape[1], 2)
        loop_uvs = np.ascontiguousarray(uvs[corners], dtype=np.float32).ravel()
    return MeshArrays(
        positions=np.ascontiguousarray(local, dtype=np.float32).ravel(),
        corner_verts=corner_verts,
        loop_starts=loop_starts(totals),
        loop_totals=totals,
        rgba=np.ascontiguousarray(linear_rgba(colors), dtype=np.float32).ravel(),
        uvs=loop_uvs,
        scale=float(scale),
        offset=offset,
    )


def bake_request(local_positions: np.ndarray, corner_verts: np.ndarray, loop_totals: np.ndarray,
                 scale: float, offset, uvs: np.ndarray | None = None) -> dict:
    """The arrays of a bake request's mesh file: an edited Blender mesh back in the backend's frame, its
    faces as loops (any polygon size), and its UV map per loop when it has one."""
    arrays = {
        "vertices": to_backend_frame(local_positions, scale, offset),
        "corner_verts": np.ascontiguousarray(corner_verts, dtype=np.int32).ravel(),
        "loop_totals": np.ascontiguousarray(loop_totals, dtype=np.int32).ravel(),
    }
    if uvs is not None:
        arrays["uvs"] = np.ascontiguousarray(uvs, dtype=np.float32).reshape(-1, 2)
    return arrays


def texture_pixels(texture: np.ndarray) -> np.ndarray:
    """(H, W, 3) sRGB bytes, top row first -> Blender's pixel buffer for a byte image: float32 RGBA (H*W*4,),
    bottom row first, values k/255 (a byte image's buffer is not linearised)."""
    texture = np.asarray(texture)
    if texture.ndim != 3 or texture.shape[2] not in (3, 4) or texture.dtype != np.uint8:
        raise ValueError("the texture must be (H, W, 3) bytes")
    height, width = texture.shape[:2]
    rgba = np.ones((height, width, 4), dtype=np.float32)
    rgba[..., :3] = texture[::-1, :, :3] * np.float32(1 / 255)
    return rgba.ravel()
