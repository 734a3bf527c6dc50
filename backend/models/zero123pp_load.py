"""Loading Zero123++ v1.2 components from a local sudo-ai/zero123plus-v1.2 folder, strictly, with no remote code.

UNet and VAE are built from their config on the meta device and take the file's tensors after every key and
shape has been checked (InstantMesh's fine-tuned UNet, a pickled fp16 state dict, may replace the folder's).
The CLIP models go through transformers' ``from_pretrained(local_files_only=True)`` and fail on any missing or
misshapen weight. diffusers and transformers are imported here only, so the rest of the backend never pays
for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import WeightsError
from .checkpoint import assign_weights, check_state_dict, load_safetensors_file, load_torch_file

NUM_TOKENS = 77
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "vision_encoder", "feature_extractor_clip",
              "feature_extractor_vae", "scheduler")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"missing {path}", hint="The folder must hold sudo-ai/zero123plus-v1.2's files.") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} could not be read ({e})") from None


def check_folder(folder: Path) -> None:
    missing = [s for s in ("model_index.json",) + SUBFOLDERS if not (folder / s).exists()]
    if missing:
        raise WeightsError(f"{folder} lacks {', '.join(missing)}",
                           hint="Download every file of sudo-ai/zero123plus-v1.2 into that folder.")


def ramping_coefficients(folder: Path) -> torch.Tensor:
    ramp = read_json(folder / "model_index.json").get("ramping_coefficients")
    if not isinstance(ramp, list) or len(ramp) != NUM_TOKENS:
        raise WeightsError(f"{folder / 'model_index.json'} has no {NUM_TOKENS} ramping_coefficients")
    return torch.tensor(ramp, dtype=torch.float32)


def unet_on_meta(config: dict):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(_strip(config))


def vae_on_meta(config: dict):
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        return AutoencoderKL.from_config(_strip(config))


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _weights_file(sub: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (sub / name).is_file():
            return sub / name
    raise WeightsError(f"no {' or '.join(WEIGHT_NAMES)} in {sub}")


def load_state(path: Path) -> dict:
    path = Path(path)
    return load_safetensors_file(path) if path.suffix == ".safetensors" else load_torch_file(path)


def load_diffusers_model(model, path: Path, dtype: torch.dtype, source: str):
    """Strictly load ``path`` into the meta-device ``model``; fp16 files are widened to ``dtype``."""
    state = load_state(path)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()},
                     {k: v.shape for k, v in state.items()}, source)
    odd = [k for k, v in state.items() if not v.is_floating_point()]
    if odd:
        raise WeightsError(f"{source} has non-float tensors: {', '.join(odd[:3])}")
    state = {k: v.to(dtype) for k, v in state.items()}
    if dtype != torch.float32:  # plain Module.to: diffusers' override only warns about fp32-kept modules (none)
        model = torch.nn.Module.to(model, dtype)
    return assign_weights(model, state, source)


def load_unet(folder: Path, unet_weights: Path | None, dtype: torch.dtype):
    model = unet_on_meta(read_json(folder / "unet" / "config.json"))
    path = Path(unet_weights) if unet_weights else _weights_file(folder / "unet")
    return load_diffusers_model(model, path, dtype, path.name)


def load_vae(folder: Path, dtype: torch.dtype):
    model = vae_on_meta(read_json(folder / "vae" / "config.json"))
    path = _weights_file(folder / "vae")
    return load_diffusers_model(model, path, dtype, f"vae/{path.name}")


def load_transformers_model(cls, sub: Path, dtype: torch.dtype):
    """``cls.from_pretrained`` on a local folder only; any weight it would have to invent is an error."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its bars would only clutter the worker's stderr
    try:
        model, info = cls.from_pretrained(sub, local_files_only=True, output_loading_info=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{sub.name} could not be loaded ({str(e).strip().splitlines()[0][:200]})",
                           hint="Download sudo-ai/zero123plus-v1.2's files again.") from None
    bad = list(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
    if bad:
        raise WeightsError(f"{sub.name} does not match its config: {len(bad)} missing or misshapen weights "
                           f"({', '.join(map(str, bad[:3]))})")
    return model.eval().requires_grad_(False)


def load_scheduler(folder: Path):
    return scheduler_from_config(read_json(folder / "scheduler" / "scheduler_config.json"))


def scheduler_from_config(config: dict):
    from diffusers import EulerAncestralDiscreteScheduler
    # InstantMesh replaces the folder's scheduler with Euler-ancestral, trailing spacing (spec §1.4).
    return EulerAncestralDiscreteScheduler.from_config(dict(_strip(config), timestep_spacing="trailing"))


@torch.no_grad()
def empty_prompt_embedding(folder: Path, dtype: torch.dtype) -> torch.Tensor:
    """CLIP text embedding of "" (1, 77, C): the only prompt ever used, so the encoder is freed at once."""
    from transformers import CLIPTextModel, CLIPTokenizer
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"tokenizer could not be loaded ({str(e).strip()[:200]})") from None
    ids = tokenizer("", padding="max_length", max_length=NUM_TOKENS, truncation=True, return_tensors="pt").input_ids
    encoder = load_transformers_model(CLIPTextModel, folder / "text_encoder", dtype)
    return encoder(ids)[0].float()


def load_vision_encoder(folder: Path, dtype: torch.dtype):
    from transformers import CLIPVisionModelWithProjection
    return load_transformers_model(CLIPVisionModelWithProjection, folder / "vision_encoder", dtype)
