"""InstantMesh stage 1 (Zero123++ v1.2): reference-attention parity with the reference pipeline's UNet call,
the full-size UNet layout, and a tiny end-to-end run from a folder in the official layout built here."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from backend.errors import Cancelled, WeightsError  # noqa: E402
from backend.models import zero123pp_load as zl  # noqa: E402
from backend.models.refattn import install_reference_attention, noised_condition, reference_unet_call  # noqa: E402
from backend.models.zero123pp import Zero123PlusPlus, scale_latents, unscale_latents  # noqa: E402
from zero123pp_tiny import WIDTH, make_folder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")  # numpy-2 notes from its scheduler
DATA = Path(__file__).parent / "data" / "zero123pp_tiny"
ATOL = 1e-4  # fixture README: fp32, measured 1.6e-6 by an independent implementation


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(DATA / "expected_unet_refattn.npz"))


@pytest.fixture(scope="module")
def tiny_unet():
    config = zl.read_json(DATA / "tiny_unet_config.json")
    return zl.load_diffusers_model(zl.unet_on_meta(config), DATA / "tiny_unet.safetensors", torch.float32, "tiny")


@pytest.mark.parametrize("step", [0, 37])
def test_reference_attention_parity(tiny_unet, expected, step):
    t = lambda k: torch.from_numpy(expected[k])  # noqa: E731
    sigma = float(expected[f"step{step}_sigma"])
    c_t = noised_condition(t("cond_lat"), t(f"step{step}_cond_noise"), sigma)
    assert torch.allclose(c_t, t(f"step{step}_noisy_cond_scaled"), atol=1e-5)
    store = install_reference_attention(tiny_unet)
    out = reference_unet_call(tiny_unet, store, t("latents"), t(f"step{step}_timestep"),
                              t("encoder_hidden_states"), t("cond_lat"), sigma, t(f"step{step}_cond_noise"))
    assert (out - t(f"step{step}_v_pred")).abs().max().item() < ATOL
    assert store.tokens == {} and store.mode == "off"
    # Without the reference tokens the output is clearly different: the check can tell the two apart.
    plain = tiny_unet(t("latents"), t(f"step{step}_timestep"), t("encoder_hidden_states"), return_dict=False)[0]
    assert (plain - t(f"step{step}_v_pred")).abs().max().item() > 0.05


def test_scheduler_tables_and_constants(expected):
    s = zl.scheduler_from_config(zl.read_json(DATA / "scheduler_config.json"))
    s.set_timesteps(75)
    np.testing.assert_allclose(s.timesteps.numpy(), expected["timesteps_75_trailing"])
    np.testing.assert_allclose(s.sigmas.numpy(), expected["sigmas_75_trailing"], rtol=1e-6)
    ones = torch.ones(1)
    np.testing.assert_allclose(scale_latents(ones, 1.0).numpy(), expected["scale_latents_of_ones"], rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(ones, 1.0).numpy(), expected["unscale_latents_of_ones"], rtol=1e-6)


def test_full_size_unet_layout():
    manifest = json.loads((DATA / "zero123plus_unet_state_dict_manifest.json").read_text())
    unet = zl.unet_on_meta(zl.read_json(DATA / "zero123plus_unet_config.json"))
    state = unet.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in manifest["tensors"].items()}
    assert len(state) == manifest["num_tensors"] == 686
    assert sum(v.numel() for v in state.values()) == manifest["num_params"] == 865_910_724
    store = install_reference_attention(unet)  # 16 attn1 blocks get ours, the rest keep diffusers'
    names = [n for n, p in unet.attn_processors.items() if getattr(p, "store", None) is store]
    assert len(names) == 16 and all(n.endswith("attn1.processor") for n in names)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("zero123plus-v1.2"))


@pytest.fixture(scope="module")
def pipe(folder):
    return Zero123PlusPlus.from_folder(folder)


def _image():
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[20:76, 30:66] = (200, 60, 30, 255)
    return rgba


class Stages:
    def __init__(self, cancel_after=None):
        self.fractions, self.cancel_after = [], cancel_after

    def check(self):
        if self.cancel_after is not None and len(self.fractions) >= self.cancel_after:
            raise Cancelled()

    def update(self, fraction, message=""):
        self.check()
        self.fractions.append(fraction)


def test_end_to_end_grid(pipe):
    stages = Stages()
    grid = pipe.generate(_image(), steps=3, seed=1, stages=stages)
    assert grid.shape == (960, 640, 3) and grid.dtype == np.uint8
    assert stages.fractions == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert np.array_equal(grid, pipe.generate(_image(), steps=3, seed=1))
    assert not np.array_equal(grid, pipe.generate(_image(), steps=3, seed=2))
    assert pipe.generate(_image(), steps=2, guidance=1.0, seed=1).shape == (960, 640, 3)


def test_prompt_embedding_mixes_in_the_image(pipe):
    from backend.models.zero123pp import to_rgb
    cond, embeds = pipe._conditions(to_rgb(_image()), 4.0, torch.Generator().manual_seed(0))
    assert cond.shape == (2, 4, 64, 64) and embeds.shape == (2, 77, WIDTH)
    assert torch.equal(embeds[0], pipe.empty_embeds[0])  # negative: the plain "" embedding
    g = (embeds[1] - embeds[0]) / pipe.ramp[:, None].clamp(min=1e-6)
    assert torch.allclose(g[1:], g[1:2].expand_as(g[1:]), atol=1e-4)  # one image vector, ramped per token


def test_cancel_between_steps(pipe):
    stages = Stages(cancel_after=2)
    with pytest.raises(Cancelled):
        pipe.generate(_image(), steps=5, stages=stages)
    assert len(stages.fractions) == 2


def test_instantmesh_unet_file(folder, tmp_path):
    state = {k: v.half() for k, v in zl.load_state(folder / "unet" / "diffusion_pytorch_model.safetensors").items()}
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    unet = zl.load_unet(folder, tmp_path / "diffusion_pytorch_model.bin", torch.float32)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in unet.parameters())
    del state["conv_in.bias"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(WeightsError, match="1 missing: conv_in.bias"):
        zl.load_unet(folder, tmp_path / "broken.bin", torch.float32)


def test_official_text_encoder_keys_load(folder):
    from transformers import CLIPTextModel
    state = zl.load_state(folder / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in state)
    model = zl.load_transformers_model(CLIPTextModel, folder / "text_encoder", torch.float32)
    loaded = model.state_dict()
    for key, value in state.items():
        key = key if key in loaded else key[len("text_model."):]
        assert torch.equal(loaded[key], value), key


def _broken(folder, tmp_path, edit):
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    edit(copy)
    return copy


def _drop_key(path: Path, key: str):
    from safetensors.torch import save_file
    state = zl.load_state(path)
    del state[key]
    save_file(state, path)


def _reshape_key(path: Path, key: str):
    from safetensors.torch import save_file
    state = zl.load_state(path)
    state[key] = torch.zeros(3)
    save_file(state, path)


@pytest.mark.parametrize("edit, message", [
    (lambda f: shutil.rmtree(f / "vision_encoder"), "lacks vision_encoder"),
    (lambda f: (f / "model_index.json").write_text("{}"), "ramping_coefficients"),
    (lambda f: _drop_key(f / "unet" / "diffusion_pytorch_model.safetensors", "conv_out.weight"), "missing"),
    (lambda f: _reshape_key(f / "vae" / "diffusion_pytorch_model.safetensors", "encoder.conv_in.bias"),
     "wrong shape"),
    (lambda f: _drop_key(f / "text_encoder" / "model.safetensors", "text_model.final_layer_norm.weight"),
     "missing or misshapen"),
    (lambda f: _reshape_key(f / "vision_encoder" / "model.safetensors",
                            "vision_model.post_layernorm.bias"), "could not be loaded|missing or misshapen"),
])
def test_strict_loading_fails(folder, tmp_path, edit, message):
    with pytest.raises(WeightsError, match=message):
        Zero123PlusPlus.from_folder(_broken(folder, tmp_path, edit))


CLIP_CONFIG = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
               "do_center_crop": True, "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711]}
VAE_CONFIG = dict(CLIP_CONFIG, size={"shortest_edge": 512}, crop_size={"height": 512, "width": 512}, resample=2,
                  image_mean=[0.5] * 3, image_std=[0.8] * 3)


@pytest.mark.parametrize("config", [CLIP_CONFIG, VAE_CONFIG])
@pytest.mark.parametrize("size", [(300, 300), (300, 200)])
def test_preprocessing_matches_clip_image_processor(config, size):
    from PIL import Image
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        pytest.skip("no PIL CLIPImageProcessor in this transformers")
    from backend.models.zero123pp import clip_preprocess
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, size[::-1] + (3,), dtype=np.uint8))
    ours = clip_preprocess(img, config)
    theirs = Processor(**config)(images=img, return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() < 1e-5
