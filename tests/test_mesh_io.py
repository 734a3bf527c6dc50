"""Mesh files: .npz / .glb / .ply / .obj written by backend.mesh and read back by hand, by the Khronos glTF
validator and by Blender's own importers. Textured meshes carry quads, triangles and UV seams."""

import io
import json
import shutil
import struct
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import files
from backend import mesh as meshio

ROOT = Path(__file__).resolve().parent.parent
VALIDATE = Path(__file__).with_name("gltf_validate.mjs")
BLENDERS = {"4.2": ROOT / ".venv-bpy42" / "bin" / "python", "4.5": ROOT / ".venv-bpy45" / "bin" / "python"}
SEGMENTS, RINGS = 8, 3


def capped_cylinder(textured=True) -> meshio.Mesh:
    """A closed cylinder: quads around the side, triangle fans on the caps (rows padded with -1). Its UVs
    have seams: the side wraps from u = 1 back to u = 0 on the same vertices, and the caps are islands of
    their own, so every rim vertex has two UVs."""
    angle = 2 * np.pi * np.arange(SEGMENTS) / SEGMENTS
    rings = [np.stack([np.cos(angle), np.sin(angle), np.full(SEGMENTS, z)], 1) for z in np.linspace(-0.5, 0.5, RINGS)]
    vertices = np.concatenate([*rings, [[0, 0, 0.5], [0, 0, -0.5]]]).astype(np.float32)
    top, bottom = RINGS * SEGMENTS, RINGS * SEGMENTS + 1
    faces, uvs = [], []
    for r in range(RINGS - 1):
        for j in range(SEGMENTS):
            k = (j + 1) % SEGMENTS
            faces.append([r * SEGMENTS + j, r * SEGMENTS + k, (r + 1) * SEGMENTS + k, (r + 1) * SEGMENTS + j])
            u0, u1, v0, v1 = j / SEGMENTS, (j + 1) / SEGMENTS, 0.5 * r / (RINGS - 1), 0.5 * (r + 1) / (RINGS - 1)
            uvs.append([[u0, v0], [u1, v0], [u1, v1], [u0, v1]])
    rim_top, rim_bottom = (RINGS - 1) * SEGMENTS, 0

    def disc(centre, j):  # a cap's rim vertex j on its UV island, a circle around centre
        return [centre[0] + 0.2 * np.cos(angle[j % SEGMENTS]), centre[1] + 0.2 * np.sin(angle[j % SEGMENTS])]

    for j in range(SEGMENTS):
        k = (j + 1) % SEGMENTS
        faces.append([top, rim_top + j, rim_top + k, -1])
        uvs.append([[0.25, 0.75], disc((0.25, 0.75), j), disc((0.25, 0.75), k), [0, 0]])
        faces.append([bottom, rim_bottom + k, rim_bottom + j, -1])
        uvs.append([[0.75, 0.75], disc((0.75, 0.75), k), disc((0.75, 0.75), j), [0, 0]])
    colors = (vertices - vertices.min(0)) / np.ptp(vertices, 0)
    if not textured:
        return meshio.Mesh(vertices, faces, colors)
    texture = np.random.default_rng(7).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    return meshio.Mesh(vertices, faces, colors, uvs=np.array(uvs), texture=texture)


# Rim-to-rim side: one vertex per ring more (the wrap seam); each rim again once for its cap; 2 centres.
CYLINDER_SPLIT_VERTICES = RINGS * (SEGMENTS + 1) + 2 * SEGMENTS + 2


def uv_grid(nx=4, ny=3) -> meshio.Mesh:
    """A flat grid of quads whose UVs are continuous (one UV per vertex): nothing to split."""
    ys, xs = np.mgrid[0:ny + 1, 0:nx + 1]
    vertices = np.stack([xs.ravel() / nx, np.zeros(xs.size), ys.ravel() / ny], 1)
    corner = (ys[:-1, :-1] * (nx + 1) + xs[:-1, :-1]).ravel()
    faces = np.stack([corner, corner + 1, corner + nx + 2, corner + nx + 1], 1)
    uvs = vertices[:, [0, 2]][faces]
    texture = np.full((4, 4, 3), 200, np.uint8)
    return meshio.Mesh(vertices, faces, np.full((len(vertices), 3), 0.5), uvs=uvs, texture=texture)


def triangle_mesh() -> meshio.Mesh:
    mesh = capped_cylinder(textured=False)
    return meshio.Mesh(mesh.vertices, meshio.triangulate(mesh.faces)[0], mesh.colors)


def face_sizes(faces):
    return (np.asarray(faces) >= 0).sum(axis=1)


def read_glb(path):
    """(glTF JSON, accessor(i) -> array (count, components)), parsed from the bytes, no library."""
    data = Path(path).read_bytes()
    magic, version, total = struct.unpack_from("<4sII", data)
    assert (magic, version, total) == (b"glTF", 2, len(data))
    json_length, json_kind = struct.unpack_from("<I4s", data, 12)
    gltf = json.loads(data[20:20 + json_length])
    bin_length, bin_kind = struct.unpack_from("<I4s", data, 20 + json_length)
    assert (json_kind, bin_kind) == (b"JSON", b"BIN\0")
    binary = data[28 + json_length:28 + json_length + bin_length]

    def view(index):
        v = gltf["bufferViews"][index]
        assert "byteStride" not in v
        return binary[v.get("byteOffset", 0):v.get("byteOffset", 0) + v["byteLength"]]

    def accessor(index):
        a = gltf["accessors"][index]
        dtype = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}[a["componentType"]]
        width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[a["type"]]
        values = np.frombuffer(view(a["bufferView"]), dtype, a["count"] * width, a.get("byteOffset", 0))
        return values.reshape(-1, width)

    gltf["_view"] = view
    return gltf, accessor


def glb_triangles(path):
    """(positions, triangles, attributes, material) of the file's one primitive."""
    gltf, accessor = read_glb(path)
    (primitive,) = gltf["meshes"][0]["primitives"]
    assert primitive.get("mode", 4) == 4
    attributes = {name: accessor(index) for name, index in primitive["attributes"].items()}
    triangles = accessor(primitive["indices"]).reshape(-1, 3)
    return attributes, triangles, gltf["materials"][primitive["material"]], gltf


def obj_rows(path):
    """rows(tag) -> the fields of every line of the file that starts with that tag (v, vt, f, ...)."""
    lines = [line.split() for line in Path(path).read_text().splitlines()]
    return lambda tag: [fields[1:] for fields in lines if fields[:1] == [tag]]


# ---- npz ----

@pytest.mark.parametrize("make", [capped_cylinder, triangle_mesh], ids=["textured quads", "plain triangles"])
def test_npz_round_trip(tmp_path, make):
    mesh = make()
    back = meshio.load_npz(meshio.save(mesh, tmp_path / "m.npz"))
    for name in ("vertices", "faces", "colors", "uvs", "texture"):
        original, loaded = getattr(mesh, name), getattr(back, name)
        if original is None:
            assert loaded is None
        else:
            assert loaded.dtype == original.dtype and np.array_equal(loaded, original), name
    with np.load(tmp_path / "m.npz") as data:
        textured = {"uvs", "texture"} if mesh.uvs is not None else set()
        assert set(data.files) == {"vertices", "faces", "colors"} | textured


# ---- glb ----

def test_textured_glb_has_uvs_flipped_texture_embedded_and_no_vertex_colours(tmp_path):
    mesh = capped_cylinder()
    attributes, triangles, material, gltf = glb_triangles(meshio.save(mesh, tmp_path / "m.glb"))
    assert set(attributes) == {"POSITION", "TEXCOORD_0"}  # COLOR_0 would tint the texture
    tris, tri_uvs = meshio.triangulate(mesh.faces, mesh.uvs)
    assert len(triangles) == len(tris)
    # Corner by corner, in face order: the position of its vertex, and its UV with glTF's v flipped back.
    assert np.array_equal(attributes["POSITION"][triangles], meshio._y_up(mesh.vertices)[tris])
    uv = attributes["TEXCOORD_0"].copy()
    uv[:, 1] = 1.0 - uv[:, 1]
    assert np.allclose(uv[triangles], tri_uvs, atol=1e-6)
    assert len(attributes["POSITION"]) == CYLINDER_SPLIT_VERTICES

    pbr = material["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr.get("baseColorFactor", [1, 1, 1, 1]) == [1, 1, 1, 1]
    image = gltf["images"][gltf["textures"][pbr["baseColorTexture"]["index"]]["source"]]
    assert image["mimeType"] == "image/png"
    png = Image.open(io.BytesIO(gltf["_view"](image["bufferView"])))
    assert png.mode == "RGB" and np.array_equal(np.asarray(png), mesh.texture)


def test_glb_splits_vertices_only_on_seams(tmp_path):
    grid = uv_grid()
    attributes, triangles, _, _ = glb_triangles(meshio.save(grid, tmp_path / "grid.glb"))
    assert len(attributes["POSITION"]) == len(grid.vertices)  # continuous UVs: no vertex duplicated
    assert np.array_equal(attributes["POSITION"], meshio._y_up(grid.vertices))


def test_plain_glb_triangulates_quads_with_linear_colours_and_a_matte_material(tmp_path):
    mesh = capped_cylinder(textured=False)
    attributes, triangles, material, _ = glb_triangles(meshio.save(mesh, tmp_path / "m.glb"))
    assert np.array_equal(triangles, meshio.triangulate(mesh.faces)[0])
    assert np.array_equal(attributes["POSITION"], meshio._y_up(mesh.vertices))
    assert np.allclose(attributes["COLOR_0"], meshio.srgb_to_linear(mesh.colors))
    assert "TEXCOORD_0" not in attributes
    # glTF's default material is fully metallic, which shows vertex colours dark.
    assert material["pbrMetallicRoughness"]["metallicFactor"] == 0.0


# ---- ply ----

def test_ply_writes_quads_as_four_vertex_faces(tmp_path):
    mesh = capped_cylinder()
    data = meshio.save(mesh, tmp_path / "m.ply").read_bytes()
    header, body = data.split(b"end_header\n", 1)
    assert b"property list uchar int vertex_indices" in header and b"texture" not in header
    n = len(mesh.vertices)
    vertices = np.frombuffer(body[:n * 15], dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    assert np.array_equal(vertices["p"], mesh.vertices)
    faces, at = [], n * 15
    while at < len(body):
        count = body[at]
        faces.append(list(np.frombuffer(body, "<i4", count, at + 1)))
        at += 1 + 4 * count
    assert at == len(body) and len(faces) == len(mesh.faces)
    assert [len(f) for f in faces] == face_sizes(mesh.faces).tolist()
    assert all(f == list(row[:len(f)]) for f, row in zip(faces, mesh.faces))


# ---- obj ----

def test_textured_obj_keeps_quads_and_writes_mtl_and_png(tmp_path):
    mesh = capped_cylinder()
    path = meshio.save(mesh, tmp_path / "chair.obj")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.mtl", "chair.obj", "chair_texture.png"]
    assert meshio.output_files(mesh, path) == [tmp_path / "chair.mtl", tmp_path / "chair_texture.png", path]
    rows = obj_rows(path)
    assert ["chair.mtl"] in rows("mtllib") and len(rows("usemtl")) == 1
    v = np.array(rows("v"), float)
    assert np.allclose(v[:, :3], meshio._y_up(mesh.vertices), atol=1e-6)
    faces = rows("f")
    sizes = face_sizes(mesh.faces)
    assert [len(f) for f in faces] == sizes.tolist()  # quads stay quads, triangles stay triangles
    vt = np.array(rows("vt"), float)
    assert len(vt) == sizes.sum()  # one per face corner
    for face, row, corner_uvs in zip(faces, mesh.faces, mesh.uvs):
        vertex, texcoord = np.array([corner.split("/") for corner in face], int).T - 1
        assert np.array_equal(vertex, row[:len(face)])
        assert np.allclose(vt[texcoord], corner_uvs[:len(face)], atol=1e-6)

    mtl = (tmp_path / "chair.mtl").read_text().split("\n")
    material = rows("usemtl")[0][0]
    assert f"newmtl {material}" in mtl and "map_Kd chair_texture.png" in mtl
    assert np.array_equal(np.asarray(Image.open(tmp_path / "chair_texture.png")), mesh.texture)


def test_plain_obj_keeps_quads_and_vertex_colours(tmp_path):
    mesh = capped_cylinder(textured=False)
    path = meshio.save(mesh, tmp_path / "m.obj")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.obj"]
    rows = obj_rows(path)
    assert not rows("vt") and not rows("mtllib")
    v = np.array(rows("v"), float)
    assert np.allclose(v[:, 3:], mesh.colors, atol=1e-4)
    faces = rows("f")
    assert [len(f) for f in faces] == face_sizes(mesh.faces).tolist()
    assert all(np.array_equal(np.array(f, int) - 1, row[:len(f)]) for f, row in zip(faces, mesh.faces))


# ---- atomic writes ----

def broken(*args, **kwargs):
    raise OSError("disk full")


# Where each writer is made to fail, with its temporary file(s) already open.
FAILURES = {
    "npz": (capped_cylinder, "m.npz", lambda mp: mp.setattr(np, "savez", broken)),
    "glb textured": (capped_cylinder, "m.glb", lambda mp: mp.setattr(meshio, "split_seams", broken)),
    "glb plain": (triangle_mesh, "m.glb", lambda mp: mp.setattr(meshio, "srgb_to_linear", broken)),
    "ply": (capped_cylinder, "m.ply", lambda mp: mp.setattr(meshio, "_ply_face_records", broken)),
    "obj plain": (triangle_mesh, "m.obj", lambda mp: mp.setattr(meshio, "_obj_face_lines", broken)),
    "obj textured": (capped_cylinder, "m.obj", lambda mp: mp.setattr(meshio, "_obj_face_lines", broken)),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failing_write_leaves_no_file(tmp_path, monkeypatch, case):
    make, name, breaks = FAILURES[case]
    mesh = make()
    breaks(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        meshio.save(mesh, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_obj_companions_are_removed_when_the_obj_cannot_be_placed(tmp_path, monkeypatch):
    (tmp_path / "m.obj").write_text("the previous result")
    real_replace = files.os.replace

    def replace(src, dst):
        if str(dst).endswith(".obj"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError):
        meshio.save(capped_cylinder(), tmp_path / "m.obj")
    # The .mtl and .png had been renamed into place already; without their .obj they are taken back.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.obj"]
    assert (tmp_path / "m.obj").read_text() == "the previous result"


def test_outputs_are_readable_like_any_new_file(tmp_path):
    path = meshio.save(triangle_mesh(), tmp_path / "m.glb")
    assert path.stat().st_mode & 0o777 == files.NEW_FILE_MODE  # not mkstemp's private 0600


# ---- Khronos glTF validator ----

VALIDATED = {
    "plain triangles": triangle_mesh,
    "plain quads": lambda: capped_cylinder(textured=False),
    "textured quads": capped_cylinder,
    "textured grid": uv_grid,
}


@pytest.mark.parametrize("case", VALIDATED)
def test_khronos_validator_finds_no_errors(tmp_path, case):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Khronos glTF validator runs under Node.js")
    path = meshio.save(VALIDATED[case](), tmp_path / "m.glb")
    r = subprocess.run([node, str(VALIDATE), str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{r.stderr}\n(the validator is installed by `make gltf-validator`)"
    report = json.loads(r.stdout)
    issues = report["issues"]
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, json.dumps(issues["messages"], indent=1)
    assert report["info"]["drawCallCount"] == 1


# ---- Blender's importers ----

BLENDER_IMPORT = textwrap.dedent("""
    import json, sys
    import bpy
    import numpy as np

    report = {}
    for path in sys.argv[2:]:
        bpy.ops.wm.read_factory_settings(use_empty=True)
        if path.endswith(".glb"):
            bpy.ops.import_scene.gltf(filepath=path)
        elif path.endswith(".ply"):
            bpy.ops.wm.ply_import(filepath=path)
        else:
            bpy.ops.wm.obj_import(filepath=path)
        (obj,) = [o for o in bpy.context.scene.objects if o.type == "MESH"]
        mesh = obj.data
        co = np.empty(len(mesh.vertices) * 3, np.float64)
        mesh.vertices.foreach_get("co", co)
        co = co.reshape(-1, 3) @ np.array(obj.matrix_world)[:3, :3].T + np.array(obj.matrix_world)[:3, 3]
        sizes = np.empty(len(mesh.polygons), np.int64)
        mesh.polygons.foreach_get("loop_total", sizes)
        corners = np.empty(len(mesh.loops), np.int64)
        mesh.loops.foreach_get("vertex_index", corners)
        uv = None
        if mesh.uv_layers:
            uv = np.empty(len(mesh.loops) * 2, np.float64)
            mesh.uv_layers[0].data.foreach_get("uv", uv)
            uv = uv.reshape(-1, 2).tolist()
        images = [node.image.name for m in mesh.materials if m and m.use_nodes
                  for node in m.node_tree.nodes if node.type == "TEX_IMAGE" and node.image]
        report[path] = {"co": co.tolist(), "sizes": sizes.tolist(), "corners": corners.tolist(), "uv": uv,
                        "images": images}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)
""")


def point_set(points):
    return np.unique(np.round(np.asarray(points, np.float64), 5), axis=0)


@pytest.fixture(scope="module", params=sorted(BLENDERS))
def blender_import(request, tmp_path_factory):
    """Saves the test meshes, imports each file with this Blender's own importer (default options) and
    returns {name: (mesh, what Blender built)}."""
    python = BLENDERS[request.param]
    if not python.exists():
        pytest.skip(f"{python.parent.parent.name} is missing (make venv-bpy{request.param.replace('.', '')})")
    folder = tmp_path_factory.mktemp(f"blender{request.param}")
    meshes = {"textured.glb": capped_cylinder(), "plain.glb": capped_cylinder(textured=False),
              "textured.obj": capped_cylinder(), "plain.obj": capped_cylinder(textured=False),
              "quads.ply": capped_cylinder(textured=False)}
    paths = [str(meshio.save(mesh, folder / name)) for name, mesh in meshes.items()]
    script = folder / "import_files.py"
    script.write_text(BLENDER_IMPORT)
    out = folder / "report.json"
    r = subprocess.run([str(python), str(script), str(out), *paths], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    return {name: (mesh, report[str(folder / name)]) for name, mesh in meshes.items()}


@pytest.mark.parametrize("name", ["textured.glb", "plain.glb"])
def test_blender_gltf_import_puts_the_mesh_where_the_npz_does(blender_import, name):
    mesh, imported = blender_import[name]
    tris, tri_uvs = meshio.triangulate(mesh.faces, mesh.uvs)
    assert imported["sizes"] == [3] * len(tris)
    co = np.array(imported["co"])
    assert np.array_equal(point_set(co), point_set(mesh.vertices))
    # Each triangle corner lands on its own vertex's position, in face order.
    assert np.allclose(co[imported["corners"]], mesh.vertices[tris].reshape(-1, 3), atol=1e-6)
    if mesh.texture is not None:
        assert np.allclose(imported["uv"], tri_uvs.reshape(-1, 2), atol=1e-6) and imported["images"]


@pytest.mark.parametrize("name", ["textured.obj", "plain.obj", "quads.ply"])
def test_blender_obj_and_ply_import_keep_vertices_and_quads(blender_import, name):
    mesh, imported = blender_import[name]
    assert np.allclose(imported["co"], mesh.vertices, atol=1e-6)  # same vertices, same order
    assert imported["sizes"] == face_sizes(mesh.faces).tolist()
    used = mesh.faces >= 0
    assert imported["corners"] == mesh.faces[used].tolist()
    if mesh.texture is not None:
        assert np.allclose(imported["uv"], mesh.uvs[used], atol=1e-6)
        assert imported["images"] == ["textured_texture.png"]
