"""TripoSG's shape VAE, the decoder half (module names = the official ``vae/`` keys): latents -> the object's
signed field at any query point.

``post_quant`` lifts the latent tokens to the decoder's width, self-attention blocks turn them into the keys and
values every query attends to (computed once per object, :meth:`ShapeDecoder.context`), and each query point,
embedded with sines and cosines of its coordinates, is one cross-attention block away from its value. The value
is positive inside the object, negative outside (the reference negates its network's output), zero on the surface.

The encoder (point cloud -> latents, for training) is not needed to generate; its keys are in the official file
and are checked with the rest (:data:`ENCODER_PREFIXES`), never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .triposg_dit import Block

ENCODER_PREFIXES = ("encoder.", "quant.")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 64
    num_attention_heads: int = 8
    width_encoder: int = 512
    width_decoder: int = 1024
    num_layers_encoder: int = 8
    num_layers_decoder: int = 16
    embed_frequency: int = 8
    embed_include_pi: bool = False

    @classmethod
    def from_json_dict(cls, d: dict) -> "VAEConfig":
        if d.get("embedding_type", "frequency") != "frequency":
            raise ValueError(f"unsupported embedding_type {d['embedding_type']!r}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        cfg = cls(**{k: (bool(v) if k == "embed_include_pi" else int(v)) for k, v in known.items()})
        for w in (cfg.width_encoder, cfg.width_decoder):
            if w % cfg.num_attention_heads:
                raise ValueError(f"width {w} is not a multiple of {cfg.num_attention_heads} heads")
        return cfg

    @property
    def embed_dim(self) -> int:
        return self.in_channels * (2 * self.embed_frequency + 1)


class FourierEmbedding(nn.Module):
    """p (..., 3) -> [p, sin(p·f), cos(p·f)] with f = 2^i (× π if asked), i < n, frequencies inner per coordinate."""

    def __init__(self, n: int, include_pi: bool):
        super().__init__()
        freqs = 2.0 ** torch.arange(n, dtype=torch.float32)
        self.register_buffer("freqs", freqs * torch.pi if include_pi else freqs, persistent=False)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if not len(self.freqs):
            return p
        scaled = (p[..., None] * self.freqs).reshape(*p.shape[:-1], p.shape[-1] * len(self.freqs))
        return torch.cat([p, scaled.sin(), scaled.cos()], dim=-1)


class _Encoder(nn.Module):
    """The encoder's layout only (its keys are checked, its weights never loaded)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w, h = cfg.width_encoder, cfg.num_attention_heads
        self.proj_in = nn.Linear(cfg.in_channels + cfg.embed_dim, w)
        self.blocks = nn.ModuleList([Block(w, h, self_attention=False, cross_dim=w, cross_norm=True)] +
                                    [Block(w, h) for _ in range(cfg.num_layers_encoder)])
        self.norm_out = nn.LayerNorm(w)


class _Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w, h = cfg.width_decoder, cfg.num_attention_heads
        self.blocks = nn.ModuleList([Block(w, h) for _ in range(cfg.num_layers_decoder)] +
                                    [Block(w, h, self_attention=False, cross_dim=w, cross_norm=True)])
        self.proj_query = nn.Linear(cfg.embed_dim, w)
        self.norm_out = nn.LayerNorm(w)
        self.proj_out = nn.Linear(w, 1)


class ShapeVAE(nn.Module):
    def __init__(self, cfg: VAEConfig, with_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embedder = FourierEmbedding(cfg.embed_frequency, cfg.embed_include_pi)
        if with_encoder:
            self.encoder = _Encoder(cfg)
            self.quant = nn.Linear(cfg.width_encoder, 2 * cfg.latent_channels)
        self.decoder = _Decoder(cfg)
        self.post_quant = nn.Linear(cfg.latent_channels, cfg.width_decoder)

    def context(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, N, C) -> what every query attends to (B, N, width)."""
        x = self.post_quant(latents)
        for block in self.decoder.blocks[:-1]:
            x = block(x)
        return x

    def sdf(self, context: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """points (B, P, 3) -> (B, P): positive inside."""
        d = self.decoder
        q = d.proj_query(self.embedder(points.to(context.dtype)))
        out = d.proj_out(d.norm_out(d.blocks[-1](q, context)))
        return -out[..., 0]
