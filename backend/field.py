"""A generation's field as the post-processing sees it, and the cache that keeps it for later bakes.

:class:`ColourField` gives the model's colour at points of the mesh's own frame (Blender's), in chunks on the
model's device, with the model's own colour conventions (clamping, byte truncation). Reduced meshes, quads,
textures and re-bakes onto an artist's edited mesh all read it, so colours never come from older vertices.

:class:`FieldCache` keeps each generation's triplanes (a few MB) under an id stored on the Blender object:
Bake from Model and Retopologize then skip the encoder and the transformer. Files are safetensors (no
pickle), written under a temporary name and renamed; the oldest go when the folder passes its size limit.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .protocol import FIELD_ID

POINTS_PER_CHUNK = 1 << 18
CACHE_LIMIT_BYTES = 2 << 30  # a few hundred generations


class ColourField:
    """``colours(points) -> (N, 3)`` sRGB in [0, 1] for points (N, 3) in the mesh's frame.

    ``colour_fn`` maps model-frame points (a tensor on the device) to colours; ``to_model`` maps mesh-frame
    points (numpy) to the model's frame; ``finish`` applies the model's output convention (e.g. bytes)."""

    def __init__(self, colour_fn: Callable, to_model: Callable, device, finish: Optional[Callable] = None):
        self._colour_fn, self._to_model, self.device, self._finish = colour_fn, to_model, device, finish

    def __call__(self, points: np.ndarray, on_fraction=None) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self._colours(points, on_fraction)

    def _colours(self, points: np.ndarray, on_fraction) -> np.ndarray:
        import torch

        points = np.asarray(points, np.float32).reshape(-1, 3)
        out = np.empty((len(points), 3), np.float32)
        for start in range(0, len(points), POINTS_PER_CHUNK):
            chunk = torch.from_numpy(np.ascontiguousarray(self._to_model(points[start:start + POINTS_PER_CHUNK])))
            colours = self._colour_fn(chunk.to(self.device, torch.float32)).float().clamp(0, 1)
            out[start:start + len(chunk)] = colours.cpu().numpy()
            if on_fraction:
                on_fraction(min(1.0, (start + len(chunk)) / len(points)))
        return self._finish(out) if self._finish else out


def default_cache_folder() -> Path:
    """$IMAGE_TO_3D_FIELDS (Blender sets it to the extension's user folder), else beside the model store, else
    the per-user cache."""
    if os.environ.get("IMAGE_TO_3D_FIELDS"):
        return Path(os.environ["IMAGE_TO_3D_FIELDS"])
    if os.environ.get("IMAGE_TO_3D_MODELS"):
        return Path(os.environ["IMAGE_TO_3D_MODELS"]).parent / "fields"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "image_to_3d" / "fields"


class FieldCache:
    def __init__(self, folder=None, limit_bytes: int = CACHE_LIMIT_BYTES):
        self.folder = Path(folder) if folder is not None else default_cache_folder()
        self.limit_bytes = limit_bytes

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def path(self, field_id: str) -> Path:
        if not FIELD_ID.match(field_id or ""):
            raise ValueError(f"not a field id: {field_id!r}")
        return self.folder / f"{field_id}.safetensors"

    def save(self, field_id: str, planes, key: str, used: Optional[dict] = None, grid=None) -> None:
        """Keep ``planes`` under ``field_id``; ``key`` says which model made them (checked on load), ``used``
        what was used to make them (e.g. the source size), handed back by :meth:`load`; ``grid``: a multi-view
        model's generated views (uint8 H, W, 3), kept so that a bake can paint from them again."""
        import json

        import torch
        from safetensors.torch import save_file

        path = self.path(field_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=self.folder)
        os.close(fd)
        try:
            tensors = {"planes": planes.detach().float().cpu().contiguous()}
            if grid is not None:
                # a packed copy: the model's grid may be a strided or read-only view
                tensors["grid"] = torch.from_numpy(np.array(grid, dtype=np.uint8, order="C"))
            save_file(tensors, tmp, metadata={"key": key, "used": json.dumps(used or {})})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._prune(keep=path)

    def load(self, field_id: str, key: str):
        """(planes, what was used, the generated views or None), or None when they are gone, unreadable or were
        made by another model."""
        import json

        from safetensors import safe_open

        path = self.path(field_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("key") != key:
                    return None
                planes = f.get_tensor("planes")
                grid = f.get_tensor("grid").numpy() if "grid" in f.keys() else None
            used = json.loads(metadata.get("used") or "{}")
        except Exception:  # noqa: BLE001 - missing or damaged: the caller recomputes
            return None
        os.utime(path)  # recently used: pruned last
        return planes, used, grid

    def _prune(self, keep: Path) -> None:
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for p in files:
            total += p.stat().st_size
            if total > self.limit_bytes and p != keep:
                p.unlink(missing_ok=True)
