"""``python -m backend check``: what this Python can do, as JSON (Python, torch, devices, GPU memory,
missing packages). Imports nothing that may be missing at module level: it must answer even in an
empty environment, since that is when it is most needed."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from pathlib import Path

from . import __version__

REQUIREMENTS = Path(__file__).with_name("requirements.txt")


def required_packages() -> list[str]:
    """Distribution names in requirements.txt that this machine needs (torch is checked on its own): a
    requirement whose environment marker excludes this platform (e.g. a package without a wheel here) is not."""
    names = []
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and applies_here(line.partition(";")[2].strip()):
            names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0])
    return names


def applies_here(marker: str) -> bool:
    """Whether a requirement's environment marker holds on this machine ('' always does). ``packaging`` reads
    it (pip's own copy where it is not installed: check runs in a bare Python); without either, or for a
    marker it cannot read, the package counts as needed."""
    if not marker:
        return True
    try:
        from packaging.markers import InvalidMarker, Marker
    except ImportError:
        try:
            from pip._vendor.packaging.markers import InvalidMarker, Marker
        except ImportError:
            return True
    try:
        return Marker(marker).evaluate()
    except InvalidMarker:
        return True


def _version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_report() -> dict:
    try:
        import torch
    except Exception as e:  # missing, or a broken build (wrong CUDA libraries...)
        return {"installed": _version("torch") is not None, "error": f"{type(e).__name__}: {e}"}
    report = {
        "installed": True,
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "rocm_build": getattr(torch.version, "hip", None),
        "cuda_available": torch.cuda.is_available(),
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "threads": torch.get_num_threads(),
        "gpus": [],
    }
    if report["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            report["gpus"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                   "memory_total_mb": total // 2**20, "memory_free_mb": free // 2**20})
    return report


def report() -> dict:
    packages = {name: _version(name) for name in required_packages()}
    torch_info = torch_report()
    missing = [n for n, v in packages.items() if v is None] + ([] if torch_info.get("version") else ["torch"])
    if torch_info.get("cuda_available"):
        device = "cuda"
    elif torch_info.get("mps_available"):
        device = "mps"
    else:
        device = "cpu"
    return {
        "ok": not missing,
        "backend_version": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": f"{platform.system()}-{platform.machine()}"},
        "torch": torch_info,
        "device": device,
        "memory_mb": _system_memory_mb(),
        "packages": packages,
        "missing": missing,
    }


def _system_memory_mb():
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"total": vm.total // 2**20, "available": vm.available // 2**20}
    except Exception:
        return None
