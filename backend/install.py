"""``python -m backend install``: make a managed backend environment with the running Python.

Blender runs this with its own interpreter, so the user needs no other Python and no administrator
rights: a virtual environment in a user folder, a PyTorch build chosen for the machine (CUDA, ROCm,
Apple MPS or CPU), then the backend's pinned requirements. Everything pip prints goes to
``<target>/install.log``; progress goes to the caller. Standard library only.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from .errors import BackendError

ROOT = Path(__file__).resolve().parent.parent  # the extension root, holding the backend package
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
TORCH_INDEX = "https://download.pytorch.org/whl/"
DEFAULT_TORCH_SPEC = "torch>=2.3"


class InstallError(BackendError):
    code = "install"


def venv_python(target: Path) -> Path:
    return target / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _cuda_driver_version() -> Optional[tuple]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def detect_flavor() -> str:
    """cuda, rocm, mps or cpu: what the machine can use."""
    if sys.platform == "darwin":
        return "mps" if platform.machine() == "arm64" else "cpu"
    if _cuda_driver_version():
        return "cuda"
    if sys.platform.startswith("linux") and (shutil.which("rocminfo") or Path("/opt/rocm").is_dir()):
        return "rocm"
    return "cpu"


def torch_index_for(flavor: str) -> Optional[str]:
    """PyTorch's own package index for a build (None: the default index, as for Apple)."""
    if flavor == "cuda":
        driver = _cuda_driver_version() or (12, 8)
        # The newest CUDA build the driver can run (drivers run builds of their CUDA version and older).
        tag = "cu128" if driver >= (12, 8) else "cu126" if driver >= (12, 6) else "cu118"
        return TORCH_INDEX + tag
    if flavor == "rocm":
        return TORCH_INDEX + "rocm6.4"
    if flavor == "cpu" and sys.platform != "darwin":
        return TORCH_INDEX + "cpu"
    return None


def install(target: Path, *, flavor: str = "auto", torch_spec: str = DEFAULT_TORCH_SPEC,
            torch_index_url: Optional[str] = None, index_url: Optional[str] = None,
            wheels: Optional[Path] = None, progress: Optional[Callable[[str, float], None]] = None) -> dict:
    """Create or update the environment at ``target``; returns ``python -m backend check``'s report.
    ``torch_index_url`` "pip" means pip's own configuration; None picks PyTorch's index for the flavour.
    ``wheels``: a wheelhouse folder (``make wheelhouse``, plus a torch wheel for the machine): everything is
    installed from it alone (``--no-index --find-links``), no network needed; the index options are ignored."""
    if wheels is not None:
        wheels = Path(wheels).expanduser().resolve()
        if not wheels.is_dir():
            raise InstallError(f"wheelhouse folder not found: {wheels}",
                               hint="Make one with `make wheelhouse PLATFORM=... PYTHON=...` on a machine with "
                                    "internet and copy it here.")
    target = Path(target).expanduser().resolve()
    flavor = detect_flavor() if flavor == "auto" else flavor
    if flavor not in ("cuda", "rocm", "mps", "cpu"):
        raise InstallError(f"unknown PyTorch build {flavor!r}; use auto, cuda, rocm, mps or cpu")
    torch_index = torch_index_for(flavor) if torch_index_url is None else (None if torch_index_url == "pip"
                                                                           else torch_index_url)
    target.mkdir(parents=True, exist_ok=True)
    log_path = target / "install.log"

    def step(message: str, fraction: float) -> None:
        if progress:
            progress(message, fraction)

    with open(log_path, "a", encoding="utf-8") as log:
        def run(args: list, what: str) -> None:
            log.write(f"\n$ {' '.join(map(str, args))}\n")
            log.flush()
            rc = subprocess.run(list(map(str, args)), stdout=log, stderr=subprocess.STDOUT, cwd=target,
                                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}).returncode
            if rc != 0:
                raise InstallError(f"{what} failed (exit status {rc})", hint=_hint(log_path, what))

        python = venv_python(target)
        if not python.exists():
            step("creating the environment", 0.02)
            run([sys.executable, "-m", "venv", target], "creating the virtual environment")
        pip = [python, "-m", "pip", "install", "--no-input"]
        if wheels is not None:
            pip += ["--no-index", "--find-links", wheels]
            torch_index = index_url = None
        step(f"installing PyTorch ({flavor})", 0.1)
        run(pip + [torch_spec] + (["--index-url", torch_index] if torch_index else []), f"installing PyTorch ({flavor})"
            if wheels is None else f"installing PyTorch from {wheels} (it needs a torch wheel for this machine there)")
        step("installing the backend's requirements", 0.7)
        run(pip + ["-r", REQUIREMENTS] + (["--index-url", index_url] if index_url else []),
            "installing the backend's requirements" + (f" from {wheels}" if wheels is not None else ""))
        step("checking the environment", 0.95)
        check = subprocess.run([python, "-m", "backend", "check"], capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        log.write(check.stdout + check.stderr)
    if check.returncode != 0:
        raise InstallError("the new environment does not work", hint=_hint(log_path, "the check"))
    import json

    report = json.loads(check.stdout)
    if not report["ok"]:
        raise InstallError(f"the new environment lacks {', '.join(report['missing'])}", hint=_hint(log_path, "install"))
    step("done", 1.0)
    return report


def _hint(log_path: Path, what: str) -> str:
    return (f"The full log is {log_path}. Common causes: no network or a proxy (set the package index in the "
            f"preferences), too little disk space (PyTorch with CUDA needs about 5 GB), or a PyTorch build that "
            f"does not exist for this platform: choose another build, or point 'Use existing Python' at an "
            f"interpreter that has PyTorch. Running {what} again resumes.")
