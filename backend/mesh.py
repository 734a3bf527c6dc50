"""The mesh the pipeline returns, and writing it to .npz / .glb / .ply / .obj.

Arrays are in Blender's frame (Z up, the input view is the Front view, the object faces -Y) with
outward winding. Colours are sRGB display values in [0, 1]. Writers convert to each format's own
convention so that Blender's default importers put the mesh where the .npz puts it.
Every file is written to a temporary name beside the target and renamed into place at the end, so a
failed or cancelled run never leaves a partial file under the requested name (a textured OBJ's .mtl and
.png included). With a texture, GLB and OBJ carry UVs and the image; PLY stays vertex-coloured.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .colour import srgb_to_linear
from .files import atomic_output, atomic_outputs  # noqa: F401 - the one atomic writer, re-exported

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
    """Read a mesh that :func:`save` wrote as .npz (UVs and texture included when it has them)."""
    with np.load(path) as data:
        optional = {key: data[key] for key in ("uvs", "texture") if key in data.files}
        return Mesh(data["vertices"], data["faces"], data["colors"], **optional)


def output_files(mesh: Mesh, path) -> list[Path]:
    """Every file :func:`save` writes for ``path``: a textured OBJ brings NAME.mtl and NAME_texture.png beside it
    (not NAME.png: that is often the input image)."""
    path = Path(path)
    if path.suffix.lower() == ".obj" and mesh.texture is not None:
        return [path.with_suffix(".mtl"), path.with_name(f"{path.stem}_texture.png"), path]
    return [path]


def save(mesh: Mesh, path) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    writers = {".npz": _write_npz, ".glb": _write_glb, ".ply": _write_ply, ".obj": _write_obj}
    if suffix not in writers:
        raise ValueError(f"unsupported output format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if suffix == ".obj" and mesh.texture is not None:
        mtl, png, _ = output_files(mesh, path)
        with atomic_outputs([mtl, png, path]) as (mtl_file, png_file, obj_file):
            _write_textured_obj(mesh, obj_file, mtl_file, png_file, mtl.name, png.name)
        return path
    with atomic_output(path) as f:
        writers[suffix](mesh, f)
    return path


def _write_npz(mesh: Mesh, f) -> None:
    optional = {key: value for key, value in (("uvs", mesh.uvs), ("texture", mesh.texture)) if value is not None}
    np.savez(f, vertices=mesh.vertices, faces=mesh.faces, colors=mesh.colors, **optional)


def _colors_u8(mesh: Mesh) -> np.ndarray:
    return np.clip(np.rint(mesh.colors * 255.0), 0, 255).astype(np.uint8)


def _y_up(vertices: np.ndarray) -> np.ndarray:
    """Blender (x, y, z) -> glTF/OBJ Y-up (x, z, -y), the inverse of what their importers apply."""
    return np.stack([vertices[:, 0], vertices[:, 2], 0.0 - vertices[:, 1]], axis=1).astype(np.float32)  # no -0.0


def _png_bytes(texture: np.ndarray) -> bytes:
    import io

    from PIL import Image

    with io.BytesIO() as buffer:
        Image.fromarray(texture, "RGB").save(buffer, format="PNG")
        return buffer.getvalue()


# ---- PLY ----

def _write_ply(mesh: Mesh, f) -> None:
    # Binary PLY in Blender's frame (its importer's default axes are Z up, Y forward: no conversion).
    # Vertex colours only: PLY has no standard way to reference a texture.
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
    f.write(_ply_face_records(mesh.faces))


def _ply_face_records(faces: np.ndarray) -> bytes:
    """Face list records (count byte, then that many int32), triangles 3 and quads 4, in face order."""
    width = faces.shape[1]
    sizes = (faces >= 0).sum(axis=1) if width == 4 else np.full(len(faces), 3)
    records = np.empty(len(faces), dtype=[("n", "u1"), ("i", "<i4", width)])
    records["n"], records["i"] = sizes, faces
    if width == 3 or (sizes == 4).all():
        return records.tobytes()
    # Fixed-width records, then drop the 4 bytes of each triangle's -1 pad.
    raw = records.view(np.uint8).reshape(len(faces), -1)
    keep = np.ones(raw.shape, dtype=bool)
    keep[sizes == 3, 13:] = False
    return raw[keep].tobytes()


# ---- OBJ ----
# OBJ is Y-up by convention (Blender's importer default: forward -Z, up Y); colours as `v x y z r g b`.
# Our own writer throughout: trimesh's OBJ export triangulates quads, and with UVs it writes one `v` per
# distinct UV, which cuts the surface open along every seam. Here `v` stays one per mesh vertex and `vt`
# one per face corner, so importers rebuild a connected mesh with UV seams, quads kept as quads.

_OBJ_MATERIAL = "ImageTo3D"
_ROWS_PER_CHUNK = 65536


def _format_rows(line: str, rows: np.ndarray) -> list[str]:
    """``line % row`` for every row of a 2-D array, formatted a chunk of rows at a time (not row by row)."""
    out = []
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        chunk = rows[start:start + _ROWS_PER_CHUNK]
        out.extend((((line + "\n") * len(chunk)) % tuple(chunk.reshape(-1).tolist())).splitlines())
    return out


def _obj_vertex_lines(mesh: Mesh) -> list[str]:
    data = np.concatenate([_y_up(mesh.vertices), mesh.colors], axis=1)
    return _format_rows("v %.6f %.6f %.6f %.4f %.4f %.4f", data)


def _obj_face_lines(faces: np.ndarray, corner_uv: Optional[np.ndarray]) -> list[str]:
    """``f`` lines in face order: 3 or 4 corners (``v`` or ``v/vt``, 1-based); ``corner_uv`` holds each
    corner's ``vt`` number, laid out as ``faces``."""
    sizes = (faces >= 0).sum(axis=1) if faces.shape[1] == 4 else np.full(len(faces), 3)
    lines = np.empty(len(faces), dtype=object)
    for size in (3, 4):
        chosen = sizes == size
        if not chosen.any():
            continue
        vertex = faces[chosen, :size] + 1
        if corner_uv is None:
            rows, corner = vertex, "%d"
        else:
            rows, corner = np.stack([vertex, corner_uv[chosen, :size]], axis=2).reshape(len(vertex), -1), "%d/%d"
        lines[chosen] = _format_rows("f " + " ".join([corner] * size), rows)
    return lines.tolist()


def _write_lines(f, lines) -> None:
    if lines:
        f.write(("\n".join(lines) + "\n").encode("ascii"))


def _write_obj(mesh: Mesh, f) -> None:
    """Vertex-coloured OBJ, the one written when the mesh has no texture."""
    f.write(b"# Image to 3D\n")
    _write_lines(f, _obj_vertex_lines(mesh))
    _write_lines(f, _obj_face_lines(mesh.faces, None))


def _write_textured_obj(mesh: Mesh, obj, mtl, png, mtl_name: str, png_name: str) -> None:
    """OBJ + MTL (map_Kd) + PNG. One ``vt`` per face corner, in face order; the vertex colours stay on the
    ``v`` lines (importers keep them as an attribute, they do not tint the texture)."""
    png.write(_png_bytes(mesh.texture))
    mtl.write((f"# Image to 3D\nnewmtl {_OBJ_MATERIAL}\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\n"
               f"map_Kd {png_name}\n").encode("utf-8"))
    used = mesh.faces >= 0
    corner_uv = np.zeros(mesh.faces.shape, dtype=np.int64)
    corner_uv[used] = np.arange(1, used.sum() + 1)
    obj.write(f"# Image to 3D\nmtllib {mtl_name}\n".encode("utf-8"))
    _write_lines(obj, _obj_vertex_lines(mesh))
    _write_lines(obj, _format_rows("vt %.6f %.6f", mesh.uvs[used]))
    obj.write(f"usemtl {_OBJ_MATERIAL}\n".encode("utf-8"))
    _write_lines(obj, _obj_face_lines(mesh.faces, corner_uv))


# ---- GLB ----
# glTF 2.0: Y up, triangles only, COLOR_0 linear, counter-clockwise front faces, TEXCOORD_0 with v down.
#
# Textured meshes go through trimesh. The vertex-coloured case keeps our own writer: on a 1,002,528-face
# mesh (502,681 vertices) it took 0.044 s (median of 10) against trimesh's 0.115 s (trimesh 5.2.0, import
# excluded), and trimesh writes COLOR_0 as bytes, so linear colours would lose their dark shades to
# 8-bit rounding, where ours keeps them as floats.

_GLB_NAME = "ImageTo3D"
# Metallic 0: glTF's default material is a metal (metallic 1), which viewers show dark; fully rough.
_MATTE = {"metallicFactor": 0.0, "roughnessFactor": 1.0}


def _write_glb(mesh: Mesh, f) -> None:
    if mesh.texture is None:
        _write_vertex_coloured_glb(mesh, f)
    else:
        _write_textured_glb(mesh, f)


def split_seams(triangles: np.ndarray, corner_uvs: np.ndarray):
    """glTF has one UV per vertex: a vertex whose corners carry different UVs becomes one vertex per
    distinct UV. Returns (source vertex per new vertex (S,), its UV (S, 2), triangles on the new vertices
    (T, 3)); new vertices are ordered by source vertex."""
    corners = triangles.reshape(-1).astype(np.int64)
    uv = corner_uvs.reshape(-1, 2).astype(np.float32) + np.float32(0.0)  # -0.0 -> 0.0: equal UVs, equal bits
    bits = uv.view(np.uint32).astype(np.uint64)
    _, uv_id = np.unique((bits[:, 0] << np.uint64(32)) | bits[:, 1], return_inverse=True)
    key = corners * (int(uv_id.max(initial=0)) + 1) + uv_id.reshape(-1)
    _, first, new_index = np.unique(key, return_index=True, return_inverse=True)
    return corners[first], uv[first], new_index.reshape(-1, 3).astype(np.int32)


def _write_textured_glb(mesh: Mesh, f) -> None:
    import trimesh
    from PIL import Image

    triangles, corner_uvs = mesh.triangles()
    source, uv, faces = split_seams(triangles, corner_uvs)
    # No COLOR_0 here: glTF multiplies it into the texture. trimesh flips v (v_gltf = 1 - v) itself.
    material = trimesh.visual.material.PBRMaterial(
        name=_GLB_NAME, baseColorTexture=Image.fromarray(mesh.texture, "RGB"), **_MATTE)
    geometry = trimesh.Trimesh(vertices=_y_up(mesh.vertices[source]), faces=faces, process=False,
                               visual=trimesh.visual.TextureVisuals(uv=uv, material=material))
    scene = trimesh.Scene()
    scene.add_geometry(geometry, geom_name=_GLB_NAME, node_name=_GLB_NAME)
    f.write(trimesh.exchange.gltf.export_glb(scene, include_normals=False, tree_postprocessor=_tidy_tree))


def _tidy_tree(gltf: dict) -> None:
    """Our generator name, and vertex and index buffer views marked as such (trimesh leaves
    bufferView.target unset, which the Khronos validator reports; set, a loader needs not guess)."""
    gltf["asset"]["generator"] = "Image to 3D (trimesh)"
    views, accessors = gltf.get("bufferViews", []), gltf.get("accessors", [])
    for mesh in gltf.get("meshes", []):
        for primitive in mesh["primitives"]:
            for accessor in primitive["attributes"].values():
                views[accessors[accessor]["bufferView"]]["target"] = 34962  # ARRAY_BUFFER
            if "indices" in primitive:
                views[accessors[primitive["indices"]]["bufferView"]]["target"] = 34963  # ELEMENT_ARRAY_BUFFER


def _write_vertex_coloured_glb(mesh: Mesh, f) -> None:
    positions = _y_up(mesh.vertices)
    colors = srgb_to_linear(mesh.colors)
    indices = mesh.triangles()[0].astype(np.uint32).reshape(-1)
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
        "nodes": [{"mesh": 0, "name": _GLB_NAME}],
        "materials": [{"name": _GLB_NAME, "pbrMetallicRoughness": dict(_MATTE)}],
        "meshes": [{"name": _GLB_NAME, "primitives": [
            {"attributes": {"POSITION": 0, "COLOR_0": 1}, "indices": 2, "material": 0, "mode": 4}]}],
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
