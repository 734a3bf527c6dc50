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
  to float rounding;
- :meth:`TriplaneField.grid_density_where` at any subset of that grid's points (coarse samples, blocks near
  the surface, whole slices), with the same factored arithmetic, made independent of batching so that a
  point gets one value however it is asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}
POINTS_PER_BLOCK = 1 << 14
# Boxes (grid_density_at) run each step on a row count padded to a multiple of this, so that every point goes
# through the same kernels (full tiles, whole vectors, even thread splits) however the points were batched.
ROW_MULTIPLE = 256
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

    @property
    def device(self) -> torch.device:
        return self.planes.device

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

    @torch.no_grad()
    def grid_density_where(self, coords: torch.Tensor, xs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Density at the grid points (coords[xs[a]], coords[j], coords[k]) where mask[a, j, k] (mask (A, R, R)
        bool) -> (A, R, R) float32, NaN elsewhere.

        :meth:`grid_density`'s factored arithmetic, made independent of which points are asked together: a
        grid point gets the same float32 value, bit for bit, whatever the mask (the coarse-to-fine surface
        evaluates a few points per slice, the dense path whole slices, and they must agree). Hence row counts
        padded (:func:`padded_rows`) and the density row as a row-wise reduction rather than a matrix-vector
        product, whose rounding depends on the row's place in the matrix. The values differ from
        :meth:`grid_density`'s by float rounding only (a few ulp)."""
        a, j, k = torch.nonzero(mask.to(self.planes.device), as_tuple=True)
        out = torch.full(mask.shape, float("nan"), device=self.planes.device)
        out[a, j, k] = self.grid_density_points(coords, xs, a, j, k)
        return out

    @torch.no_grad()
    def grid_density_points(self, coords: torch.Tensor, xs: torch.Tensor, a: torch.Tensor, j: torch.Tensor,
                            k: torch.Tensor) -> torch.Tensor:
        """:meth:`grid_density_where` at the points (coords[xs[a]], coords[j], coords[k]) -> (N,) float32."""
        layers = list(self.mlp)
        first, hidden, last = layers[0], self.mlp[1:-1], layers[-1]
        w = first.weight.split(self.planes.shape[1], dim=1)
        q = self.normalize(coords.to(self.planes))
        h_yz = self._yz_layer(q, w, first.bias)  # (R, R, n), bias folded in
        qx = q[xs.to(q.device)]
        p, feats = self._sample_axes((0, 1), qx, q)
        h_xy = padded_rows(lambda x: x @ w[p].T, feats)  # (A, R, n)
        p, feats = self._sample_axes((0, 2), qx, q)
        h_xz = padded_rows(lambda x: x @ w[p].T, feats)  # (A, R, n)
        a, j, k = (t.to(q.device) for t in (a, j, k))
        r, n = len(q), h_yz.shape[-1]
        # rows of the three terms per point, by flat index (index_select: several times faster than [a, j])
        at_xy, at_xz, at_yz = a * r + j, a * r + k, j * r + k
        h_xy, h_xz, h_yz = h_xy.reshape(-1, n), h_xz.reshape(-1, n), h_yz.reshape(-1, n)
        density = torch.empty(len(a), device=q.device)
        for s in range(0, len(a), POINTS_PER_BLOCK):
            part = slice(s, s + POINTS_PER_BLOCK)
            h = (h_xy.index_select(0, at_xy[part]) + h_xz.index_select(0, at_xz[part])) + \
                h_yz.index_select(0, at_yz[part])
            density[s:s + len(h)] = padded_rows(lambda x: self.activate_density(
                (hidden(x) * last.weight[0]).sum(-1) + last.bias[0]), h)
        return density

    def _yz_layer(self, q: torch.Tensor, w, bias) -> torch.Tensor:
        """The (y, z) plane's first-layer term on the whole R×R grid (+ the bias), kept for the grid's
        next calls: every slice needs it (R=1024: 256 MB with 64 neurons)."""
        key = (len(q), q.device)
        if getattr(self, "_yz_cache", (None,))[0] != key:
            p, feats = self._sample_axes((1, 2), q, q)
            self._yz_cache = (key, padded_rows(lambda x: x @ w[p].T, feats) + bias)
        return self._yz_cache[1]

    def forget_grid(self) -> None:
        """Free what :meth:`grid_density_where` keeps between calls (the surface is extracted)."""
        self.__dict__.pop("_yz_cache", None)


def padded_rows(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` (row-wise: matrix products, activations) on x (..., K) as one matrix whose row count is padded
    to a multiple of ROW_MULTIPLE. A ragged tail of rows can take another kernel path and round differently;
    padded, each row's value does not depend on how the points were batched."""
    rows = x.reshape(-1, x.shape[-1])
    n = len(rows)
    if n % ROW_MULTIPLE:
        rows = F.pad(rows, (0, 0, 0, ROW_MULTIPLE - n % ROW_MULTIPLE))
    out = fn(rows)[:n]
    return out.reshape(*x.shape[:-1], *out.shape[1:])
