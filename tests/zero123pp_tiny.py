"""A tiny Zero123++ v1.2 folder in sudo-ai/zero123plus-v1.2's layout, built in a test's tmp folder (shared by
test_zero123pp.py and test_instantmesh_cli.py), and a whole tiny InstantMesh folder (the Blender tests build
it with ``python tests/zero123pp_tiny.py DIR`` in the backend's Python). Needs diffusers and transformers."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from backend.models import zero123pp_load as zl

DATA = Path(__file__).parent / "data" / "zero123pp_tiny"
LRM = Path(__file__).parent / "data" / "instantmesh_tiny"
WIDTH = 16  # CLIP widths = the UNet's cross_attention_dim


def _tokenizer(path: Path):
    path.mkdir(parents=True)
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "a</w>": 3}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


def _official_text_keys(path: Path):
    """transformers 5 saves CLIPTextModel keys without the ``text_model.`` prefix the official file has."""
    from safetensors.torch import save_file
    state = zl.load_state(path)
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}, path)


def make_folder(root: Path) -> Path:
    """Random tiny weights in the official layout (UNet: the reference-attention fixture's); returns root."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(zl._strip(zl.read_json(DATA / "tiny_unet_config.json")))
    unet.load_state_dict(zl.load_state(DATA / "tiny_unet.safetensors"))
    unet.save_pretrained(root / "unet")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  sample_size=64).save_pretrained(root / "vae")
    common = dict(hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    CLIPTextModel(CLIPTextConfig(vocab_size=4, max_position_embeddings=77, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2, **common)).save_pretrained(root / "text_encoder")
    _official_text_keys(root / "text_encoder" / "model.safetensors")
    CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=WIDTH, **common)
                                  ).save_pretrained(root / "vision_encoder")
    _tokenizer(root / "tokenizer")
    clip = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 3,
            "do_center_crop": True, "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}
    vae = dict(clip, size={"shortest_edge": 512}, crop_size={"height": 512, "width": 512}, resample=2,
               image_mean=[0.5] * 3, image_std=[0.8] * 3)
    for name, cfg in (("feature_extractor_clip", clip), ("feature_extractor_vae", vae)):
        (root / name).mkdir()
        (root / name / "preprocessor_config.json").write_text(json.dumps(cfg))
    (root / "scheduler").mkdir()
    shutil.copy(DATA / "scheduler_config.json", root / "scheduler" / "scheduler_config.json")
    ramp = np.linspace(0.0, 1.2, 77).tolist()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Zero123PlusPipeline",
                                                       "ramping_coefficients": ramp}))
    return root


def add_lrm(root: Path) -> Path:
    """The tiny LRM under the names instantmesh-large looks for, with its own config (used instead of ours)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(LRM / "tiny_config.yaml", root / "tiny_config.yaml")
    shutil.copy(LRM / "tiny_instant_mesh.ckpt", root / "instant_mesh_large.ckpt")
    return root


def make_instantmesh_folder(root: Path) -> Path:
    """Both stages of a tiny instantmesh-large: Zero123++'s layout, InstantMesh's UNet .bin (fp16, as the
    official one) and the tiny LRM checkpoint."""
    make_folder(root)
    unet = zl.load_state(root / "unet" / "diffusion_pytorch_model.safetensors")
    torch.save({k: v.half() for k, v in unet.items()}, root / "diffusion_pytorch_model.bin")
    return add_lrm(root)


if __name__ == "__main__":
    make_instantmesh_folder(Path(sys.argv[1]))
