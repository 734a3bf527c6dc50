"""TripoSG's image encoder: DINOv2 as transformers' ``Dinov2Model`` lays it out (the official
``image_encoder_dinov2/`` keys: ``embeddings.*``, ``encoder.layer.N.attention.attention.query``, ``layer_scale1``,
``mlp.fc1``, ...), and the image preparation of ``feature_extractor_dinov2/preprocessor_config.json``
(transformers' ``BitImageProcessor``: resize the short side, centre crop, rescale, normalise).

The attention is our ViT's (same key names); the position embeddings are resized bicubic to the exact grid, without
antialiasing, as transformers' Dinov2 does (and OpenLRM's DINOv2 with registers does not: it lives in dinov2.py).
All tokens come out (CLS first, no registers), after the final LayerNorm: the DiT attends to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .vit import ViTConfig, _Attention, _PatchEmbeddings, resize_position_embeddings


@dataclass(frozen=True)
class Dinov2Config:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    @classmethod
    def from_json_dict(cls, d: dict) -> "Dinov2Config":
        odd = {k: d[k] for k, ok in (("use_swiglu_ffn", False), ("hidden_act", "gelu"), ("num_channels", 3),
                                     ("apply_layernorm", True)) if k in d and d[k] != ok}
        if d.get("num_register_tokens"):
            odd["num_register_tokens"] = d["num_register_tokens"]
        if odd:
            raise ValueError(f"unsupported DINOv2 settings {odd}")
        cfg = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_attention_heads} heads")
        return cfg

    def vit(self) -> ViTConfig:
        return ViTConfig(hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                         patch_size=self.patch_size, qkv_bias=self.qkv_bias)


class _Embeddings(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        d = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # training only
        self.position_embeddings = nn.Parameter(torch.zeros(1, (cfg.image_size // cfg.patch_size) ** 2 + 1, d))
        self.patch_embeddings = _PatchEmbeddings(cfg.vit())
        self.patch = cfg.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        x = self.patch_embeddings(pixels.to(self.patch_embeddings.projection.weight.dtype))
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        pos = self.position_embeddings
        if pos.shape[1] != x.shape[1] or h != w:
            pos = resize_position_embeddings(pos.float(), h // self.patch, w // self.patch, offset=0.0).to(pos.dtype)
        return x + pos


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attention = _Attention(cfg.vit())
        self.layer_scale1 = _LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = _Mlp(d, int(d * cfg.mlp_ratio))
        self.layer_scale2 = _LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x)) * self.layer_scale1.lambda1
        return x + self.mlp(self.norm2(x)) * self.layer_scale2.lambda1


class _Encoder(nn.Module):
    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Dinov2(nn.Module):
    """pixels (B, 3, H, W), normalised -> tokens (B, 1 + patches, D) after the final LayerNorm."""

    def __init__(self, cfg: Dinov2Config):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, check=None) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
            if check:
                check()
        return self.layernorm(x)


@dataclass(frozen=True)
class ImagePrep:
    """``preprocessor_config.json`` of a ``BitImageProcessor`` (the fields it uses)."""
    shortest_edge: int | None = 256
    resample: int = 3  # PIL's BICUBIC
    crop: tuple | None = (224, 224)  # height, width
    rescale_factor: float | None = 1 / 255
    mean: tuple | None = (0.485, 0.456, 0.406)
    std: tuple | None = (0.229, 0.224, 0.225)

    @classmethod
    def from_json_dict(cls, d: dict) -> "ImagePrep":
        size = d.get("size", {"shortest_edge": 256})
        if d.get("do_resize", True) and "shortest_edge" not in size:
            raise ValueError(f"unsupported resize {size}: only a shortest_edge is")
        crop = d.get("crop_size", {"height": 224, "width": 224})
        return cls(shortest_edge=int(size["shortest_edge"]) if d.get("do_resize", True) else None,
                   resample=int(d.get("resample", 3)),
                   crop=(int(crop["height"]), int(crop["width"])) if d.get("do_center_crop", True) else None,
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else None,
                   mean=tuple(d.get("image_mean", cls.mean)) if d.get("do_normalize", True) else None,
                   std=tuple(d.get("image_std", cls.std)) if d.get("do_normalize", True) else None)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> (1, 3, h, w) float32, as the processor gives it (PIL resize on the bytes)."""
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]), "RGB")
        if self.shortest_edge:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
            image = image.resize(size, resample=self.resample)
        x = np.asarray(image, np.float32)
        if self.crop:
            x = _center_crop(x, *self.crop)
        if self.rescale_factor is not None:
            x = x * np.float32(self.rescale_factor)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The processor's centre crop; a side shorter than the crop is padded with zeros first."""
    h, w = x.shape[:2]
    if h < height or w < width:
        ph, pw = max(0, height - h), max(0, width - w)
        x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = x.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return x[top:top + height, left:left + width]
