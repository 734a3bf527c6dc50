"""DINO ViT image encoder, laid out so that its state-dict keys are the transformers-4.35 ``ViTModel``
names that TripoSR's official checkpoint uses (``embeddings.*``, ``encoder.layer.N.attention.attention.query``, ...).

Position embeddings are resized the way transformers 4.35 did it (the weights were trained with it):
bicubic with ``scale_factor = (grid + 0.1) / trained_grid``. Newer transformers resize to an exact size
instead, which shifts every embedding slightly and degrades the meshes (see specs/triposr.md §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import multihead_attention


@dataclass
class ViTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True  # transformers' default, absent from DINO's config.json
    hidden_act: str = "gelu"

    @classmethod
    def from_json_dict(cls, d: dict) -> "ViTConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        cfg = cls(**known)
        if cfg.hidden_act != "gelu":
            raise ValueError(f"unsupported ViT activation {cfg.hidden_act!r}")
        return cfg


def resize_position_embeddings(pos: torch.Tensor, grid_h: int, grid_w: int, offset: float = 0.1,
                               antialias: bool = False) -> torch.Tensor:
    """(1, 1 + g*g, C) trained embeddings -> (1, 1 + grid_h*grid_w, C), bicubic, CLS passed through.

    ``offset`` is the DINO work-around each reference trained with: TripoSR (transformers 4.35) uses 0.1,
    OpenLRM's DINOv2 0.0; ``antialias`` is on for DINOv2 with registers.
    """
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    trained = int(math.sqrt(patch_pos.shape[1]))
    if grid_h == trained and grid_w == trained:
        return pos
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, trained, trained, dim).permute(0, 3, 1, 2)
    if offset:
        # The offset only works through a scale factor (not a size): PyTorch then maps output pixel d to
        # source (d + 0.5) * trained / (grid + offset) - 0.5, as transformers 4.35 did.
        grid = F.interpolate(grid, scale_factor=((grid_h + offset) / trained, (grid_w + offset) / trained),
                             mode="bicubic", align_corners=False, antialias=antialias)
    else:
        # A scale factor of grid/trained maps pixels exactly like this size, but its float rounding of the
        # output size is one short for some grids (39, 43, 78, ...).
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False, antialias=antialias)
    if grid.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"position-embedding resize gave {tuple(grid.shape[-2:])}, expected {(grid_h, grid_w)}")
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)], dim=1)


class _PatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(pixels).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, positions, cfg.hidden_size))
        self.patch_embeddings = _PatchEmbeddings(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        tokens = self.patch_embeddings(pixels)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = resize_position_embeddings(self.position_embeddings, h // self.patch_size, w // self.patch_size)
        return tokens + pos


class _Dense(nn.Module):
    """Holds a Linear as ``.dense``: only there to give the checkpoint's key names."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multihead_attention(self.query(x), self.key(x), self.value(x), self.heads)


class _Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attention = _SelfAttention(cfg)
        self.output = _Dense(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class ViTLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + MLP(LN(x)).

    With ``mod_dim`` (InstantMesh's camera conditioning) each LayerNorm output is modulated by a
    per-sample vector: ``adaLN_modulation`` = SiLU → Linear(mod_dim, 4·hidden), chunked into shift and
    scale before the attention, then shift and scale before the MLP: LN(x)·(1 + scale) + shift. No gate.
    """

    def __init__(self, cfg: ViTConfig, mod_dim: int | None = None):
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = _Dense(cfg.intermediate_size, cfg.hidden_size)
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if mod_dim:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(mod_dim, 4 * cfg.hidden_size))

    def forward(self, x: torch.Tensor, mod: torch.Tensor | None = None) -> torch.Tensor:
        before = self.layernorm_before(x)
        if mod is not None:
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(mod)[:, None].chunk(4, dim=-1)
            before = before * (1 + scale_msa) + shift_msa
        x = x + self.attention(before)
        after = self.layernorm_after(x)
        if mod is not None:
            after = after * (1 + scale_mlp) + shift_mlp
        return x + self.output.dense(F.gelu(self.intermediate.dense(after)))


class _Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig, mod_dim: int | None = None):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg, mod_dim) for _ in range(cfg.num_hidden_layers))


class ViTModel(nn.Module):
    """Returns the last hidden state (B, 1 + patches, C), CLS token first, after the final LayerNorm.

    ``mod_dim``: layers modulated by a (B, mod_dim) vector passed as ``mod`` (see :class:`ViTLayer`).
    ``pooler``: whether the checkpoint holds the (unused) pooler (TripoSR's does, InstantMesh's does not).
    """

    def __init__(self, cfg: ViTConfig, mod_dim: int | None = None, pooler: bool = True):
        super().__init__()
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = _Encoder(cfg, mod_dim)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if pooler:  # in the checkpoint, but its output is never used
            self.pooler = _Dense(cfg.hidden_size, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor, check=None, mod: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x, mod)
            if check:
                check()
        return self.layernorm(x)
