"""TripoSG's denoiser: a Hunyuan-DiT-style transformer over the shape latents (module names = the official
``transformer/`` keys), and the block it shares with the shape VAE.

A block: optional long skip (concatenate [skip, x], Linear, LayerNorm), pre-norm self-attention, pre-norm
cross-attention to the image tokens, pre-norm GELU MLP. Attention with per-head RMS-normalised queries and keys
(the DiT) or none (the VAE). The timestep is a sinusoidal embedding through a two-layer MLP, prepended to the
latent tokens as one more token; the first half of the blocks feed their output to the mirrored second half.

Head layout: the reference splits heads out of the *concatenated* projections ([q|k|v] for self-attention,
[k|v] for cross-attention, each head taking the next 3d or 2d channels), not out of each projection on its own;
the trained weights expect that, so :func:`_split_heads` does the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS, QK_NORM_EPS = 1e-5, 1e-6


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the autocast type, output in the input's type (as the reference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = QK_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def _split_heads(x: torch.Tensor, heads: int, parts: int):
    """(B, N, parts·H·d) of concatenated projections -> ``parts`` tensors (B, H, N, d), the reference's layout."""
    b, n, c = x.shape
    d = c // parts // heads
    return [t.transpose(1, 2) for t in x.view(b, n, heads, parts * d).split(d, dim=-1)]


class Attention(nn.Module):
    """Self-attention (``cross_dim`` None) or cross-attention; keys named as the official files."""

    def __init__(self, dim: int, heads: int, cross_dim: int | None = None, qk_norm: bool = False,
                 cross_norm: bool = False):
        super().__init__()
        self.heads, self.is_cross = heads, cross_dim is not None
        kv_dim = cross_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        if qk_norm:
            self.norm_q, self.norm_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        if cross_norm:
            self.norm_cross = nn.LayerNorm(kv_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.to_q(x)
        if self.is_cross:
            if hasattr(self, "norm_cross"):
                context = self.norm_cross(context)
            k, v = _split_heads(torch.cat([self.to_k(context), self.to_v(context)], -1), self.heads, 2)
            q = q.view(q.shape[0], -1, self.heads, q.shape[-1] // self.heads).transpose(1, 2)
        else:
            q, k, v = _split_heads(torch.cat([q, self.to_k(x), self.to_v(x)], -1), self.heads, 3)
        if hasattr(self, "norm_q"):
            q, k = self.norm_q(q), self.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, out.shape[1] * out.shape[3]).to(q.dtype)
        return self.to_out[0](out)


class _GELUProj(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, *, self_attention: bool = True, cross_dim: int | None = None,
                 cross_norm: bool = False, qk_norm: bool = False, skip: bool = False):
        super().__init__()
        if self_attention:
            self.norm1 = FP32LayerNorm(dim, LAYER_NORM_EPS)
            self.attn1 = Attention(dim, heads, qk_norm=qk_norm)
        if cross_dim is not None:
            self.norm2 = FP32LayerNorm(dim, LAYER_NORM_EPS)
            self.attn2 = Attention(dim, heads, cross_dim, qk_norm=qk_norm, cross_norm=cross_norm)
        self.norm3 = FP32LayerNorm(dim, LAYER_NORM_EPS)
        self.ff = FeedForward(dim, 4 * dim)
        if skip:
            self.skip_norm = FP32LayerNorm(dim, LAYER_NORM_EPS)
            self.skip_linear = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "skip_linear"):
            # the reference's order: Linear, then the norm (its "skip_norm_last")
            x = self.skip_norm(self.skip_linear(torch.cat([skip, x], dim=-1)))
        if hasattr(self, "attn1"):
            x = x + self.attn1(self.norm1(x))
        if hasattr(self, "attn2"):
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


@dataclass(frozen=True)
class DiTConfig:
    num_attention_heads: int = 16
    width: int = 2048
    in_channels: int = 64
    num_layers: int = 21
    cross_attention_dim: int = 1024

    @classmethod
    def from_json_dict(cls, d: dict) -> "DiTConfig":
        if d.get("use_cross_attention_2"):
            raise ValueError("use_cross_attention_2 (the scribble model's second condition) is not supported")
        cfg = cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})
        if cfg.width % cfg.num_attention_heads:
            raise ValueError(f"width {cfg.width} is not a multiple of {cfg.num_attention_heads} heads")
        return cfg


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [sin | cos], frequencies exp(-ln(max_period)·i/half), as diffusers' ``Timesteps``
    with flip_sin_to_cos=False and shift 0."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _TimeMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, 4 * dim)
        self.linear_2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class TripoSGDiT(nn.Module):
    """latents (B, N, C), timesteps (B,) in [0, 1000], image tokens (B, M, D) -> velocity (B, N, C)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        w, n = cfg.width, cfg.num_layers
        self.time_proj = _TimeMLP(w)
        self.proj_in = nn.Linear(cfg.in_channels, w)
        self.blocks = nn.ModuleList(
            Block(w, cfg.num_attention_heads, cross_dim=cfg.cross_attention_dim, qk_norm=True, skip=layer > n // 2)
            for layer in range(n))
        self.norm_out = nn.LayerNorm(w)
        self.proj_out = nn.Linear(w, cfg.in_channels)

    def forward(self, latents: torch.Tensor, t: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        n = latents.shape[1]
        temb = self.time_proj(timestep_embedding(t, self.cfg.width).to(latents.dtype))
        x = torch.cat([temb[:, None], self.proj_in(latents)], dim=1)
        half, skips = self.cfg.num_layers // 2, []
        for layer, block in enumerate(self.blocks):
            x = block(x, image_tokens, skips.pop() if layer > half else None)
            if layer < half:
                skips.append(x)
        return self.proj_out(self.norm_out(x)[:, -n:])
