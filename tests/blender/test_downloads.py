"""The Download buttons against a stand-in hub on 127.0.0.1 (HF_ENDPOINT): a one-shot backend command in the
backend's Python (huggingface_hub), the registry's own records, a file that fails verification, progress + Cancel
(nothing left half-written in the Hugging Face cache) + Download again of a real-sized OpenLRM file, the token in
the download's environment only; with Allow Online Access off, or before a backend exists, no process at all
and a message saying what to do."""

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import bpy
import pytest

from .conftest import addon_module, environment_module as env, prefs, prefs_text
from hubserver import StandInHub, Zeros

SMALL = "openlrm-obj-small"


def registry():
    return addon_module("backend.models.registry")


def download_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                status = (entry / "status").read_text()
            except OSError:
                continue
            if b"download" in cmdline and b"backend" in cmdline and "State:\tZ" not in status:
                found.append(int(entry.name))
    return found


@pytest.fixture
def store(addon):
    folder = env().model_store()
    cache = Path(os.environ["HF_HOME"]) / "hub"  # conftest's, where downloads go
    for old in (folder, cache):
        shutil.rmtree(old, ignore_errors=True)
    folder.mkdir(parents=True)
    yield folder
    for old in (folder, cache):
        shutil.rmtree(old, ignore_errors=True)
    env().OUTCOMES.clear()


def test_offline_the_download_button_is_greyed_out_and_starts_nothing(addon, store):
    assert not bpy.app.online_access  # bpy's default, as Blender's until the user allows it
    assert not bpy.ops.image_to_3d.download_model.poll()
    with pytest.raises(RuntimeError, match="Allow Online Access is off"):
        bpy.ops.image_to_3d.download_model(model="triposr")
    assert env().TASKS == {} and download_processes() == []
    assert not bpy.ops.image_to_3d.install_backend.poll()
    text = prefs_text()
    assert "Allow Online Access is off" in text and "image_to_3d.download_model" in text
    assert f"Model store (Download puts files here): {store}" in text


def test_before_a_backend_exists_download_says_to_install_one(addon, store, online, tmp_path):
    before = prefs().backend_python
    prefs().backend_python = str(tmp_path / "no-env" / "bin" / "python")
    try:
        assert not bpy.ops.image_to_3d.download_model.poll()
        with pytest.raises(RuntimeError, match="Install the backend first"):
            bpy.ops.image_to_3d.download_model(model="triposr")
        assert env().TASKS == {} and download_processes() == []
    finally:
        prefs().backend_python = before
    assert bpy.ops.image_to_3d.download_model.poll()


def cache_files() -> list:
    """Files in the Hugging Face cache (conftest's HF_HOME), the library's locks left out."""
    root = Path(os.environ["HF_HOME"])
    return [p for p in root.rglob("*") if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts
            and p.name != "CACHEDIR.TAG"]


def sidebar_text() -> str:
    layout = MagicMock()
    bpy.types.IMAGE_TO_3D_PT_sidebar.draw(SimpleNamespace(layout=layout), bpy.context)
    return " ".join(str(c) for c in layout.mock_calls)


def test_offline_generation_with_missing_files_names_them(settings, store):
    prefs().weights_dir = ""  # nothing in the Model Folder, the store or the (empty) HF cache
    text = sidebar_text()
    assert "Weights not downloaded (1.7 GB)" in text and "image_to_3d.download_model" in text
    settings.remove_background = True
    assert "Background removal model not downloaded (about 176.0 MB)" in sidebar_text()
    settings.remove_background = False
    with pytest.raises(RuntimeError, match="weights not found"):
        bpy.ops.image_to_3d.generate()
    assert str(store / "triposr") in settings.last_error
    hint = settings.last_hint
    assert "config.yaml (987 B)" in hint and "model.ckpt (1.7 GB)" in hint and str(store / "triposr") in hint
    worker_env = addon_module("backend.client.session").current().env
    assert worker_env["HF_HUB_OFFLINE"] == "1" and worker_env["IMAGE_TO_3D_OFFLINE"] == "1"
    assert worker_env["IMAGE_TO_3D_MODELS"] == str(store)


def test_a_file_that_fails_verification_is_rejected_in_the_ui(addon, store, online, monkeypatch):
    path = f"/stabilityai/TripoSR/resolve/{registry().TRIPOSR_REVISION}/config.yaml"
    with StandInHub({path: b"#" * 987}) as hub:  # the right size, the wrong bytes
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(RuntimeError, match="failed its checksum"):
            bpy.ops.image_to_3d.download_model(model="triposr")
    assert [r[0] for r in hub.requests] == [path]
    outcome = env().OUTCOMES["download:triposr"]
    assert outcome["level"] == "ERROR" and "removed, never loaded" in outcome["message"]
    assert "download it again" in outcome["hint"]
    assert cache_files() == [] and not (store / "triposr").exists()
    assert "failed its checksum" in prefs_text()
    assert env().TASKS == {} and download_processes() == []


def test_download_progress_cancel_and_again(addon, store, online, config_dir, monkeypatch):
    spec = registry().MODELS[SMALL]
    config, weights = spec.files
    base = f"/{spec.repo}/resolve/{config.revision}"
    key = f"download:{SMALL}"
    with StandInHub({f"{base}/config.json": b'{"encoder_type": "dinov2"}',
                     f"{base}/model.safetensors": Zeros(weights.size)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        prefs().hf_token = "hf_secret_token"

        with pytest.raises(RuntimeError, match="Accept the licence"):  # before the first download
            bpy.ops.image_to_3d.download_model(model=SMALL)
        assert hub.requests == hub.heads == [] and env().TASKS == {}
        assert "image_to_3d.accept_licence" in prefs_text()
        assert bpy.ops.image_to_3d.accept_licence(model=SMALL) == {"FINISHED"}

        hub.delay = 0.01  # slow enough to cancel mid-way
        assert bpy.ops.image_to_3d.download_model(model=SMALL, run_async=True) == {"FINISHED"}
        task = env().TASKS[key]
        assert task.args[0] == prefs().backend_python  # the backend's Python, which has huggingface_hub
        assert "hf_secret_token" not in " ".join(task.args) and task.env["HF_TOKEN"] == "hf_secret_token"
        assert bpy.app.timers.is_registered(env().tick)
        deadline = time.monotonic() + 60
        while task.bytes_done < 30 * 2**20:
            assert env().tick() is not None and time.monotonic() < deadline, task
            time.sleep(0.05)
        assert task.rate > 0 and 0 < task.fraction < 1
        text = prefs_text()
        assert "of about 445.6 MB at" in text and "image_to_3d.cancel_task" in text

        assert bpy.ops.image_to_3d.cancel_task(key=key) == {"FINISHED"}
        assert task.state == "cancelled" and download_processes() == []
        # ended on SIGTERM: the library removed its temporary file; config.json, finished, stays in the cache
        assert [p.name for p in cache_files() if ".incomplete" in p.name or p.name.startswith("zeros")] == []
        assert [p.name for p in cache_files() if "snapshots" in p.parts] == ["config.json"]
        assert not (store / SMALL / "model.safetensors").exists()
        assert env().OUTCOMES[key]["message"] == "Cancelled"
        if bpy.app.timers.is_registered(env().tick):
            bpy.app.timers.unregister(env().tick)

        hub.delay = 0.0
        assert bpy.ops.image_to_3d.download_model(model=SMALL) == {"FINISHED"}
        assert [r[0] for r in hub.requests].count(f"{base}/config.json") == 1  # not fetched twice
        assert {r[1] for r in hub.heads + [(r[0], r[2]) for r in hub.requests]} == {"Bearer hf_secret_token"}
    path = store / SMALL / "model.safetensors"
    assert path.stat().st_size == weights.size and path.is_symlink()  # a link into the cache, no copy
    assert Path(os.environ["HF_HOME"]) in Path(os.path.realpath(path)).parents
    assert (store / "checksums.json").is_file()  # the sha256 recorded on first download, enforced from then on
    assert env().OUTCOMES[key]["message"] == "Downloaded and verified"
    assert addon_module("backend.client.catalog").where_is(SMALL, store)[0] == "store"
    assert "Ready, downloaded" in prefs_text()
    prefs().hf_token = ""
    assert "HF_TOKEN" not in env().process_env(prefs())  # the worker never gets it
