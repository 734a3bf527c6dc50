"""Choosing the torch device: ``auto`` takes CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

from .errors import InputError


def resolve(name: str = "auto"):
    import torch

    name = (name or "auto").lower()
    cuda, mps = torch.cuda.is_available(), _mps_available(torch)
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name.startswith("cuda"):
        if not cuda:
            raise InputError(f"device {name!r} was requested but this PyTorch ({torch.__version__}) sees no CUDA GPU",
                             hint="Use --device cpu (or auto), or install a CUDA build of PyTorch.")
        return torch.device(name)
    if name == "mps":
        if not mps:
            raise InputError("device 'mps' was requested but Apple Metal is not available here",
                             hint="Use --device cpu (or auto).")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or mps")


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())
