"""Pinhole cameras in the mesh's frame (Blender's: +Z up, the front view looks along +Y), the camera each model
conditions on, and the fit of a camera to a picture's mask for a model that has none.

A camera maps a point to pixel coordinates (x right, y down, pixel (c, r) is the square [c, c + 1] x [r, r + 1])
and a depth along its view axis. Intrinsics are normalised by the image's width and height, so one camera
serves an image at any resolution: the painting uses the picture at its own size, the fit small renders.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

# Which reference constants define each model's conditioning camera (orbit() azimuth 0 = Blender's front).
# TripoSR: the reference gives the input camera no constant; its run.py renders the object at camera_distance
#   1.9, fovy_deg 40, elevation 0 from +X of its frame (= Blender's front, models/triposr.to_blender_frame). The
#   object's framing (foreground ratio 0.85) fixes the scale only loosely, so scale and offset are refined.
TRIPOSR_DISTANCE, TRIPOSR_FOV = 1.9, 40.0
# OpenLRM: models/openlrm.source_camera: at (0, -2, 0) looking along +Y, focal 0.75 and principal point 0.5 of
#   the image size (SOURCE_CAMERA_DISTANCE, FOCAL, PRINCIPAL_POINT there).
# InstantMesh: the six Zero123++ v1.2 views at models/instantmesh.AZIMUTHS / ELEVATIONS, radius CAMERA_RADIUS 4.0,
#   fov CAMERA_FOV 30; the reference picture is Zero123++'s input, at azimuth 0 and elevation 0 of the same
#   orbit. Zero123++ re-frames its input, so the reference view's scale and offset are refined too.
REFERENCE_VIEW = "reference"


@dataclass(frozen=True)
class Camera:
    position: np.ndarray  # (3,) in the mesh's frame
    rotation: np.ndarray  # (3, 3) rows: the camera's right, down and forward axes in the mesh's frame
    focal: float  # focal length / image side (both axes)
    centre: tuple = (0.5, 0.5)  # principal point / image side, x then y

    def project(self, points: np.ndarray, width: int, height: int):
        """points (N, 3) -> pixel x, y (N,) and depth (N,) along the view axis (<= 0 behind the camera), in the
        points' precision (float32 points: float32 out, for the millions of texels of a texture)."""
        points = np.asarray(points)
        dtype = np.float32 if points.dtype == np.float32 else np.float64
        rotation = self.rotation.astype(dtype)
        cam = points.astype(dtype, copy=False) @ rotation.T
        cam -= (self.position @ self.rotation.T).astype(dtype)
        depth = cam[:, 2]
        safe = np.where(np.abs(depth) > 1e-12, depth, dtype(1e-12))
        x = (self.centre[0] + self.focal * cam[:, 0] / safe) * width
        y = (self.centre[1] + self.focal * cam[:, 1] / safe) * height
        return x.astype(dtype, copy=False), y.astype(dtype, copy=False), depth

    def scaled(self, scale: float, centre) -> "Camera":
        """The same view zoomed by ``scale`` about the principal point, which moves to ``centre``: the image
        of every point scales about the old centre and shifts with it (a similarity of the picture)."""
        return replace(self, focal=self.focal * float(scale), centre=(float(centre[0]), float(centre[1])))

    def to_dict(self) -> dict:
        return {"position": [round(float(v), 6) for v in self.position], "focal": round(float(self.focal), 6),
                "centre": [round(float(v), 6) for v in self.centre],
                "rotation": [[round(float(v), 6) for v in row] for row in self.rotation]}


def focal_from_fov(fov_degrees: float) -> float:
    return 0.5 / np.tan(np.deg2rad(fov_degrees) / 2)


def look_at(position, target=(0.0, 0.0, 0.0), focal: float = 1.0, up=(0.0, 0.0, 1.0)) -> Camera:
    position, target = np.asarray(position, np.float64), np.asarray(target, np.float64)
    forward = target - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, np.float64))
    if np.linalg.norm(right) < 1e-9:  # looking straight up or down: any right will do
        right = np.cross(forward, (0.0, 1.0, 0.0))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return Camera(position, np.stack([right, down, forward]), float(focal))


def orbit_position(azimuth: float, elevation: float, distance: float, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """InstantMesh's orbit in Blender's frame: azimuth 0 is the front (-Y), 90 the right side (+X)."""
    az, el = np.deg2rad(azimuth), np.deg2rad(elevation)
    return np.asarray(target, np.float64) + distance * np.array(
        [np.cos(el) * np.sin(az), -np.cos(el) * np.cos(az), np.sin(el)])


def orbit(azimuth: float, elevation: float, distance: float, fov: float, target=(0.0, 0.0, 0.0)) -> Camera:
    return look_at(orbit_position(azimuth, elevation, distance, target), target, focal_from_fov(fov))


def reference_camera(kind: str) -> Camera:
    """The camera of the picture a model was given (its foreground crop), by the model's ``conditioning_camera``."""
    if kind == "triposr":
        return orbit(0.0, 0.0, TRIPOSR_DISTANCE, TRIPOSR_FOV)
    if kind == "openlrm":
        from ..models.openlrm import FOCAL, SOURCE_CAMERA_DISTANCE

        return look_at((0.0, -SOURCE_CAMERA_DISTANCE, 0.0), focal=FOCAL)
    if kind == "instantmesh":
        from ..models.instantmesh import CAMERA_FOV, CAMERA_RADIUS

        return orbit(0.0, 0.0, CAMERA_RADIUS, CAMERA_FOV)
    raise ValueError(f"no conditioning camera named {kind!r}")


def zero123pp_cameras() -> list[Camera]:
    """The six generated views' cameras, row-major in the grid (models/instantmesh.input_cameras)."""
    from ..models.instantmesh import AZIMUTHS, CAMERA_FOV, CAMERA_RADIUS, ELEVATIONS

    return [orbit(a, e, CAMERA_RADIUS, CAMERA_FOV) for a, e in zip(AZIMUTHS, ELEVATIONS)]


# ------------------------------------------------------------------------------------------------ fitting

FIT_SIZE = 128  # side of the silhouettes compared while fitting a whole camera (hundreds of renders)
FRAMING_SIZE = 256  # ... and while fitting the framing of a known camera (one render)
# The model's own framing is kept unless a fitted one overlaps the mask better by this much: the fit is only as
# exact as its silhouettes' pixels, the model's camera exact where the reconstruction is.
FRAMING_GAIN = 0.01
FIT_FOV = 30.0  # a camera fitted to a model with none: a moderate lens (scale and offset absorb the rest)
FIT_DISTANCE = 2.5  # ... at this many bounding radii from the mesh's centre
AZIMUTH_STEP, ELEVATION_STEPS = 20.0, (-30.0, -15.0, 0.0, 15.0, 30.0, 45.0, 60.0)
REFINE_STEPS = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25)  # degrees, pattern search around the best starts
STARTS = 4  # best coarse candidates refined
# The fit renders hundreds of FIT_SIZE² silhouettes, each costing time in proportion to the faces. A denser mesh
# draws the same outline there, so it is reduced first (608 k faces: the fit took 145 s, 28 s reduced, on a busy
# machine; a TripoSG surface at 512 has 1.25 M).
FIT_FACES = 5_000


@dataclass
class Fit:
    camera: Camera
    iou: float
    azimuth: Optional[float] = None
    elevation: Optional[float] = None
    framed: bool = False  # refine_framing: the framing was fitted (not the model's own)


def silhouette(vertices, triangles, camera: Camera, size: int) -> np.ndarray:
    return silhouette_at(vertices, triangles, camera, size, size)


def silhouette_at(vertices, triangles, camera: Camera, width: int, height: int) -> np.ndarray:
    from .raster import depth_buffer

    return np.isfinite(depth_buffer(vertices, triangles, camera, width, height))


def _moments(mask: np.ndarray):
    """Area (share of the image) and centroid (x, y normalised) of a boolean mask."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    if not len(xs):
        return 0.0, np.array([0.5, 0.5])
    return len(xs) / (h * w), np.array([(xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h])


def _warp(sil: np.ndarray, base: Camera, scale: float, centre) -> np.ndarray:
    """The silhouette ``sil`` (rendered by ``base``) as ``base.scaled(scale, centre)`` would render it."""
    h, w = sil.shape
    u = (np.arange(w) + 0.5) / w
    v = (np.arange(h) + 0.5) / h
    src_x = np.floor((base.centre[0] + (u - centre[0]) / scale) * w).astype(np.int64)
    src_y = np.floor((base.centre[1] + (v - centre[1]) / scale) * h).astype(np.int64)
    ok_x, ok_y = (src_x >= 0) & (src_x < w), (src_y >= 0) & (src_y < h)
    out = sil[np.clip(src_y, 0, h - 1)][:, np.clip(src_x, 0, w - 1)]
    return out & ok_y[:, None] & ok_x[None, :]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def fit_similarity(sil: np.ndarray, base: Camera, mask: np.ndarray):
    """Scale and principal point that best lay ``sil`` (rendered by ``base``) over ``mask``: matched moments,
    then a pattern search on IoU. -> (camera, IoU)."""
    area_s, mean_s = _moments(sil)
    area_m, mean_m = _moments(mask)
    if area_s == 0 or area_m == 0:
        return base, 0.0
    scale = np.sqrt(area_m / area_s)
    centre = mean_m - scale * (mean_s - np.asarray(base.centre))
    best = _iou(_warp(sil, base, scale, centre), mask)
    step = 1.0 / mask.shape[0]
    for rel in (0.02, 0.01, 0.005):
        improved = True
        while improved:
            improved = False
            for ds, dx, dy in ((1 + rel, 0, 0), (1 - rel, 0, 0), (1, step, 0), (1, -step, 0), (1, 0, step),
                               (1, 0, -step)):
                s, c = scale * ds, centre + (dx, dy)
                iou = _iou(_warp(sil, base, s, c), mask)
                if iou > best + 1e-9:
                    best, scale, centre, improved = iou, s, c, True
        step /= 2
    return base.scaled(scale, centre), best


def refine_framing(vertices, triangles, camera: Camera, mask: np.ndarray) -> Fit:
    """A known view direction whose framing (scale, offset) is not known exactly: fitted to ``mask``, kept when
    it overlaps the mask clearly better than the model's own framing."""
    small = _resize_mask(mask, FRAMING_SIZE)
    sil = silhouette(vertices, triangles, camera, FRAMING_SIZE)
    own = _iou(sil, small)
    cam, iou = fit_similarity(sil, camera, small)
    return Fit(cam, iou, framed=True) if iou > own + FRAMING_GAIN else Fit(camera, own)


def fit_camera(vertices, triangles, mask: np.ndarray, check=None) -> Fit:
    """The camera (azimuth, elevation, scale, offset) from which the mesh's silhouette best matches ``mask``
    (the picture's, any size): a coarse grid of directions, then a pattern search from the best few."""
    vertices = np.asarray(vertices, np.float64)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    if len(triangles) > FIT_FACES:
        from .reduce import reduce

        vertices, triangles = reduce(vertices, triangles, FIT_FACES, check)
        vertices = np.asarray(vertices, np.float64)
    target, radius = (lo + hi) / 2, max(float(np.linalg.norm(hi - lo)) / 2, 1e-6)
    small = _resize_mask(mask, FIT_SIZE)
    cache: dict = {}

    def score(az, el):
        key = (round(az % 360.0, 4), round(el, 4))
        if key not in cache:
            base = orbit(az, el, FIT_DISTANCE * radius, FIT_FOV, target)
            cache[key] = fit_similarity(silhouette(vertices, triangles, base, FIT_SIZE), base, small)
        return cache[key][1]

    coarse = [(score(a, e), a, e) for a in np.arange(0.0, 360.0, AZIMUTH_STEP) for e in ELEVATION_STEPS]
    coarse.sort(reverse=True)
    best = None
    for iou, az, el in coarse[:STARTS]:
        for step in REFINE_STEPS:
            improved = True
            while improved:
                improved = False
                for da, de in ((step, 0), (-step, 0), (0, step), (0, -step)):
                    e = float(np.clip(el + de, -89.0, 89.0))
                    s = score(az + da, e)
                    if s > iou + 1e-9:
                        iou, az, el, improved = s, az + da, e, True
        if best is None or iou > best[0]:
            best = (iou, az, el)
    iou, az, el = best
    key = (round(az % 360.0, 4), round(el, 4))
    return Fit(cache[key][0], float(iou), float(az % 360.0), float(el))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask (H, W) of bool or [0, 1] as a size x size boolean (area-averaged, then > 0.5)."""
    from PIL import Image

    m = np.asarray(mask)
    m = (m > 0.5) if m.dtype != bool else m
    img = Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.BOX)
    return np.asarray(img) > 127
