"""InstantMesh through the command line, as a user runs it: stage 2 alone on a ready-made views grid (the tiny
parity fixture), both stages from an image (tiny random Zero123++ + the tiny LRM), and the refusals."""

import json
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from support import DATA, ROOT, assert_same_mesh, run_backend

from backend import mesh as meshio
from backend.models import instantmesh as im

TINY = DATA / "instantmesh_tiny"
GRID = TINY / "views_grid_960x640.png"


def stage2_folder(root):
    from zero123pp_tiny import add_lrm

    return add_lrm(root)


def config_env(tmp_path):
    return {"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")}


def test_views_grid_reproduces_the_reference_mesh(tmp_path):
    out = tmp_path / "out.npz"
    r = run_backend("generate", "--views", GRID, "-o", out, "--model", "instantmesh-large",
                    "--weights", stage2_folder(tmp_path / "model"), "--accept-licence", "--json", env=config_env(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["model"] == "instantmesh-large" and summary["resolution"] == 32  # the folder config's grid
    assert "generating_views" not in summary["seconds"] and "removing_background" not in summary["seconds"]
    with np.load(TINY / "expected.npz") as e:
        ref_vertices, ref_faces = e["mesh_vertices"], e["mesh_faces"]
    used = np.unique(ref_faces)  # the reference keeps unused dual vertices; we drop them
    mesh = meshio.load_npz(out)
    assert len(mesh.faces) == len(ref_faces) and len(mesh.vertices) == len(used)
    assert_same_mesh(mesh.vertices, mesh.faces, im.to_blender(ref_vertices[used]), ref_faces)


@pytest.fixture(scope="module")
def full_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from zero123pp_tiny import make_instantmesh_folder

    return make_instantmesh_folder(tmp_path_factory.mktemp("instantmesh-large"))


def rgba_image(path):
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[20:76, 30:66] = (200, 60, 30, 255)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_image_to_views_to_mesh(tmp_path, full_folder):
    out, views = tmp_path / "out.npz", tmp_path / "views.png"
    r = run_backend("generate", rgba_image(tmp_path / "in.png"), "-o", out, "--model", "instantmesh-large",
                    "--weights", full_folder, "--steps", 2, "--seed", 1, "--save-views", views, "--accept-licence",
                    env=config_env(tmp_path))
    # The tiny weights are random; the LRM's empty-shape repair guarantees a surface, so a mesh comes out.
    assert r.returncode == 0, r.stderr
    assert "[generating_views]" in r.stderr and "view synthesis step 2/2" in r.stderr
    with Image.open(views) as grid:
        assert grid.size == (640, 960) and grid.mode == "RGB"
    mesh = meshio.load_npz(out)
    assert len(mesh.faces) > 0 and mesh.colors.shape == mesh.vertices.shape
    # The saved grid is what stage 2 reconstructed: feeding it back gives the same mesh.
    again = tmp_path / "again.npz"
    r = run_backend("generate", "--views", views, "-o", again, "--model", "instantmesh-large",
                    "--weights", full_folder, "--json", env=config_env(tmp_path))
    assert r.returncode == 0, r.stderr
    same = meshio.load_npz(again)
    assert np.array_equal(same.faces, mesh.faces) and np.allclose(same.vertices, mesh.vertices, atol=1e-6)


def test_worker_reports_each_step_and_hands_back_the_views(tmp_path, full_folder, monkeypatch):
    """What Blender's operator sees: per-step progress, then the mesh and the views grid in the job folder,
    the same mesh as the CLI gives for the same seed; a cancel lands between two steps."""
    from backend import client as wire
    from backend import protocol
    from backend import licences

    monkeypatch.setenv("IMAGE_TO_3D_CONFIG_DIR", str(tmp_path / "config"))
    licences.accept("CC-BY-NC-4.0", "instantmesh-large")
    options = {"model": "instantmesh-large", "weights": str(full_folder), "device": "cpu", "steps": 3, "seed": 1,
               "guidance": 4.0}
    image = rgba_image(tmp_path / "in.png")
    w = wire.Worker(sys.executable, ROOT, temp_dir=str(tmp_path / "jobs"))
    try:
        job = w.submit(str(image), options)
        w.wait(timeout=300)
        assert job.state == protocol.DONE, (job.error, w.log_tail())
        assert job.views_path == str(job.job_dir / "views.png")
        with Image.open(job.views_path) as grid:
            assert grid.size == (640, 960)
        served = meshio.load_npz(job.result_path)
        out = tmp_path / "cli.npz"
        r = run_backend("generate", image, "-o", out, "--model", "instantmesh-large", "--weights", full_folder,
                        "--steps", 3, "--seed", 1, env=config_env(tmp_path))
        assert r.returncode == 0, r.stderr
        cli = meshio.load_npz(out)
        assert np.array_equal(served.faces, cli.faces) and np.allclose(served.vertices, cli.vertices, atol=1e-6)
        job.cleanup()

        job = w.submit(str(image), dict(options, steps=400))
        steps_seen = set()
        deadline = time.monotonic() + 120
        while "step 2/400" not in job.message and not job.finished and time.monotonic() < deadline:
            w.poll()
            if job.stage == "generating_views":
                steps_seen.add(job.message)
            time.sleep(0.005)
        w.cancel()
        w.wait(timeout=60)
        assert job.state == protocol.CANCELLED and w.running  # stopped between steps, the worker lives on
        assert any("step 1/400" in m for m in steps_seen)
        assert not job.job_dir.exists()
    finally:
        w.stop()


@pytest.mark.parametrize("args, status, message", [
    (["--views", "SMALL"], 2, "must be 640×960"),
    (["--views", GRID, "--steps", 0], 2, "steps must be between 1 and 500"),
    (["--views", GRID, "--seed", 3], 2, "--seed does not apply"),
    (["IMAGE", "--views", GRID], 2, "not both"),
    (["IMAGE", "--threshold", 0.5], 2, "--threshold does not apply"),
    (["IMAGE", "--guidance", 0.5], 2, "guidance must be between 1 and 30"),
    (["IMAGE", "--save-views", "views.jpg"], 2, "saved as PNG"),
    (["--views", GRID, "--model", "triposr"], 2, "--views does not apply"),
    (["IMAGE"], 3, "lacks diffusion_pytorch_model.bin, model_index.json"),  # stage-2 files only: enough for --views, not for an image
    (["--views", GRID, "--weights", "EMPTY"], 3, "lacks instant_mesh_large.ckpt"),
    (["--views", GRID, "--model", "instantmesh-base"], 3, "InstantMesh Base weights not found"),
])
def test_refusals(tmp_path, args, status, message):
    Image.new("RGB", (640, 640), "white").save(tmp_path / "small.png")
    (tmp_path / "empty").mkdir()
    names = {"SMALL": tmp_path / "small.png", "IMAGE": rgba_image(tmp_path / "in.png"), "EMPTY": tmp_path / "empty"}
    args = [names.get(a, a) if isinstance(a, str) else a for a in args]
    if "--model" not in args:
        args += ["--model", "instantmesh-large"]
    if "--weights" not in args and "instantmesh-base" not in args:
        args += ["--weights", stage2_folder(tmp_path / "model")]
    if "views.jpg" in args:
        args[args.index("views.jpg")] = tmp_path / "views.jpg"
    out = tmp_path / "out.npz"
    env = {**config_env(tmp_path), "IMAGE_TO_3D_MODELS": str(tmp_path / "store"), "HF_HUB_CACHE": str(tmp_path)}
    r = run_backend("generate", *args, "-o", out, "--accept-licence", env=env)
    assert r.returncode == status, r.stderr
    assert message in r.stderr and not out.exists()


def test_licence_must_be_accepted(tmp_path):
    r = run_backend("generate", "--views", GRID, "-o", tmp_path / "out.npz", "--model", "instantmesh-large",
                    "--weights", stage2_folder(tmp_path / "model"), env=config_env(tmp_path))
    assert r.returncode == 4, r.stderr
    assert "CC-BY-NC-4.0" in r.stderr and not (tmp_path / "out.npz").exists()


def test_registry_and_preprocessing():
    from backend import preprocess
    from backend.models import registry

    spec = registry.get("instantmesh-base")
    assert spec.multiview and spec.licence == "CC-BY-NC-4.0" and spec.default_resolution == 128
    assert spec.file_names[:2] == ("instant_mesh_base.ckpt", "diffusion_pytorch_model.bin")
    assert "unet/diffusion_pytorch_model.safetensors" not in spec.file_names  # InstantMesh's UNet replaces it
    assert spec.download_size is None and 5.0e9 < registry.approx_size(spec.files) < 5.2e9  # Zero123++'s sizes: estimates
    rgba = np.zeros((100, 60, 4), np.uint8)
    rgba[10:90, 20:40] = (10, 200, 30, 255)
    out = preprocess.prepare(Image.fromarray(rgba, "RGBA"), recipe="instantmesh")
    assert out.shape == (92, 92, 4) and out[..., 3].any() and not out[0, 0].any()  # int(79 / 0.85), transparent
    plain = Image.new("RGB", (50, 30), "red")
    assert np.array_equal(preprocess.prepare(plain, recipe="instantmesh", remove_background=False), np.asarray(plain))


@pytest.mark.parametrize("size", ["large", "base"])
def test_bundled_configs_match_the_official_layouts(size):
    import json as json_

    from backend.models import instantmesh_pipeline as imp

    cfg, infer = im.read_config(imp.BUNDLED_CONFIGS / f"instant-mesh-{size}.yaml")
    assert infer["model_path"] == f"instant_mesh_{size}.ckpt" and cfg.grid_res == 128 and cfg.grid_scale == 2.1
    with torch.device("meta"):
        model = im.InstantMesh(cfg)
    manifest = json_.loads((DATA / f"instantmesh_state_dict_manifest_{size}.json").read_text())
    tensors = manifest["tensors"] if "tensors" in manifest else manifest
    assert sum(p.numel() for p in model.parameters()) == {"large": 378_657_644, "base": 313_352_516}[size]
    assert len(model.state_dict()) == len(tensors)


def test_recorded_checksums_are_the_manifests():
    from backend.models import registry

    unet = json.loads((DATA / "zero123pp_tiny" / "zero123plus_unet_state_dict_manifest.json").read_text())
    for size in ("large", "base"):
        manifest = json.loads((DATA / f"instantmesh_state_dict_manifest_{size}.json").read_text())
        ckpt, unet_file = registry.get(f"instantmesh-{size}").files[:2]
        assert (ckpt.size, ckpt.sha256) == (manifest["file_size_bytes"], manifest["sha256"])
        assert (unet_file.size, unet_file.sha256) == (unet["file_size_bytes"], unet["sha256"])
