"""``--colours images`` through the pipeline: the CLI, the worker, Bake from Model, and a geometry-only model
(no field, no camera). With ``field`` (the default) every output is as before (tests/test_cli.py's parity)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from support import DATA, TINY, run_backend

from backend import client as wire
from backend import mesh as meshio
from backend import protocol
from backend.errors import InputError
from backend.options import Options, check
from backend.postprocess import cameras as cm
from backend.postprocess import paint as pt
from backend.progress import Stages

ROOT = Path(__file__).resolve().parent.parent
IMAGE = TINY / "input_rgba.png"
FAST = {"weights": str(TINY), "resolution": 64, "device": "cpu"}


def unseen(vertices, faces, camera):
    """Vertices the camera cannot see: facing away from it."""
    n = pt.vertex_normals(np.asarray(vertices, np.float64), pt.triangles_of(faces))
    return (n * (camera.position - vertices)).sum(axis=1) < 0


def test_colours_must_be_field_or_images():
    from backend.models import registry

    with pytest.raises(InputError, match="colours"):
        check(Options(colours="photo"), registry.get("triposr"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paint")
    runs = {}
    for colours in ("field", "images"):
        out = folder / f"{colours}.npz"
        r = run_backend("generate", IMAGE, "-o", out, "--weights", TINY, "--resolution", 48, "--texture", 512,
                        "--colours", colours, "--json")
        assert r.returncode == 0, r.stderr
        runs[colours] = (json.loads(r.stdout), meshio.load_npz(out))
    return runs


def test_cli_images_differ_from_the_field_only_where_the_picture_sees(outputs):
    (s_field, m_field), (s_images, m_images) = outputs["field"], outputs["images"]
    assert "colour_sources" not in s_field and s_images["colours"] == "images"
    shares = s_images["colour_sources"]
    assert set(shares) == {"vertices", "texture"}
    for share in shares.values():
        assert share["picture"] > 0.01 and abs(share["picture"] + share["field"] - 1) < 2e-3
    assert s_images["views"][0]["view"] == "picture" and 0 < s_images["views"][0]["iou"] <= 1
    assert np.array_equal(m_field.vertices, m_images.vertices) and np.array_equal(m_field.faces, m_images.faces)
    changed = np.abs(m_field.colors - m_images.colors).max(axis=1) > 1e-6
    assert changed.any()
    camera = cm.reference_camera("triposr")
    assert not (changed & unseen(m_images.vertices, m_images.faces, camera)).any()
    assert not np.array_equal(m_field.texture, m_images.texture)


def test_worker_takes_the_option(tmp_path):
    w = wire.Worker(sys.executable, ROOT, temp_dir=str(tmp_path / "jobs"))
    w.start()
    try:
        job = w.submit(str(IMAGE), dict(FAST, colours="images"))
        assert w.wait(120).state == protocol.DONE, (job.error, w.log_tail())
        assert job.stats["colours"] == "images" and job.stats["colour_sources"]["vertices"]["picture"] > 0
        bad = w.submit(str(IMAGE), dict(FAST, colours="paint"))
        assert w.wait(60).state == protocol.ERROR and bad.error["code"] == "bad_input"
    finally:
        w.stop()


def test_bake_from_model_paints_the_artists_mesh():
    """pipeline.bake with --colours images: the texture of a mesh in the generation's frame is painted."""
    pytest.importorskip("xatlas")
    from backend.pipeline import bake, generate

    base = Options(weights=str(TINY), resolution=48, device="cpu")
    mesh = generate(IMAGE, base)
    corner_verts, totals = mesh.faces.reshape(-1), np.full(len(mesh.faces), 3)
    args = (mesh.vertices, corner_verts, totals)
    _, tex_field, stats_field = bake(IMAGE, Options(**{**base.__dict__, "texture": 512}), *args)
    _, tex_images, stats = bake(IMAGE, Options(**{**base.__dict__, "texture": 512, "colours": "images"}), *args)
    assert "colour_sources" not in stats_field and stats["colour_sources"]["texture"]["picture"] > 0.01
    assert not np.array_equal(tex_field, tex_images)


class _GeometryOnly:
    """A model with no colour field and no camera of its own (TripoSG's shape)."""


def test_a_model_with_no_field_and_no_camera_is_painted_from_a_fitted_camera():
    """A plain mesh, its picture rendered from a camera the model does not know: the camera is fitted to the
    mask, the picture paints what it sees, the rest takes colours spread from it (no grey, no black)."""
    from test_paint import figure, pattern

    from backend.mesh import Mesh
    from backend.postprocess import run
    from backend.postprocess.colours import painting_for
    from backend.postprocess.raster import depth_buffer

    v, f = figure()
    lo, hi = v.min(0), v.max(0)
    truth = cm.orbit(35.0, 10.0, 3.0 * np.linalg.norm(hi - lo) / 2, 35.0, (lo + hi) / 2)
    size = 256
    depth = depth_buffer(v, f, truth, size, size).astype(np.float64)
    mask = np.isfinite(depth)
    u = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid((u - 0.5) / truth.focal, (u - 0.5) / truth.focal)
    cam_points = np.stack([x, y, np.ones_like(x)], -1) * np.where(mask, depth, 0)[..., None]
    points = cam_points.reshape(-1, 3) @ truth.rotation + truth.position
    rgb = np.where(mask.reshape(-1, 1), pattern(points), 1.0).reshape(size, size, 3)
    picture = np.rint(np.concatenate([rgb, mask[..., None]], axis=2) * 255).astype(np.uint8)

    stages = Stages(None, None)
    painting = painting_for(_GeometryOnly(), picture, None, v, f, stages)
    about = painting.about[0]
    assert about["camera"] == "fitted" and about["iou"] >= 0.95 and abs(about["azimuth"] - 35.0) <= 3
    out = run(Mesh(v.astype(np.float32), f, np.full((len(v), 3), 0.5)), None, Options(), stages, painting)
    shares = out.stats["colour_sources"]["vertices"]
    assert set(shares) == {"picture", "spread"} and shares["picture"] > 0.05  # a low-poly figure
    colours, alpha, _ = pt.Painter(v, f, painting.views).paint(v, pt.vertex_normals(v, f))
    seen = alpha > 0.99
    assert seen.sum() > 20
    assert np.median(np.abs(out.colors[seen] - pattern(v[seen])).max(axis=1)) < 0.05
    rest = alpha == 0
    assert rest.sum() > 20 and out.colors[rest].max(axis=1).min() > 0.05  # never black
    assert not np.allclose(out.colors[rest], 0.5, atol=0.05)  # nor a flat grey


def test_instantmesh_views_grid_paints_from_the_six_views(tmp_path):
    """``--views GRID``: the grid's six views paint at Zero123++'s cameras; no picture is there to paint."""
    from test_instantmesh_cli import GRID, config_env, stage2_folder

    folder, runs = stage2_folder(tmp_path / "model"), {}
    for colours in ("field", "images"):
        out = tmp_path / f"{colours}.npz"
        r = run_backend("generate", "--views", GRID, "-o", out, "--model", "instantmesh-large", "--weights", folder,
                        "--accept-licence", "--colours", colours, "--json", env=config_env(tmp_path))
        assert r.returncode == 0, r.stderr
        runs[colours] = (json.loads(r.stdout), meshio.load_npz(out))
    summary, mesh = runs["images"]
    assert [v["view"] for v in summary["views"]] == ["generated views"]
    assert summary["colour_sources"]["vertices"]["generated views"] > 0
    changed = np.abs(runs["field"][1].colors - mesh.colors).max(axis=1) > 1e-6
    hidden = np.ones(len(mesh.vertices), bool)
    for camera in cm.zero123pp_cameras():
        hidden &= unseen(mesh.vertices, mesh.faces, camera)
    assert changed.any() and not (changed & hidden).any()


def test_the_field_cache_keeps_the_views_grid_whatever_its_memory_layout(tmp_path):
    """The model's grid can be a strided, read-only view: it is kept as it reads, and a field without one has none."""
    import torch

    from backend.field import FieldCache

    grid = (np.arange(640 * 960 * 3) % 251).astype(np.uint8).reshape(640, 960, 3).transpose(1, 0, 2)
    grid.flags.writeable = False
    cache, planes = FieldCache(tmp_path), torch.rand(3, 4, 5)
    cache.save("a" * 32, planes, "instantmesh-large:", {"steps": 3}, grid=grid)
    kept_planes, used, kept = cache.load("a" * 32, "instantmesh-large:")
    assert torch.equal(kept_planes, planes) and used == {"steps": 3} and np.array_equal(kept, grid)
    cache.save("b" * 32, planes, "triposr:")
    assert cache.load("b" * 32, "triposr:")[2] is None
    assert cache.load("a" * 32, "triposr:") is None, "another model's field"


def test_a_bake_from_a_cached_instantmesh_field_paints_from_its_six_views_too(tmp_path, monkeypatch):
    """The cache keeps the generated views with the field, whatever the generation's colours: Bake from Model
    (From Images) paints from them as the generation would have, not from the picture alone."""
    pytest.importorskip("xatlas")
    from test_instantmesh_cli import GRID, stage2_folder

    from backend.field import FieldCache
    from backend.pipeline import bake, generate

    monkeypatch.setenv("IMAGE_TO_3D_CONFIG_DIR", str(tmp_path / "config"))
    cache = FieldCache(tmp_path / "fields")
    base = Options(model="instantmesh-large", weights=str(stage2_folder(tmp_path / "model")), device="cpu",
                   accept_licence=True)
    mesh = generate(None, Options(**{**base.__dict__, "views": str(GRID)}), field_cache=cache)  # From Model
    assert "colour_sources" not in mesh.stats
    options = Options(**{**base.__dict__, "texture": 512, "colours": "images", "field_id": mesh.stats["field_id"]})
    args = mesh.vertices, mesh.faces.reshape(-1), np.full(len(mesh.faces), 3)
    _, texture, stats = bake(None, options, *args, field_cache=cache)
    assert stats["field"] == "cached"
    assert [v["view"] for v in stats["views"]] == ["generated views"]
    assert stats["colour_sources"]["texture"]["generated views"] > 0.01
    _, plain, _ = bake(None, Options(**{**options.__dict__, "colours": "field"}), *args, field_cache=cache)
    assert not np.array_equal(texture, plain)


def test_cancel_during_painting_stops_and_returns_nothing(tmp_path):
    from backend.errors import Cancelled
    from backend.pipeline import generate

    seen = []

    def progress(stage, fraction, message):
        seen.append(stage)

    def cancelled():
        return seen.count(protocol.Stage.PAINT) >= 3  # well into the painting

    options = Options(weights=str(TINY), resolution=48, device="cpu", texture=512, colours="images")
    with pytest.raises(Cancelled):
        generate(IMAGE, options, progress, cancelled)
    assert seen[-1] == protocol.Stage.PAINT


def test_an_unreadable_picture_to_paint_from_is_named(tmp_path):
    """Bake from Model on a cached field reads the picture again to paint from: a damaged file is a clear
    bad_input naming it, not a crash."""
    pytest.importorskip("xatlas")
    from backend.field import FieldCache
    from backend.pipeline import bake, generate

    cache = FieldCache(tmp_path / "fields")
    base = Options(weights=str(TINY), resolution=48, device="cpu")
    mesh = generate(IMAGE, base, field_cache=cache)
    broken = tmp_path / "picture.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    options = Options(**{**base.__dict__, "texture": 512, "colours": "images", "field_id": mesh.stats["field_id"]})
    with pytest.raises(InputError, match="picture.png"):
        bake(broken, options, mesh.vertices, mesh.faces.reshape(-1), np.full(len(mesh.faces), 3), field_cache=cache)


def test_openlrm_paints_from_its_source_camera(tmp_path):
    """OpenLRM through the CLI: the picture (its recentred crop) paints at the source camera."""
    folder = DATA / "openlrm_tiny"
    with np.load(folder / "expected.npz") as e:
        thres = float(e["mesh_thres"])
    out = tmp_path / "out.npz"
    r = run_backend("generate", folder / "input.png", "-o", out, "--model", "openlrm-obj-small", "--weights",
                    folder, "--source-size", 224, "--resolution", 48, "--threshold", repr(thres),
                    "--no-remove-background", "--accept-licence", "--colours", "images", "--json",
                    env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["views"][0]["view"] == "picture" and "vertices" in summary["colour_sources"]
