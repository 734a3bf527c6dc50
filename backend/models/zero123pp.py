"""InstantMesh stage 1: Zero123++ v1.2 (with InstantMesh's white-background UNet) turns one image into a
960×640 grid of six 320×320 views (3 rows × 2 columns), spec §1.

Our own pipeline on diffusers/transformers building blocks: reference attention on the noised condition
latent (refattn.py), the global CLIP image embedding mixed into the empty prompt's embedding with the
ramping coefficients, Zero123++'s latent/image scaling, classifier-free guidance and Euler-ancestral
sampling with trailing timesteps.

Randomness: one CPU generator seeded with ``seed`` draws, in the reference's order, the VAE sample of the
condition, then of the negative (gray) image, the initial latents, and per step the condition noise and the
ancestral noise. The reference draws the same tensors in the same order from torch's global CPU generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..preprocess import load_image
from . import zero123pp_load as zl
from .refattn import install_reference_attention, reference_unet_call

GRID_HEIGHT, GRID_WIDTH = 960, 640
LATENT_SCALE, LATENT_SHIFT = 0.75, 0.22  # z = (vae_latent·scaling_factor − 0.22)·0.75
IMAGE_SCALE = 0.8 / 0.5  # decoded images are unscaled ×1.6 (the VAE input is (x − 0.5)/0.8)
BACKGROUND = (255, 255, 255)  # InstantMesh's copy pastes RGBA over white (upstream: gray 127)
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SEED = 75, 4.0, 42


def scale_latents(vae_latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    return (vae_latents * scaling_factor - LATENT_SHIFT) * LATENT_SCALE


def unscale_latents(z: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    return (z / LATENT_SCALE + LATENT_SHIFT) / scaling_factor


def to_rgb(image) -> Image.Image:
    if isinstance(image, (str, Path)):
        image = load_image(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def _edge(value, *names) -> int:
    if isinstance(value, dict):
        for n in names:
            if n in value:
                return int(value[n])
        raise ValueError(f"unsupported size {value}")
    return int(value)


def clip_preprocess(image: Image.Image, config: dict) -> torch.Tensor:
    """What CLIPImageProcessor does with Zero123++'s configs: shortest edge, centre crop, /255, normalise."""
    short = _edge(config.get("size", 224), "shortest_edge")
    w, h = image.size
    size = (short, max(1, int(short * h / w))) if w <= h else (max(1, int(short * w / h)), short)
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling(int(config.get("resample", 3))))
    crop = config.get("crop_size", short)
    ch, cw = (_edge(crop, "height"), _edge(crop, "width")) if isinstance(crop, dict) else (int(crop),) * 2
    if config.get("do_center_crop", True) and (cw, ch) != image.size:
        left, top = (image.size[0] - cw) // 2, (image.size[1] - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    x = np.asarray(image, dtype=np.float32) * float(config.get("rescale_factor", 1 / 255))
    x = (x - np.asarray(config["image_mean"], np.float32)) / np.asarray(config["image_std"], np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


class Zero123PlusPlus:
    """The loaded stage-1 components. ``generate`` returns the (960, 640, 3) uint8 views grid."""

    def __init__(self, unet, vae, vision_encoder, prompt_embeds, ramp, scheduler, clip_config, vae_config,
                 device="cpu", dtype=torch.float32):
        self.unet, self.vae, self.vision_encoder = unet, vae, vision_encoder
        self.ref_store = install_reference_attention(unet)
        self.empty_embeds, self.ramp = prompt_embeds, ramp  # (1,77,C), (77,)
        self.scheduler, self.clip_config, self.vae_config = scheduler, clip_config, vae_config
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_folder(cls, folder, unet_weights=None, device="cpu", dtype=torch.float32) -> "Zero123PlusPlus":
        """``folder``: sudo-ai/zero123plus-v1.2's files; ``unet_weights``: InstantMesh's UNet file, if any."""
        folder = Path(folder)
        zl.check_folder(folder)
        ramp = zl.ramping_coefficients(folder)
        embeds = zl.empty_prompt_embedding(folder, dtype)
        unet = zl.load_unet(folder, unet_weights, dtype)
        vae = zl.load_vae(folder, dtype)
        vision = zl.load_vision_encoder(folder, dtype)
        configs = [zl.read_json(folder / f / "preprocessor_config.json")
                   for f in ("feature_extractor_clip", "feature_extractor_vae")]
        model = cls(unet, vae, vision, embeds, ramp, zl.load_scheduler(folder), *configs, device=device,
                    dtype=dtype)
        return model.to(device)

    def to(self, device) -> "Zero123PlusPlus":
        self.device = torch.device(device)
        for m in (self.unet, self.vae, self.vision_encoder):
            m.to(self.device)
        return self

    def _randn(self, shape, generator) -> torch.Tensor:
        # Drawn on the CPU so that a seed gives the same views on every device.
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)

    @torch.no_grad()
    def _conditions(self, image: Image.Image, guidance: float, generator):
        """Raw VAE latents of the condition (and of the gray negative) and the prompt embeddings."""
        pixels = clip_preprocess(image, self.vae_config).to(self.device, self.dtype)
        images = [pixels, torch.zeros_like(pixels)] if guidance > 1 else [pixels]
        lats = []
        for x in images:  # condition first, then negative: the reference's sampling order
            dist = self.vae.encode(x).latent_dist
            lats.append(dist.mean + dist.std * self._randn(dist.mean.shape, generator))
        clip = clip_preprocess(image, self.clip_config).to(self.device, self.dtype)
        g = self.vision_encoder(clip).image_embeds.float()[:, None, :]  # (1,1,C)
        empty = self.empty_embeds.to(self.device)
        prompt = empty + g * self.ramp.to(self.device)[:, None]
        if guidance > 1:  # batches are [uncond, cond]; the negative prompt is the plain empty embedding
            return torch.cat(lats[::-1]), torch.cat([empty, prompt]).to(self.dtype)
        return lats[0], prompt.to(self.dtype)

    @torch.no_grad()
    def generate(self, image, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                 seed: int = DEFAULT_SEED, stages=None) -> np.ndarray:
        """``stages``: an object with ``update(fraction, message)`` and ``check()`` (raises when cancelled)."""
        if int(steps) < 1:
            raise InputError(f"steps must be at least 1, not {steps}")
        steps = int(steps)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        cond_lat, embeds = self._conditions(to_rgb(image), float(guidance), generator)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # Euler keeps a step index: one per run
        scheduler.set_timesteps(steps, device=self.device)
        latents = self._randn((1, 4, GRID_HEIGHT // 8, GRID_WIDTH // 8), generator) * scheduler.init_noise_sigma
        rows = cond_lat.shape[0]
        for i, t in enumerate(scheduler.timesteps):
            if stages is not None:
                stages.check()
            x = scheduler.scale_model_input(torch.cat([latents] * rows), t)
            sigma = float(scheduler.sigmas[scheduler.step_index])
            noise = self._randn(cond_lat.shape, generator)
            v = reference_unet_call(self.unet, self.ref_store, x, t, embeds, cond_lat, sigma, noise)
            if rows == 2:
                uncond, cond = v.chunk(2)
                v = uncond + float(guidance) * (cond - uncond)
            latents = scheduler.step(v, t, latents, generator=generator).prev_sample
            if stages is not None:
                stages.update((i + 1) / steps, f"view synthesis step {i + 1}/{steps}")
        return self._decode(latents)

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        z = unscale_latents(latents, self.vae.config.scaling_factor)
        image = self.vae.decode(z.to(self.dtype)).sample.float() * IMAGE_SCALE
        image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        return (image * 255).round().astype(np.uint8)


def grid_image(grid: np.ndarray) -> Image.Image:
    return Image.fromarray(grid, "RGB")


def load_zero123pp(folder, unet_weights: Optional[Path] = None, device="cpu", dtype=torch.float32) -> Zero123PlusPlus:
    return Zero123PlusPlus.from_folder(folder, unet_weights, device, dtype)
