"""Post-processing on real extractions of the tiny models: --faces, --quads, --texture through the pipeline,
the CLI and the worker, and Bake from Model on an edited mesh, with the field as the reference."""

import shutil
import sys
import time

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from backend import client as wire
from backend import protocol
from backend import postprocess
from backend.protocol import Stage
from backend.errors import Cancelled
from backend.field import FieldCache
from backend.mesh import load_npz, triangulate
from backend.models import registry
from backend.options import Options
from backend.pipeline import generate
from backend.progress import Stages
from backend.postprocess import quads as quads_module
from support import DATA, ROOT, TINY, run_backend

IMAGE = TINY / "input_rgba.png"
BASE = dict(model="triposr", weights=str(TINY), resolution=64, remove_background=False, device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return FieldCache(tmp_path_factory.mktemp("fields"))


def run(cache=None, **options):
    return generate(IMAGE, Options(**{**BASE, **options}), field_cache=cache)


@pytest.fixture(scope="module")
def full():
    return run()


def colour_field(field_id, cache):
    spec = registry.get("triposr")
    model = registry.load(spec, str(TINY), torch.device("cpu"))
    return model.colour_field(cache.load(field_id, f"triposr:{TINY}")[0])


def surface_points(vertices, tris, tri_uvs, n, seed=0):
    """Random points on random triangles, with their UVs."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, len(tris), n)
    w = rng.dirichlet(np.ones(3), n).astype(np.float32)
    points = np.einsum("nk,nkd->nd", w, vertices[tris[t]])
    uvs = np.einsum("nk,nkd->nd", w, tri_uvs[t])
    return points, uvs


def bilinear(texture, uv):
    """Sample as a GPU does: texel centres at (i + 0.5) / size, v up, row 0 at the top."""
    h, w = texture.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = (1.0 - uv[:, 1]) * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    tex = texture.astype(np.float32) / 255.0

    def at(yy, xx):
        return tex[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]

    return ((1 - fx) * (1 - fy) * at(y0, x0) + fx * (1 - fy) * at(y0, x0 + 1)
            + (1 - fx) * fy * at(y0 + 1, x0) + fx * fy * at(y0 + 1, x0 + 1))


def area_samples(mesh, n=200_000, seed=0):
    """Points spread over the surface by area: a chamfer of surfaces, not of vertex sets."""
    tris, _ = triangulate(mesh.faces)
    corners = mesh.vertices[tris]
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    rng = np.random.default_rng(seed)
    t = rng.choice(len(tris), n, p=area / area.sum())
    w = rng.dirichlet(np.ones(3), n)
    return np.einsum("nk,nkd->nd", w, corners[t])


def chamfer(a, b):
    """Mean symmetric surface distance between two meshes."""
    pa, pb = area_samples(a), area_samples(b)
    return max(cKDTree(pb).query(pa)[0].mean(), cKDTree(pa).query(pb)[0].mean())


def diagonal(v):
    return float(np.linalg.norm(v.max(0) - v.min(0)))


def test_reduction_keeps_the_surface_and_hits_the_budget(full):
    mesh = run(faces=3000)
    assert abs(len(mesh.faces) - 3000) <= 0.05 * 3000
    assert mesh.stats["faces_reached"] == len(mesh.faces) and mesh.stats["notes"] == []
    assert chamfer(mesh, full) <= 0.01 * diagonal(full.vertices)
    # The new vertices are coloured from the field, not copied from the old mesh.
    assert not np.isin(mesh.vertices.view("V12"), full.vertices.view("V12")).all()


def test_new_vertex_colours_come_from_the_field(cache):
    mesh = run(cache, faces=1500)
    field = colour_field(mesh.stats["field_id"], cache)
    assert np.abs(field(mesh.vertices) - mesh.colors).max() < 1e-6


def test_budget_at_or_above_the_mesh_leaves_it_and_says_so(full):
    mesh = run(faces=10 * len(full.faces))
    assert np.array_equal(mesh.faces, full.faces)
    assert "left as extracted" in mesh.stats["notes"][0]


def test_quads_are_mostly_quads_and_fewer_faces(full):
    mesh = run(faces=2000, quads=True)
    assert mesh.stats["quads"] and mesh.stats["notes"] == []
    assert mesh.faces.shape[1] == 4 and len(mesh.faces) < len(full.faces)
    assert (mesh.faces[:, 3] >= 0).mean() >= 0.9
    # Instant Meshes resamples the surface (and the tiny model's random blobs are rough): 2 %, not 1 %.
    assert chamfer(mesh, full) <= 0.02 * diagonal(full.vertices)


def test_quads_fall_back_to_triangles_and_say_so(monkeypatch):
    def refuse(*args, **kwargs):
        raise quads_module.QuadsFailed("only 40% of Instant Meshes' faces are quads")

    monkeypatch.setattr(quads_module, "quad_remesh", refuse)
    mesh = run(faces=2000, quads=True)
    assert not mesh.stats["quads"] and mesh.faces.shape[1] == 3
    assert abs(len(mesh.faces) - 2000) <= 100
    assert "quad remeshing failed (only 40%" in mesh.stats["notes"][0] and "triangles instead" in mesh.stats["notes"][0]


def test_quad_check_refuses_a_result_that_is_not_quads():
    tris = np.array([[0, 1, 2, -1]] * 8 + [[0, 1, 2, 3]] * 2)
    with pytest.raises(quads_module.QuadsFailed, match="20% of"):
        quads_module.check_quads(tris, 100)
    with pytest.raises(quads_module.QuadsFailed, match="10 faces from 10"):
        quads_module.check_quads(np.array([[0, 1, 2, 3]] * 10), 10)


@pytest.mark.parametrize("extra", [{}, {"quads": True}], ids=["triangles", "quads"])
def test_texture_round_trip_matches_the_field(cache, extra):
    mesh = run(cache, faces=2000, texture=512, **extra)
    assert mesh.texture.shape == (512, 512, 3) and mesh.uvs.shape == (*mesh.faces.shape, 2)
    tris, tri_uvs = triangulate(mesh.faces, mesh.uvs)
    points, uvs = surface_points(mesh.vertices, tris, tri_uvs, 20000)
    field = colour_field(mesh.stats["field_id"], cache)
    error = np.abs(bilinear(mesh.texture, uvs) - field(points)).mean()
    assert error <= 2 / 255, error
    # A texture of the wrong UVs does not pass the same check.
    shuffled = np.random.default_rng(1).permutation(len(uvs))
    assert np.abs(bilinear(mesh.texture, uvs[shuffled]) - field(points)).mean() > 4 / 255


def test_texture_alone_reduces_to_the_default_budget():
    mesh = run(resolution=128, texture=512)
    assert abs(len(mesh.faces) - postprocess.DEFAULT_TEXTURE_FACES) <= 0.05 * postprocess.DEFAULT_TEXTURE_FACES
    assert "for the texture" in mesh.stats["notes"][0]


@pytest.mark.parametrize("stage", [Stage.REDUCE, Stage.UNWRAP, Stage.BAKE])
def test_cancel_in_each_new_stage(stage):
    seen = []

    def progress(name, fraction, message):
        seen.append(name)

    with pytest.raises(Cancelled):
        generate(IMAGE, Options(**BASE, faces=2000, texture=512), progress=progress,
                 cancelled=lambda: stage in seen)
    assert seen[-1] == stage


@pytest.mark.parametrize("args, message", [
    (["--faces", "0"], "faces must be between 100"),
    (["--faces", "-5"], "faces must be between 100"),
    (["--texture", "100"], "texture size must be between 512 and 4096"),
    (["--texture", "10000"], "texture size must be between 512 and 4096"),
    (["--quads"], "--quads needs a face budget"),
])
def test_bad_values_exit_2(tmp_path, args, message):
    out = tmp_path / "out.glb"
    result = run_backend("generate", IMAGE, "-o", out, "--weights", TINY, "--resolution", "32", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not list(tmp_path.iterdir())


def test_cli_textured_npz_and_summary(tmp_path):
    out = tmp_path / "out.npz"
    result = run_backend("generate", IMAGE, "-o", out, "--weights", TINY, "--resolution", "64", "--faces", "1000",
                         "--quads", "--texture", "512", "--json")
    assert result.returncode == 0, result.stderr
    import json

    summary = json.loads(result.stdout)  # Instant Meshes' own output does not reach stdout
    mesh = load_npz(out)
    assert summary["faces_reached"] == len(mesh.faces) and summary["quads"] and summary["texture"] == 512
    assert {"reducing", "unwrapping", "baking_texture"} <= set(summary["seconds"])
    assert mesh.texture.shape == (512, 512, 3) and mesh.uvs is not None


@pytest.mark.parametrize("model", ["openlrm-base", "instantmesh-large"])
def test_every_model_family_is_post_processed(tmp_path, model):
    from zero123pp_tiny import add_lrm

    if model.startswith("instantmesh"):
        inputs = ["--views", DATA / "instantmesh_tiny" / "views_grid_960x640.png", "--weights",
                  add_lrm(tmp_path / "model")]
    else:
        with np.load(DATA / "openlrm_tiny" / "packed" / "expected.npz") as e:
            threshold = float(e["mesh_thres"])
        inputs = [DATA / "openlrm_tiny" / "input.png", "--weights", DATA / "openlrm_tiny" / "packed", "--resolution",
                  "64", "--threshold", repr(threshold), "--no-remove-background"]
    out = tmp_path / "out.npz"
    result = run_backend("generate", *inputs, "-o", out, "--model", model, "--faces", "500", "--texture", "512",
                         "--accept-licence", env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert result.returncode == 0, result.stderr
    mesh = load_npz(out)
    assert abs(len(mesh.faces) - 500) <= 25 and mesh.texture.shape == (512, 512, 3)


# -- Bake from Model, through the worker -------------------------------------------------------------

def subdivided_and_displaced(vertices, faces, amount):
    """Each triangle into four (midpoints), every vertex pushed along a smooth wave: an edited surface."""
    a, b, c = faces.T
    n = len(vertices)
    edges = np.sort(np.concatenate([np.stack([a, b], 1), np.stack([b, c], 1), np.stack([c, a], 1)]), axis=1)
    unique, inverse = np.unique(edges, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    mids = vertices[unique].mean(axis=1)
    ab, bc, ca = np.split(inverse + n, 3)
    new_faces = np.concatenate([np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1), np.stack([ca, bc, c], 1),
                                np.stack([ab, bc, ca], 1)])
    v = np.concatenate([vertices, mids]).astype(np.float32)
    v[:, 2] += amount * np.sin(v[:, 0] * 9.0).astype(np.float32)
    return v, new_faces


@pytest.fixture
def worker(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGE_TO_3D_FIELDS", str(tmp_path / "fields"))
    w = wire.Worker(sys.executable, ROOT, env=wire.default_env(ROOT), temp_dir=str(tmp_path / "jobs"))
    yield w
    w.stop()


def wait(w, timeout=300):
    job = w.wait(timeout)
    assert job.state == protocol.DONE, job.error
    return job


def test_bake_from_model_on_an_edited_mesh_and_after_the_cache_is_gone(worker, tmp_path):
    job = worker.submit(str(IMAGE), dict(BASE, faces=800))
    wait(worker)
    field_id = job.stats["field_id"]
    generated = load_npz(job.result_path)
    job.cleanup()
    vertices, faces = subdivided_and_displaced(generated.vertices, generated.faces, 0.01)
    mesh_path = tmp_path / "edited.npz"
    np.savez(mesh_path, vertices=vertices, corner_verts=faces.reshape(-1).astype(np.int32),
             loop_totals=np.full(len(faces), 3, np.int32))
    options = dict(BASE, texture=512, field_id=field_id)

    def bake():
        job = worker.submit(str(IMAGE), options, op="bake", mesh=str(mesh_path))
        seen = set()
        while not job.finished:
            seen |= {e.get("stage") for e in worker.poll() if e.get("event") == "progress"}
            time.sleep(0.005)
        assert job.state == protocol.DONE, job.error
        with np.load(job.result_path) as data:
            result = data["texture"], data["uvs"]
        job.cleanup()
        return result, seen, job.stats

    (texture, uvs), seen, stats = bake()
    assert stats["uvs"] == "made" and stats["field"] == "cached" and Stage.FIELD not in seen
    assert stats["source_size"] == 64  # what made the field travels with it
    assert uvs.shape == (faces.size, 2) and {Stage.UNWRAP, Stage.BAKE} <= seen
    # Compare with the field at the edited surface (reference: the same tiny model, its field recomputed here).
    spec = registry.get("triposr")
    model = registry.load(spec, str(TINY), torch.device("cpu"))
    planes, _ = model.make_planes(__import__("backend.preprocess", fromlist=["x"]).prepare(
        __import__("backend.preprocess", fromlist=["x"]).load_image(IMAGE), recipe=spec.preprocessing,
        remove_background=False, foreground_ratio=None, u2net_path=None), Options(**BASE), Stages(None, None))
    points, point_uvs = surface_points(vertices, faces, uvs.reshape(-1, 3, 2), 20000, seed=3)
    error = np.abs(bilinear(texture, point_uvs) - model.colour_field(planes)(points)).mean()
    assert error <= 2 / 255, error

    shutil.rmtree(tmp_path / "fields")  # another machine, a cleaned folder: the field is recomputed
    (texture2, uvs2), seen2, stats2 = bake()
    assert Stage.FIELD in seen2 and stats2["field_id"] == field_id
    assert np.array_equal(uvs2, uvs)
    assert np.abs(texture2.astype(int) - texture).max() <= 1


def test_bake_keeps_the_given_uvs(worker, tmp_path):
    job = worker.submit(str(IMAGE), dict(BASE, faces=600, texture=512))
    wait(worker)
    generated = load_npz(job.result_path)
    job.cleanup()
    mesh_path = tmp_path / "mesh.npz"
    corner = generated.faces.reshape(-1)
    np.savez(mesh_path, vertices=generated.vertices, corner_verts=corner, loop_totals=np.full(len(generated.faces), 3),
             uvs=generated.uvs.reshape(-1, 2))
    bake = worker.submit(str(IMAGE), dict(BASE, texture=512, field_id=job.stats["field_id"]), op="bake",
                         mesh=str(mesh_path))
    wait(worker)
    with np.load(bake.result_path) as data:
        assert np.array_equal(data["uvs"], generated.uvs.reshape(-1, 2))
        assert np.abs(data["texture"].astype(int) - generated.texture).max() <= 1  # the same field, the same bake


def test_bake_refuses_a_broken_mesh_and_the_worker_lives_on(worker, tmp_path):
    mesh_path = tmp_path / "bad.npz"
    np.savez(mesh_path, vertices=np.zeros((3, 3), np.float32), corner_verts=np.array([0, 1, 7]),
             loop_totals=np.array([3]))
    worker.submit(str(IMAGE), dict(BASE, texture=512, field_id="0" * 32), op="bake", mesh=str(mesh_path))
    job = worker.wait(120)
    assert job.state == protocol.ERROR and job.error["code"] == "bad_input"
    assert "does not exist" in job.error["message"]
    worker.submit(str(IMAGE), BASE)
    wait(worker)


def test_cancel_while_baking_leaves_no_job_folder(worker):
    job = worker.submit(str(IMAGE), dict(BASE, resolution=128, texture=4096))
    while job.stage != Stage.BAKE and not job.finished:
        worker.poll()
        time.sleep(0.005)
    worker.cancel()
    worker.wait(60)
    assert job.state == protocol.CANCELLED
    assert not job.job_dir.exists()


def test_textured_obj_never_overwrites_its_input_image(tmp_path):
    image = tmp_path / "chair_texture.png"
    shutil.copy(IMAGE, image)
    result = run_backend("generate", image, "-o", tmp_path / "chair.obj", "--weights", TINY, "--resolution", "32",
                         "--texture", "512")
    assert result.returncode == 2 and "would overwrite the input image" in result.stderr
    assert image.read_bytes() == IMAGE.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == [image.name]


def test_polygons_with_corners_in_line_are_unwrapped_whole(full):
    """Blender's Subdivide without fill leaves hexagons: a triangle plus its edge midpoints. A fan from a corner
    has a triangle of no area; the atlas must still keep every polygon whole."""
    from backend.postprocess import atlas

    small = run(faces=400)
    a, b, c = small.faces.T
    n = len(small.vertices)
    edges = np.sort(np.concatenate([np.stack([a, b], 1), np.stack([b, c], 1), np.stack([c, a], 1)]), axis=1)
    unique, inverse = np.unique(edges, axis=0, return_inverse=True)
    ab, bc, ca = np.split(inverse.reshape(-1) + n, 3)
    vertices = np.concatenate([small.vertices, small.vertices[unique].mean(axis=1)])
    hexagons = np.stack([a, ab, b, bc, c, ca], axis=1)
    uvs, alone, broken, _ = atlas.unwrap(vertices, hexagons.reshape(-1), np.full(len(hexagons), 6), 512)
    assert not broken.any() and uvs.shape == (hexagons.size, 2) and 0 <= uvs.min() and uvs.max() <= 1
    # Without the choice of fan start, the first triangle of every hexagon has no area.
    tri_loops, _ = atlas.fan(np.full(len(hexagons), 6))
    corners = vertices[hexagons.reshape(-1)][tri_loops]
    assert np.allclose(np.cross(corners[::4, 1] - corners[::4, 0], corners[::4, 2] - corners[::4, 0]), 0, atol=1e-7)


def test_instant_meshes_faces_are_cleaned_for_blender():
    faces = np.array([[0, 1, 2, 3], [4, 5, 5, 6], [7, 7, 8, 9], [1, 2, 1, 3], [3, 2, 1, 0], [10, 11, 12, 10],
                      [13, 13, 14, 14]])
    assert quads_module.clean(faces).tolist() == [[0, 1, 2, 3], [4, 5, 6, -1], [7, 8, 9, -1], [11, 12, 10, -1]]


def test_a_texture_without_xatlas_is_refused_before_anything_runs(monkeypatch):
    """Where xatlas has no wheel (Linux aarch64) requirements.txt leaves it out: --texture then fails at once,
    saying what is missing and how to get it."""
    import importlib.util

    from backend.errors import InputError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xatlas" else real(name, *a))
    Options(faces=1000).validate()  # no texture: no atlas needed
    with pytest.raises(InputError, match="xatlas") as e:
        Options(texture=1024).validate()
    assert "pip install xatlas" in e.value.hint
