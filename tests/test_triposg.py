"""TripoSG against its reference on tiny random weights in the official layout (tests/data/triposg_tiny: made by
make_tiny.py with the reference's own classes; the reference itself is never imported here)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import DATA, assert_same_mesh, weld_points

from backend import surface
from backend.errors import WeightsError
from backend.models import triposg
from backend.models.rectified_flow import FlowConfig

TINY = DATA / "triposg_tiny"
META = json.loads((TINY / "expected_meta.json").read_text())


@pytest.fixture(scope="module")
def expected():
    with np.load(TINY / "expected.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def model():
    return triposg.load(TINY / "model", torch.device("cpu"))


@pytest.fixture(scope="module")
def image():
    return np.asarray(Image.open(TINY / "conditioning.png").convert("RGB"))


@pytest.fixture(scope="module")
def field(model, expected):
    return model.field(torch.from_numpy(expected["latents_cfg_seed0"][-1])[None])


def test_image_preparation_and_embeddings(model, expected, image):
    assert np.abs(model.cfg.prep(image).numpy() - expected["pixel_values"]).max() <= 1e-6
    assert np.abs(model.encode(image).numpy() - expected["image_embeds"]).max() <= 1e-5


@pytest.mark.parametrize("run", sorted(META["runs"]))
def test_latents_after_the_schedule(model, expected, image, run):
    """With guidance (the DiT on [zeros, image] tokens) and without (guidance 1: conditional only), two seeds."""
    seed, guidance = META["runs"][run]["seed"], META["runs"][run]["guidance"]
    seen = []
    latents = model.latents(model.encode(image), META["steps"], guidance, seed, lambda i, n: seen.append((i, n)))
    ref = expected[f"latents_{run}"][-1]
    assert np.abs(latents[0].numpy() - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert seen == [(i, META["steps"]) for i in range(1, META["steps"] + 1)]


def test_same_seed_same_latents_other_seed_other(model, image):
    tokens = model.encode(image)
    a, b, c = (model.latents(tokens, 2, 3.0, s) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_sigmas_follow_the_shift():
    sigmas = FlowConfig(1000, 2.0).sigmas(4).numpy()
    s = np.array([1.0, 0.75, 0.5, 0.25])
    assert np.allclose(sigmas, np.append(2 * s / (1 + s), 0.0), atol=1e-7)


def test_sdf_at_points(field, expected):
    sdf = field.query(torch.from_numpy(expected["query_points"])).numpy()
    assert np.abs(sdf - expected["query_sdf"]).max() <= 1e-5


@pytest.mark.parametrize("resolution", META["grids"])
def test_mesh_matches_marching_cubes_of_the_reference_grid(field, expected, resolution):
    """Our coarse-to-fine surface against skimage's marching cubes of the reference decoder's dense grid."""
    from skimage import measure

    grid = expected[f"grid_sdf_{resolution}"]
    ref_v, ref_f, _, _ = measure.marching_cubes(grid, 0.0)
    ref_v = ref_v / (resolution - 1) * (2 * triposg.BOX) - triposg.BOX
    stats = {}
    vertices, faces = surface.marching_cubes(field, resolution, 0.0, stats=stats)
    assert stats["blocks"] is not None  # the coarse-to-fine path
    assert len(faces) == len(ref_f) and len(weld_points(vertices)) == len(weld_points(ref_v))
    assert_same_mesh(vertices, faces, ref_v, ref_f)
    dense = surface.marching_cubes(field, resolution, 0.0, dense=True)
    assert np.array_equal(dense[1], faces) and np.array_equal(dense[0], vertices)


def test_surface_is_outward(field):
    """Faces wind outward: a step along each face normal leaves the object (the field falls)."""
    vertices, faces = surface.marching_cubes(field, 32, 0.0)
    tri = vertices[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    centre = tri.mean(1)
    step = 0.01
    outside = field.query(torch.from_numpy((centre + step * normal).astype(np.float32))).numpy()
    inside = field.query(torch.from_numpy((centre - step * normal).astype(np.float32))).numpy()
    assert (outside < inside).mean() > 0.95


def test_blender_frame_is_a_rotation():
    v = np.array([[1.0, 2.0, 3.0]])
    assert triposg.to_blender_frame(v).tolist() == [[1.0, -3.0, 2.0]]
    assert triposg.from_blender_frame(triposg.to_blender_frame(v)).tolist() == v.tolist()


def test_query_chunks_do_not_change_the_values(field, expected):
    points = torch.from_numpy(expected["query_points"])
    whole = field.query(points)
    saved = field.chunk
    try:
        field.chunk = 300
        assert torch.equal(field.query(points), whole)
    finally:
        field.chunk = saved


def test_query_chunk_follows_free_memory(monkeypatch):
    monkeypatch.setattr(triposg, "_free_bytes", lambda device: 64 << 30)
    big = triposg.query_chunk(torch.device("cpu"), 1024, 8, 2048)
    monkeypatch.setattr(triposg, "_free_bytes", lambda device: 1 << 30)
    small = triposg.query_chunk(torch.device("cpu"), 1024, 8, 2048)
    assert triposg.MIN_CHUNK <= small < big <= triposg.MAX_CHUNK and small % triposg.QUERY_ROWS == 0


def test_full_size_layout_matches_the_reference_manifest():
    """Our modules at the reference's default sizes have exactly the keys and shapes its classes save."""
    manifest = json.loads((DATA / "triposg_state_dict_manifest.json").read_text())
    cfg = triposg.TripoSGConfig(triposg.DiTConfig(), triposg.VAEConfig(), triposg.Dinov2Config(),
                                triposg.ImagePrep(), FlowConfig())
    with torch.device("meta"):
        ours = triposg.TripoSG(cfg, with_encoder=True)
    for part in triposg.WEIGHTS:
        layout = {k: list(v.shape) for k, v in getattr(ours, part).state_dict().items()}
        assert layout == manifest[part], part
    assert manifest["total_parameters"]["transformer"] == 1_439_556_160


def tiny_copy(tmp_path) -> Path:
    folder = tmp_path / "triposg"
    shutil.copytree(TINY / "model", folder)
    return folder


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_strict_loading_names_a_renamed_key(tmp_path):
    folder = tiny_copy(tmp_path)
    path = folder / triposg.WEIGHTS["transformer"]
    _rewrite(path, lambda s: s.__setitem__("blocks.0.attn1.to_qq.weight", s.pop("blocks.0.attn1.to_q.weight")))
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.safetensors.*to_q.weight") as e:
        triposg.load(folder, torch.device("cpu"))
    assert "transformer" in str(e.value) and "to_qq" in str(e.value)


def test_strict_loading_names_a_changed_shape(tmp_path):
    folder = tiny_copy(tmp_path)
    _rewrite(folder / triposg.WEIGHTS["vae"], lambda s: s.__setitem__("decoder.proj_out.weight", torch.zeros(2, 32)))
    with pytest.raises(WeightsError, match=r"vae.*decoder.proj_out.weight: \(2, 32\) instead of \(1, 32\)"):
        triposg.load(folder, torch.device("cpu"))


def test_the_vae_encoder_keys_are_checked_too(tmp_path):
    folder = tiny_copy(tmp_path)
    _rewrite(folder / triposg.WEIGHTS["vae"], lambda s: s.pop("encoder.proj_in.weight"))
    with pytest.raises(WeightsError, match="encoder.proj_in.weight"):
        triposg.load(folder, torch.device("cpu"))


@pytest.mark.parametrize("rel", triposg.FILES)
def test_a_missing_file_is_named(tmp_path, rel):
    folder = tiny_copy(tmp_path)
    (folder / rel).unlink()
    with pytest.raises(WeightsError, match=Path(rel).name):
        triposg.load(folder, torch.device("cpu"))


def test_half_precision_files_load_as_float32(tmp_path, expected):
    folder = tiny_copy(tmp_path)
    _rewrite(folder / triposg.WEIGHTS["vae"], lambda s: s.update({k: v.half() for k, v in s.items()}))
    model = triposg.load(folder, torch.device("cpu"))
    assert model.vae.post_quant.weight.dtype == torch.float32
    f = model.field(torch.from_numpy(expected["latents_cfg_seed0"][-1])[None])
    sdf = f.query(torch.from_numpy(expected["query_points"])).numpy()
    assert np.abs(sdf - expected["query_sdf"]).max() <= 0.05


def test_other_schedulers_are_refused(tmp_path):
    folder = tiny_copy(tmp_path)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(WeightsError, match="scheduler_config.json.*use_dynamic_shifting"):
        triposg.read_config(folder)


def test_cancel_stops_between_steps(model, image):
    from backend.errors import Cancelled
    from backend.options import Options
    from backend.progress import Stages

    seen = []

    def progress(stage, fraction, message):
        seen.append(message)

    stages = Stages(progress, lambda: any(m == "shape step 1/5" for m in seen))
    with pytest.raises(Cancelled):
        model.make_planes(image, Options(model="triposg", steps=5), stages)
    assert "shape step 1/5" in seen and "shape step 2/5" not in seen


def test_half_precision_keeps_the_latents_close(model, expected, image):
    """--precision bf16 (fp16 on CUDA/MPS under auto, as the reference runs there): the encoder and the DiT in
    the half type, the latents and the decoder in fp32; within 3 % of the fp32 reference on the tiny model."""
    from backend.options import Options
    from backend.progress import Stages

    run = META["runs"]["cfg_seed0"]
    options = Options(model="triposg", steps=META["steps"], guidance=run["guidance"], seed=run["seed"],
                      precision="bf16")
    latents, used = model.make_planes(image, options, Stages(None, None))
    ref = expected["latents_cfg_seed0"][-1]
    assert used["precision"] == "bf16" and latents.dtype == torch.float32
    assert np.abs(latents[0].numpy() - ref).max() <= 0.03 * np.abs(ref).max()
