"""A depth buffer of a triangle mesh seen by a camera (cameras.Camera), in torch on the CPU: no OpenGL, no
nvdiffrast, so it runs headless anywhere the backend runs.

Each triangle covers the pixels whose centre lies inside it (either winding). Candidates (triangle, pixel of its
bounding box) are expanded in bounded chunks with no loop over triangles; depth is interpolated as 1/z, which
is linear in the image for a planar triangle, and the nearest wins through scatter_reduce("amin").
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 20  # (triangle, pixel) candidates at once: bounds the working memory at any image size
NEAR = 1e-6  # a triangle with a corner this close to the camera plane or behind it is left out
_EPS = 1e-7  # barycentric slack, so that a pixel centre on a shared edge is inside one of the two triangles


def depth_buffer(vertices, triangles, camera, width: int, height: int) -> np.ndarray:
    """(height, width) float32: the depth of the nearest surface at each pixel centre, +inf where none."""
    import torch

    x, y, z = camera.project(np.asarray(vertices, np.float64), width, height)
    xy = torch.from_numpy(np.stack([x, y], axis=1))
    zs = torch.from_numpy(z)
    tris = torch.from_numpy(np.asarray(triangles, np.int64).reshape(-1, 3))
    depth = torch.full((height * width,), float("inf"), dtype=torch.float64)
    if not len(tris):
        return depth.reshape(height, width).float().numpy()
    tris = tris[(zs[tris] > NEAR).all(dim=1)]
    p = xy[tris]  # (T, 3, 2)
    lo, hi = p.min(dim=1).values, p.max(dim=1).values
    x0 = torch.ceil(lo[:, 0] - 0.5).clamp(0, width).long()
    x1 = torch.floor(hi[:, 0] - 0.5).clamp(-1, width - 1).long()
    y0 = torch.ceil(lo[:, 1] - 0.5).clamp(0, height).long()
    y1 = torch.floor(hi[:, 1] - 0.5).clamp(-1, height - 1).long()
    w, h = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    count = w * h
    keep = count > 0
    tris, p, x0, y0, w, count = tris[keep], p[keep], x0[keep], y0[keep], w[keep], count[keep]
    if not len(tris):
        return depth.reshape(height, width).float().numpy()
    inv_z = 1.0 / zs[tris]  # (T, 3)
    area = ((p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1])
            - (p[:, 2, 0] - p[:, 0, 0]) * (p[:, 1, 1] - p[:, 0, 1]))
    solid = area.abs() > 1e-12
    area = torch.where(solid, area, torch.ones_like(area))
    ends = torch.cumsum(count, 0)
    # Chunks of whole triangles, each at most CHUNK candidates (a larger triangle is a chunk of its own).
    cuts = [0]
    while cuts[-1] < len(tris):
        start_total = int(ends[cuts[-1]] - count[cuts[-1]])
        nxt = int(torch.searchsorted(ends, torch.tensor(start_total + CHUNK), right=True))
        cuts.append(max(nxt, cuts[-1] + 1))
    for a, b in zip(cuts[:-1], cuts[1:]):
        n = count[a:b]
        tri = torch.repeat_interleave(torch.arange(a, b), n)
        local = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        px = x0[tri] + local % w[tri]
        py = y0[tri] + torch.div(local, w[tri], rounding_mode="floor")
        cx, cy = px.double() + 0.5, py.double() + 0.5
        q = p[tri]
        # Barycentrics from the signed sub-areas opposite each corner.
        b0 = ((q[:, 1, 0] - cx) * (q[:, 2, 1] - cy) - (q[:, 2, 0] - cx) * (q[:, 1, 1] - cy)) / area[tri]
        b1 = ((q[:, 2, 0] - cx) * (q[:, 0, 1] - cy) - (q[:, 0, 0] - cx) * (q[:, 2, 1] - cy)) / area[tri]
        b2 = 1.0 - b0 - b1
        inside = (b0 >= -_EPS) & (b1 >= -_EPS) & (b2 >= -_EPS) & solid[tri]
        iz = (torch.stack([b0, b1, b2], dim=1) * inv_z[tri]).sum(dim=1)
        inside &= iz > 0
        flat = (py * width + px)[inside]
        depth.scatter_reduce_(0, flat, 1.0 / iz[inside], reduce="amin")
    return depth.reshape(height, width).float().numpy()
