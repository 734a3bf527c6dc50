"""InstantMesh's NeRF variants (instantnerf-large/base): the official key layouts, the bundled configs against the
checkpoints' own parameters, the recorded checksums, and a tiny model through the CLI compared with a plain
reading of the reference's extract_mesh (σ on the whole grid at once, one marching-cubes call)."""

import itertools
import json

import mcubes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.spatial import cKDTree
from support import DATA, assert_same_mesh, run_backend

from backend import mesh as meshio
from backend.models import instantmesh as im
from backend.models import instantmesh_pipeline as imp
from backend.models import registry
from backend.models.checkpoint import check_state_dict
from backend.models.triplane import mlp_layers

TINY = DATA / "instantmesh_tiny"
GRID = TINY / "views_grid_960x640.png"
RES = 40


def manifest(kind: str, size: str) -> dict:
    return json.loads((DATA / f"instant{kind}_state_dict_manifest_{size}.json").read_text())


@pytest.mark.parametrize("size", ["large", "base"])
def test_official_layouts(size):
    m = manifest("nerf", size)
    cfg = im.config_from_params(m["model_params"], kind=im.NERF)
    with torch.device("meta"):
        model = im.InstantNeRF(cfg)
    state = model.state_dict()
    expected = {k[len(m["key_prefix_on_disk"]):]: v["shape"] for k, v in m["tensors"].items()}
    check_state_dict(expected, {k: v.shape for k, v in state.items()}, f"manifest nerf {size}")
    assert list(state) == list(expected) and len(state) == m["num_tensors"]
    assert sum(v.numel() for v in state.values()) == m["num_params"]
    assert (cfg.grid_res, cfg.kind) == (256, "nerf")


@pytest.mark.parametrize("kind, size", list(itertools.product(["mesh", "nerf"], ["large", "base"])))
def test_bundled_configs_are_the_checkpoints_own(kind, size):
    m = manifest(kind, size)
    path = imp.BUNDLED_CONFIGS / f"instant-{kind}-{size}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["model_config"]["target"] == m["model_class"]
    assert raw["model_config"]["params"] == m["model_params"]
    assert raw["infer_config"]["model_path"] == f"instant_{kind}_{size}.ckpt"
    assert im.read_config(path)[0].kind == kind


def test_registry_entries():
    for size in ("large", "base"):
        spec = registry.get(f"instantnerf-{size}")
        ckpt = spec.files[0]
        assert (ckpt.path, ckpt.size, ckpt.sha256) == (
            f"instant_nerf_{size}.ckpt", manifest("nerf", size)["file_size_bytes"], manifest("nerf", size)["sha256"])
        assert spec.files[1:] == registry.get(f"instantmesh-{size}").files[1:]  # the same Zero123++ stage
        assert (spec.multiview, spec.default_resolution, spec.default_threshold) == (True, 256, 10.0)
        assert spec.display_name == f"InstantNeRF {size.title()}" and spec.licence == "CC-BY-NC-4.0"
    assert registry.get("instantmesh").id == "instantmesh-large" and registry.get("instantnerf").id == "instantnerf-large"


@pytest.fixture(scope="module")
def tiny_nerf(tmp_path_factory):
    """The tiny fixture's encoder and transformer with a seeded random NeRF decoder, in the official layout
    under the name instantnerf-large looks for, with a NeRF config."""
    folder = tmp_path_factory.mktemp("instantnerf-large")
    config = yaml.safe_load((TINY / "tiny_config.yaml").read_text())
    config["model_config"]["target"] = "src.models.lrm.InstantNeRF"
    for key in ("grid_res", "grid_scale"):
        del config["model_config"]["params"][key]
    config["infer_config"]["model_path"] = "instant_nerf_large.ckpt"
    (folder / "tiny_config.yaml").write_text(yaml.safe_dump(config))
    state = torch.load(TINY / "tiny_instant_mesh.ckpt", weights_only=True)["state_dict"]
    state = {k: v for k, v in state.items() if ".synthesizer." not in k}
    torch.manual_seed(0)
    width = 3 * config["model_config"]["params"]["triplane_dim"]
    net = mlp_layers(width, 64, 3, "relu", 4)
    state.update({f"lrm_generator.synthesizer.decoder.net.{k}": v for k, v in net.state_dict().items()})
    torch.save({"state_dict": state}, folder / "instant_nerf_large.ckpt")
    return folder


def reference(folder, res):
    """The spec's extract_mesh, written out: σ = softplus(raw − 1) on linspace(−1, 1, res)³ (ij), one marching
    cubes, v / (res − 1) · 2 − 1, colours sigmoid · 1.002 − 0.001 at the vertices. The level is picked so that
    the random field has a surface: the 90th percentile of σ."""
    model = im.load(folder / "tiny_config.yaml", torch.device("cpu"))
    assert isinstance(model, im.InstantNeRF) and model.cfg.grid_res == 256
    with torch.no_grad():
        planes = model.triplanes(model.encode(im.views_from_grid(GRID), im.input_cameras()))
        axis = torch.linspace(-1, 1, res)
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        net = model.synthesizer.decoder.net
        sigma = F.softplus(net(model.features(planes, points))[:, 0] - 1).reshape(res, res, res).numpy()
        level = float(np.quantile(sigma, 0.9))
        vertices, faces = mcubes.marching_cubes(sigma.astype(np.float64), level)
        vertices = vertices / (res - 1) * 2 - 1
        rgb = torch.sigmoid(net(model.features(planes, torch.from_numpy(vertices).float()))[:, 1:]) * 1.002 - 0.001
    return level, vertices, faces, rgb.clamp(0, 1).numpy()


def test_views_to_mesh_through_the_cli(tmp_path, tiny_nerf):
    level, ref_vertices, ref_faces, ref_colors = reference(tiny_nerf, RES)
    out = tmp_path / "out.npz"
    r = run_backend("generate", "--views", GRID, "-o", out, "--model", "instantnerf-large", "--weights", tiny_nerf,
                    "--resolution", RES, "--threshold", repr(level), "--accept-licence", "--json",
                    env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["model"] == "instantnerf-large" and summary["resolution"] == RES
    mesh = meshio.load_npz(out)
    assert len(ref_faces) > 100
    assert_same_mesh(mesh.vertices, mesh.faces, im.to_blender(ref_vertices), ref_faces)
    # colours: each vertex against the reference vertex at the same place, as bytes (truncated)
    _, nearest = cKDTree(im.to_blender(ref_vertices)).query(mesh.vertices)
    ref_bytes = np.floor(ref_colors[nearest] * 255)
    diff = np.abs(np.round(mesh.colors * 255) - ref_bytes)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # a float32 rounding may tip a byte


def test_a_level_with_no_surface_is_explained(tmp_path, tiny_nerf):
    r = run_backend("generate", "--views", GRID, "-o", tmp_path / "out.npz", "--model", "instantnerf-large",
                    "--weights", tiny_nerf, "--resolution", 32, "--threshold", "1e9", "--accept-licence",
                    env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert r.returncode == 2 and "no surface found at threshold 1e+09" in r.stderr, r.stderr
    assert not (tmp_path / "out.npz").exists()


def test_a_second_variant_reuses_the_files_the_first_downloaded(tmp_path, monkeypatch):
    """instantnerf-base after instantmesh-base: the Zero123++ files and the UNet (about 3.9 GB) are in the Hugging
    Face cache once, for every variant; only the NeRF checkpoint is left, and offline it is named."""
    from backend import hub
    from backend.hub import OfflineError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    store = tmp_path / "store"
    first, second = registry.get("instantmesh-base"), registry.get("instantnerf-base")
    for f in first.files[1:]:  # everything but the mesh checkpoint, as a finished download leaves it in the cache
        folder = hub.repo_folder(f.repo)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / f.revision).write_text("c" * 40)  # a branch ("main"), as the library records it
        path = folder / "snapshots" / ("c" * 40) / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            out.truncate(f.size or 10)  # sparse: the UNet's published size without writing 1.7 GB
    assert [f.path for f in registry.missing_files(second, store)] == ["instant_nerf_base.ckpt"]
    with pytest.raises(OfflineError, match="instant_nerf_base.ckpt"):
        registry.fetch("instantnerf-base", store, online=False)
    # A file of the wrong size does not count (it would not be the published one).
    with open(hub.cached(first.files[1]), "r+b") as out:
        out.truncate(5)
    assert "diffusion_pytorch_model.bin" in [f.path for f in registry.missing_files(registry.get("instantnerf-large"),
                                                                                    store)]


def test_post_processing_reads_the_nerf_field(tmp_path, tiny_nerf):
    """--faces and --texture on the NeRF variant: the reduced mesh's colours are the field's at its vertices."""
    level, _, ref_faces, _ = reference(tiny_nerf, RES)
    out = tmp_path / "out.npz"
    r = run_backend("generate", "--views", GRID, "-o", out, "--model", "instantnerf-large", "--weights", tiny_nerf,
                    "--resolution", RES, "--threshold", repr(level), "--faces", "600", "--texture", "512",
                    "--accept-licence", env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert r.returncode == 0, r.stderr
    mesh = meshio.load_npz(out)
    assert abs(len(mesh.faces) - 600) <= 30 < len(ref_faces) and mesh.texture.shape == (512, 512, 3)
    model = im.load(tiny_nerf / "tiny_config.yaml", torch.device("cpu"))
    with torch.no_grad():
        planes = model.triplanes(model.encode(im.views_from_grid(GRID), im.input_cameras()))
    expected = model.colour_field(planes)(mesh.vertices)
    assert np.abs(expected - mesh.colors).max() <= 1 / 255 + 1e-6
