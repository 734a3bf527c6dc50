"""The batch on a real local Ray cluster (`generate ... -o OUT/ --ray local`, two 1-CPU workers, the tiny model):
the local batch's names and meshes, nothing listening beyond this machine, a worker killed mid-batch, weights
no node can read, Ray not installed; TripoSG (a sampled model, painted from its pictures) as the local batch makes it.
Each run starts and ends its own cluster; afterwards no Ray process of it is left."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from support import DATA, ROOT, TINY, assert_same_mesh, beyond_loopback, listening
from test_batch import EXPECTED, GOOD, TINY_ARGS, json_lines, make_inputs

from backend import batch
from backend import mesh as meshio

# Two workers on this machine's CPUs (2 in CI): `--ray local` takes every CPU Ray finds.
CPUS_PER_WORKER = max(1, (os.cpu_count() or 2) // 2)
TRIPOSG = DATA / "triposg_tiny"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install -r backend/requirements-ray.txt)")


@pytest.fixture
def ray_tmp():
    """A short private RAY_TMPDIR (Ray's socket paths must stay under ~100 characters) that tags every process
    of the run's cluster; at the end, none of them may be left."""
    folder = Path(tempfile.mkdtemp(prefix="r", dir="/tmp" if os.name == "posix" else None))
    yield folder
    leftovers = [p for p in psutil.process_iter() if _in_cluster(p, folder)]
    gone, alive = psutil.wait_procs(leftovers, timeout=20)
    for p in alive:
        p.kill()
    shutil.rmtree(folder, ignore_errors=True)
    assert not alive, f"Ray processes left running: {[p.pid for p in alive]}"


def _in_cluster(process, folder: Path) -> bool:
    try:
        return process.environ().get("RAY_TMPDIR") == str(folder)
    except (psutil.Error, OSError):
        return False


def start(cwd: Path, ray_tmp: Path, *args):
    (cwd / "tmp").mkdir()  # a worker killed mid-image leaves its scratch copy of the image here, not in /tmp
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(cwd / "tmp")}
    return subprocess.Popen([sys.executable, "-m", "backend", "generate", *make_inputs(cwd), "-o", "ray/",
                             "--format", "npz", "--json", "--ray", "local", "--ray-cpus", str(CPUS_PER_WORKER),
                             *map(str, TINY_ARGS), *args],
                            cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def local_batch(tmp_path_factory):
    """The same six inputs through the local batch: the reference for the cluster's outputs."""
    cwd = tmp_path_factory.mktemp("local")
    r = subprocess.run([sys.executable, "-m", "backend", "generate", *make_inputs(cwd), "-o", "local/",
                        "--format", "npz", *map(str, TINY_ARGS)], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == batch.SOME_FAILED, r.stderr
    return cwd / "local"


def workers(stderr: str) -> int:
    (line,) = [line for line in stderr.splitlines() if line.startswith("Ray: ")]
    return int(line.split()[1])


def assert_like_the_local_batch(stdout: str, folder: Path, local: Path) -> None:
    *per_image, summary = json_lines(stdout)
    assert sorted(line["input"] for line in per_image) == sorted(EXPECTED)
    assert {line["input"]: Path(line["output"]).name for line in per_image if line["event"] == "result"} == GOOD
    (failure,) = [line for line in per_image if line["event"] == "error"]
    assert failure["input"] == "broken.png" and failure["code"] == "bad_input"
    assert "Image broken.png could not be decoded" in failure["message"]  # named as the user named it
    assert summary["done"] == 5 and summary["failed"] == 1 and summary["exit_status"] == batch.SOME_FAILED
    assert sorted(p.name for p in folder.iterdir()) == sorted(GOOD.values())  # nothing else, no .partial
    for name in GOOD.values():
        ours, theirs = meshio.load_npz(folder / name), meshio.load_npz(local / name)
        # same image, same model, same code; only the CPU thread count differs (floating-point sums)
        assert_same_mesh(ours.vertices, ours.faces, theirs.vertices, theirs.faces)


@needs_ray
def test_the_cluster_writes_what_the_local_batch_writes(tmp_path, ray_tmp, local_batch):
    """... and, while it works, nothing of the cluster listens beyond this machine."""
    proc = start(tmp_path, ray_tmp)
    sockets, deadline = set(), time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:  # every socket seen while the run goes on
        sockets.update(listening(p for p in psutil.process_iter() if _in_cluster(p, ray_tmp)))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == batch.SOME_FAILED, err
    assert workers(err) >= 1 and "Ray worker ready on" in err  # a worker still starting may get no image
    assert_like_the_local_batch(out, tmp_path / "ray", local_batch)
    assert len({pid for pid, _ in sockets}) >= 3, f"too few of the cluster's processes were seen: {sockets}"
    assert not beyond_loopback(sockets), f"listening beyond this machine: {beyond_loopback(sockets)}"


def _is_busy_worker(process) -> bool:
    try:
        return process.cmdline()[:1] == ["ray::ReconstructionWorker.reconstruct"]
    except psutil.Error:
        return False


@needs_ray
def test_a_worker_killed_mid_batch_is_replaced_and_its_image_sent_again(tmp_path, ray_tmp, local_batch):
    proc = start(tmp_path, ray_tmp)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            if _is_busy_worker(child):  # busy with an image
                try:
                    child.send_signal(signal.SIGKILL)
                except psutil.Error:
                    continue
                killed = child.pid
                break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert killed, f"no worker was seen at work:\n{err}"
    assert proc.returncode == batch.SOME_FAILED, err
    assert "its Ray worker died" in err and "sending it again (1 of 2)" in err
    assert_like_the_local_batch(out, tmp_path / "ray", local_batch)


@needs_ray
def test_weights_that_no_node_can_read_stop_the_run_saying_where(tmp_path, ray_tmp):
    proc = start(tmp_path, ray_tmp, "--weights", tmp_path / "not-shared")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert "on the Ray node" in err and "must be readable on every node" in err
    error, summary = json_lines(out)[-2:]
    assert error["code"] == "weights" and summary["done"] == 0 and summary["exit_status"] == 3
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").iterdir())


@needs_ray
def test_triposg_on_the_cluster_gives_the_local_batchs_shapes_and_colours(tmp_path, ray_tmp):
    """A sampled model takes the cluster like any other: its seed and steps travel with each image and its noise is
    drawn on the CPU, so a worker gives the local batch's shape, painted from the picture through the same fitted
    camera."""
    from PIL import Image, ImageOps

    (tmp_path / "in").mkdir()  # a picture with its alpha: the mask its camera is fitted to
    shutil.copy(TINY / "input_rgba.png", tmp_path / "in" / "a.png")
    ImageOps.mirror(Image.open(TINY / "input_rgba.png")).save(tmp_path / "in" / "b.png")
    args = ["--format", "npz", "--model", "triposg", "--weights", str(TRIPOSG / "model"), "--resolution", "128",
            "--steps", "2", "--seed", "3", "--no-remove-background", "--colours", "images", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    runs = {}
    # the local batch with a worker's thread count: the same float sums, so the same fitted camera (the fit's
    # optimum is flat on this random shape, IoU ~0.65: other sums can tip it to another pose)
    local = dict(env, OMP_NUM_THREADS=str(CPUS_PER_WORKER))
    for name, extra, environ in (("local", [], local),
                                 ("ray", ["--ray", "local", "--ray-cpus", str(CPUS_PER_WORKER)], env)):
        r = subprocess.run([sys.executable, "-m", "backend", "generate", "in", "-o", f"{name}/", *args, *extra],
                           cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[name] = json_lines(r.stdout)
    assert "Ray worker ready on" in r.stderr
    assert [line["event"] for line in runs["ray"][:-1]] == ["result", "result"]
    fits = {name: {Path(line["input"]).stem: line["views"][0] for line in lines[:-1]} for name, lines in runs.items()}
    for image in ("a", "b"):
        ours = meshio.load_npz(tmp_path / "ray" / f"{image}.npz")
        theirs = meshio.load_npz(tmp_path / "local" / f"{image}.npz")
        assert len(theirs.faces) > 1000
        assert_same_mesh(ours.vertices, ours.faces, theirs.vertices, theirs.faces)
        fit, reference = fits["ray"][image], fits["local"][image]
        assert fit == reference and fit["camera"] == "fitted", (fit, reference)
        assert theirs.colors.std() > 0.02, "painted from the picture, not grey"
        assert np.abs(np.sort(ours.colors, axis=0) - np.sort(theirs.colors, axis=0)).max() < 1e-4


def test_without_ray_the_error_says_what_to_install(tmp_path):
    make_inputs(tmp_path)
    hide_ray = ("import sys; sys.modules['ray'] = None; "  # `import ray` now fails as if it were not installed
                "from backend.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", hide_ray, "generate", "B.jpg", "shots/chair.png", "-o", "ray/",
                        "--ray", "local", *map(str, TINY_ARGS)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "--ray needs the Ray package" in r.stderr and "pip install -r backend/requirements-ray.txt" in r.stderr
    assert "Traceback" not in r.stderr
