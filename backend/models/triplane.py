"""Triplane fields: sample three axis-aligned feature planes, decode density and colour with an MLP.

Shared by the triplane models. Two ways to evaluate:
- :meth:`TriplaneField.query` at arbitrary points (vertex colours, parity checks);
- :meth:`TriplaneField.grid_density` on a regular grid, one slab of x at a time. On a grid, plane
  (x, y) depends only on (i, j), plane (x, z) on (i, k) and plane (y, z) on (j, k), and the MLP's first
  layer is linear, so that layer is evaluated on the three R×R planes and summed per voxel. This skips
  R³ bilinear samples and a third of the MLP work, with the same values up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}
POINTS_PER_BLOCK = 1 << 14


class NeRFMLP(nn.Module):
    """Linear + activation, ``n_hidden_layers`` times, then Linear -> (density, r, g, b)."""

    def __init__(self, in_channels: int, n_neurons: int, n_hidden_layers: int, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported decoder activation {activation!r}")
        act = ACTIVATIONS[activation]
        # In place: inference only, and every activation input is a fresh Linear output.
        layers = [nn.Linear(in_channels, n_neurons), act(inplace=True)]
        for _ in range(n_hidden_layers - 1):
            layers += [nn.Linear(n_neurons, n_neurons), act(inplace=True)]
        layers.append(nn.Linear(n_neurons, 4))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def sample_planes(planes: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """planes (3, C, H, W), q (N, 3) in [-1, 1] -> features (N, 3C), plane-major: xy, xz, yz."""
    grid = torch.stack([q[:, [0, 1]], q[:, [0, 2]], q[:, [1, 2]]])[:, None]  # (3, 1, N, 2): (column, row)
    feats = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return feats[:, :, 0].permute(2, 0, 1).reshape(q.shape[0], -1)


class TriplaneField:
    """Triplanes of one object + the decoder that reads them. Points are in the model's frame,
    inside the cube [-radius, radius]^3."""

    def __init__(self, planes: torch.Tensor, decoder: NeRFMLP, radius: float, density_bias: float,
                 chunk: int = POINTS_PER_BLOCK):
        self.planes = planes  # (3, C, H, W)
        self.decoder = decoder
        self.radius = radius
        self.density_bias = density_bias
        self.chunk = chunk

    def normalize(self, p: torch.Tensor) -> torch.Tensor:
        r = self.radius
        return (p + r) / (2 * r) * 2 - 1

    def density_activation(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.exp(raw + self.density_bias)

    @torch.no_grad()
    def query(self, points: torch.Tensor):
        """points (N, 3) -> density (N,) after activation, colour (N, 3) in [0, 1]."""
        dens, cols = [], []
        for p in points.split(self.chunk):
            out = self.decoder(sample_planes(self.planes, self.normalize(p.to(self.planes))))
            dens.append(self.density_activation(out[:, 0]))
            cols.append(torch.sigmoid(out[:, 1:4]))
        if not dens:
            empty = self.planes.new_zeros((0,))
            return empty, empty.reshape(0, 3)
        return torch.cat(dens), torch.cat(cols)

    def _plane_pair(self, plane: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sample one plane at every (u[a], v[b]) -> (len(u), len(v), C), where u is the plane's first
        coordinate (its columns) and v its second (its rows), as in :func:`sample_planes`."""
        grid = torch.stack(torch.meshgrid(u, v, indexing="ij"), dim=-1)[None]  # (1, A, B, 2)
        out = F.grid_sample(plane[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out[0].permute(1, 2, 0)

    @torch.no_grad()
    def grid_density(self, coords: torch.Tensor):
        """Density on the grid coords × coords × coords, yielded one x slice (R, R) at a time."""
        layers = list(self.decoder.layers)
        first, hidden, last = layers[0], self.decoder.layers[1:-1], layers[-1]
        c = self.planes.shape[1]
        w = first.weight  # (n, 3C): split per plane
        w_xy, w_xz, w_yz = w[:, :c], w[:, c:2 * c], w[:, 2 * c:]
        q = self.normalize(coords.to(self.planes))
        r = len(q)
        # First-layer contribution of plane yz, shared by every slice; the bias is folded in here.
        h_yz = self._plane_pair(self.planes[2], q, q) @ w_yz.T + first.bias  # (R_j, R_k, n)
        # The MLP runs on blocks small enough to stay in cache: far faster than one big matmul per slice.
        rows = max(1, POINTS_PER_BLOCK // r)
        for i in range(r):
            h_xy = self._plane_pair(self.planes[0], q[i:i + 1], q)[0] @ w_xy.T  # (R_j, n)
            h_xz = self._plane_pair(self.planes[1], q[i:i + 1], q)[0] @ w_xz.T  # (R_k, n)
            raw = torch.empty(r, r, device=q.device)
            for j0 in range(0, r, rows):
                h = (h_xy[j0:j0 + rows, None] + h_xz[None] + h_yz[j0:j0 + rows]).reshape(-1, h_yz.shape[-1])
                h = hidden(h)
                raw[j0:j0 + rows] = (h @ last.weight[0] + last.bias[0]).reshape(-1, r)  # density row only
            yield self.density_activation(raw)
