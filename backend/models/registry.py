"""What each model is, where its files are looked for, and loading it (with a warm cache)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError, WeightsError


@dataclass(frozen=True)
class ModelSpec:
    id: str
    display_name: str
    hf_repo: str
    files: tuple  # file names the model folder must hold
    licence: str
    default_resolution: int
    default_threshold: float
    loader: Callable  # (folder, device) -> model with .reconstruct()


def _load_triposr(folder, device):
    from . import triposr

    return triposr.load(folder, device)


MODELS = {
    spec.id: spec
    for spec in (
        ModelSpec("triposr", "TripoSR", "stabilityai/TripoSR", ("config.yaml", "model.ckpt"), "MIT", 256, 25.0,
                  _load_triposr),
    )
}


def get(model_id: str) -> ModelSpec:
    try:
        return MODELS[model_id]
    except KeyError:
        raise InputError(f"unknown model {model_id!r}; available: {', '.join(MODELS)}") from None


def candidate_folders(spec: ModelSpec) -> list[Path]:
    """Where a model's folder is looked for when none is named: $IMAGE_TO_3D_MODELS/<id>, then the
    Hugging Face cache's snapshots of its repo."""
    folders = []
    if os.environ.get("IMAGE_TO_3D_MODELS"):
        folders.append(Path(os.environ["IMAGE_TO_3D_MODELS"]) / spec.id)
    hf_home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                           "huggingface")) / "hub")
    snapshots = hf_home / f"models--{spec.hf_repo.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir():
        folders += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return folders


def find_folder(spec: ModelSpec, weights: Optional[str]) -> Path:
    if weights:
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            raise WeightsError(f"model folder not found: {folder}")
        missing = [f for f in spec.files if not (folder / f).is_file()]
        if missing:
            raise WeightsError(f"{folder} lacks {', '.join(missing)} for {spec.display_name}",
                               hint=f"It must hold the files of {spec.hf_repo}: {', '.join(spec.files)}.")
        return folder
    searched = candidate_folders(spec)
    for folder in searched:
        if all((folder / f).is_file() for f in spec.files):
            return folder
    where = ", ".join(str(f) for f in searched) or "nowhere (no model folder configured)"
    raise WeightsError(
        f"{spec.display_name} weights not found (looked in: {where})",
        hint=f"Download {', '.join(spec.files)} from https://huggingface.co/{spec.hf_repo} into a folder and "
             f"pass it with --weights DIR (or set IMAGE_TO_3D_MODELS to a folder holding '{spec.id}/').")


def load(spec: ModelSpec, weights: Optional[str], device, cache: Optional[dict] = None):
    folder = find_folder(spec, weights).resolve()
    key = (spec.id, str(folder), str(device))
    if cache is not None and key in cache:
        return cache[key]
    if cache is not None:
        cache.clear()  # one model in memory at a time
    model = spec.loader(folder, device)
    if cache is not None:
        cache[key] = model
    return model
