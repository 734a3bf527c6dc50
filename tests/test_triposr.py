"""TripoSR against the reference: parity with the tiny fixture, the official key layout, strict loading."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from support import DATA, TINY, assert_same_mesh, weld_points

from backend import surface
from backend.errors import WeightsError
from backend.models import triposr
from backend.models.vit import resize_position_embeddings

RADIUS = 0.87


@pytest.fixture(scope="module")
def expected():
    with np.load(TINY / "expected.npz") as e:
        return {k: e[k] for k in e.files}


@pytest.fixture(scope="module")
def model():
    return triposr.load(TINY, torch.device("cpu"))


@pytest.fixture(scope="module")
def field(model, expected):
    return model.field(torch.from_numpy(expected["scene_codes"][0]))


def test_position_embedding_resize_follows_transformers_435():
    with np.load(DATA / "posembed_interp_14to32.npz") as f:
        out = resize_position_embeddings(torch.from_numpy(f["pos_in"]), 32, 32).numpy()
        assert np.abs(out - f["out_tf435"]).max() <= 1e-6
        # The newer exact-size resize is measurably different: the test can tell them apart.
        assert np.abs(out - f["out_tf5"]).max() > 1e-2


def test_stages_match_reference(model, expected):
    rgb = torch.from_numpy(expected["rgb_cond"][:, 0])
    tokens = model.encode(rgb)
    assert np.abs(tokens.numpy() - expected["image_tokens"]).max() <= 1e-4
    planes = model.triplanes(torch.from_numpy(expected["image_tokens"]))
    assert planes.shape == expected["scene_codes"].shape
    assert np.abs(planes.numpy() - expected["scene_codes"]).max() <= 1e-4
    assert np.abs(model.triplanes(tokens).numpy() - expected["scene_codes"]).max() <= 1e-4


def test_density_and_colour_at_points(field, expected):
    density, color = field.query(torch.from_numpy(expected["query_points"]))
    ref = expected["query_density_act"][:, 0]
    assert (np.abs(density.numpy() - ref) / ref).max() <= 1e-4
    assert np.abs(color.numpy() - expected["query_color"]).max() <= 1e-5


@pytest.mark.parametrize("resolution", [32, 64])
def test_grid_density(field, expected, resolution):
    coords = surface.grid_coords(resolution, RADIUS)
    grid = np.stack([d.numpy() for d in field.grid_density(coords)])
    ref = expected[f"grid_density_{resolution}"]
    assert (np.abs(grid - ref) / ref).max() <= 1e-4


@pytest.mark.parametrize("resolution", [32, 64])
def test_mesh_matches_reference(field, expected, resolution):
    vertices, faces = surface.marching_cubes(field, resolution, 25.0)
    assert_same_mesh(vertices, faces, expected[f"mesh{resolution}_vertices"], expected[f"mesh{resolution}_faces"])
    # colours at the vertices, against the reference's uint8 colours (±1)
    _, colors = field.query(torch.from_numpy(vertices.astype(np.float32)))
    ref_tree = cKDTree(expected[f"mesh{resolution}_vertices"])
    _, nearest = ref_tree.query(vertices)
    ref_rgb = expected[f"mesh{resolution}_vertex_colors_rgba8"][nearest, :3].astype(int)
    assert np.abs(np.rint(colors.numpy() * 255).astype(int) - ref_rgb).max() <= 1


def test_slabs_do_not_change_the_mesh(field):
    whole = surface.marching_cubes(field, 48, 25.0)
    surface_slab = surface.SLAB_BYTES
    try:
        surface.SLAB_BYTES = 3 * 48 * 48 * 8  # 3 slices per slab: many seams
        sliced = surface.marching_cubes(field, 48, 25.0)
    finally:
        surface.SLAB_BYTES = surface_slab
    assert len(sliced[1]) == len(whole[1]) and len(sliced[0]) == len(whole[0])
    assert_same_mesh(sliced[0], sliced[1], whole[0], whole[1])


def test_mesh_is_welded_and_outward(field):
    vertices, faces = surface.marching_cubes(field, 64, 25.0)
    assert len(weld_points(vertices)) == len(vertices)  # no duplicate positions
    assert (faces[:, 0] != faces[:, 1]).all() and (faces[:, 1] != faces[:, 2]).all()
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(normals, axis=1)
    ok = area > 1e-8
    normals = normals[ok] / area[ok, None]
    centres = tri[ok].mean(axis=1)
    step = 0.01
    outside, _ = field.query(torch.from_numpy((centres + step * normals).astype(np.float32)))
    inside, _ = field.query(torch.from_numpy((centres - step * normals).astype(np.float32)))
    # normals point toward lower density (outward) almost everywhere
    assert (outside.numpy() < inside.numpy()).mean() > 0.95


def test_blender_frame_is_a_rotation():
    v = np.array([[1.0, 2.0, 3.0]])
    assert triposr.to_blender_frame(v).tolist() == [[2.0, -1.0, 3.0]]


def official_config_folder(tmp_path):
    shutil.copy(Path(triposr.__file__).parent / "configs" / "triposr-config.yaml", tmp_path / "config.yaml")
    return tmp_path


def test_full_size_layout_matches_official_manifest(tmp_path):
    manifest = json.loads((DATA / "triposr_state_dict_manifest.json").read_text())
    cfg = triposr.read_config(official_config_folder(tmp_path))
    with torch.device("meta"):
        model = triposr.TripoSR(cfg)
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    theirs = [(t["key"], t["shape"], t["dtype"].replace("torch.", "")) for t in manifest["tensors"]]
    assert ours == theirs
    assert sum(int(np.prod(s)) for _, s, _ in ours) == manifest["header"]["total_parameters"] == 419_275_628


def tiny_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    return folder


def test_strict_loading_rejects_a_missing_key(tmp_path):
    folder = tiny_copy(tmp_path)
    state = torch.load(folder / "model.ckpt", weights_only=True)
    del state["decoder.layers.0.bias"]
    torch.save(state, folder / "model.ckpt")
    with pytest.raises(WeightsError, match="1 missing: decoder.layers.0.bias"):
        triposr.load(folder, torch.device("cpu"))


def test_strict_loading_rejects_extra_keys_and_shapes(tmp_path):
    folder = tiny_copy(tmp_path)
    state = torch.load(folder / "model.ckpt", weights_only=True)
    state["backbone.extra"] = torch.zeros(1)
    state["decoder.layers.0.bias"] = torch.zeros(17)
    torch.save(state, folder / "model.ckpt")
    with pytest.raises(WeightsError, match=r"1 unexpected: backbone.extra; 1 wrong shape: decoder.layers.0.bias"):
        triposr.load(folder, torch.device("cpu"))


def test_truncated_checkpoint_is_a_weights_error(tmp_path):
    folder = tiny_copy(tmp_path)
    data = (folder / "model.ckpt").read_bytes()
    (folder / "model.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="could not be read as a PyTorch checkpoint"):
        triposr.load(folder, torch.device("cpu"))


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected, the code never runs."""
    folder = tiny_copy(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Payload()}, folder / "model.ckpt")
    with pytest.raises(WeightsError):
        triposr.load(folder, torch.device("cpu"))
    assert not marker.exists()


def test_config_naming_other_classes_is_refused(tmp_path):
    folder = tiny_copy(tmp_path)
    text = (folder / "config.yaml").read_text().replace("tsr.models.network_utils.NeRFMLP", "evil.Module")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(WeightsError, match="not a TripoSR config"):
        triposr.load(folder, torch.device("cpu"))


def test_vit_config_comes_from_the_folder_then_our_copy(tmp_path):
    folder = tiny_copy(tmp_path)
    assert triposr.read_config(folder).vit.hidden_size == 64  # tiny-dino-vit/config.json in the folder
    (tmp_path / "official").mkdir()
    official = triposr.read_config(official_config_folder(tmp_path / "official"))
    assert official.vit.hidden_size == 768 and official.vit.image_size == 224 and official.vit.qkv_bias
