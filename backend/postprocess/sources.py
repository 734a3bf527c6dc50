"""The views a model saw, as paint.View: the picture in the model's foreground crop at its own resolution, and
for InstantMesh the six generated views, each at the camera the model conditions on (cameras.py) or, for a
model with no camera, at a camera fitted to the picture's mask.

A model says which camera it conditions on by its ``conditioning_camera`` attribute (a cameras.reference_camera
name); a model without one (a geometry-only model) gets a fitted camera.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import cameras
from .paint import View, triangles_of, view_from_rgba

# A picture whose mask overlaps the mesh's silhouette less than MIN_IOU is not this mesh's: it paints nothing.
# Below GOOD_IOU it still paints (the mask's edge keeps the background out), and the summary says it fits poorly.
MIN_IOU, GOOD_IOU = 0.2, 0.8
GENERATED_TRUST = 0.5  # a generated view counts half as much as the picture where both see a point
BACKGROUND_DISTANCE = 12 / 255  # a generated view's pixel this far from its border's colour is the object's
PICTURE, GENERATED = "picture", "generated views"


def views_for(kind: Optional[str], picture: Optional[np.ndarray], grid: Optional[np.ndarray], vertices, faces,
              check=lambda: None):
    """-> (views, what each one is: [{"view", "camera", "iou"}...], notes). ``picture``: uint8 (H, W, 4) or
    (H, W, 3); ``grid``: the (960, 640, 3) uint8 six-view grid; ``kind``: the model's conditioning camera."""
    triangles = triangles_of(faces)
    views, about, notes = [], [], []
    if picture is not None:
        view = view_from_rgba(picture, None, PICTURE)
        mask = view.mask > 0.5
        whole = bool(mask.all())  # no alpha: the framing cannot be checked
        if kind is None:
            fit = cameras.fit_camera(vertices, triangles, mask, check)
            how = {"view": PICTURE, "camera": "fitted", "iou": round(fit.iou, 4),
                   "azimuth": round(fit.azimuth, 2), "elevation": round(fit.elevation, 2)}
        elif whole:
            fit = cameras.Fit(cameras.reference_camera(kind), float("nan"))
            how = {"view": PICTURE, "camera": "model", "iou": None}
        else:
            fit = cameras.refine_framing(vertices, triangles, cameras.reference_camera(kind), mask)
            how = {"view": PICTURE, "camera": "model, framing fitted" if fit.framed else "model",
                   "iou": round(fit.iou, 4)}
        check()
        if whole and kind is None:
            notes.append("the picture has no mask (alpha or background removal): its camera cannot be fitted, "
                         "so it paints nothing")
        elif not whole and fit.iou < MIN_IOU:
            notes.append(f"the picture does not match the mesh's silhouette (IoU {fit.iou:.2f}): it paints nothing")
        else:
            if not whole and fit.iou < GOOD_IOU:
                notes.append(f"the picture matches the mesh's silhouette poorly (IoU {fit.iou:.2f}): its colours "
                             f"may sit off their place")
            view.camera, view.fit = fit.camera, how
            views.append(view)
        about.append(how)
    if grid is not None and kind == "instantmesh":
        from ..models.instantmesh import views_from_grid

        images = views_from_grid(grid).permute(0, 2, 3, 1).numpy()  # (6, 320, 320, 3) in [0, 1], row-major
        for k, (image, camera) in enumerate(zip(images, cameras.zero123pp_cameras())):
            mask = _generated_mask(image, vertices, triangles, camera)
            view = View(image, mask.astype(np.float32), camera, GENERATED, GENERATED_TRUST,
                        {"view": f"{GENERATED} {k + 1}", "camera": "model", "iou": None})
            views.append(view)
            check()
        about.append({"view": GENERATED, "camera": "model", "iou": None})
    return views, about, notes


def _generated_mask(rgb: np.ndarray, vertices, triangles, camera) -> np.ndarray:
    """A generated view (float (H, W, 3) in [0, 1]) has no alpha: the object is what differs from the colour of
    the view's border (holes filled), within the mesh's own silhouette from that camera."""
    from scipy import ndimage

    h, w = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    differs = np.abs(rgb - background).max(axis=2) > BACKGROUND_DISTANCE
    return ndimage.binary_fill_holes(differs) & cameras.silhouette_at(vertices, triangles, camera, w, h)
