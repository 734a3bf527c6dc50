"""Reading official weight files safely and strictly.

``torch.load(weights_only=True)`` (no pickled code runs), memory-mapped so that the weights are not held
twice while the model takes them over, or safetensors (no code at all). The model is built on the meta
device and takes the loaded tensors as its parameters (``assign=True``), after every key, shape and dtype
has been checked.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError, first_line


def load_torch_file(path: Path, entry: str | None = None) -> dict:
    """``entry``: the state dict is that item of a dict (e.g. Lightning's ``{'state_dict': ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(
            f"{path.name} could not be read as a PyTorch checkpoint ({first_line(e, 200)})",
            hint="The file is corrupt, incomplete or not the official one: download it again.") from e
    if entry is not None:
        if not isinstance(data, dict) or entry not in data:
            raise WeightsError(f"{path.name} has no {entry!r} entry",
                               hint="The file is not the official checkpoint: download it again.")
        data = data[entry]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path.name} does not hold a plain state dict of tensors")
    return data


def load_safetensors_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:
        raise WeightsError(f"reading {path.name} needs the safetensors package ({e})",
                           hint="Install the backend requirements (backend/requirements.txt).") from None
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(
            f"{path.name} could not be read as a safetensors file ({first_line(e, 200)})",
            hint="The file is corrupt, incomplete or not the official one: download it again.") from e


def check_state_dict(expected: dict, found: dict, source: str) -> None:
    """``expected`` and ``found`` map key -> shape. Raise WeightsError naming what differs."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: {tuple(found[k])} instead of {tuple(expected[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        raise WeightsError(f"{source} does not match the model's layout: " + "; ".join(parts),
                           hint="Check that the folder holds this model's official files and its config.")


def assign_weights(model: nn.Module, state: dict, source: str) -> nn.Module:
    """Strictly load ``state`` into a meta-device ``model`` without copying the tensors."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, {k: v.shape for k, v in state.items()}, source)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    odd = [f"{k} is {v.dtype}" for k, v in state.items() if v.dtype != dtypes[k]]
    if odd:
        raise WeightsError(f"{source} has tensors of an unexpected type: {', '.join(odd[:3])}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def named(**children: nn.Module) -> nn.Module:
    """A module holding ``children`` under these names: only there to give the checkpoint's key names."""
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder
