"""The rectified-flow Euler sampler with classifier-free guidance (TripoSG's ``scheduler/``).

Noise at sigma 1 flows to the sample at sigma 0 along the model's velocity: x ← x + (σ_i − σ_{i+1})·v. The
sigmas are 1 − i/n (i < n), shifted σ' = s·σ / (1 + (s − 1)·σ), then 0; the model sees t = 1000·σ. With guidance
g > 1 the model runs on [unconditional, conditional] (the unconditional image tokens are zeros) and
v = v_u + g·(v_c − v_u); at g = 1 it runs once, conditional only, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KNOWN_CLASSES = ("RectifiedFlowScheduler",)


@dataclass(frozen=True)
class FlowConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0

    @classmethod
    def from_json_dict(cls, d: dict) -> "FlowConfig":
        if d.get("_class_name", KNOWN_CLASSES[0]) not in KNOWN_CLASSES:
            raise ValueError(f"unsupported scheduler {d['_class_name']!r}")
        if d.get("use_dynamic_shifting"):
            raise ValueError("use_dynamic_shifting is not supported")
        return cls(int(d.get("num_train_timesteps", 1000)), float(d.get("shift", 1.0)))

    def sigmas(self, steps: int) -> torch.Tensor:
        """(steps + 1,) float32, from 1 down to 0 (computed in float64 first, as the reference)."""
        s = np.array([1.0 - i / steps for i in range(steps)])
        s = self.shift * s / (1 + (self.shift - 1) * s)
        return torch.cat([torch.from_numpy(s).float(), torch.zeros(1)])


def sample(velocity, noise: torch.Tensor, cond: torch.Tensor, cfg: FlowConfig, steps: int, guidance: float,
           on_step=None) -> torch.Tensor:
    """``velocity(x, t, tokens)`` -> v; ``noise`` (B, N, C) fp32, ``cond`` the image tokens (B, M, D).
    ``on_step(i, steps)`` after each step (it may raise to cancel)."""
    sigmas = cfg.sigmas(steps).to(noise.device)
    timesteps = sigmas[:-1] * cfg.num_train_timesteps
    guided = guidance > 1
    tokens = torch.cat([torch.zeros_like(cond), cond]) if guided else cond
    x = noise
    for i in range(steps):
        model_in = torch.cat([x, x]) if guided else x
        v = velocity(model_in, timesteps[i].expand(len(model_in)), tokens).float()
        if guided:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (sigmas[i] - sigmas[i + 1]) * v
        if on_step:
            on_step(i + 1, steps)
    return x
