"""The offline studio install: ``make wheelhouse`` then ``backend install --wheels`` with no index at all.

The fast tests (always run) check how the wheelhouse judges environment markers for its target. The slow ones
(``IMAGE_TO_3D_WHEELHOUSE_TESTS=1``, or ``make test-wheelhouse``; about 8 minutes on 2 cores, most of it pip
resolving against the index and installing) build the linux-x64 wheelhouses for Python 3.11 and 3.13, install
each into a fresh environment with pip's configuration, index and find-links neutralised and every proxy pointed
at a closed port (the network cut), run ``check``, and resolve the other platforms' wheelhouses (metadata only).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import wheelhouse  # noqa: E402

sys.path.remove(str(ROOT / "scripts"))

SLOW = pytest.mark.skipif(os.environ.get("IMAGE_TO_3D_WHEELHOUSE_TESTS") != "1",
                          reason="slow (minutes, the package index): IMAGE_TO_3D_WHEELHOUSE_TESTS=1 or "
                                 "make test-wheelhouse")


def test_markers_are_judged_for_the_target_not_this_machine():
    """click needs colorama on Windows alone; pip, judging by this Linux machine, would leave it out."""
    resolved = {"click": ("8.5.1", ['colorama; platform_system == "Windows"']),
                "uvloop": ("0.21.0", []), "app": ("1.0", ['click>=8', 'uvloop; sys_platform != "win32"'])}
    windows = wheelhouse.marker_environment("windows-x64", "3.11")
    reached, gaps = wheelhouse._walk([Requirement("app")], resolved, windows)
    assert [str(g) for g in gaps] == ['colorama; platform_system == "Windows"'] and "uvloop" not in reached
    reached, gaps = wheelhouse._walk([Requirement("app")], resolved, wheelhouse.marker_environment("linux-x64", "3.13"))
    assert gaps == [] and set(reached) == {"app", "click", "uvloop"}


def test_torch_and_its_cuda_libraries_are_left_to_the_machine():
    resolved = {"torch": ("2.13.0", ["sympy>=1.13", 'nvidia-cublas-cu12; platform_system == "Linux"', "triton"]),
                "sympy": ("1.14.0", ["mpmath<1.4"]), "mpmath": ("1.3.0", [])}
    reached, gaps = wheelhouse._walk([Requirement("torch==2.13.0")], resolved,
                                     wheelhouse.marker_environment("linux-x64", "3.11"))
    assert gaps == [] and {n for n in reached if not wheelhouse._left_out(n)} == {"sympy", "mpmath"}


def test_the_wheelhouse_stays_out_of_git_and_the_extension():
    assert "/wheels/" in (ROOT / ".gitignore").read_text().splitlines()
    assert '"/wheels/",' in (ROOT / "blender_manifest.toml").read_text()


def offline_env() -> dict:
    """pip with no configuration file (this machine's names extra indexes, find-links and constraints), no PIP_*
    variable, and every proxy a closed port: anything that tries the network fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k.lower() not in (
        "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    closed = "http://127.0.0.1:9"
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "http_proxy": closed,
            "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "PYTHONPATH": str(ROOT)}


def torch_wheel(python: str):
    """A torch 2.13.0 CPU wheel for this machine already on disk (the machine's find-links folder, pip's cache)."""
    tag = "cp" + python.replace(".", "")
    for folder in ("/opt/wheels", Path.home() / ".cache" / "pip" / "wheels"):
        for wheel in sorted(Path(folder).rglob(f"torch-2.13.0*-{tag}-{tag}-*x86_64.whl")):
            return wheel
    return None


def build(python: str) -> Path:
    r = subprocess.run(["make", "-s", "wheelhouse", "PLATFORM=linux-x64", f"PYTHON={python}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = ROOT / "wheels" / f"linux-x64-py{python}"
    assert not any(p.name.startswith(("torch-", "nvidia_")) for p in folder.iterdir())
    return folder


def python_for(version: str):
    if version == "3.11":
        return sys.executable
    from test_install import PYTHON313

    return PYTHON313


@SLOW
@pytest.mark.parametrize("python", ["3.11", "3.13"])
def test_wheelhouse_then_an_install_with_the_network_cut(tmp_path, python):
    interpreter = python_for(python)
    if interpreter is None:
        pytest.skip(f"no Python {python} here")
    house = tmp_path / "wheels"
    shutil.copytree(build(python), house, symlinks=True)
    torch = torch_wheel(python)
    env = offline_env()
    target = tmp_path / "env"
    if torch is not None:  # the whole install, as Install Backend runs it with the Wheelhouse Folder
        os.symlink(torch, house / torch.name)
        r = subprocess.run([interpreter, "-m", "backend", "install", "--target", target, "--flavor", "cpu",
                            "--wheels", house, "--json"], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=1500)
        assert r.returncode == 0, r.stdout[-2000:] + (target / "install.log").read_text()[-3000:]
        assert "--no-index --find-links" in (target / "install.log").read_text()
        python_in_env = Path(json.loads(r.stdout.splitlines()[-1])["python"])
    else:  # no torch wheel for this Python on disk: the rest, the same way
        subprocess.run([interpreter, "-m", "venv", target], check=True)
        python_in_env = target / "bin" / "python"
        r = subprocess.run([python_in_env, "-m", "pip", "install", "--no-index", "--find-links", house, "-r",
                            ROOT / "backend" / "requirements.txt"], capture_output=True, text=True, env=env,
                           timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check = json.loads(subprocess.run([python_in_env, "-m", "backend", "check"], capture_output=True, text=True,
                                      cwd=ROOT, env=env).stdout)
    assert check["missing"] == ([] if torch is not None else ["torch"]), check["missing"]
    assert check["python"]["version"].startswith(python)


@SLOW
def test_the_other_platforms_wheelhouses_resolve():
    """Metadata only (pip's report): every requirement, on each platform and Python, has a wheel."""
    runs = {(platform, python): subprocess.Popen(
        [sys.executable, ROOT / "scripts" / "wheelhouse.py", "--platform", platform, "--python", python, "--dry-run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for platform in ("windows-x64", "macos-arm64") for python in ("3.11", "3.13")}
    for (platform, python), run in runs.items():
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, (platform, python, err[-3000:])
        pins = json.loads(out)
        environment = wheelhouse.marker_environment(platform, python)
        for r in wheelhouse.top_requirements(environment):
            assert r.name.lower().replace("_", "-") in pins, (platform, python, r.name)
        assert "torch" not in pins and ("colorama" in pins) == (platform == "windows-x64")
