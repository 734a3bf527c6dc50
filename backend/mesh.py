"""The mesh the pipeline returns, and writing it to .npz / .glb / .ply / .obj.

Arrays are in Blender's frame (Z up, the input view is the Front view, the object faces -Y) with
outward winding. Colours are sRGB display values in [0, 1]. Writers convert to each format's own
convention so that Blender's default importers put the mesh where the .npz puts it.
Every file is written to a temporary name beside the target and renamed into place at the end, so a
failed or cancelled run never leaves a partial file under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

FORMATS = (".npz", ".glb", ".ply", ".obj")


@dataclass
class Mesh:
    """A generated mesh. ``faces`` holds triangles (M, 3), or up to quads (M, 4) where a triangle has -1 in
    its last column. ``uvs`` are per face corner (M, K, 2), K = faces.shape[1] (ignored under a -1), with
    v up (as Blender and OBJ); ``texture`` is sRGB bytes (H, W, 3), row 0 at the top of the image."""

    vertices: np.ndarray  # float32 (N, 3)
    faces: np.ndarray  # int32 (M, 3) or (M, 4)
    colors: np.ndarray  # float32 (N, 3), sRGB in [0, 1]
    stats: dict = field(default_factory=dict)
    uvs: Optional[np.ndarray] = None  # float32 (M, K, 2)
    texture: Optional[np.ndarray] = None  # uint8 (H, W, 3)

    def __post_init__(self):
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32).reshape(-1, 3)
        faces = np.asarray(self.faces)
        width = faces.shape[1] if faces.ndim == 2 and faces.shape[1] in (3, 4) else 3
        self.faces = np.ascontiguousarray(faces, dtype=np.int32).reshape(-1, width)
        self.colors = np.ascontiguousarray(self.colors, dtype=np.float32).reshape(-1, 3)
        if len(self.colors) != len(self.vertices):
            raise ValueError("one colour per vertex expected")
        if self.uvs is not None:
            self.uvs = np.ascontiguousarray(self.uvs, dtype=np.float32).reshape(len(self.faces), width, 2)
        if self.texture is not None:
            self.texture = np.ascontiguousarray(self.texture, dtype=np.uint8)
            if self.texture.ndim != 3 or self.texture.shape[2] != 3:
                raise ValueError("the texture must be (H, W, 3) bytes")
            if self.uvs is None:
                raise ValueError("a texture needs UVs")

    @property
    def has_quads(self) -> bool:
        return self.faces.shape[1] == 4 and bool((self.faces[:, 3] >= 0).any())

    def triangles(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The faces as triangles (T, 3), quads split along their 0-2 diagonal, and the UVs per triangle
        corner (T, 3, 2) when there are UVs."""
        return triangulate(self.faces, self.uvs)


def triangulate(faces: np.ndarray, uvs: Optional[np.ndarray] = None):
    """Triangles (M, 3) or mixed quads (M, 4, -1 pad) -> triangles (T, 3) (and per-corner UVs (T, 3, 2)): a quad
    (a, b, c, d) becomes (a, b, c) and (a, c, d), in face order."""
    faces = np.asarray(faces)
    if faces.shape[1] == 3:
        return faces, uvs
    quad = faces[:, 3] >= 0
    first = faces[:, [0, 1, 2]]
    second = faces[quad][:, [0, 2, 3]]
    # Interleave so that each face's triangles stay together, in face order.
    order = np.argsort(np.concatenate([np.arange(len(faces)), np.flatnonzero(quad)]), kind="stable")
    tris = np.concatenate([first, second])[order]
    if uvs is None:
        return tris, None
    tri_uvs = np.concatenate([uvs[:, [0, 1, 2]], uvs[quad][:, [0, 2, 3]]])[order]
    return tris, tri_uvs


def truncate_to_bytes(colors: np.ndarray) -> np.ndarray:
    """Colours as the LRM references export them, ``(rgb * 255).astype(uint8)``: truncated, not rounded.
    Kept as k/255, which every writer maps back to byte k."""
    return np.floor(np.clip(colors, 0.0, 1.0) * np.float32(255.0)) / np.float32(255.0)


def load_npz(path) -> Mesh:
    with np.load(path) as data:
        return Mesh(data["vertices"], data["faces"], data["colors"])


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "wb"):
    """Yield a file object for a temporary file that becomes ``path`` only on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save(mesh: Mesh, path) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    writers = {".npz": _write_npz, ".glb": _write_glb, ".ply": _write_ply, ".obj": _write_obj}
    if suffix not in writers:
        raise ValueError(f"unsupported output format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    with atomic_output(path) as f:
        writers[suffix](mesh, f)
    return path


def _write_npz(mesh: Mesh, f) -> None:
    np.savez(f, vertices=mesh.vertices, faces=mesh.faces, colors=mesh.colors)


def _colors_u8(mesh: Mesh) -> np.ndarray:
    return np.clip(np.rint(mesh.colors * 255.0), 0, 255).astype(np.uint8)


def _y_up(vertices: np.ndarray) -> np.ndarray:
    """Blender (x, y, z) -> glTF/OBJ Y-up (x, z, -y), the inverse of what their importers apply."""
    return np.stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]], axis=1).astype(np.float32)


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float32)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _write_ply(mesh: Mesh, f) -> None:
    # Binary PLY in Blender's frame (its importer's default axes are Z up, Y forward: no conversion).
    n, m = len(mesh.vertices), len(mesh.faces)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment Image to 3D\n"
        f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {m}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    f.write(header.encode("ascii"))
    vert = np.empty(n, dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    vert["p"], vert["c"] = mesh.vertices, _colors_u8(mesh)
    f.write(vert.tobytes())
    face = np.empty(m, dtype=[("n", "u1"), ("i", "<i4", 3)])
    face["n"], face["i"] = 3, mesh.faces
    f.write(face.tobytes())


def _write_obj(mesh: Mesh, f) -> None:
    # OBJ is Y-up by convention (Blender's importer default: forward -Z, up Y); colours as `v x y z r g b`.
    data = np.concatenate([_y_up(mesh.vertices), mesh.colors], axis=1)
    f.write(b"# Image to 3D\n")
    np.savetxt(f, data, fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
    np.savetxt(f, mesh.faces + 1, fmt="f %d %d %d")


def _write_glb(mesh: Mesh, f) -> None:
    # glTF 2.0: Y up, COLOR_0 is linear, indices counter-clockwise front faces.
    positions = _y_up(mesh.vertices)
    colors = srgb_to_linear(mesh.colors)
    indices = mesh.faces.astype(np.uint32).reshape(-1)
    chunks, views, offset = [], [], 0
    for array, target in ((positions, 34962), (colors, 34962), (indices, 34963)):
        data = array.tobytes()
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data), "target": target})
        pad = (-len(data)) % 4
        chunks.append(data + b"\0" * pad)
        offset += len(data) + pad
    lo = positions.min(axis=0).tolist() if len(positions) else [0.0] * 3
    hi = positions.max(axis=0).tolist() if len(positions) else [0.0] * 3
    gltf = {
        "asset": {"version": "2.0", "generator": "Image to 3D"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "ImageTo3D"}],
        "meshes": [{"name": "ImageTo3D", "primitives": [
            {"attributes": {"POSITION": 0, "COLOR_0": 1}, "indices": 2, "mode": 4}]}],
        "buffers": [{"byteLength": offset}],
        "bufferViews": views,
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": len(positions), "type": "VEC3", "min": lo, "max": hi},
            {"bufferView": 1, "componentType": 5126, "count": len(colors), "type": "VEC3"},
            {"bufferView": 2, "componentType": 5125, "count": len(indices), "type": "SCALAR"},
        ],
    }
    js = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    js += b" " * ((-len(js)) % 4)
    binary = b"".join(chunks)
    total = 12 + 8 + len(js) + 8 + len(binary)
    f.write(struct.pack("<4sII", b"glTF", 2, total))
    f.write(struct.pack("<I4s", len(js), b"JSON") + js)
    f.write(struct.pack("<I4s", len(binary), b"BIN\0") + binary)
