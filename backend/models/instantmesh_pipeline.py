"""InstantMesh's two stages behind one loaded model: Zero123++ v1.2 draws six views of the object
(zero123pp.py), the sparse-view LRM meshes them (instantmesh.py).

The model folder holds sudo-ai/zero123plus-v1.2's files at their repository paths and, at its root,
InstantMesh's fine-tuned UNet (``diffusion_pytorch_model.bin``) and ``instant_{mesh,nerf}_{size}.ckpt``. Stage 1 is
loaded on first use only, so that reconstructing ready-made views needs the checkpoint alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import devices
from ..errors import WeightsError
from . import instantmesh

BUNDLED_CONFIGS = Path(__file__).parent / "configs"
UNET_FILE = "diffusion_pytorch_model.bin"
# The half type of Zero123++ under ``auto`` on CUDA: fp16, as the reference runs it (measured: PRECISION below).
VIEWS_HALF = "fp16"


def config_path(folder: Path, size: str, variant: str = "mesh") -> Path:
    """The stage-2 YAML: ``instant-{variant}-{size}.yaml`` or the only ``*.yaml`` in the folder, else ours."""
    name = f"instant-{variant}-{size}.yaml"
    if (folder / name).is_file():
        return folder / name
    found = sorted(folder.glob("*.yaml"))
    if len(found) > 1:
        raise WeightsError(f"{folder} holds several YAML configs ({', '.join(p.name for p in found)})",
                           hint=f"Keep one, or name the InstantMesh config {name}.")
    return found[0] if found else BUNDLED_CONFIGS / name


class InstantMeshPipeline:
    conditioning_camera = "instantmesh"  # postprocess/cameras.py: the picture's and the six views' cameras

    def __init__(self, folder, device, size: str, variant: str = "mesh"):
        """``variant``: "mesh" (FlexiCubes) or "nerf" (marching cubes on density)."""
        self.folder, self.device = Path(folder), torch.device(device)
        checkpoint = self.folder / f"instant_{variant}_{size}.ckpt"
        self.lrm = instantmesh.load(config_path(self.folder, size, variant), self.device, weights=checkpoint)
        self.views_model = None

    def load_views_model(self, precision: str = "auto"):
        """Zero123++ with InstantMesh's UNet, its weights in ``precision`` (backend/devices.py); loaded again when
        another precision is asked (a cast to half and back would not give fp32's weights)."""
        dtype = devices.resolve_precision(precision, self.device, half=VIEWS_HALF)
        if self.views_model is None or self.views_model.dtype != dtype:
            from .zero123pp import Zero123PlusPlus

            self.views_model = None  # the old one's memory goes before the new one is read
            self.views_model = Zero123PlusPlus.from_folder(self.folder, self.folder / UNET_FILE, self.device, dtype)
        return self.views_model

    def generate_views(self, image: np.ndarray, options, stages) -> np.ndarray:
        """The prepared image (RGBA or RGB uint8) -> the (960, 640, 3) uint8 grid of six views."""
        return self.load_views_model(getattr(options, "precision", "auto")).generate(
            image, steps=options.steps, guidance=options.guidance, seed=options.seed, stages=stages)

    def planes_from_views(self, grid, options, stages):
        return self.lrm.planes_from_views(grid, options, stages)

    def mesh_from(self, planes, options, stages):
        return self.lrm.mesh_from(planes, options, stages)

    def colour_field(self, planes):
        return self.lrm.colour_field(planes)
