"""Triplane fields: sample three axis-aligned feature planes, decode density and colour with an MLP.

Shared by the triplane models, which differ only in conventions (passed as parameters): which world
axes each plane spans, how raw density and colour are activated, the cube the planes cover.
Features of the three planes are concatenated (plane 0, 1, 2) before the MLP.

Two ways to evaluate:
- :meth:`TriplaneField.query` at arbitrary points (vertex colours, parity checks);
- :meth:`TriplaneField.grid_density` on a regular grid, one slab of x at a time. On a grid, a plane
  spanning x and y depends only on (i, j), one spanning x and z on (i, k), one spanning y and z on
  (j, k), and the MLP's first layer is linear, so that layer is evaluated on the three R×R planes and
  summed per voxel. This skips R³ bilinear samples and a third of the MLP work, with the same values up
  to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}
POINTS_PER_BLOCK = 1 << 14
# (column axis, row axis) of each plane, world axes 0/1/2 = x/y/z.
TRIPOSR_PLANE_AXES = ((0, 1), (0, 2), (1, 2))
EG3D_PLANE_AXES = ((0, 1), (0, 2), (2, 1))  # OpenLRM (EG3D's corrected projection): the third plane is (z, y)


def mlp_layers(in_channels: int, n_neurons: int, n_hidden_layers: int, activation: str = "silu",
               out_channels: int = 4) -> nn.Sequential:
    """Linear + activation, ``n_hidden_layers`` times, then Linear -> (density, r, g, b) by default: Linears
    at even indices."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported decoder activation {activation!r}")
    act = ACTIVATIONS[activation]
    # In place: inference only, and every activation input is a fresh Linear output.
    layers = [nn.Linear(in_channels, n_neurons), act(inplace=True)]
    for _ in range(n_hidden_layers - 1):
        layers += [nn.Linear(n_neurons, n_neurons), act(inplace=True)]
    layers.append(nn.Linear(n_neurons, out_channels))
    return nn.Sequential(*layers)


class NeRFMLP(nn.Module):
    """TripoSR's decoder: :func:`mlp_layers` held as ``.layers`` (the checkpoint's key names)."""

    def __init__(self, in_channels: int, n_neurons: int, n_hidden_layers: int, activation: str = "silu"):
        super().__init__()
        self.layers = mlp_layers(in_channels, n_neurons, n_hidden_layers, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def sample_planes(planes: torch.Tensor, q: torch.Tensor, plane_axes=TRIPOSR_PLANE_AXES) -> torch.Tensor:
    """planes (3, C, H, W), q (N, 3) in [-1, 1] -> features (N, 3C), plane-major (concatenated)."""
    grid = torch.stack([q[:, list(axes)] for axes in plane_axes])[:, None]  # (3, 1, N, 2): (column, row)
    feats = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return feats[:, :, 0].permute(2, 0, 1).reshape(q.shape[0], -1)


class TriplaneField:
    """Triplanes of one object + the MLP that reads them. Points are in the model's frame, inside the
    cube [-radius, radius]^3.

    density = exp(raw + density_bias) (TripoSR) or softplus(raw + density_bias) (OpenLRM);
    colour = sigmoid(rgb) stretched by ``color_margin`` on both sides (OpenLRM's MipNeRF clamp: 0.001).
    """

    def __init__(self, planes: torch.Tensor, mlp: nn.Sequential, radius: float, density_bias: float,
                 chunk: int = POINTS_PER_BLOCK, plane_axes=TRIPOSR_PLANE_AXES, density_activation: str = "exp",
                 color_margin: float = 0.0):
        if density_activation not in ("exp", "softplus"):
            raise ValueError(f"unsupported density activation {density_activation!r}")
        if sorted(tuple(sorted(a)) for a in plane_axes) != [(0, 1), (0, 2), (1, 2)]:
            raise ValueError(f"the planes must span xy, xz and yz once each, got {plane_axes}")
        self.planes = planes  # (3, C, H, W)
        self.mlp = mlp
        self.radius = radius
        self.density_bias = density_bias
        self.chunk = chunk
        self.plane_axes = tuple(tuple(a) for a in plane_axes)
        self.density_activation = density_activation
        self.color_margin = color_margin

    def normalize(self, p: torch.Tensor) -> torch.Tensor:
        r = self.radius
        return (p + r) / (2 * r) * 2 - 1

    def activate_density(self, raw: torch.Tensor) -> torch.Tensor:
        if self.density_activation == "softplus":
            return F.softplus(raw + self.density_bias)
        return torch.exp(raw + self.density_bias)

    def activate_color(self, raw: torch.Tensor) -> torch.Tensor:
        rgb = torch.sigmoid(raw)
        return rgb * (1 + 2 * self.color_margin) - self.color_margin if self.color_margin else rgb

    def raw(self, points: torch.Tensor) -> torch.Tensor:
        """points (N, 3) -> the MLP's raw output (N, 4): density, r, g, b before activation."""
        return self.mlp(sample_planes(self.planes, self.normalize(points.to(self.planes)), self.plane_axes))

    @torch.no_grad()
    def query(self, points: torch.Tensor):
        """points (N, 3) -> density (N,) after activation, colour (N, 3)."""
        dens, cols = [], []
        for p in points.split(self.chunk):
            out = self.raw(p)
            dens.append(self.activate_density(out[:, 0]))
            cols.append(self.activate_color(out[:, 1:4]))
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

    def _sample_axes(self, axes: tuple, along_first: torch.Tensor, along_second: torch.Tensor):
        """Features of the plane spanning world ``axes`` (a < b) at every (a, b) of the two coordinate
        lists -> (plane index, (len(along_first), len(along_second), C)), whatever the plane's own order."""
        for p, plane_axes in enumerate(self.plane_axes):
            if plane_axes == axes:
                return p, self._plane_pair(self.planes[p], along_first, along_second)
            if plane_axes == axes[::-1]:
                return p, self._plane_pair(self.planes[p], along_second, along_first).transpose(0, 1)
        raise ValueError(f"no plane spans axes {axes}")

    @torch.no_grad()
    def grid_density(self, coords: torch.Tensor):
        """Density on the grid coords × coords × coords, yielded one x slice (R, R) at a time."""
        layers = list(self.mlp)
        first, hidden, last = layers[0], self.mlp[1:-1], layers[-1]
        w = first.weight.split(self.planes.shape[1], dim=1)  # first-layer weights per plane
        q = self.normalize(coords.to(self.planes))
        r = len(q)
        # First-layer contribution of the (y, z) plane, shared by every slice; the bias is folded in here.
        p, feats = self._sample_axes((1, 2), q, q)
        h_yz = feats @ w[p].T + first.bias  # (R_j, R_k, n)
        # The MLP runs on blocks small enough to stay in cache: far faster than one big matmul per slice.
        rows = max(1, POINTS_PER_BLOCK // r)
        for i in range(r):
            p, feats = self._sample_axes((0, 1), q[i:i + 1], q)
            h_xy = feats[0] @ w[p].T  # (R_j, n)
            p, feats = self._sample_axes((0, 2), q[i:i + 1], q)
            h_xz = feats[0] @ w[p].T  # (R_k, n)
            raw = torch.empty(r, r, device=q.device)
            for j0 in range(0, r, rows):
                h = (h_xy[j0:j0 + rows, None] + h_xz[None] + h_yz[j0:j0 + rows]).reshape(-1, h_yz.shape[-1])
                h = hidden(h)
                raw[j0:j0 + rows] = (h @ last.weight[0] + last.bias[0]).reshape(-1, r)  # density row only
            yield self.activate_density(raw)
