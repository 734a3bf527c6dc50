"""The installer for real: a managed environment made with this Python, a CPU torch, the pinned
requirements; then `check` and a tiny-model generation with the environment it made. Then the same
requirements on Python 3.13, as Blender 5.1 and 5.2 ship it. Slow (minutes): it installs packages from
the package index this machine is configured for."""

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import TINY
from test_wheels import KNOWN_GAPS

from backend import install

ROOT = Path(__file__).resolve().parent.parent


def _python313():
    """PYTHON313, else python3.13 on PATH, else pyenv's newest 3.13; each must really start as 3.13 (a pyenv
    shim can be on PATH without 3.13 enabled). None when there is none."""
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = [os.environ.get("PYTHON313"), shutil.which("python3.13"),
                  *sorted(glob.glob(f"{pyenv}/versions/3.13*/bin/python3.13"), reverse=True)]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 13)"],
                               capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


PYTHON313 = _python313()


def test_install_then_check_then_generate(tmp_path):
    target = tmp_path / "env"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "backend", "install", "--target", target, "--flavor", "cpu",
                        "--torch-spec", "torch==2.13.0", "--torch-index-url", "pip", "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr + (target / "install.log").read_text()[-3000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["event"] for e in events][-1] == "result"
    assert [e["fraction"] for e in events if e["event"] == "progress"] == sorted(
        e["fraction"] for e in events if e["event"] == "progress")
    python = Path(events[-1]["python"])
    assert python.is_file() and python.is_relative_to(target)
    assert "installing PyTorch" in (target / "install.log").read_text() or "torch" in (target / "install.log").read_text()

    check = json.loads(subprocess.run([python, "-m", "backend", "check"], capture_output=True, text=True, cwd=ROOT,
                                      env=env, check=True).stdout)
    assert check["ok"] and check["torch"]["version"].startswith("2.13.0") and check["device"] == "cpu"
    assert check["python"]["executable"].startswith(str(target))

    out = tmp_path / "m.npz"
    g = subprocess.run([python, "-m", "backend", "generate", TINY / "input_rgba.png", "-o", out, "--weights", TINY,
                        "--resolution", "32", "--json"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert g.returncode == 0, g.stderr
    with np.load(out) as m:
        assert json.loads(g.stdout)["faces"] == len(m["faces"]) > 0


def test_failed_install_says_what_to_do(tmp_path):
    target = tmp_path / "env"
    r = subprocess.run([sys.executable, "-m", "backend", "install", "--target", target, "--flavor", "cpu",
                        "--torch-spec", "torch==0.0.0.nonexistent", "--torch-index-url", "pip"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=600)
    assert r.returncode == 1
    assert "error: installing PyTorch (cpu) failed" in r.stderr
    assert f"The full log is {target.resolve() / 'install.log'}" in r.stderr


def _this_machine() -> str:
    """This machine's name in tests/test_wheels.py's TARGETS."""
    system = {"win32": "windows", "darwin": "macos"}.get(sys.platform, sys.platform)
    machine = {"amd64": "x86_64", "arm64": "arm64" if system == "macos" else "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower())
    return f"{system}-{machine}"


@pytest.mark.skipif(PYTHON313 is None, reason="no Python 3.13 found (PYTHON313, python3.13 on PATH, pyenv)")
def test_requirements_install_from_wheels_on_python_313_then_check(tmp_path):
    """Install Backend's requirements step on Python 3.13, from wheels alone, then `check`.

    Left out, on purpose: PyTorch, and so the installer's PyTorch step and the tiny generation. This machine
    has a CPU torch wheel for Python 3.11 only, and PyPI's torch for 3.13 is the CUDA build (gigabytes).
    Built from source: only what tests/test_wheels.py lists as having no wheel for this machine and Python
    3.13 (today nothing: marching cubes is our own, backend/marching_cubes.py, since PyMCubes has no cp313
    wheel)."""
    from_source = sorted(name for (name, target, python) in KNOWN_GAPS if (target, python) == (_this_machine(), "3.13"))
    target = tmp_path / "env"
    subprocess.run([PYTHON313, "-m", "venv", target], check=True)
    python = install.venv_python(target)
    r = subprocess.run([python, "-m", "pip", "install", "--no-input", "--only-binary=:all:",
                        *[f"--no-binary={name}" for name in from_source], "-r", install.REQUIREMENTS],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    c = subprocess.run([python, "-m", "backend", "check"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert c.returncode == 1, c.stderr  # not ok: torch is missing, as it should be here
    check = json.loads(c.stdout)
    assert check["python"]["version"].startswith("3.13.")
    assert check["python"]["executable"].startswith(str(target))
    assert check["missing"] == ["torch"] and not check["ok"]  # torch alone: it was left out
    assert all(check["packages"].values()), check["packages"]


def test_check_needs_only_what_this_platform_installs(tmp_path, monkeypatch):
    """A requirement whose marker excludes this machine (no wheel there) is not reported missing."""
    from backend import check

    requirements = tmp_path / "requirements.txt"
    requirements.write_text('numpy>=1\nnot-here==1; sys_platform == "nowhere"\n'
                            'here-too==1; sys_platform == "%s"  # a comment\n' % sys.platform)
    monkeypatch.setattr(check, "REQUIREMENTS", requirements)
    assert check.required_packages() == ["numpy", "here-too"]
