"""bpy (Blender as a Python module) test set-up: run under .venv-bpy42, .venv-bpy45 or .venv-bpy52, never the plain suite.

Blender's user config goes to a temporary folder (set before ``import bpy``). The extension is loaded from
the source tree through a local extension repository (a symlink named like the manifest id), so it loads
as ``bl_ext.<repo>.image_to_3d`` exactly as an installed extension does.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

if "BLENDER_USER_RESOURCES" not in os.environ:
    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="image_to_3d-blender-user-")
    atexit.register(shutil.rmtree, os.environ["BLENDER_USER_RESOURCES"], True)
# Hermetic: licence acceptances and the Hugging Face cache in temporary folders, never the user's.
for _name, _prefix in (("IMAGE_TO_3D_CONFIG_DIR", "image_to_3d-config-"), ("HF_HOME", "image_to_3d-hf-")):
    os.environ[_name] = tempfile.mkdtemp(prefix=_prefix)
    atexit.register(shutil.rmtree, os.environ[_name], True)
for _name in ("HF_TOKEN", "HF_ENDPOINT", "IMAGE_TO_3D_MODELS", "HF_HUB_OFFLINE", "IMAGE_TO_3D_OFFLINE"):
    os.environ.pop(_name, None)

import bpy  # noqa: E402  (first: it puts Blender's script modules on sys.path)
import addon_utils  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "tests" / "data" / "triposr_tiny"
INPUT_IMAGE = TINY_MODEL / "input_rgba.png"
BACKEND_PYTHON = Path(os.environ.get("IMAGE_TO_3D_BACKEND_PYTHON") or ROOT / ".venv" / "bin" / "python")
REPO = "image_to_3d_tests"
ADDON = f"bl_ext.{REPO}.image_to_3d"


def blender_scripts_dir() -> Path:
    """bpy/<major.minor>/scripts of the bpy wheel in this venv."""
    version = "%d.%d" % bpy.app.version[:2]
    for parent in Path(bpy.__file__).resolve().parents:
        candidate = parent / version / "scripts"
        if (candidate / "addons_core").is_dir():
            return candidate
    raise RuntimeError("Blender scripts folder not found next to bpy")


def enable_from_source():
    repo_dir = Path(tempfile.mkdtemp(prefix="image_to_3d-repo-"))
    atexit.register(shutil.rmtree, repo_dir, True)
    (repo_dir / "image_to_3d").symlink_to(ROOT, target_is_directory=True)
    bpy.context.preferences.extensions.repos.new(name=REPO, module=REPO, custom_directory=str(repo_dir),
                                                 source="USER")
    errors = []
    module = addon_utils.enable(ADDON, default_set=True, handle_error=errors.append)
    assert not errors, errors
    assert ADDON in bpy.context.preferences.addons
    return module


@pytest.fixture(scope="session")
def addon():
    module = enable_from_source()
    yield module
    if ADDON in bpy.context.preferences.addons:
        addon_utils.disable(ADDON, default_set=True)


@pytest.fixture
def settings(addon):
    """An empty scene with the tiny model and the test image chosen, settings as the CLI test uses."""
    bpy.ops.wm.read_homefile(use_empty=True)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.backend_python = str(BACKEND_PYTHON)
    prefs.weights_dir = str(TINY_MODEL)
    prefs.device = "cpu"
    settings = bpy.context.scene.image_to_3d
    settings.image = bpy.data.images.load(str(INPUT_IMAGE), check_existing=True)
    settings.resolution = 64
    settings.remove_background = False
    settings.foreground_ratio = 0.85
    return settings


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """A fresh licence config folder (nothing accepted), seen by Blender and every process it starts."""
    folder = tmp_path / "config"
    monkeypatch.setenv("IMAGE_TO_3D_CONFIG_DIR", str(folder))
    return folder


def prefs():
    return bpy.context.preferences.addons[ADDON].preferences


def addon_module(name: str):
    """A sub-module of the loaded extension, e.g. addon_module('operators.generate')."""
    import importlib

    return importlib.import_module(f"{ADDON}.{name}")


def environment_module():
    return addon_module("environment")


def generate_module():
    return addon_module("operators.generate")


def jobs_module():
    return addon_module("operators.jobs")


def session():
    return addon_module("backend.client.session")


def leftover_files() -> list:
    """Files left in the add-on's job folders."""
    root = jobs_module().temp_root()
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files] if os.path.isdir(root) else []


def start_async():
    """Generate 3D as the UI runs it: execute() returns at once, the timer does the rest."""
    assert bpy.ops.image_to_3d.generate(run_async=True) == {"FINISHED"}
    (job_id,) = jobs_module().TIMERS
    timer = jobs_module().TIMERS[job_id]
    assert bpy.app.timers.is_registered(timer)
    return timer


def tick_until(timer, condition=lambda: False, timeout=120):
    """Drive the timer by hand (timers never fire in bpy-as-module). Returns True if the job ended."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if timer() is None:
            bpy.app.timers.unregister(timer)
            return True
        if condition():
            return False
        time.sleep(0.01)
    raise TimeoutError


@pytest.fixture
def progress(addon, monkeypatch):
    """Every progress event the session's backend applies, as (stage, message), in order: a test that samples
    the job between timer ticks can miss one that two events in a single tick overwrote."""
    transport = addon_module("backend.client.jobs").Transport
    applied, seen = transport._apply, []

    def recording(self, event):
        if event.get("event") == "progress":
            seen.append((event.get("stage", ""), event.get("message", "")))
        applied(self, event)

    monkeypatch.setattr(transport, "_apply", recording)
    return seen


@pytest.fixture
def online(addon):
    """Blender's Allow Online Access on for the test, off again after it."""
    bpy.context.preferences.system.use_online_access = True
    assert bpy.app.online_access
    yield
    bpy.context.preferences.system.use_online_access = False


def drawn_text(draw) -> str:
    """Everything ``draw(owner, context)`` put on a mock layout: the labels' texts (so that wrapped lines read
    as one again), then the calls themselves."""
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    layout = MagicMock()
    draw(SimpleNamespace(layout=layout), bpy.context)
    labels = " ".join(str(c.kwargs.get("text", "")) for c in layout.mock_calls)
    return labels + " " + " ".join(str(c) for c in layout.mock_calls)


def prefs_text() -> str:
    return drawn_text(type(prefs()).draw)


def panel_text(panel: str = "IMAGE_TO_3D_PT_sidebar") -> str:
    return drawn_text(getattr(bpy.types, panel).draw)


def worker_children() -> list[int]:
    """Live ``backend serve`` processes started by this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        parent = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "")
        state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
        if b"backend" in cmdline and b"serve" in cmdline and parent == str(os.getpid()) and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_orphan_workers():
    yield
    import addon_utils as utils

    if ADDON in bpy.context.preferences.addons:
        utils.disable(ADDON, default_set=True)
    assert worker_children() == [], "a backend worker outlived the add-on"
