"""The bpy-free parts of the preferences and the panel: the model catalogue (it mirrors what the backend
defaults to), the check summary, and the background task runner (JSON events, cancel, timeout)."""

import importlib
import importlib.util
import json
import sys
import textwrap
import time

from support import ROOT

from backend.models import registry
from backend.client.commands import Task
from backend.protocol import CANCELLED, DONE, ERROR as FAILED


def extension():
    """The extension root as a package, the way Blender imports it (catalog uses relative imports)."""
    name = "image_to_3d_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.backend.client.catalog")


def test_catalogue_mirrors_the_backend_defaults():
    catalog = extension()
    assert [i[0] for i in catalog.model_items()] == list(registry.MODELS)
    assert [m for m in registry.MODELS if catalog.draws_views(m)] == [
        "instantmesh-large", "instantmesh-base", "instantnerf-large", "instantnerf-base"]
    assert [m for m in registry.MODELS if not catalog.uses_threshold(m)] == [
        "triposg", "instantmesh-large", "instantmesh-base"]
    assert [m for m in registry.MODELS if catalog.draws_samples(m)] == [
        "triposg", "instantmesh-large", "instantmesh-base", "instantnerf-large", "instantnerf-base"]
    assert catalog.sampling_defaults("triposg") == {"steps": 50, "guidance": 7.0, "seed": 42}
    assert catalog.sampling_defaults("instantmesh-base") == catalog.VIEW_DEFAULTS
    assert catalog.defaults("instantnerf-base")["threshold"] == 10.0 and catalog.defaults("instantnerf-base")[
        "resolution"] == 256
    assert catalog.defaults("triposr") == {"resolution": 256, "threshold": 25.0, "foreground_ratio": 0.85,
                                           "source_size": 512, "patch": 16}
    assert catalog.defaults("openlrm-base") == {"resolution": 384, "threshold": 3.0, "foreground_ratio": 0.8,
                                                "source_size": 336, "patch": 14}
    assert catalog.size_text("triposr") == "1.7 GB" and catalog.size_text("openlrm-obj-small") == "about 445.6 MB"
    assert catalog.size_text("instantmesh-large") == "about 5.4 GB"  # Zero123++'s files counted at their estimates
    assert catalog.VIEW_DEFAULTS == {"steps": 75, "guidance": 4.0, "seed": 42}


def test_licence_state_and_acceptance(tmp_path, monkeypatch):
    catalog = extension()
    monkeypatch.setenv("IMAGE_TO_3D_CONFIG_DIR", str(tmp_path))
    assert not catalog.licence_pending("triposr")
    assert catalog.licence_pending("openlrm-mix-small") and "CC-BY-NC-4.0" in catalog.licence_notice("openlrm-small")
    assert catalog.accept_licence("openlrm-mix-small")
    assert not catalog.licence_pending("openlrm-obj-large")


def test_where_the_files_are(tmp_path, monkeypatch):
    catalog = extension()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    store, own = tmp_path / "store", tmp_path / "mine"
    assert catalog.where_is("triposr", store, "") == ("", None)
    (own / "triposr").mkdir(parents=True)
    for name in ("config.yaml", "model.ckpt"):
        (own / "triposr" / name).write_bytes(b"x")
    assert catalog.where_is("triposr", store, str(own)) == ("folder", own / "triposr")  # the user vouches
    assert catalog.user_folder_for("openlrm-small", str(own)) is None  # not there: store, then cache
    assert catalog.where_is("triposr", store, "") == ("", None)
    (store / "u2net").mkdir(parents=True)
    (store / "u2net" / "u2net.onnx").write_bytes(b"x")
    assert catalog.where_is("u2net", store)[0] == "store"
    (store / "triposr").mkdir()
    (store / "triposr" / "model.ckpt.partial").write_bytes(b"x" * 10)
    assert catalog.partial_bytes("triposr", store) == 10


def test_check_summary_says_what_to_do():
    catalog = extension()
    level, line, todo = catalog.check_summary({"python": {"version": "3.11.7"}, "torch": {"installed": False},
                                               "missing": ["torch", "rembg"], "device": "cpu"})
    assert level == "ERROR" and line == "Python 3.11.7: missing torch, rembg" and "Install backend" in todo[0]
    gpu = {"python": {"version": "3.11.7"}, "missing": [], "device": "cuda",
           "torch": {"version": "2.13.0", "gpus": [{"name": "NVIDIA H100", "memory_total_mb": 81559}]}}
    assert catalog.check_summary(gpu)[:2] == ("OK", "Ready: Python 3.11.7, torch 2.13.0, NVIDIA H100 (80 GB)")
    level, _, todo = catalog.check_summary(None, "did not answer")
    assert level == "ERROR" and "Install backend" in todo[0]
    env = catalog.store_env(ROOT, online=False, token="t")
    assert env == {"IMAGE_TO_3D_MODELS": str(ROOT), "HF_HUB_OFFLINE": "1", "IMAGE_TO_3D_OFFLINE": "1", "HF_TOKEN": "t"}
    assert catalog.store_env(ROOT, online=True) == {"IMAGE_TO_3D_MODELS": str(ROOT)}


def script_task(tmp_path, body: str, **kw) -> Task:
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(body))
    return Task("test", [sys.executable, str(script)], cwd=str(tmp_path), env=None, **kw)


def test_task_follows_json_events(tmp_path):
    task = script_task(tmp_path, """
        import json, sys
        print(json.dumps({"event": "progress", "bytes": 50, "total": 200, "rate": 10}), flush=True)
        print("a log line", file=sys.stderr)
        print(json.dumps({"event": "progress", "message": "half", "fraction": 0.5}), flush=True)
        print(json.dumps({"event": "result", "python": "/x"}), flush=True)
    """).wait(30)
    assert task.state == DONE and task.result["python"] == "/x"
    assert (task.bytes_done, task.bytes_total, task.message, task.fraction) == (50, 200, "half", 0.5)
    assert task.log_tail() == "a log line"


def test_task_reports_the_error_event_or_the_exit(tmp_path):
    task = script_task(tmp_path, """
        import json, sys
        print(json.dumps({"event": "error", "code": "download", "message": "m", "hint": "h"}), flush=True)
        sys.exit(3)
    """).wait(30)
    assert task.state == FAILED and task.error == {"code": "download", "message": "m", "hint": "h"}
    task = script_task(tmp_path, "import sys; print('Traceback: boom', file=sys.stderr); sys.exit(1)").wait(30)
    assert task.state == FAILED and "exited with status 1" in task.error["message"] and "boom" in task.error["hint"]


def test_task_document_mode_cancel_and_timeout(tmp_path):
    task = script_task(tmp_path, "import json; print(json.dumps({'ok': False, 'missing': ['torch']}, indent=1))",
                       document=True).wait(30)
    assert task.state == DONE and task.result["missing"] == ["torch"]
    task = script_task(tmp_path, "import time; time.sleep(60)")
    task.cancel()
    assert task.state == CANCELLED and task.process.poll() is not None
    task = script_task(tmp_path, "import time; time.sleep(60)", timeout=0.3, document=True)
    started = time.monotonic()
    task.wait(10)
    assert task.state == FAILED and task.error["code"] == "timeout" and time.monotonic() - started < 5
    missing = Task("test", [str(tmp_path / "nope")], cwd=str(tmp_path), env=None)
    assert missing.state == FAILED and "Could not start" in missing.error["message"]


def test_catalog_is_stdlib_only():
    source = "".join((ROOT / "backend" / "client" / name).read_text() for name in ("catalog.py", "commands.py"))
    for heavy in ("import torch", "import numpy", "import PIL", "import rembg", "import bpy"):
        assert heavy not in source
    json.dumps(extension().model_items())


def test_the_download_size_counts_only_what_is_left(tmp_path):
    """A model whose files another model already holds in the store (InstantMesh's variants share about
    3.9 GB) shows only the rest."""
    catalog = extension()
    store = tmp_path / "store"
    assert catalog.size_text("instantnerf-base", store) == "about 5.1 GB"
    unet = registry.INSTANTMESH_UNET
    path = store / "instantmesh-large" / unet.path
    path.parent.mkdir(parents=True)
    with open(path, "wb") as out:
        out.truncate(unet.size)  # sparse, at the published size
    assert catalog.download_size("instantnerf-base", store) == catalog.download_size("instantnerf-base") - unet.size
    assert catalog.size_text("instantnerf-base", store) == "about 3.4 GB"
