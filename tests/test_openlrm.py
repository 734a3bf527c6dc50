"""OpenLRM against the reference: parity with the tiny fixtures (separate and packed cross-attention), the
official key layouts of small/base/large, strict loading, the source size, the frame, the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.spatial import cKDTree
from support import DATA, OPENLRM_TINY, run_backend

from backend import mesh as meshio
from backend import preprocess, surface
from backend.errors import InputError, WeightsError
from backend.models import openlrm
from backend.models.triplane import sample_planes
from backend.models.vit import resize_position_embeddings
from backend.options import Options
from backend.progress import Stages

# variant -> (folder, source size of its fixture)
VARIANTS = {"separate": (OPENLRM_TINY, 224), "packed": (OPENLRM_TINY / "packed", 336)}


def max_error(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    return float(np.abs(a.astype(np.float64) - b).max())


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    folder, source_size = VARIANTS[request.param]
    with np.load(folder / "expected.npz") as e:
        expected = {k: e[k] for k in e.files}
    model = openlrm.load(folder, torch.device("cpu"))
    return model, expected, source_size


def test_cross_attention_layouts():
    separate = load_file(OPENLRM_TINY / "model.safetensors")
    packed = load_file(OPENLRM_TINY / "packed" / "model.safetensors")
    assert "transformer.layers.0.cross_attn.q_proj_weight" in separate and \
        "transformer.layers.0.cross_attn.in_proj_weight" not in separate
    assert "transformer.layers.0.cross_attn.in_proj_weight" in packed and \
        "transformer.layers.0.cross_attn.k_proj_weight" not in packed


def test_stages_match_reference(variant):
    model, e, _ = variant
    # Tolerances from the fixture README (float32 CPU).
    assert max_error(openlrm.source_camera(), e["source_camera"]) == 0
    features = model.encode(torch.from_numpy(e["preprocessed_image"]))
    assert max_error(features, e["image_feats"]) <= 2e-5
    camera = model.embed_camera(openlrm.source_camera())
    assert max_error(camera, e["camera_embedding"]) <= 1e-5
    tokens = model.transform(torch.from_numpy(e["image_feats"]), torch.from_numpy(e["camera_embedding"]))
    assert max_error(tokens, e["transformer_tokens"]) <= 1e-5
    assert max_error(model.upsample(torch.from_numpy(e["transformer_tokens"])), e["planes"]) <= 1e-5
    assert max_error(model.upsample(model.transform(features, camera)), e["planes"]) <= 1e-5


def test_density_and_colour_at_points(variant):
    model, e, _ = variant
    field = model.field(torch.from_numpy(e["planes"][0]))
    points = torch.from_numpy(e["points"][0])  # some outside the box: zero features there
    c = field.planes.shape[1]
    features = sample_planes(field.planes, field.normalize(points), field.plane_axes)
    assert max_error(features.reshape(-1, 3, c).permute(1, 0, 2), e["point_features"][0]) <= 5e-6
    assert max_error(field.raw(points)[:, :1], e["sigma_raw"][0]) <= 5e-6
    density, color = field.query(points)
    assert max_error(density[:, None], e["sigma"][0]) <= 5e-6
    assert max_error(color, e["rgb"][0]) <= 5e-6


@pytest.mark.parametrize("resolution", [32, 64])
def test_grid_and_mesh_match_reference(variant, resolution):
    model, e, _ = variant
    field = model.field(torch.from_numpy(e["planes"][0]))
    grid = np.stack([d.numpy() for d in field.grid_density(surface.grid_coords(resolution, openlrm.RADIUS))])
    assert max_error(grid, e[f"grid{resolution}_sigma"]) <= 5e-6

    vertices, faces = surface.marching_cubes(field, resolution, float(e["mesh_thres"]))
    ref_vertices, ref_faces = e[f"mesh{resolution}_vertices"], e[f"mesh{resolution}_faces"]
    assert len(vertices) == len(ref_vertices) and len(faces) == len(ref_faces)
    gap = max(cKDTree(ref_vertices).query(vertices)[0].max(), cKDTree(vertices).query(ref_vertices)[0].max())
    assert gap <= 1e-4
    _, colors = field.query(torch.from_numpy(vertices.astype(np.float32)))
    ours = np.rint(meshio.truncate_to_bytes(colors.numpy()) * 255).astype(int)
    ref = e[f"mesh{resolution}_vertex_colors"][cKDTree(ref_vertices).query(vertices)[1]].astype(int)
    assert np.abs(ours - ref).max() <= 1


def test_reconstruct_from_the_image_file(variant):
    """The runner's own path, file to mesh: the image as given (composited on white, resized)."""
    model, e, source_size = variant
    image = preprocess.load_image(OPENLRM_TINY / "input.png")
    conditioning = preprocess.prepare(image, recipe="openlrm", remove_background=False)
    assert max_error(preprocess.to_openlrm_input(conditioning, source_size), e["preprocessed_image"]) <= 1e-6
    options = Options(resolution=32, threshold=float(e["mesh_thres"]), source_size=source_size)
    mesh = model.reconstruct(conditioning, options, Stages(None, None))
    assert len(mesh.vertices) == len(e["mesh32_vertices"]) and len(mesh.faces) == len(e["mesh32_faces"])
    # Already in Blender's frame: vertices are the reference's, unchanged.
    assert cKDTree(e["mesh32_vertices"]).query(mesh.vertices)[0].max() <= 1e-4
    assert mesh.stats["source_size"] == source_size


def test_truncate_to_bytes_keeps_the_reference_bytes():
    rgb = np.array([[-0.001, 0.5, 1.001], [0.9999, 0.00392, 0.00393]], np.float32)
    ref = (rgb * 255).astype(np.uint8)  # what the reference exports (negative values truncate to 0)
    stored = meshio.truncate_to_bytes(rgb)
    assert stored.min() >= 0 and stored.max() <= 1
    assert (meshio._colors_u8(meshio.Mesh(np.zeros((2, 3)), np.zeros((0, 3)), stored)) == ref).all()


def test_source_camera_is_blenders_front_view():
    """spec §4/§10: cam2world R columns are the camera's right, up and backward axes in the world."""
    cam = openlrm.source_camera()[0].numpy()
    pose = cam[:12].reshape(3, 4)
    right, up, backward, centre = pose[:, 0], pose[:, 1], pose[:, 2], pose[:, 3]
    assert centre.tolist() == [0, -2, 0]  # in front of the object, on -Y
    assert right.tolist() == [1, 0, 0] and up.tolist() == [0, 0, 1] and (-backward).tolist() == [0, 1, 0]
    assert cam[12:].tolist() == [0.75, 0.75, 0.5, 0.5]


@pytest.mark.parametrize("grid", [16, 24, 32, 39])
def test_dinov2_position_embeddings_resize_to_any_grid(grid):
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = resize_position_embeddings(pos, grid, grid, offset=0.0, antialias=True)
    assert out.shape == (1, 1 + grid * grid, 8) and torch.equal(out[:, 0], pos[:, 0])
    if grid != 39:  # the reference's scale-factor call gives the same values where its size comes out right
        ref = torch.nn.functional.interpolate(pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2),
                                              scale_factor=(grid / 37, grid / 37), mode="bicubic", antialias=True)
        assert torch.equal(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 8))


# ------------------------------------------------------------------------------------------ source size

def test_other_source_sizes_run_and_wrong_ones_are_refused():
    model = openlrm.load(OPENLRM_TINY, torch.device("cpu"), default_source_size=224)
    image = preprocess.load_image(OPENLRM_TINY / "input.png")
    conditioning = preprocess.prepare(image, recipe="openlrm", remove_background=False)
    thres = float(np.load(OPENLRM_TINY / "expected.npz")["mesh_thres"])
    mesh = model.reconstruct(conditioning, Options(resolution=32, threshold=thres, source_size=252),
                             Stages(None, None))
    assert mesh.stats["source_size"] == 252 and len(mesh.faces) > 0
    default = model.reconstruct(conditioning, Options(resolution=32, threshold=thres), Stages(None, None))
    assert default.stats["source_size"] == 224
    with pytest.raises(InputError, match="not a multiple of the image encoder's 14-pixel patches") as e:
        model.reconstruct(conditioning, Options(resolution=32, threshold=thres, source_size=300), Stages(None, None))
    assert "294 or 308" in e.value.hint


# --------------------------------------------------------------------------------- official layouts

def manifest(size):
    return json.loads((DATA / f"openlrm_state_dict_manifest_{size}.json").read_text())


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_full_size_layout_matches_official_manifest(tmp_path, size):
    m = manifest(size)
    (tmp_path / "config.json").write_text(json.dumps(m["_header"]["config_json"]))
    cfg = openlrm.read_config(tmp_path)
    with torch.device("meta"):
        model = openlrm.OpenLRM(cfg)
    ours = [(k, list(v.shape), "F32" if v.dtype == torch.float32 else str(v.dtype))
            for k, v in model.state_dict().items()]
    theirs = [(k, t["shape"], t["dtype"]) for k, t in m["tensors"].items()]
    assert ours == theirs
    assert len(ours) == m["_header"]["num_tensors"]
    assert sum(int(np.prod(s)) for _, s, _ in ours) == m["_header"]["num_parameters"]
    cross = {k.rsplit(".", 1)[-1] for k in m["tensors"] if ".cross_attn." in k}
    assert ("in_proj_weight" in cross) == (size == "base")  # base packs, small and large do not


# ------------------------------------------------------------------------------------- strict loading

def tiny_copy(tmp_path, folder=OPENLRM_TINY):
    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tiny_encoder_arch.json"):
        shutil.copy(folder / name, out / name)
    return out


def rewrite(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("synthesizer.decoder.net.6.bias"), "1 missing: synthesizer.decoder.net.6.bias"),
    (lambda s: s.update(extra=torch.zeros(1)), "1 unexpected: extra"),
    (lambda s: s.update({"upsampler.bias": torch.zeros(9)}), "1 wrong shape: upsampler.bias"),
    (lambda s: s.update({"upsampler.bias": torch.zeros(8, dtype=torch.float16)}), "unexpected type: upsampler.bias"),
])
def test_strict_loading(tmp_path, edit, message):
    folder = tiny_copy(tmp_path)
    rewrite(folder, edit)
    with pytest.raises(WeightsError, match=message.replace(".", r"\.")):
        openlrm.load(folder, torch.device("cpu"))


def test_packed_weights_do_not_load_as_separate(tmp_path):
    folder = tiny_copy(tmp_path)
    shutil.copy(OPENLRM_TINY / "packed" / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(WeightsError, match="missing: .*q_proj_weight"):
        openlrm.load(folder, torch.device("cpu"))


@pytest.mark.parametrize("damage", ["truncated", "not safetensors", "empty"])
def test_unreadable_weights_are_a_weights_error(tmp_path, damage):
    folder = tiny_copy(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(
        {"truncated": data[: len(data) // 2], "not safetensors": b"\x80\x02}q\x00." * 100, "empty": b""}[damage])
    with pytest.raises(WeightsError, match="could not be read as a safetensors file") as e:
        openlrm.load(folder, torch.device("cpu"))
    assert "download it again" in e.value.hint


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("triplane_dim"), r"missing \['triplane_dim'\]"),
    (lambda c: c.update(trust_remote_code=True), r"unknown \['trust_remote_code'\]"),
    (lambda c: c.update(encoder_type="dino"), "encoder_type 'dino' is not supported"),
    (lambda c: c.update(encoder_feat_dim=64), "encoder_feat_dim 64 differs"),
    (lambda c: c.update(encoder_model_name="dinov2_vitg14_reg"), "image encoder 'dinov2_vitg14_reg'"),
])
def test_config_is_checked(tmp_path, change, message):
    folder = tiny_copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=message):
        openlrm.read_config(folder)


def test_encoder_arch_comes_from_its_side_file_or_the_known_backbones(tmp_path):
    folder = tiny_copy(tmp_path)
    assert openlrm.read_config(folder).encoder.embed_dim == 48
    (folder / "tiny_encoder_arch.json").unlink()
    with pytest.raises(WeightsError, match="dinov2_vitt14_reg_test") as e:
        openlrm.read_config(folder)
    assert "encoder_arch.json" in e.value.hint
    arch = json.loads((OPENLRM_TINY / "tiny_encoder_arch.json").read_text())
    (folder / "my_encoder_arch.json").write_text(json.dumps({**arch, "ffn_layer": "swiglufused"}))
    with pytest.raises(WeightsError, match="unsupported DINOv2 settings"):
        openlrm.read_config(folder)
    base = manifest("base")["_header"]["config_json"]
    (folder / "config.json").write_text(json.dumps(base))
    assert openlrm.read_config(folder).encoder.embed_dim == 768  # dinov2_vitb14_reg needs no side file


# ------------------------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("model,folder,extra", [
    ("openlrm-base", OPENLRM_TINY / "packed", []),  # base's default source size, 336, is the packed fixture's
    ("openlrm-obj-small", OPENLRM_TINY, ["--source-size", 224]),
])
def test_cli_reproduces_the_reference_mesh(tmp_path, model, folder, extra):
    with np.load(folder / "expected.npz") as e:
        thres, ref_vertices, ref_faces = float(e["mesh_thres"]), e["mesh64_vertices"], e["mesh64_faces"]
        ref_colors = e["mesh64_vertex_colors"]
    out = tmp_path / "out.npz"
    r = run_backend("generate", OPENLRM_TINY / "input.png", "-o", out, "--model", model, "--weights", folder,
                    "--resolution", 64, "--threshold", repr(thres), "--no-remove-background", "--accept-licence",
                    "--json", *extra, env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["model"] == model.replace("openlrm-base", "openlrm-mix-base")
    assert summary["source_size"] == (336 if not extra else 224)
    mesh = meshio.load_npz(out)
    assert len(mesh.vertices) == len(ref_vertices) and len(mesh.faces) == len(ref_faces)
    dist, nearest = cKDTree(ref_vertices).query(mesh.vertices)
    assert dist.max() <= 1e-4
    assert np.abs(np.rint(mesh.colors * 255).astype(int) - ref_colors[nearest]).max() <= 1


def test_cli_refuses_a_source_size_off_the_patch_grid(tmp_path):
    r = run_backend("generate", OPENLRM_TINY / "input.png", "-o", tmp_path / "m.npz", "--model", "openlrm-small",
                    "--weights", OPENLRM_TINY, "--resolution", 32, "--no-remove-background", "--accept-licence",
                    "--source-size", 230, env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert r.returncode == 2, r.stderr
    assert "source size 230 is not a multiple of the image encoder's 14-pixel patches" in r.stderr
    assert "224 or 238" in r.stderr and not (tmp_path / "m.npz").exists()


def test_cli_default_path_recentres_like_the_demo(tmp_path):
    """A real-alpha image through the default path (no flags about preprocessing): the model sees exactly the
    reference demo's recentred image."""
    folder = OPENLRM_TINY / "packed"
    thres = float(np.load(folder / "expected.npz")["mesh_thres"])
    out = tmp_path / "out.npz"
    r = run_backend("generate", OPENLRM_TINY / "preprocess" / "alpha_probe.png", "-o", out, "--model", "openlrm-base",
                    "--weights", folder, "--resolution", 32, "--threshold", repr(thres), "--accept-licence",
                    env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert r.returncode == 0, r.stderr
    recentred = np.asarray(preprocess.load_image(OPENLRM_TINY / "preprocess" / "alpha_probe__app_recenter512.png"))
    model = openlrm.load(folder, torch.device("cpu"))
    expected = model.reconstruct(recentred, Options(resolution=32, threshold=thres, source_size=336),
                                 Stages(None, None))
    mesh = meshio.load_npz(out)
    assert len(mesh.faces) == len(expected.faces) and np.allclose(mesh.vertices, expected.vertices, atol=1e-6)
    assert np.array_equal(mesh.colors, expected.colors)


@pytest.mark.parametrize("size", [0, 5000])
def test_cli_refuses_a_source_size_out_of_range(tmp_path, size):
    r = run_backend("generate", OPENLRM_TINY / "input.png", "-o", tmp_path / "m.npz", "--model", "openlrm-small",
                    "--weights", OPENLRM_TINY, "--source-size", size, "--accept-licence",
                    env={"IMAGE_TO_3D_CONFIG_DIR": str(tmp_path / "config")})
    assert r.returncode == 2 and "source size must be between 1 and 2048" in r.stderr
