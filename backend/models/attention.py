"""Multi-head scaled dot-product attention on already projected queries, keys and values.

Every model family projects q/k/v with its own weight layout (separate Linears, one fused Linear, packed
``in_proj_weight``); the attention itself is this one function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """q (B, N, H·d), k and v (B, M, H·d) -> (B, N, H·d): softmax(q·kᵀ/√d)·v per head."""
    b = q.shape[0]

    def split(t):
        return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])
