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
_EPS = 1e-6  # barycentric slack (float32), so that a pixel centre on a shared edge is inside one of the two triangles


def depth_buffer(vertices, triangles, camera, width: int, height: int) -> np.ndarray:
    """(height, width) float32: the depth of the nearest surface at each pixel centre, +inf where none."""
    import torch

    x, y, z = camera.project(np.asarray(vertices, np.float64), width, height)  # float64: the planes below
    tris = np.asarray(triangles, np.int64).reshape(-1, 3)
    depth = torch.full((height * width,), float("inf"), dtype=torch.float32)
    tris = tris[(z[tris] > NEAR).all(axis=1)] if len(tris) else tris
    px, py = x[tris], y[tris]  # (T, 3) each
    x0 = np.clip(np.ceil(px.min(axis=1) - 0.5), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(px.max(axis=1) - 0.5), -1, width - 1).astype(np.int64)
    y0 = np.clip(np.ceil(py.min(axis=1) - 0.5), 0, height).astype(np.int64)
    y1 = np.clip(np.floor(py.max(axis=1) - 0.5), -1, height - 1).astype(np.int64)
    area = (px[:, 1] - px[:, 0]) * (py[:, 2] - py[:, 0]) - (px[:, 2] - px[:, 0]) * (py[:, 1] - py[:, 0])
    keep = (x1 >= x0) & (y1 >= y0) & (np.abs(area) > 1e-12)
    if not keep.any():
        return depth.reshape(height, width).numpy()
    px, py, area, x0, y0, x1, y1 = px[keep], py[keep], area[keep], x0[keep], y0[keep], x1[keep], y1[keep]
    inv_z = 1.0 / z[tris[keep]]
    # Barycentrics and 1/z are affine in the image: each triangle's three planes, taken at the centre of its
    # first candidate pixel (so that float32 only ever adds small pixel steps to them).
    ox, oy = x0 + 0.5, y0 + 0.5
    planes = []
    for i, j in ((1, 2), (2, 0)):
        a = (py[:, i] - py[:, j]) / area
        b = (px[:, j] - px[:, i]) / area
        c = (px[:, i] * py[:, j] - px[:, j] * py[:, i]) / area
        planes.append((a, b, a * ox + b * oy + c))
    (a0, b0, e0), (a1, b1, e1) = planes
    d0, d1 = inv_z[:, 0] - inv_z[:, 2], inv_z[:, 1] - inv_z[:, 2]
    zplane = (a0 * d0 + a1 * d1, b0 * d0 + b1 * d1, inv_z[:, 2] + e0 * d0 + e1 * d1)
    coef = torch.from_numpy(np.stack([a0, b0, e0, a1, b1, e1, *zplane], axis=1).astype(np.float32))
    w = torch.from_numpy(x1 - x0 + 1)
    count = w * torch.from_numpy(y1 - y0 + 1)
    start = torch.from_numpy(y0 * width + x0)
    ends = torch.cumsum(count, 0)
    # Chunks of whole triangles, each at most CHUNK candidates (a larger triangle is a chunk of its own).
    cuts = [0]
    while cuts[-1] < len(count):
        begun = int(ends[cuts[-1]] - count[cuts[-1]])
        cuts.append(max(int(torch.searchsorted(ends, torch.tensor(begun + CHUNK), right=True)), cuts[-1] + 1))
    for a, b in zip(cuts[:-1], cuts[1:]):
        n = count[a:b]
        tri = torch.repeat_interleave(torch.arange(a, b), n)
        local = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        width_t = w[tri]
        dy = torch.div(local, width_t, rounding_mode="floor")
        dx = local - dy * width_t
        c = coef[tri]
        fx, fy = dx.float(), dy.float()
        bary0 = c[:, 0] * fx + c[:, 1] * fy + c[:, 2]
        bary1 = c[:, 3] * fx + c[:, 4] * fy + c[:, 5]
        iz = c[:, 6] * fx + c[:, 7] * fy + c[:, 8]
        inside = (bary0 >= -_EPS) & (bary1 >= -_EPS) & (bary0 + bary1 <= 1 + _EPS) & (iz > 0)
        flat = (start[tri] + dy * width + dx)[inside]
        depth.scatter_reduce_(0, flat, 1.0 / iz[inside], reduce="amin")
    return depth.reshape(height, width).numpy()
