"""Zero123++ reference attention on the noised condition latent (spec §1.3), for diffusers' UNet.

Every UNet call becomes two passes. The write pass runs the UNet on the noised, scaled condition latent
and each self-attention (``attn1``) stores its input tokens; the read pass runs it on x_t and each attn1
takes its keys and values from its own tokens followed by the stored ones (queries stay its own). attn2
and everything else are untouched. The stored tokens live in a side object, not in cross_attention_kwargs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RefStore:
    """Tokens written by each attn1 in the write pass, read back (and dropped) in the read pass."""

    def __init__(self):
        self.mode = "off"  # "write", "read" or "off" (plain self-attention)
        self.tokens: dict[str, torch.Tensor] = {}


class RefSelfAttnProcessor:
    """Self-attention whose keys/values may be extended with tokens of the write pass."""

    def __init__(self, name: str, store: RefStore):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        # The SD2 layout has no spatial/group norm, mask, residual or 4-D input inside attn1: keep it plain.
        if attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None \
                or attn.group_norm is not None:
            raise NotImplementedError("reference attention supports the SD2 UNet layout only")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if self.store.mode == "write":
            self.store.tokens[self.name] = context
        elif self.store.mode == "read":
            context = torch.cat([context, self.store.tokens.pop(self.name)], dim=1)
        b, n, _ = hidden_states.shape
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)
        k = attn.to_k(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        v = attn.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        # diffusers' own processor uses SDPA's default scale too (upcast_attention only matters for fp16).
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_reference_attention(unet) -> RefStore:
    """Put our processor on every attn1 of ``unet``; the others keep diffusers' default."""
    store = RefStore()
    procs = {}
    for name, proc in unet.attn_processors.items():
        procs[name] = RefSelfAttnProcessor(name, store) if name.endswith("attn1.processor") else proc
    unet.set_attn_processor(procs)
    return store


def noised_condition(cond_lat: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Euler's add_noise followed by scale_model_input at σ: (c + σ·ε)/√(σ²+1)."""
    return (cond_lat + sigma * noise) / (sigma ** 2 + 1) ** 0.5


@torch.no_grad()
def reference_unet_call(unet, store: RefStore, latents, timestep, encoder_hidden_states, cond_lat, sigma,
                        noise: torch.Tensor) -> torch.Tensor:
    """One UNet evaluation with reference attention: write pass on the noised condition, then read pass.

    ``latents`` are already scaled for the model; ``noise`` is ε for the condition latent (same shape).
    """
    try:
        store.mode, store.tokens = "write", {}
        unet(noised_condition(cond_lat, noise, sigma), timestep, encoder_hidden_states, return_dict=False)
        store.mode = "read"
        return unet(latents, timestep, encoder_hidden_states, return_dict=False)[0]
    finally:
        store.mode, store.tokens = "off", {}
