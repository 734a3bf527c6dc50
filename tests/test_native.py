"""Long native calls in a child process (backend/postprocess/native.py): the same bytes as in-process, a
deadline that ends a call that never returns (the job fails with ``timeout``, the worker lives on), a cancel
that lands within a second, and no child left behind."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from backend import client as wire
from backend import protocol
from backend.errors import Cancelled
from backend.postprocess import atlas, native, quads
from backend.postprocess import reduce as reduce_module
from support import ROOT, TINY
from test_bake import bumpy_sphere

TESTS = Path(__file__).resolve().parent
IMAGE = TINY / "input_rgba.png"
BASE = dict(model="triposr", weights=str(TINY), resolution=64, remove_background=False, device="cpu")


@pytest.fixture(autouse=True)
def targets_importable(monkeypatch):
    """The children import tests/native_targets.py as they import the backend's own targets."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def sphere():
    return bumpy_sphere(40, 60)  # 4,680 triangles


def gone(pid: int) -> bool:
    """Ended (a zombie not reaped yet counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def native_children(pid: int) -> list:
    """The worker's children that run a native call (not its watcher, backend/orphan_guard.py)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "backend.postprocess.native" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for_file(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never came"
        time.sleep(0.01)
    return path.read_text()


def assert_same(child: dict, here: dict):
    assert sorted(child) == sorted(here)
    for name in here:
        a, b = np.asarray(child[name]), np.asarray(here[name])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


def test_xatlas_in_the_child_gives_the_bytes_it_gives_in_process(sphere):
    v, f = sphere
    arrays = {"vertices": v, "tris": f.astype(np.uint32)}
    params = {"texels_per_unit": float(np.sqrt(0.55 * 512 * 512 / 3.7)), "padding": 3}
    child = native.call("backend.postprocess.atlas:xatlas_generate", arrays, params, seconds=120, what="xatlas")
    assert_same(child, atlas.xatlas_generate(**arrays, **params))


def test_the_reduction_and_instant_meshes_in_the_child_give_the_same_bytes(sphere):
    v, f = sphere
    arrays = {"points": v.astype(np.float64), "triangles": f.astype(np.int32)}
    child = native.call("backend.postprocess.reduce:simplify", arrays, {"target": 1000}, seconds=120, what="reduce")
    assert_same(child, reduce_module.simplify(**arrays, target=1000))
    pytest.importorskip("pynanoinstantmeshes")
    arrays = {"vertices": v, "faces": f.astype(np.uint32)}
    child = native.call("backend.postprocess.quads:remesh", arrays, {"vertex_count": 300}, seconds=120, what="quads")
    assert_same(child, quads.remesh(**arrays, vertex_count=300))


def test_a_call_that_never_returns_is_ended_at_its_deadline(tmp_path):
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(native.NativeTimeout) as e:
        native.call("native_targets:hang", {"x": np.zeros(3)}, {"pid_file": str(pid_file)}, seconds=2,
                    what="the test's step", hint="Use fewer faces.")
    took = time.monotonic() - started
    assert 2 <= took < 3.5, took
    assert e.value.code == "timeout" and e.value.hint == "Use fewer faces."
    assert e.value.message == "the test's step did not finish within 2 s"
    assert gone(int(pid_file.read_text()))


def test_a_cancel_kills_the_child_within_a_second(tmp_path):
    pid_file = tmp_path / "pid"
    asked = []

    def check():
        if asked:
            raise Cancelled()

    threading.Timer(1.0, lambda: asked.append(time.monotonic())).start()
    with pytest.raises(Cancelled):
        native.call("native_targets:hang", {}, {"pid_file": str(pid_file)}, seconds=60, what="x", check=check)
    assert time.monotonic() - asked[0] < 1.0
    assert gone(int(pid_file.read_text()))


def test_a_cancel_during_xatlas_lands_within_a_second():
    """xatlas on 50k triangles at 2048² runs for about 13 s; the cancel comes after 1 s."""
    v, f = bumpy_sphere(160, 160)
    asked = []

    def check():
        if asked:
            raise Cancelled()

    threading.Timer(1.0, lambda: asked.append(time.monotonic())).start()
    with pytest.raises(Cancelled):
        atlas.unwrap(v, f.reshape(-1), np.full(len(f), 3), 2048, check)
    assert time.monotonic() - asked[0] < 1.0
    assert not psutil.Process().children(recursive=True)


@pytest.mark.parametrize("target, params, raised, words", [
    ("native_targets:fail", {}, native.NativeFailed, "the test's step failed: ValueError: no good"),
    ("native_targets:fail", {"kind": "MemoryError"}, MemoryError, "no good"),
    ("native_targets:die", {}, native.NativeFailed, "the test's step ended without a result (exit status 3)"),
    ("no_such_module:f", {}, native.NativeFailed, "ModuleNotFoundError"),
])
def test_failures_in_the_child_are_raised_in_the_parent(target, params, raised, words):
    with pytest.raises(raised) as e:
        native.call(target, {}, params, seconds=60, what="the test's step")
    assert words in str(e.value)


def test_the_results_come_back_whole():
    arrays = {"a": np.arange(10, dtype=">i4").reshape(2, 5), "b": np.asfortranarray(np.eye(3)), "c": np.float32(2)}
    assert_same(native.call("native_targets:echo", arrays, {}, seconds=60, what="echo"), arrays)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_the_child_dies_with_its_parent(tmp_path):
    pid_file = tmp_path / "pid"
    script = ("import sys; from backend.postprocess import native; "
              "native.call('native_targets:hang', {}, {'pid_file': sys.argv[1]}, seconds=600, what='x')")
    parent = subprocess.Popen([sys.executable, "-c", script, str(pid_file)], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)])))
    child = int(wait_for_file(pid_file))
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 2
    while not gone(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.01)


def test_an_orphaned_child_ends_itself_after_its_deadline(tmp_path):
    """Where no parent-death signal exists (macOS, Windows), faulthandler's watchdog (a thread that needs no GIL)
    ends the child a little after the parent's deadline."""
    np.savez(tmp_path / "in.npz")
    (tmp_path / "call.json").write_text(json.dumps({"target": "native_targets:hang", "params": {}, "watchdog": 1.0,
                                                    "parent": os.getpid()}))
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-m", "backend.postprocess.native", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert child.returncode != 0 and "Timeout" in child.stderr and time.monotonic() - started < 10


SITECUSTOMIZE = """
import sys

if sys.orig_argv[-2:] == ["backend", "serve"]:  # the worker only, not its children
    from backend.postprocess import native

    real_call = native.call

    def call(target, *args, **kwargs):
        if target == "backend.postprocess.reduce:simplify":  # the reduction never returns
            target, kwargs["seconds"] = "native_targets:hang", 3
        return real_call(target, *args, **kwargs)

    native.call = call
"""


def test_a_hung_native_step_fails_the_job_with_timeout_and_the_worker_lives_on(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = wire.default_env(ROOT)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path / "site"), str(TESTS)]),
               IMAGE_TO_3D_FIELDS=str(tmp_path / "fields"))
    worker = wire.Worker(sys.executable, ROOT, env=env, temp_dir=str(tmp_path / "jobs"))
    try:
        job = worker.submit(str(IMAGE), dict(BASE, faces=300))
        assert worker.wait(120).state == protocol.ERROR
        assert job.error["code"] == "timeout" and "did not finish within 3 s" in job.error["message"], job.error
        assert job.error["hint"] and worker.running
        assert not native_children(worker.pid), "the hung child outlived its job"

        # A cancel while the native step runs: the child is killed and the job ends within a second.
        job = worker.submit(str(IMAGE), dict(BASE, faces=300))
        while job.stage != protocol.Stage.REDUCE and not job.finished:
            worker.poll()
            time.sleep(0.01)
        time.sleep(0.5)
        asked = time.monotonic()
        worker.cancel()
        assert worker.wait(10).state == protocol.CANCELLED
        assert time.monotonic() - asked < 1.0
        assert not native_children(worker.pid)

        pid = worker.pid
        worker.submit(str(IMAGE), BASE)
        assert worker.wait(120).state == protocol.DONE and worker.pid == pid
    finally:
        worker.stop()


def test_a_worker_whose_client_goes_during_xatlas_ends_at_once(tmp_path):
    """The client's going cancels the job; xatlas, in its child, is killed with it: the worker ends at once, its
    own way (status 0), and leaves no process (before, xatlas held the worker's GIL until the watcher killed it)."""
    from test_client_worker import group_alive, noisy_sphere

    np.savez(tmp_path / "mesh.npz", **noisy_sphere(120))
    request = {"op": "bake", "id": "gone", "image": str(IMAGE), "mesh": str(tmp_path / "mesh.npz"),
               "output_dir": str(tmp_path), "options": dict(BASE, field_id="0" * 32, texture=1024)}
    process = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=wire.default_env(ROOT),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        assert json.loads(process.stdout.readline())["event"] == "ready"
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        while json.loads(process.stdout.readline()).get("stage") != protocol.Stage.UNWRAP:
            pass
        deadline = time.monotonic() + 30
        while not native_children(process.pid):
            assert time.monotonic() < deadline, "xatlas never started"
            time.sleep(0.01)
        child = native_children(process.pid)[0].pid
        process.stdin.close()  # Blender crashed or quit
        left = time.monotonic()
        assert process.wait(10) == 0
        assert time.monotonic() - left < 1.0
        assert gone(child)
        deadline = time.monotonic() + 2
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(process.pid)
    finally:
        if group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
