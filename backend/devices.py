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


# Precision of the heavy networks (the transformers, the diffusion U-Net). ``auto``: fp32 on the CPU (half is
# no faster there), bf16 on CUDA where the GPU has it (fp32's range: no overflow), else fp16, fp16 on MPS.
# What the mesh is sensitive to stays fp32 in every model whatever is asked (see each model's ``precision``).
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_precision(name: str, device, half: str | None = None):
    """``name`` (one of PRECISIONS) on ``device`` -> a torch dtype. ``half``: the half type a model prefers on
    CUDA under ``auto`` (Zero123++ runs fp16 there, as its reference does); None = bf16 where supported."""
    import torch

    name = (name or "auto").lower()
    if name not in PRECISIONS:
        raise InputError(f"unknown precision {name!r}; use {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            name = half or ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        else:
            name = "fp16" if device.type == "mps" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def precision_name(dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device`` for a block (weights stay fp32, so a cached model serves every
    precision); fp32 is no context at all, so its output is exactly what it was without this option."""
    import contextlib

    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
