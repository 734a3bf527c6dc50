"""The installer for real: a managed environment made with this Python, a CPU torch, the pinned
requirements; then `check` and a tiny-model generation with the environment it made. Slow (minutes):
it installs packages from the package index this machine is configured for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from support import TINY

ROOT = Path(__file__).resolve().parent.parent


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
