"""The backend environment in the preferences: Check (``python -m backend check`` in a subprocess), Use
Existing Python (a good interpreter is taken, a bare one is refused with what it lacks), Install Backend
(its failure shows the error, the hint and the log; Cancel stops it; it needs online access)."""

import os
import shutil
import sys
import time
from pathlib import Path

import bpy
import pytest

from .conftest import BACKEND_PYTHON, addon_module, environment_module as env, prefs, prefs_text


def live_in_group(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (a container's init may never reap those)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def bare_python() -> str:
    """A Python without torch: the base interpreter of this venv (bpy's venv has no torch either)."""
    return sys.executable


@pytest.fixture
def clean(addon):
    p = prefs()
    saved = p.backend_python
    env().CHECKS.clear()
    env().OUTCOMES.clear()
    yield p
    p.backend_python = saved
    env().stop_all()
    env().OUTCOMES.clear()


def test_check_reports_torch_and_the_device(clean):
    clean.backend_python = str(BACKEND_PYTHON)
    assert "Not checked yet" in prefs_text()
    assert bpy.ops.image_to_3d.check_backend() == {"FINISHED"}
    check = env().check_of(str(BACKEND_PYTHON))
    assert check["report"]["ok"] and check["report"]["torch"]["version"]
    assert check["line"].startswith(f"Ready: Python {check['report']['python']['version']}, torch ")
    if check["report"]["device"] == "cpu":
        assert check["level"] == "WARNING" and "CPU only" in check["line"] and "CUDA" in check["todo"][0]
    assert check["line"] in prefs_text()


def test_check_does_not_block_the_ui(clean):
    clean.backend_python = str(BACKEND_PYTHON)
    started = time.monotonic()
    assert bpy.ops.image_to_3d.check_backend(run_async=True) == {"FINISHED"}
    assert time.monotonic() - started < 0.5, "the operator returns while the check runs"
    assert not bpy.ops.image_to_3d.check_backend.poll()
    assert "Checking the backend Python" in prefs_text()
    deadline = time.monotonic() + 120
    while env().tick() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert env().check_of(str(BACKEND_PYTHON))["report"]["ok"]
    if bpy.app.timers.is_registered(env().tick):
        bpy.app.timers.unregister(env().tick)


def test_use_existing_python_takes_a_working_interpreter(clean):
    clean.backend_python = ""
    assert bpy.ops.image_to_3d.use_existing_python(filepath=str(BACKEND_PYTHON)) == {"FINISHED"}
    assert clean.backend_python == os.path.abspath(str(BACKEND_PYTHON))
    assert "Using" in env().OUTCOMES["use_existing"]["message"]


def test_use_existing_python_lists_what_a_bare_one_lacks(clean):
    clean.backend_python = str(BACKEND_PYTHON)
    with pytest.raises(RuntimeError, match="cannot run the backend"):
        bpy.ops.image_to_3d.use_existing_python(filepath=bare_python())
    assert clean.backend_python == str(BACKEND_PYTHON), "not taken"
    outcome = env().OUTCOMES["use_existing"]
    assert "missing" in outcome["message"] and "torch" in outcome["message"]
    assert "Install backend" in outcome["hint"] or "Install Backend" in outcome["hint"]
    assert "cannot run the backend" in prefs_text()
    with pytest.raises(RuntimeError, match="Not a file"):
        bpy.ops.image_to_3d.use_existing_python(filepath="/no/such/python")


def test_install_backend_needs_online_access(clean):
    assert not bpy.app.online_access
    assert not bpy.ops.image_to_3d.install_backend.poll()
    assert env().TASKS == {}


def test_offline_a_wheelhouse_folder_installs_from_it_alone(clean, tmp_path, monkeypatch):
    """Allow Online Access off, a Wheelhouse Folder set: Install Backend runs, with --wheels and no index. This
    folder lacks a torch wheel, so pip (never reaching for the network) stops there and the message says so."""
    assert not bpy.app.online_access
    fresh_target()
    no_local_packages(monkeypatch)
    clean.wheels_dir, clean.package_index_url = str(tmp_path), "https://mirror.example/simple"
    try:
        assert bpy.ops.image_to_3d.install_backend.poll()
        args = addon_module("operators.backend_env").install_args(clean)
        assert args[args.index("--wheels") + 1] == str(tmp_path) and "--index-url" not in args
        with pytest.raises(RuntimeError, match=f"installing PyTorch from {tmp_path} .*torch wheel.* failed"):
            bpy.ops.image_to_3d.install_backend()
        log = (env().backend_env_dir() / "install.log").read_text()
        assert f"--no-index --find-links {tmp_path}" in log and "mirror.example" not in log
    finally:
        clean.wheels_dir, clean.package_index_url = "", ""
    assert not bpy.ops.image_to_3d.install_backend.poll()


def no_local_packages(monkeypatch):
    """pip sees only the index the preferences give: no pip.conf, no find-links (this machine has local
    wheels configured), no retries."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def fresh_target():
    target = env().backend_env_dir()
    shutil.rmtree(target, ignore_errors=True)
    return target


def test_a_failed_install_shows_the_error_the_hint_and_the_log(clean, online, monkeypatch):
    """Blender's Python makes the environment in the extension's user folder; PyTorch's index is a port on
    127.0.0.1 where nothing listens, so pip fails at once (no retries)."""
    target = fresh_target()
    no_local_packages(monkeypatch)
    clean.torch_build, clean.torch_index_url, clean.package_index_url = "cpu", "http://127.0.0.1:9/simple", ""
    saved = clean.backend_python
    with pytest.raises(RuntimeError, match=r"installing PyTorch \(cpu\) failed"):
        bpy.ops.image_to_3d.install_backend()
    outcome = env().OUTCOMES["install"]
    assert outcome["level"] == "ERROR" and f"The full log is {target / 'install.log'}" in outcome["hint"]
    assert "127.0.0.1:9" in (target / "install.log").read_text()
    assert (target / "bin" / "python").exists(), "the environment was made with Blender's Python"
    assert clean.backend_python == saved, "a failed install changes nothing"
    text = prefs_text()
    assert "installing PyTorch (cpu) failed" in text and "install.log" in text
    clean.torch_index_url = ""


def test_install_progress_and_cancel(clean, online, monkeypatch):
    fresh_target()
    clean.torch_build, clean.torch_index_url = "cpu", "http://127.0.0.1:9/simple"
    no_local_packages(monkeypatch)
    assert bpy.ops.image_to_3d.install_backend(run_async=True) == {"FINISHED"}
    task = env().TASKS["install"]
    assert task.args[:4] == [sys.executable, "-m", "backend", "install"]
    assert task.args[task.args.index("--target") + 1] == str(env().backend_env_dir())
    assert "--index-url" not in task.args and task.args[task.args.index("--flavor") + 1] == "cpu"
    deadline = time.monotonic() + 60
    while not task.message:
        env().tick()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not bpy.ops.image_to_3d.install_backend.poll()
    assert "image_to_3d.cancel_task" in prefs_text() and task.message in prefs_text()
    assert bpy.ops.image_to_3d.cancel_task(key="install") == {"FINISHED"}
    assert task.state == "cancelled" and task.process.poll() is not None
    assert env().OUTCOMES["install"]["message"] == "Install cancelled"
    time.sleep(0.2)
    assert live_in_group(task.pid) == [], "the whole group (pip included) is gone"
    clean.torch_index_url = ""


def test_install_passes_the_package_index(clean):
    clean.torch_build, clean.package_index_url, clean.torch_index_url = "auto", " https://mirror.example/simple ", ""
    args = addon_module("operators.backend_env").install_args(clean)
    assert args[args.index("--index-url") + 1] == "https://mirror.example/simple"
    assert "--torch-index-url" not in args and Path(args[args.index("--target") + 1]).name == "backend-env"
    clean.package_index_url = ""


@pytest.mark.skipif(os.environ.get("IMAGE_TO_3D_BPY_INSTALL") != "1",
                    reason="a real install (minutes; needs the packages from pip's configured index or cache): "
                           "IMAGE_TO_3D_BPY_INSTALL=1 runs it")
def test_install_backend_for_real_sets_the_backend_python(clean, online):
    target = fresh_target()
    clean.torch_build, clean.torch_index_url, clean.package_index_url = "cpu", "pip", ""
    clean.backend_python = ""
    assert bpy.ops.image_to_3d.install_backend() == {"FINISHED"}
    assert clean.backend_python == str(target.resolve() / "bin" / "python")
    check = env().check_of(clean.backend_python)
    assert check is not None and check["report"]["ok"], check
    assert "Backend installed" in env().OUTCOMES["install"]["message"]
