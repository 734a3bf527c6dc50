"""The Remote backend inside Blender, against a real shared server (`python -m backend cluster-serve` on Ray Serve,
127.0.0.1, the tiny TripoSR; started once for the module with the backend Python): Generate 3D puts the object
Local puts; progress (the queue included), Cancel and errors as locally; Check shows what the server offers;
Allow Online Access off disables it, saying why; nothing listens beyond 127.0.0.1; nothing is left running."""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import bpy
import numpy as np
import pytest

from .conftest import (BACKEND_PYTHON, ROOT, TINY_MODEL, addon_module, generate_module, leftover_files, panel_text,
                       prefs, prefs_text, session, start_async, tick_until)

TOKEN = "remote-test-token-" + "7" * 24
SLOW_RESOLUTION = 512  # seconds of surface extraction on the server: time to cancel mid-job
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _serve_installed() -> bool:
    probe = ("import importlib.util as u, sys; "
             "sys.exit(0 if u.find_spec('ray') and u.find_spec('ray.serve') else 1)")
    return BACKEND_PYTHON.is_file() and subprocess.run([str(BACKEND_PYTHON), "-c", probe]).returncode == 0


pytestmark = pytest.mark.skipif(not _serve_installed(), reason="Ray Serve is not installed in the backend Python "
                                                             "(pip install -r backend/requirements-serve.txt)")


def cluster_pids(ray_tmp: Path) -> list[int]:
    """Processes of the server's own Ray (each one has its RAY_TMPDIR)."""
    tag = f"RAY_TMPDIR={ray_tmp}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag in (entry / "environ").read_bytes().split(b"\0") and \
                    "State:\tZ" not in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket and bound UDP socket of ``pids``, from /proc/net."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, listen_state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == listen_state and fields[9] in inodes:
                address, port = fields[1].split(":")
                found.append((_ip(address), int(port, 16)))
    return found


def _ip(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words)


@pytest.fixture(scope="module")
def server():
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=str(ray_tmp), IMAGE_TO_3D_SERVER_TOKEN=TOKEN)
    log = open(ray_tmp / "server.log", "w")
    process = subprocess.Popen([str(BACKEND_PYTHON), "-m", "backend", "cluster-serve", "--port", str(port),
                                "--weights", str(TINY_MODEL)], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while "ready at" not in (ray_tmp / "server.log").read_text() and process.poll() is None:
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.5)
        assert process.poll() is None, (ray_tmp / "server.log").read_text()[-3000:]
        yield {"url": url, "ray_tmp": ray_tmp, "process": process}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            status = "killed"
        deadline = time.monotonic() + 30
        while cluster_pids(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = cluster_pids(ray_tmp)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert status == 0 and not left, f"the server left processes behind: {status}, {left}"


@pytest.fixture
def remote(settings, server, online):
    """The settings of tests/blender/conftest.py, sent to the server instead of the local worker."""
    p = prefs()
    p.backend, p.server_url, p.server_token = "REMOTE", server["url"], TOKEN
    yield settings
    session().stop()
    p.backend, p.server_url, p.server_token = "LOCAL", "", ""


def mesh_of(obj) -> dict:
    mesh = obj.data
    co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.vertices.foreach_get("co", co)
    rgba = np.empty(len(mesh.vertices) * 4, dtype=np.float32)
    mesh.color_attributes["Color"].data.foreach_get("color", rgba)
    return {"name": obj.name, "co": co.reshape(-1, 3), "rgba": rgba.reshape(-1, 4), "faces": len(mesh.polygons),
            "location": tuple(obj.location), "material": obj.active_material.name.split(".")[0],
            "stored": {k: v for k, v in obj["image_to_3d"].to_dict().items() if k != "field_id"}}


def test_remote_generate_puts_the_object_local_puts(remote):
    bpy.context.scene.cursor.location = (1.0, -2.0, 0.5)
    prefs().backend = "LOCAL"
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}
    local = mesh_of(bpy.context.active_object)
    bpy.data.objects.remove(bpy.context.active_object)
    bpy.ops.ed.undo_push(message="local object removed")
    assert session().current().pid, "a local worker did it"

    prefs().backend = "REMOTE"
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}, remote.last_error
    assert session().current().pid is None and not session().worker_running(), "switching stopped the local worker"
    obj = bpy.context.active_object
    ours = mesh_of(obj)
    assert ours["name"] == local["name"] and ours["faces"] == local["faces"] and len(ours["co"]) == len(local["co"])
    np.testing.assert_allclose(ours["co"], local["co"], atol=1e-5)
    np.testing.assert_allclose(ours["rgba"], local["rgba"], atol=1e-5)
    assert (ours["location"], ours["material"], ours["stored"]) == (local["location"], local["material"],
                                                                    local["stored"])
    assert obj.select_get() and bpy.context.view_layer.objects.active == obj
    assert "model reused" in remote.last_info, "the replica keeps its model loaded"
    assert leftover_files() == []
    assert bpy.ops.ed.undo() == {"FINISHED"} and ours["name"] not in bpy.data.objects, "one undo step"


def test_bake_from_model_and_retopologize_on_the_server(remote):
    remote.faces = 1000
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}, remote.last_error
    obj = bpy.context.active_object
    name = obj.name
    remote.texture = "512"
    assert bpy.ops.image_to_3d.bake_from_model() == {"FINISHED"}, remote.last_error
    assert session().current_job().stats.get("field") == "cached", "the server kept the generation's field"
    bsdf = next(n for n in obj.active_material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    image = bsdf.inputs["Base Color"].links[0].from_node.image
    assert image.name == name and tuple(image.size) == (512, 512) and obj.data.uv_layers
    remote.faces, remote.texture = 500, "NONE"
    bpy.ops.ed.undo_push(message="baked")
    assert bpy.ops.image_to_3d.retopologize() == {"FINISHED"}, remote.last_error
    assert 400 <= len(bpy.data.objects[name].data.polygons) <= 500
    assert bpy.data.objects[f"{name} (original)"].hide_get() and leftover_files() == []


def test_remote_progress_and_cancel_as_locally(remote):
    remote.resolution = SLOW_RESOLUTION
    timer = start_async()
    job = session().current_job()
    tick_until(timer, lambda: job.stage == "extracting_surface", timeout=180)
    assert not bpy.ops.image_to_3d.generate.poll()
    assert bpy.ops.image_to_3d.cancel() == {"FINISHED"}
    assert tick_until(timer, timeout=30)
    assert job.state == "cancelled" and remote.last_info == "Cancelled" and remote.last_error == ""
    assert len(bpy.data.objects) == 0 and len(bpy.data.meshes) == 0 and leftover_files() == []
    remote.resolution = 64
    assert bpy.ops.image_to_3d.generate() == {"FINISHED"}, "the server serves the next job"


def test_a_job_waiting_for_the_server_shows_its_place(remote, server):
    """Another client keeps the one replica busy; Blender's job waits, and the panel says so."""
    body = json.dumps({"options": {"resolution": SLOW_RESOLUTION, "remove_background": False},
                       "image": base64.b64encode((TINY_MODEL / "input_rgba.png").read_bytes()).decode(),
                       "image_name": "other.png"}).encode()
    other = urllib.request.urlopen(urllib.request.Request(f"{server['url']}/generate", data=body, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}), timeout=120)
    for line in other:  # until the other job runs on the replica
        if json.loads(line).get("stage") == "extracting_surface":
            break
    timer = start_async()
    job = session().current_job()
    tick_until(timer, lambda: job.stage == "waiting_in_queue", timeout=60)
    assert "next in line" in job.message
    assert "Waiting for the server" in panel_text() and "next in line" in panel_text()
    other.read()
    other.close()
    assert tick_until(timer, timeout=180)
    assert remote.last_error == "" and bpy.context.active_object is not None


def test_errors_reach_the_panel_as_locally(remote, server):
    prefs().server_token = "wrong-token-" + "0" * 24
    with pytest.raises(RuntimeError, match="The server refused the token"):  # the operator's error report
        bpy.ops.image_to_3d.generate()
    assert remote.last_error == "The server refused the token" and "Token" in remote.last_hint
    prefs().server_token = TOKEN
    prefs().server_url = "http://127.0.0.1:1"
    with pytest.raises(RuntimeError, match="Cannot reach the server"):
        bpy.ops.image_to_3d.generate()
    assert remote.last_error.startswith("Cannot reach the server at http://127.0.0.1:1") and remote.last_hint
    assert len(bpy.data.objects) == 0 and leftover_files() == []


def test_check_shows_what_the_server_offers(remote, server):
    assert bpy.ops.image_to_3d.check_backend() == {"FINISHED"}
    check = addon_module("preferences").remote_check(server["url"])
    assert check["level"] == "OK", check
    assert check["line"].startswith("Server: TripoSR · CPU") and check["report"]["models"][0]["id"] == "triposr"
    assert check["line"] in prefs_text() and "'server_url'" in prefs_text()
    for token, said in (("wrong-token-" + "0" * 24, "The server refused the token"),
                        ("", "This server needs a token")):
        prefs().server_token = token
        assert bpy.ops.image_to_3d.check_backend() == {"FINISHED"}
        check = addon_module("preferences").remote_check(server["url"])
        assert check["level"] == "ERROR" and check["line"].startswith(said) and "Token" in check["todo"][0], check
        assert check["report"] is None  # nothing of the server is told without the token


def test_free_memory_says_the_server_holds_the_memory(remote):
    assert not bpy.ops.image_to_3d.free_memory.poll()
    free_memory = addon_module("operators.free_memory")
    assert free_memory.why_not(bpy.context) == free_memory.REMOTE


def test_allow_online_access_off_disables_remote_saying_why(remote):
    bpy.context.preferences.system.use_online_access = False
    reason = "Allow Online Access is off (Preferences › System › Network): the Remote backend is disabled"
    assert not bpy.ops.image_to_3d.generate.poll()
    assert generate_module().why_not(bpy.context) == reason
    assert not bpy.ops.image_to_3d.check_backend.poll()
    assert reason in prefs_text()
    prefs().backend = "LOCAL"
    assert bpy.ops.image_to_3d.generate.poll(), "Local needs no network"


def test_nothing_of_the_server_listens_beyond_loopback(server):
    sockets = listening(cluster_pids(server["ray_tmp"]))
    assert any(port == int(server["url"].rsplit(":", 1)[1]) for _, port in sockets), sockets
    assert [s for s in sockets if s[0] not in LOOPBACK] == []


def test_the_token_stays_with_the_server_process(server):
    """It came in the server's environment: none of Ray's processes inherits it (they get only its digest)."""
    others = [pid for pid in cluster_pids(server["ray_tmp"]) if pid != server["process"].pid]
    assert others
    for pid in others:
        assert TOKEN.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), f"process {pid} has the token"
