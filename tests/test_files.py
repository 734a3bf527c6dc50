"""Writing files whole or not at all (backend/files.py and every writer that goes through it): a planted link is
never followed, an overwritten file keeps its mode, SIGTERM mid-write leaves no temporary file."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from support import ROOT, TINY

from backend import mesh as meshio
from backend import pipeline
from backend.client import remote
from backend.server import token as serve_token

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX modes, symlinks and signals")


def triangle():
    return meshio.Mesh(vertices=np.eye(3, dtype=np.float32), faces=np.array([[0, 1, 2]], np.int32),
                       colors=np.ones((3, 3), np.float32))


def plant_link(folder, name):
    """A symlink at ``name`` pointing at a file someone else owns; returns that file."""
    target = folder / "someone_elses_file"
    target.write_text("not yours")
    (folder / name).symlink_to(target)
    return target


@posix_only
@pytest.mark.parametrize("suffix", [".glb", ".obj", ".npz"])
def test_overwriting_a_private_output_keeps_it_private(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    path.write_bytes(b"old")
    path.chmod(0o600)
    meshio.save(triangle(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() != b"old"


@posix_only
def test_save_views_does_not_follow_a_link_at_the_old_temporary_name(tmp_path):
    target = plant_link(tmp_path, ".views.png.partial")
    pipeline.save_views(np.zeros((4, 4, 3), np.uint8), tmp_path / "views.png")
    assert target.read_text() == "not yours"
    assert (tmp_path / "views.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".views.png.partial", "someone_elses_file", "views.png"]


@posix_only
def test_remote_results_do_not_follow_a_link_at_the_old_temporary_name(tmp_path):
    target = plant_link(tmp_path, ".result.npz.partial")
    remote._write_atomic(tmp_path / "result.npz", b"the result")
    assert target.read_text() == "not yours"
    assert (tmp_path / "result.npz").read_bytes() == b"the result"


@posix_only
def test_the_token_file_leaves_a_file_at_the_old_temporary_name_alone(tmp_path, monkeypatch):
    """Two servers making the token at once each write under a name of their own (no one deletes the other's)."""
    monkeypatch.setenv("IMAGE_TO_3D_CONFIG_DIR", str(tmp_path))
    target = plant_link(tmp_path, f".{serve_token.FILE_NAME}.partial")
    token, origin, created = serve_token.resolve(environ={})
    assert created and stat.S_IMODE(os.stat(origin).st_mode) == 0o600
    assert target.read_text() == "not yours"
    assert (tmp_path / f".{serve_token.FILE_NAME}.partial").is_symlink()


# The real CLI with the tiny model; only the GLB writer is slowed down, so that SIGTERM lands mid-write.
SLOW_WRITE = textwrap.dedent("""
    import sys, time
    from backend import cli, mesh
    def slow_glb(m, f):
        f.write(b"glTF half of it")
        f.flush()
        print("WRITING", file=sys.stderr, flush=True)
        time.sleep(60)
    mesh._write_glb = slow_glb
    sys.exit(cli.main(sys.argv[1:]))
""")


@posix_only
def test_sigterm_mid_write_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "out" / "m.glb"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, "generate", str(TINY / "input_rgba.png"), "-o",
                             str(out), "--weights", str(TINY), "--resolution", "32"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            if "WRITING" in line:
                break
            assert time.monotonic() < deadline
        assert [p.name for p in out.parent.iterdir()][0].endswith(".partial"), "the write had begun"
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
        proc.wait()
    assert list(out.parent.iterdir()) == [], rest
    assert "interrupted" in rest


@posix_only
def test_sigterm_to_the_worker_mid_write_leaves_no_temporary_file(tmp_path):
    script = SLOW_WRITE.replace("_write_glb", "_write_npz")
    proc = subprocess.Popen([sys.executable, "-c", script, "serve"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        proc.stdin.write(json.dumps({"id": "j1", "op": "generate", "image": str(TINY / "input_rgba.png"),
                                     "output_dir": str(tmp_path),
                                     "options": {"weights": str(TINY), "resolution": 32}}) + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            if "WRITING" in line:
                break
            assert time.monotonic() < deadline
        assert [p.name for p in tmp_path.iterdir()][0].endswith(".partial"), "the write had begun"
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
        proc.wait()
    assert list(tmp_path.iterdir()) == [], rest
