"""The wire, with the real worker (``python -m backend serve``) driven by ``backend.client``:
round trip, warm model, bad input, cancel, a killed worker, a worker that does not start, no orphans."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backend import client as wire
from backend import protocol
from backend.protocol import Stage

STAGE_BACKGROUND, STAGE_COLOR, STAGE_LOAD, STAGE_SURFACE = Stage.BACKGROUND, Stage.COLOR, Stage.LOAD, Stage.SURFACE

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "triposr_tiny"
IMAGE = TINY / "input_rgba.png"
FAST = {"weights": str(TINY), "resolution": 64, "remove_background": False, "device": "cpu"}
SLOW = dict(FAST, resolution=512)  # ~9 s of surface extraction: time to cancel or kill mid-job


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def worker(tmp_path):
    w = wire.Worker(sys.executable, ROOT, temp_dir=str(tmp_path / "jobs"))
    pids = []
    w.start()
    pids.append(w.pid)
    yield w
    pids.append(w.pid)
    w.stop()
    for pid in set(filter(None, pids)):
        assert not group_alive(pid), "a worker process outlived stop()"


def wait_for_stage(w, stage, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w.poll()
        if w.job.stage == stage or w.job.finished:
            return
        time.sleep(0.01)
    raise TimeoutError(stage)


def collect(w, timeout=300):
    """Poll until the job ends; return every event seen."""
    events, deadline = [], time.monotonic() + timeout
    while True:
        events += w.poll()
        if w.job.finished:
            return events
        assert time.monotonic() < deadline, w.job
        time.sleep(0.01)


def test_round_trip_result_file_progress_and_warm_second_job(worker):
    job = worker.submit(str(IMAGE), FAST)
    events = collect(worker)
    assert job.state == protocol.DONE, (job.error, worker.log_tail())
    assert worker.ready_info["torch"] and worker.ready_info["pid"] == worker.pid

    stages = [e["stage"] for e in events if e["event"] == "progress"]
    for stage in (STAGE_BACKGROUND, STAGE_LOAD, STAGE_SURFACE, STAGE_COLOR):
        assert stage in stages
    assert all(e["id"] == job.id for e in events if e["event"] in ("progress", "result"))

    result = Path(job.result_path)
    assert result.parent == job.job_dir and result.suffix == ".npz"
    with np.load(result) as data:
        assert data["vertices"].dtype == np.float32 and data["vertices"].shape[1] == 3
        assert data["faces"].dtype == np.int32 and data["faces"].shape[1] == 3
        assert data["colors"].shape == data["vertices"].shape
        assert job.stats["vertices"] == len(data["vertices"]) and job.stats["faces"] == len(data["faces"])
    assert job.stats["model_cache"] == "miss"
    job.cleanup()
    assert not job.job_dir.exists()

    pid = worker.pid
    second = worker.submit(str(IMAGE), FAST)
    assert worker.wait(120).state == protocol.DONE
    assert worker.pid == pid, "the worker is kept between jobs"
    assert second.stats["model_cache"] == "hit"
    assert second.stats["vertices"] == job.stats["vertices"]
    assert second.stats["seconds"].get(STAGE_LOAD, 0.0) < job.stats["seconds"][STAGE_LOAD]


@pytest.mark.parametrize("image, options, code", [
    ("missing.png", FAST, "bad_input"),
    (str(IMAGE), dict(FAST, resolution=4), "bad_input"),
    (str(IMAGE), dict(FAST, no_such_option=1), "bad_input"),
    (str(IMAGE), dict(FAST, weights="/nonexistent/model"), "weights"),
])
def test_bad_input_gives_an_error_event_with_its_code_and_the_worker_lives_on(worker, tmp_path, image, options, code):
    if image == "missing.png":
        image = str(tmp_path / image)
    job = worker.submit(image, options)
    assert worker.wait(120).state == protocol.ERROR
    assert job.error["code"] == code and job.error["message"]
    assert not job.job_dir.exists(), "a failed job leaves no folder"
    assert worker.running
    assert worker.submit(str(IMAGE), FAST) and worker.wait(120).state == protocol.DONE


def test_cancel_mid_job_stops_between_chunks_and_keeps_the_worker(worker):
    job = worker.submit(str(IMAGE), SLOW)
    wait_for_stage(worker, STAGE_SURFACE)
    assert not job.finished, "the job ended before it could be cancelled"
    asked = time.monotonic()
    worker.cancel()
    worker.wait(30)
    assert job.state == protocol.CANCELLED
    assert time.monotonic() - asked < 5, "cooperative cancel takes one chunk, not the whole job"
    assert not job.job_dir.exists() and job.result_path is None
    assert worker.running, "a cooperative cancel keeps the worker (and its model)"
    again = worker.submit(str(IMAGE), FAST)
    assert worker.wait(120).state == protocol.DONE and again.stats["model_cache"] == "hit"


def test_cancel_kills_a_worker_that_does_not_stop_in_time(tmp_path):
    w = wire.Worker(sys.executable, ROOT, temp_dir=str(tmp_path), cancel_grace=0.5)
    job = w.submit(str(IMAGE), SLOW)
    wait_for_stage(w, STAGE_SURFACE)
    pid = w.pid
    os.kill(pid, signal.SIGSTOP)  # a worker stuck in a long native call
    w.cancel()
    assert w.wait(20).state == protocol.CANCELLED
    assert not w.running and not group_alive(pid)
    assert not job.job_dir.exists()


def test_a_worker_killed_mid_job_is_reported_and_the_next_job_works(worker):
    job = worker.submit(str(IMAGE), SLOW)
    wait_for_stage(worker, STAGE_SURFACE)
    assert not job.finished
    dead_pid = worker.pid
    os.kill(dead_pid, signal.SIGKILL)
    started = time.monotonic()
    worker.wait(30)
    assert time.monotonic() - started < 10, "a dead worker is not hung on"
    assert job.state == protocol.ERROR and job.error["code"] == "worker_died"
    assert "signal 9" in job.error["message"] and job.error["hint"]
    assert not job.job_dir.exists()
    assert not group_alive(dead_pid)

    again = worker.submit(str(IMAGE), FAST)
    assert worker.wait(120).state == protocol.DONE, again.error
    assert worker.pid != dead_pid and again.stats["model_cache"] == "miss"


def test_a_worker_that_cannot_start_is_reported_with_its_log(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'No module named torch' >&2\nexit 3\n")
    fake_python.chmod(0o755)
    w = wire.Worker(str(fake_python), ROOT, temp_dir=str(tmp_path / "jobs"))
    job = w.submit(str(IMAGE), FAST)
    assert w.wait(20).state == protocol.ERROR
    assert job.error["code"] == "worker_start_failed"
    assert "status 3" in job.error["message"] and "No module named torch" in job.error["hint"]
    assert not job.job_dir.exists()


def test_missing_interpreter_raises_before_anything_starts(tmp_path):
    w = wire.Worker(str(tmp_path / "nope" / "python"), ROOT, temp_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        w.submit(str(IMAGE), FAST)
    assert list(tmp_path.iterdir()) == []


def test_one_job_at_a_time(worker):
    worker.submit(str(IMAGE), FAST)
    with pytest.raises(RuntimeError):
        worker.submit(str(IMAGE), FAST)
    assert worker.wait(120).state == protocol.DONE


def test_stop_ends_the_worker_and_its_process_group(worker):
    worker.submit(str(IMAGE), FAST)
    worker.wait(120)
    pid = worker.pid
    worker.stop()
    assert not worker.running and not group_alive(pid)


def test_stop_during_a_job_cancels_it(worker):
    job = worker.submit(str(IMAGE), SLOW)
    wait_for_stage(worker, STAGE_SURFACE)
    pid = worker.pid
    worker.stop()
    assert job.state == protocol.CANCELLED and not job.job_dir.exists()
    assert not group_alive(pid)


def test_worker_exits_when_its_client_goes_away():
    env = wire.default_env(ROOT)
    process = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    ready = json.loads(process.stdout.readline())
    assert ready["event"] == "ready"
    process.stdin.close()  # Blender crashed or quit
    assert process.wait(30) == 0
    process.stdout.close()


def noisy_sphere(n: int) -> dict:
    """A bake request's mesh: a sphere of 2n(n-1) triangles with 4 % noise on its radius. xatlas cuts it into
    thousands of charts: about 40 s at n=100 on a CI core, without a cancel check (a stand-in for the hostile
    meshes of #20 that never finish)."""
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, n, endpoint=False), np.linspace(0.05, np.pi - 0.05, n))
    r = 0.5 + 0.02 * np.random.default_rng(0).standard_normal(u.shape)
    vertices = np.stack([r * np.sin(v) * np.cos(u), r * np.sin(v) * np.sin(u), r * np.cos(v)], -1)
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n), indexing="ij")
    a, b = (i * n + j).ravel(), (i * n + (j + 1) % n).ravel()
    c, d = a + n, b + n
    tris = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return {"vertices": vertices.reshape(-1, 3).astype(np.float32), "corner_verts": tris.ravel().astype(np.int32),
            "loop_totals": np.full(len(tris), 3, np.int32)}


def test_a_worker_stuck_in_a_native_call_exits_soon_after_its_client_goes_away(tmp_path):
    """#20 item 1: Blender gone while xatlas runs (a call that never checks cancel, and holds the GIL so that no
    thread of the worker runs): its watcher process kills it after the grace, says so on stderr, and goes too.
    xatlas runs in the worker itself here (tests/in_process_native), as native calls did before they got a child
    process of their own (tests/test_native.py has the worker that ends at once)."""
    from backend.worker import CLIENT_GONE_EXIT_STATUS, CLIENT_GONE_GRACE_S

    np.savez(tmp_path / "mesh.npz", **noisy_sphere(120))
    request = {"op": "bake", "id": "stuck", "image": str(IMAGE), "mesh": str(tmp_path / "mesh.npz"),
               "output_dir": str(tmp_path), "options": dict(FAST, field_id="0" * 32, texture=1024)}
    log = tmp_path / "stderr.log"
    with open(log, "wb") as stderr:
        in_process = ROOT / "tests" / "in_process_native"
        env = dict(wire.default_env(ROOT), PYTHONPATH=os.pathsep.join([str(ROOT), str(in_process)]))
        process = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   start_new_session=True)
    try:
        assert json.loads(process.stdout.readline())["event"] == "ready"
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        while True:
            event = json.loads(process.stdout.readline())
            assert event["event"] == "progress", event
            if event["stage"] == Stage.UNWRAP:
                break
        time.sleep(0.5)  # inside xatlas now
        process.stdin.close()  # Blender crashed or quit
        gone = time.monotonic()
        # Killed by the watcher; the worker's own exit status should a later change let its reader run meanwhile.
        assert process.wait(CLIENT_GONE_GRACE_S + 5) in (-signal.SIGKILL, CLIENT_GONE_EXIT_STATUS)
        assert time.monotonic() - gone >= CLIENT_GONE_GRACE_S, "the job had its grace to stop"
        assert "did not stop" in log.read_text()
        deadline = time.monotonic() + 2
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(process.pid), "the watcher outlived the worker"
    finally:
        if group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()


def test_a_job_that_never_checks_cancel_ends_with_the_worker_after_the_grace():
    """#20 item 1, in the worker itself: its client gone, a job inside a long call that lets other threads run
    but never checks cancel (here a sleep) ends with the process, with its own status, after the grace."""
    from backend.worker import CLIENT_GONE_EXIT_STATUS, CLIENT_GONE_GRACE_S

    code = (
        "import sys, threading, time\n"
        "from backend import worker\n"
        "events = worker.EventWriter(worker.claim_protocol_stream())\n"
        "control = worker.JobControl()\n"
        "threading.Thread(target=worker.read_requests, args=(sys.stdin, control, events), daemon=True).start()\n"
        "assert control.try_begin('stuck')\n"
        "events.emit('ready')\n"
        "time.sleep(60)\n"
        "control.finish()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=wire.default_env(ROOT),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        assert json.loads(process.stdout.readline())["event"] == "ready"
        process.stdin.close()
        gone = time.monotonic()
        assert process.wait(CLIENT_GONE_GRACE_S + 3) == CLIENT_GONE_EXIT_STATUS
        assert time.monotonic() - gone >= CLIENT_GONE_GRACE_S - 0.1, "the job had its grace to stop"
        assert "did not stop" in process.stderr.read()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_stray_output_goes_to_stderr_not_the_protocol():
    code = (
        "import os, sys\n"
        "from backend.worker import EventWriter, claim_protocol_stream\n"
        "events = EventWriter(claim_protocol_stream())\n"
        "print('stray print', flush=True)\n"
        "os.system('echo from a child process')\n"
        "events.emit('ready', pid=os.getpid())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=wire.default_env(ROOT), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["event"] for line in r.stdout.splitlines()] == ["ready"]
    assert "stray print" in r.stderr and "from a child process" in r.stderr


def test_malformed_and_unknown_requests_get_error_events():
    process = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=wire.default_env(ROOT),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        assert json.loads(process.stdout.readline())["event"] == "ready"
        process.stdin.write("not json\n{\"op\": \"fly\"}\n")
        process.stdin.flush()
        codes = [json.loads(process.stdout.readline())["code"] for _ in range(2)]
        assert codes == ["bad_request", "bad_request"]
        process.stdin.write('{"op": "shutdown"}\n')
        process.stdin.flush()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stdin.close()
        process.stdout.close()


def test_a_backend_without_torch_says_which_package_is_missing(tmp_path):
    # A worker whose pipeline cannot import torch (a Python without the backend requirements).
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['torch'] = None\n")
    env = wire.default_env(ROOT)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{tmp_path}"
    w = wire.Worker(sys.executable, ROOT, env=env, temp_dir=str(tmp_path / "jobs"))
    try:
        job = w.submit(str(IMAGE), FAST)
        assert w.wait(60).state == protocol.ERROR
        assert job.error["code"] == "missing_package" and "torch" in job.error["message"]
        assert "torch" in w.ready_info["missing"] and "error" in w.ready_info["torch"]
    finally:
        w.stop()


def test_the_wire_is_the_recorded_one(worker, tmp_path):
    """Requests, events and files of a generate, a bake, a cancel and two errors, as recorded before the layout
    change (tests/wire_exchange.py)."""
    import wire_exchange

    requests = wire_exchange.RequestLog()
    requests.pipe(worker)
    wire_exchange.check("pipe", worker, tmp_path, requests)


def test_protocol_nits_are_refused_as_bad_input_and_the_worker_lives_on(tmp_path):
    """#20 item 9: 100k-deep JSON, a request without an output folder, a field id with a trailing newline, an
    option of the wrong type: each a clear refusal, never the worker's own folder, never `internal`."""
    process = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=tmp_path, env=wire.default_env(ROOT),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)

    def ask(request) -> dict:
        process.stdin.write((request if isinstance(request, str) else json.dumps(request)) + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())

    try:
        assert json.loads(process.stdout.readline())["event"] == "ready"
        assert ask("[" * 100_000 + "]" * 100_000)["code"] == "bad_request"
        job = {"op": "generate", "image": str(IMAGE), "options": FAST}
        answer = ask(dict(job, id="no-folder"))
        assert answer["code"] == "bad_input" and "output_dir" in answer["message"]
        out = tmp_path / "out"
        out.mkdir()
        answer = ask(dict(job, id="newline", output_dir=str(out), options={"field_id": "0" * 32 + "\n"}))
        assert answer["code"] == "bad_input" and "field id" in answer["message"]
        answer = ask(dict(job, id="typed", output_dir=str(out), options=dict(FAST, resolution="high")))
        assert answer["code"] == "bad_input" and "resolution" in answer["message"], answer
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(out.iterdir())
        assert ask(dict(job, id="good", output_dir=str(out)))["event"] in ("progress", "result")
    finally:
        process.kill()
        process.wait(10)
        for stream in (process.stdin, process.stdout):
            stream.close()
