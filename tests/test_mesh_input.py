"""Meshes that enter the backend (a bake request's .npz, locally or uploaded to the server): refused with
``bad_input`` and a message naming what is wrong, before anything large is allocated or any native code runs."""

import io
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from backend import client as wire
from backend import protocol
from backend import worker as worker_module
from backend.errors import InputError
from backend.options import Options
from support import ROOT, TINY

IMAGE = TINY / "input_rgba.png"
BASE = dict(model="triposr", weights=str(TINY), resolution=64, remove_background=False, device="cpu")


def tetrahedron():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32) * 0.5
    corner_verts = np.array([0, 1, 2, 0, 2, 3, 0, 3, 1, 1, 3, 2], np.int32)
    return dict(vertices=vertices, corner_verts=corner_verts, loop_totals=np.full(4, 3, np.int32))


def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def npy_member(array_header: dict, data: bytes = b"") -> bytes:
    """A .npy file with the header given (shape, dtype) and whatever data follows: a file may declare far
    more than it holds."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, array_header)
    return buffer.getvalue() + data


@pytest.fixture
def worker(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGE_TO_3D_FIELDS", str(tmp_path / "fields"))
    w = wire.Worker(sys.executable, ROOT, env=wire.default_env(ROOT), temp_dir=str(tmp_path / "jobs"))
    yield w
    w.stop()


@pytest.mark.parametrize("far", [np.inf, 1e38])
def test_a_hostile_bake_is_refused_within_seconds_and_the_next_job_runs(worker, tmp_path, far):
    """Before: inf made the texel density NaN and xatlas spun forever, holding the GIL."""
    mesh = tetrahedron()
    mesh["vertices"][3] = far
    path = npz(tmp_path / "hostile.npz", **mesh)
    assert path.stat().st_size < 2000
    worker.start()
    deadline = time.monotonic() + 120
    while worker.ready_info is None:  # timed from a started worker (torch's import is not the bake's)
        assert time.monotonic() < deadline and worker.running, worker.log_tail()
        worker.poll()
        time.sleep(0.01)
    asked = time.monotonic()
    job = worker.submit(str(IMAGE), dict(BASE, texture=512, field_id="0" * 32), op="bake", mesh=str(path))
    worker.wait(60)
    seconds = time.monotonic() - asked
    assert job.error["code"] == "bad_input", job.error
    assert "vertex coordinate" in job.error["message"]
    assert seconds < 5, seconds
    worker.submit(str(IMAGE), BASE)
    assert worker.wait(120).state == protocol.DONE, worker.job.error


def test_a_small_npz_declaring_a_huge_array_is_refused_before_it_is_allocated(tmp_path):
    """A deflated zip member can declare gigabytes in a few bytes of header; before, np.load allocated what
    the header said (3 GB here) before reading a byte of it."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("vertices.npy", npy_member({"descr": "<f4", "fortran_order": False, "shape": (250_000_000, 3)},
                                              bytes(3 << 20)))
        for name, array in tetrahedron().items():
            if name != "vertices":
                buffer = io.BytesIO()
                np.save(buffer, array)
                z.writestr(f"{name}.npy", buffer.getvalue())
    assert path.stat().st_size < 3 << 20
    request = {"mesh": str(path)}
    options = Options(**dict(BASE, texture=512, field_id="0" * 32))
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as e:
            worker_module._bake(request, options, tmp_path, lambda *a: None, lambda: False, {}, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MB allocated for a refused file"
    assert "250,000,000 vertices" in e.value.message and e.value.code == "bad_input"


def test_a_good_mesh_is_read_as_written(tmp_path):
    from backend.mesh_input import load_bake_mesh

    mesh = tetrahedron()
    uvs = np.random.default_rng(0).random((12, 2)).astype(np.float32)
    read = load_bake_mesh(npz(tmp_path / "good.npz", uvs=uvs, **mesh))
    for name, array in dict(mesh, uvs=uvs).items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array)
    assert load_bake_mesh(npz(tmp_path / "plain.npz", **mesh))["uvs"] is None


def change(**edits):
    """A tetrahedron with some arrays replaced (None drops one)."""
    def make():
        mesh = tetrahedron()
        for name, value in edits.items():
            if value is None:
                del mesh[name]
            else:
                mesh[name] = value(mesh) if callable(value) else value
        return mesh
    return make


def with_vertex(value):
    def edit(mesh):
        mesh["vertices"][2, 1] = value
        return mesh["vertices"]
    return edit


@pytest.mark.parametrize("make, words", [
    (change(vertices=with_vertex(np.nan)), "1 vertex coordinate is not a finite number"),
    (change(vertices=with_vertex(-np.inf)), "1 vertex coordinate is not a finite number"),
    (change(vertices=with_vertex(2e4)), "vertex coordinates reach 20,000"),
    (change(vertices=lambda m: m["vertices"].astype(np.float64)), None),  # other dtypes of the same kind are fine
    (change(vertices=lambda m: m["vertices"][:, :2]), "vertices must be an array of shape (N, 3), not (4, 2)"),
    (change(vertices=lambda m: m["vertices"].astype(np.int32)), "vertices must hold floating-point numbers"),
    (change(vertices=np.array(["a", "b"])), "vertices must hold floating-point numbers"),
    (change(vertices=None), "the mesh file has no vertices"),
    (change(corner_verts=lambda m: np.where(m["corner_verts"] == 3, 9, m["corner_verts"])),
     "a loop names vertex 9, which does not exist (the mesh has 4 vertices)"),
    (change(corner_verts=lambda m: m["corner_verts"] - 1), "a loop names vertex -1, which does not exist"),
    (change(corner_verts=lambda m: m["corner_verts"].astype(np.float32)), "corner_verts must hold integers"),
    (change(loop_totals=np.array([3, 3, 2, 4])), "every polygon needs 3 corners or more; one has 2"),
    (change(loop_totals=np.array([3, 3, 3])), "the polygons have 9 loops in all, but corner_verts has 12"),
    (change(loop_totals=np.array([3, 3, 3, 2**62 + 3])), "the polygons have"),
    (change(loop_totals=np.zeros(0, np.int32), corner_verts=np.zeros(0, np.int32)), "the mesh has no polygons"),
    (change(uvs=np.zeros((12, 3), np.float32)), "uvs must be an array of shape (L, 2), not (12, 3)"),
    (change(uvs=np.zeros((11, 2), np.float32)), "uvs must be an array of shape (12, 2), not (11, 2)"),
    (change(uvs=np.full((12, 2), np.nan, np.float32)), "24 UV coordinates are not finite numbers"),
])
def test_each_bad_mesh_is_refused_naming_what_is_wrong(tmp_path, make, words):
    from backend.mesh_input import load_bake_mesh

    path = npz(tmp_path / "mesh.npz", **make())
    if words is None:
        load_bake_mesh(path)
        return
    with pytest.raises(InputError) as e:
        load_bake_mesh(path)
    assert words in e.value.message and e.value.code == "bad_input"


@pytest.mark.parametrize("member, words", [
    (npy_member({"descr": "<f4", "fortran_order": False, "shape": (4, 3)}, bytes(20)),
     "vertices is cut short"),
    (npy_member({"descr": "|O", "fortran_order": False, "shape": (4, 3)}, bytes(96)),
     "vertices must hold floating-point numbers"),
    (b"not an array at all", "vertices is not a NumPy array"),
])
def test_a_member_that_is_not_what_it_says_is_refused(tmp_path, member, words):
    from backend.mesh_input import load_bake_mesh

    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("vertices.npy", member)
        for name in ("corner_verts", "loop_totals"):
            buffer = io.BytesIO()
            np.save(buffer, tetrahedron()[name])
            z.writestr(f"{name}.npy", buffer.getvalue())
    with pytest.raises(InputError) as e:
        load_bake_mesh(path)
    assert words in e.value.message


def test_counts_beyond_the_budget_are_refused_from_the_headers(tmp_path):
    from backend import mesh_input

    path = tmp_path / "many.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("vertices.npy", npy_member({"descr": "<f4", "fortran_order": False, "shape": (4, 3)},
                                              bytes(48)))
        z.writestr("corner_verts.npy", npy_member({"descr": "<i4", "fortran_order": False,
                                                   "shape": (mesh_input.MAX_LOOPS + 1,)}))
        z.writestr("loop_totals.npy", npy_member({"descr": "<i4", "fortran_order": False, "shape": (4,)},
                                                 np.full(4, 3, np.int32).tobytes()))
    with pytest.raises(InputError, match="more than the 40,000,000 loops"):
        mesh_input.load_bake_mesh(path)


@pytest.mark.parametrize("content, words", [(b"", "could not be read"), (b"PK\x03\x04 broken", "could not be read")])
def test_a_file_that_is_no_npz_is_refused(tmp_path, content, words):
    from backend.mesh_input import load_bake_mesh

    path = tmp_path / "mesh.npz"
    path.write_bytes(content)
    with pytest.raises(InputError, match=words):
        load_bake_mesh(path)
    with pytest.raises(InputError, match="could not be read"):
        load_bake_mesh(tmp_path / "missing.npz")
