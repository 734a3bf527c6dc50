"""DINOv2 ViT with register tokens, the image encoder of OpenLRM (module names = its checkpoint keys under
``encoder.model.``: ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ...). As OpenLRM's vendored DINOv2 names them.

Tokens: 14-pixel patches, CLS prepended, learned position embeddings (trained for 518-pixel images,
resized bicubic with antialiasing for other sizes), then register tokens inserted after CLS without
position embeddings; pre-norm blocks with LayerScale; a final LayerNorm. The output keeps CLS and the
patch tokens and drops the registers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import multihead_attention
from .vit import resize_position_embeddings

LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DinoV2Config:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518  # the size the position embeddings were trained for
    num_register_tokens: int = 4

    @property
    def trained_positions(self) -> int:
        return (self.img_size // self.patch_size) ** 2 + 1

    # What this implementation does; an architecture description asking for anything else is refused.
    FIXED = {"qkv_bias": True, "proj_bias": True, "ffn_bias": True, "interpolate_antialias": True,
             "interpolate_offset": 0.0, "block_chunks": 0}

    @classmethod
    def from_arch_dict(cls, d: dict) -> "DinoV2Config":
        """A backbone description as OpenLRM's tiny fixtures write it (``tiny_encoder_arch.json``)."""
        cfg = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        odd = {k: d[k] for k, v in cls.FIXED.items() if k in d and d[k] != v}
        if not str(d.get("ffn_layer", "mlp")).startswith("mlp"):
            odd["ffn_layer"] = d["ffn_layer"]
        if d.get("layerscale_init_values", 1.0) in (None, 0):
            odd["layerscale_init_values"] = d["layerscale_init_values"]
        if d.get("pos_embed_tokens", cfg.trained_positions) != cfg.trained_positions:
            odd["pos_embed_tokens"] = d["pos_embed_tokens"]
        if odd:
            raise ValueError(f"unsupported DINOv2 settings {odd}")
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not a multiple of num_heads {cfg.num_heads}")
        return cfg


# The registered backbones of DINOv2's hub (`dinov2_vit?14_reg`) that OpenLRM can name; all use an MLP FFN.
KNOWN_BACKBONES = {
    "dinov2_vits14_reg": DinoV2Config(embed_dim=384, depth=12, num_heads=6),
    "dinov2_vitb14_reg": DinoV2Config(embed_dim=768, depth=12, num_heads=12),
    "dinov2_vitl14_reg": DinoV2Config(embed_dim=1024, depth=24, num_heads=16),
}


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows laid out (q|k|v, head, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(multihead_attention(q, k, v, self.heads))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """x + γ₁·attn(LN(x)), then x + γ₂·MLP(LN(x))."""

    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = _Attention(dim, cfg.num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = _Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """pixels (B, 3, S, S) in [0, 1], S a multiple of the patch size -> (B, 1 + (S/14)², C): CLS + patches."""

    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.trained_positions, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
        self.patch_embed = _PatchEmbed(cfg)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, pixels: torch.Tensor, check=None) -> torch.Tensor:
        b, _, h, w = pixels.shape
        p = self.cfg.patch_size
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(pixels)], dim=1)
        x = x + resize_position_embeddings(self.pos_embed, h // p, w // p, offset=0.0, antialias=True)
        x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
            if check:
                check()
        x = self.norm(x)
        return torch.cat([x[:, :1], x[:, 1 + self.cfg.num_register_tokens:]], dim=1)
