"""Painting: surface points coloured from the pictures the model saw, the field (or colours spread over the
surface) where no picture sees them.

Each view is (image, mask, camera) at the image's own resolution. A point takes a view's colour when the view
sees it: in front of the depth buffer (raster.py) within a tolerance scaled to the mesh, and not within a pixel
of an occluding edge. Its weight in that view is the product of two ramps, both 0 to 1:
- the angle between the normal and the ray to the camera (grazing views count little);
- the distance to the mask's edge (the reconstruction's silhouette never matches the picture's: a point near
  the border must not take the background).
Views mix by their weights to the fourth power (the best view dominates: mixing two views that disagree by a
pixel blurs), and the mix blends with the fallback by the largest weight, so no seam shows where coverage ends.
Colours are each pixel's own (premultiplied by the mask where it is partial), never interpolated: the painting
is as sharp as the picture, and a render from the view's camera gives the picture back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

DEPTH_TOLERANCE = 0.005  # share of the bounding box's diagonal a point may lie behind the depth buffer ...
DEPTH_REACH = 2.0  # ... plus the depth its own surface spans over this many depth pixels (the 3x3 minimum's
# reach and the pixel centre's offset), which grows with the slope: tan(angle to the view) per pixel
COS_NONE, COS_FULL = 0.05, 0.5  # normal·view ramp of a view's weight among views: none beyond ~87°, full within 60°
COS_COVERED = 0.25  # ... and of its coverage against the fallback: full within ~75°, so a view that alone sees
# a grazing part still paints it (the field, or the spread colours, are blurrier than a grazing picture)
ALPHA_SOLID = 0.99  # a pixel paints only where the mask holds it whole: a partial one holds background too
EDGE_GAP = 0.5  # pixels inside the mask's edge (alpha > 0.5) that never paint ...
EDGE_RAMP = 0.005  # ... then the weight ramps to 1 over this share of the image's side ...
EDGE_RAMP_MIN = 0.5  # ... or at least this many pixels
MIX_POWER = 4.0  # views mix by weight**MIX_POWER
SEEN = 0.5  # a vertex painted at least this much is a source for the spreading
SMOOTH_PASSES = 8  # averaging passes over the spread colours (softens the nearest-source patches)
CONTINUE_SHARE = 64  # without a field, painted texels continue over size / CONTINUE_SHARE texels around them
MAX_VIEW_SIDE = 2048  # a larger picture is scaled down first: the cost follows its pixels
# The depth buffer's longest side: visibility needs less detail than colour (the tolerance and the 3x3 minimum
# cover a coarser pixel), and its cost follows its pixels (1024² takes seconds for 50k faces, 512² a quarter).
DEPTH_SIDE = 512


@dataclass
class View:
    image: np.ndarray  # (H, W, 3) float32 sRGB in [0, 1]
    mask: np.ndarray  # (H, W) float32 in [0, 1]: the object's coverage (alpha)
    camera: object  # cameras.Camera
    name: str = "picture"  # for the summary: "picture" or "generated views"
    trust: float = 1.0  # relative weight among views when several see a point
    fit: Optional[dict] = None  # how the camera was fitted ({"iou": .., "fitted": "framing" | "camera"})


def view_from_rgba(rgba: np.ndarray, camera, name: str = "picture", trust: float = 1.0) -> View:
    """A uint8 (H, W, 4) picture (or (H, W, 3), all object) as a view; downscaled to MAX_VIEW_SIDE."""
    rgba = np.asarray(rgba)
    if rgba.shape[2] == 3:
        rgba = np.concatenate([rgba, np.full(rgba.shape[:2] + (1,), 255, np.uint8)], axis=2)
    if max(rgba.shape[:2]) > MAX_VIEW_SIDE:
        from PIL import Image

        scale = MAX_VIEW_SIDE / max(rgba.shape[:2])
        size = (max(1, round(rgba.shape[1] * scale)), max(1, round(rgba.shape[0] * scale)))
        rgba = np.asarray(Image.fromarray(rgba, "RGBA").resize(size, Image.BOX))
    data = rgba.astype(np.float32) / 255.0
    return View(data[..., :3], data[..., 3], camera, name, trust)


def smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Seen:
    """One view against one mesh: its depth buffer (min over 3x3, so a point beside an occluding edge counts
    as hidden), the mask's distance to its edge, and the premultiplied image."""

    def __init__(self, view: View, vertices, triangles, tolerance: float):
        from scipy import ndimage

        from .raster import depth_buffer

        h, w = view.mask.shape
        self.view, self.w, self.h, self.tolerance = view, w, h, tolerance
        shrink = min(1.0, DEPTH_SIDE / max(h, w))
        self.dw, self.dh = max(1, round(w * shrink)), max(1, round(h * shrink))
        depth = depth_buffer(vertices, triangles, view.camera, self.dw, self.dh)
        self.depth = ndimage.minimum_filter(depth, size=3, mode="nearest").reshape(-1)
        self.solid = (view.mask >= ALPHA_SOLID).reshape(-1)
        inside = np.pad(view.mask > 0.5, 1)  # the image's border is an edge too
        self.edge = ndimage.distance_transform_edt(inside)[1:-1, 1:-1].astype(np.float32)
        self.ramp = max(EDGE_RAMP_MIN, EDGE_RAMP * max(h, w))
        premul = np.concatenate([view.image * view.mask[..., None], view.mask[..., None]], axis=2)
        self.premul = np.ascontiguousarray(premul, np.float32).reshape(h * w, 4)

    def sample(self, points: np.ndarray, normals: np.ndarray):
        """-> the indices of the points this view paints, their weights among views and their coverage (both in
        [0, 1]), and their colours (n, 3).
        Each test narrows the points the next one looks at: most of a surface is hidden from any one view."""
        cam = self.view.camera
        x, y, z = cam.project(points, self.w, self.h)
        col, row = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
        idx = np.flatnonzero((z > 0) & (col >= 0) & (col < self.w) & (row >= 0) & (row < self.h))
        pixel = row[idx] * self.w + col[idx]
        keep = (self.edge.reshape(-1)[pixel] > EDGE_GAP) & self.solid[pixel]
        idx, pixel = idx[keep], pixel[keep]
        ray = cam.position.astype(np.float32) - points[idx]
        cos = (np.asarray(normals[idx], np.float32) * ray).sum(axis=1) / np.maximum(np.linalg.norm(ray, axis=1), 1e-12)
        keep = cos > COS_NONE
        idx, pixel, cos = idx[keep], pixel[keep], cos[keep]
        coarse = (np.minimum((y[idx] * (self.dh / self.h)).astype(np.int64), self.dh - 1) * self.dw
                  + np.minimum((x[idx] * (self.dw / self.w)).astype(np.int64), self.dw - 1))
        footprint = z[idx] / (cam.focal * self.dw)  # a depth pixel's side on the surface, facing the view
        slope = np.sqrt(np.maximum(1.0 - cos * cos, 0.0)) / cos
        keep = z[idx] <= self.depth[coarse] + self.tolerance + DEPTH_REACH * footprint * slope
        idx, pixel, cos = idx[keep], pixel[keep], cos[keep]
        edge = smoothstep((self.edge.reshape(-1)[pixel] - EDGE_GAP) / self.ramp)
        weights = smoothstep((cos - COS_NONE) / (COS_FULL - COS_NONE)) * edge
        cover = smoothstep((cos - COS_NONE) / (COS_COVERED - COS_NONE)) * edge
        # The pixel's own value (no interpolation): a render of the painted surface from this camera averages
        # each pixel's footprint back to that value, where interpolating twice would blur every edge.
        rgba = self.premul[pixel]
        keep = (rgba[:, 3] > 1e-3) & (cover > 0)
        colours = rgba[keep, :3] / rgba[keep, 3:]
        return (idx[keep], weights[keep].astype(np.float32), cover[keep].astype(np.float32),
                np.clip(colours, 0.0, 1.0))


class Painter:
    """The views prepared against one mesh (vertices (V, 3), faces (M, 3|4) with -1 pads)."""

    def __init__(self, vertices, faces, views: list):
        self.vertices = np.asarray(vertices, np.float64).reshape(-1, 3)
        self.triangles = triangles_of(faces)
        self.views = list(views)
        diagonal = float(np.linalg.norm(self.vertices.max(axis=0) - self.vertices.min(axis=0))) if len(
            self.vertices) else 1.0
        self.seen = [_Seen(v, self.vertices, self.triangles, DEPTH_TOLERANCE * diagonal) for v in self.views]
        self.names = sorted({v.name for v in self.views})

    def paint(self, points, normals):
        """-> colours (N, 3), coverage (N,) in [0, 1] (the largest view weight), and per view name the share
        of the coverage it gave (N, len(names))."""
        points = np.asarray(points)
        points = points if points.dtype == np.float32 else points.astype(np.float64)
        total = np.zeros((len(points), 3), np.float32)
        norm = np.zeros(len(points), np.float32)
        alpha = np.zeros(len(points), np.float32)
        by_name = np.zeros((len(points), len(self.names)), np.float32)
        for seen in self.seen:
            idx, w, cover, c = seen.sample(points, normals)
            mix = np.maximum(seen.view.trust * w ** MIX_POWER, 1e-30)  # a weight of 1e-8 still counts
            total[idx] += mix[:, None] * c
            norm[idx] += mix
            alpha[idx] = np.maximum(alpha[idx], cover)
            by_name[idx, self.names.index(seen.view.name)] += mix
        painted = norm > 0
        colours = np.zeros((len(points), 3), np.float32)
        colours[painted] = total[painted] / norm[painted, None]
        share = by_name
        share[painted] *= (alpha[painted] / norm[painted])[:, None]
        return colours, alpha, share

    def vertex_normals(self) -> np.ndarray:
        return vertex_normals(self.vertices, self.triangles)

    def paint_vertices(self, fallback: Optional[np.ndarray]):
        """Colours (V, 3) of the mesh's vertices: painted, blended with ``fallback`` (V, 3) (the field's colours)
        or, without one, with colours spread from the painted vertices. -> (colours, report)."""
        colours, alpha, share = self.paint(self.vertices, self.vertex_normals())
        if fallback is None:
            fallback = spread(self.vertices, self.triangles, colours, alpha)
            rest = "spread"
        else:
            rest = "field"
        out = alpha[:, None] * colours + (1.0 - alpha[:, None]) * np.asarray(fallback, np.float32)
        return out.astype(np.float32), self._report(vertex_areas(self.vertices, self.triangles), share, alpha, rest)

    def _report(self, weights, share, alpha, rest: str) -> dict:
        total = max(float(weights.sum()), 1e-30)
        out = {name: round(float((weights * share[:, i]).sum() / total), 4) for i, name in enumerate(self.names)}
        out[rest] = round(float((weights * (1.0 - alpha)).sum() / total), 4)
        return out


def triangles_of(faces) -> np.ndarray:
    """Faces (M, 3), or quads (M, 4) with -1 pads -> triangles (T, 3) int64, split as mesh.triangulate does."""
    from ..mesh import triangulate

    return triangulate(np.asarray(faces, np.int64))[0]


def vertex_normals(vertices, triangles) -> np.ndarray:
    corners = vertices[triangles]
    n = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # area-weighted
    out = np.zeros_like(vertices, dtype=np.float64)
    for k in range(3):
        np.add.at(out, triangles[:, k], n)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-20)


def vertex_areas(vertices, triangles) -> np.ndarray:
    corners = vertices[triangles]
    area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1) / 6
    out = np.zeros(len(vertices))
    for k in range(3):
        np.add.at(out, triangles[:, k], area)
    return out


def spread(vertices, triangles, colours, alpha) -> np.ndarray:
    """Colours for every vertex from the painted ones (alpha >= SEEN, else any painted at all): each takes its
    nearest source along the mesh's edges, then a few averaging passes over the unseen vertices soften the
    patches. A part no painted vertex reaches takes the mean painted colour; nothing painted: mid-grey."""
    from scipy import sparse
    from scipy.sparse.csgraph import dijkstra

    n = len(vertices)
    sources = np.flatnonzero(alpha >= SEEN)
    if not len(sources):
        sources = np.flatnonzero(alpha > 0)
    if not len(sources):
        return np.full((n, 3), 0.5, np.float32)
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    length = np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1) + 1e-12
    graph = sparse.coo_matrix((length, (edges[:, 0], edges[:, 1])), shape=(n, n)).tocsr()
    _, _, nearest = dijkstra(graph, directed=False, indices=sources, min_only=True, return_predecessors=True)
    mean = (colours[sources] * alpha[sources, None]).sum(axis=0) / alpha[sources].sum()
    out = np.where((nearest >= 0)[:, None], colours[np.maximum(nearest, 0)], mean).astype(np.float32)
    free = alpha < SEEN
    if free.any():
        sym = (graph + graph.T).tocsr()
        sym.data[:] = 1.0
        degree = np.maximum(np.asarray(sym.sum(axis=1)).ravel(), 1.0)
        for _ in range(SMOOTH_PASSES):
            out[free] = (sym @ out)[free] / degree[free, None]
    return out


def barycentrics(points, corners) -> np.ndarray:
    """Barycentric coordinates (N, 3) of points (N, 3) projected onto their triangles (N, 3, 3)."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    v0, v1, v2 = b - a, c - a, points - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = d00 * d11 - d01 * d01
    safe = np.where(np.abs(den) > 1e-30, den, 1.0)
    v = np.where(np.abs(den) > 1e-30, (d11 * d20 - d01 * d21) / safe, 1 / 3)
    w = np.where(np.abs(den) > 1e-30, (d00 * d21 - d01 * d20) / safe, 1 / 3)
    return np.stack([1 - v - w, v, w], axis=1)


def _continue_painted(fallback, samples, colours, alpha, size: int) -> None:
    """Near the painted texels, the fallback continues their colours (rings of neighbour averages in the
    texture, as the gutter is filled): where a view's weight fades at a silhouette or a grazing angle, the blend
    then meets the picture's own colours, not the coarser spread over the mesh's vertices."""
    from .bake import _grow_rings

    seen = alpha >= SEEN
    if not seen.any():
        return
    padded = np.zeros((size + 2, size + 2, 3), np.float32)
    padded[samples.rows[seen] + 1, samples.cols[seen] + 1] = colours[seen]
    mask = np.zeros((size, size), bool)
    mask[samples.rows[seen], samples.cols[seen]] = True
    filled = _grow_rings(padded, mask, max(4, size // CONTINUE_SHARE))[samples.rows, samples.cols]
    fallback[filled] = padded[samples.rows[filled] + 1, samples.cols[filled] + 1]


def paint_texture(painter: Painter, triangles, tri_uvs, size: int, field: Optional[Callable] = None,
                  on_fraction: Optional[Callable[[float], None]] = None, padding: Optional[int] = None):
    """A ``size``² texture over the UV layout of ``triangles`` (of the painter's mesh), painted from the views,
    blended with ``field(points)`` (or colours spread over the surface). -> (texture uint8, mask, report)."""
    from . import bake

    report = on_fraction or (lambda f: None)
    triangles = np.asarray(triangles, np.int64).reshape(-1, 3)
    samples = bake.texel_samples(painter.vertices, triangles, tri_uvs, size, on_fraction=lambda f: report(0.3 * f))
    corners = painter.vertices[triangles]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    face_normals /= np.maximum(np.linalg.norm(face_normals, axis=1, keepdims=True), 1e-20)
    # The weights are smooth ramps of the angle: a face's own normal serves as well as an interpolated one.
    colours, alpha, share = painter.paint(samples.positions, face_normals.astype(np.float32)[samples.triangle])
    report(0.7)
    if field is not None:
        fallback, rest = np.asarray(field(samples.positions), np.float32).reshape(-1, 3), "field"
    else:
        v_colours, v_alpha, _ = painter.paint(painter.vertices, painter.vertex_normals())
        spread_v = spread(painter.vertices, painter.triangles, v_colours, v_alpha)
        tri = triangles[samples.triangle]
        bary = barycentrics(samples.positions.astype(np.float64), painter.vertices[tri])
        fallback, rest = np.einsum("nk,nkd->nd", bary, spread_v[tri]).astype(np.float32), "spread"
        _continue_painted(fallback, samples, colours, alpha, size)
    report(0.9)
    rgb = colours
    rgb *= alpha[:, None]
    rgb += (1.0 - alpha[:, None]) * fallback
    texture = np.zeros((size * size, 3), np.uint8)
    flat = samples.rows.astype(np.int64) * size + samples.cols
    texture[flat] = np.rint(np.clip(np.nan_to_num(rgb), 0.0, 1.0) * 255.0).astype(np.uint8)
    out = painter._report(np.ones(len(alpha)), share, alpha, rest)
    padding = bake.default_padding(size) if padding is None else int(padding)
    texture = bake.dilate(texture.reshape(size, size, 3), samples.mask, padding, check=lambda: report(0.95))
    report(1.0)
    return texture, samples.mask, out
