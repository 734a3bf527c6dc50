"""OpenLRM's triplane transformer: learned triplane tokens refined by blocks of cross-attention to the
image features, self-attention and an MLP, each after a LayerNorm modulated by the camera embedding
(adaLN: ``LN(x)·(1 + scale) + shift``). Module names follow the official checkpoint
(``layers.N.norm1.mlp.1``, ``layers.N.cross_attn.in_proj_weight``, ...). As OpenLRM's transformer names them.

Without a modulation width (``mod_dim=None``) the same blocks use plain LayerNorms with torch's default
eps 1e-5 (InstantMesh: ``layers.N.norm1.weight``; its ``eps`` argument never reached them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import multihead_attention

LAYER_NORM_EPS = 1e-6


class ModulatedLayerNorm(nn.Module):
    def __init__(self, dim: int, mod_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(mod_dim, 2 * dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mlp(mod).chunk(2, dim=-1)  # first half shifts, second half scales
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class PlainLayerNorm(nn.LayerNorm):
    """A LayerNorm that takes (and ignores) the modulation, so that blocks can hold either kind."""

    def forward(self, x: torch.Tensor, mod: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def _block_norm(dim: int, mod_dim: int | None) -> nn.Module:
    return ModulatedLayerNorm(dim, mod_dim) if mod_dim else PlainLayerNorm(dim)


class ProjectedAttention(nn.Module):
    """Bias-free multi-head attention stored as ``torch.nn.MultiheadAttention`` stores it: one packed
    ``in_proj_weight`` (rows q; k; v) when keys and values have the query's width, else separate
    ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.packed = kv_dim == dim
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
            self.k_proj_weight = nn.Parameter(torch.empty(dim, kv_dim))
            self.v_proj_weight = nn.Parameter(torch.empty(dim, kv_dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        for p in self.parameters():  # as torch initialises them; only random-weight models see this
            nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.packed:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        q, k, v = F.linear(x, wq), F.linear(context, wk), F.linear(context, wv)
        return self.out_proj(multihead_attention(q, k, v, self.heads))


class ConditionModulationBlock(nn.Module):
    def __init__(self, dim: int, heads: int, cond_dim: int, mod_dim: int | None, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = _block_norm(dim, mod_dim)
        self.cross_attn = ProjectedAttention(dim, heads, cond_dim)
        self.norm2 = _block_norm(dim, mod_dim)
        self.self_attn = ProjectedAttention(dim, heads)
        self.norm3 = _block_norm(dim, mod_dim)
        # Index 2 is a dropout slot in the checkpoint's numbering; it holds no weights.
        hidden = dim * mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mod: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x, mod), cond)
        h = self.norm2(x, mod)
        x = x + self.self_attn(h, h)
        return x + self.mlp(self.norm3(x, mod))


class TransformerDecoder(nn.Module):
    """tokens (B, L, D), image features (B, M, cond_dim), camera embedding (B, mod_dim) or None -> (B, L, D)."""

    def __init__(self, dim: int, layers: int, heads: int, cond_dim: int, mod_dim: int | None):
        super().__init__()
        self.layers = nn.ModuleList(ConditionModulationBlock(dim, heads, cond_dim, mod_dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mod: torch.Tensor | None = None,
                check=None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cond, mod)
            if check:
                check()
        return self.norm(x)


def upsample_triplanes(deconv: nn.Module, tokens: torch.Tensor, res: int) -> torch.Tensor:
    """tokens (B, 3·res·res, D), index plane·res² + row·res + column -> deconv per plane -> (B, 3, C, H, W)."""
    b, _, d = tokens.shape
    planes = deconv(tokens.view(b, 3, res, res, d).permute(0, 1, 4, 2, 3).reshape(b * 3, d, res, res))
    return planes.view(b, 3, *planes.shape[1:])
