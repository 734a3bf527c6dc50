"""The batch on the command line: `generate A.jpg broken.png refs/ 'shots/*.png' -o OUT/`: names, failures and
the exit status, the model loaded once, every option on every image, Ctrl+C and --skip-existing, --offline."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hubserver import StandInHub
from PIL import Image, ImageOps
from support import ROOT, TINY, run_backend

from backend import batch, cli
from backend import mesh as meshio
from backend.models import triposr

IMAGE = TINY / "input_rgba.png"
TINY_ARGS = ["--weights", TINY, "--resolution", 32, "--no-remove-background"]
# The six inputs of make_inputs, in the order the batch takes them, and the output each good one gets.
EXPECTED = {"B.jpg": "B.npz", "broken.png": None, "refs/chair.png": "chair.npz", "refs/small.png": "small.npz",
            "shots/chair.png": "chair-2.npz", "shots/chair_flipped.png": "chair_flipped.npz"}
GOOD = {name: out for name, out in EXPECTED.items() if out}


def make_inputs(root: Path) -> list:
    """Five different images (one opaque JPEG, two files named chair.png) and a truncated PNG; returns the
    command-line arguments that name them: two files, a folder and a pattern."""
    (root / "refs").mkdir()
    (root / "shots").mkdir()
    chair = Image.open(IMAGE)
    chair.save(root / "shots" / "chair.png")
    ImageOps.mirror(chair).save(root / "shots" / "chair_flipped.png")
    chair.rotate(90).save(root / "refs" / "chair.png")
    chair.resize((chair.width * 3 // 4, chair.height * 3 // 4)).save(root / "refs" / "small.png")
    ImageOps.flip(Image.open(TINY / "conditioning.png").convert("RGB")).save(root / "B.jpg", quality=95)
    (root / "broken.png").write_bytes(IMAGE.read_bytes()[:2000])
    (root / "refs" / "notes.txt").write_text("not an image: a folder gives its images only")
    return ["B.jpg", "broken.png", "refs/", "shots/*.png"]


def run_cli(*args, cwd, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "backend", "generate", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=300)


def json_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_equal_meshes(path_a, path_b):
    a, b = meshio.load_npz(path_a), meshio.load_npz(path_b)
    assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)
    assert np.array_equal(a.colors, b.colors)


def test_output_names_follow_the_inputs_and_never_clash(tmp_path):
    inputs = [Path("a/chair.png"), Path("b/chair.jpg"), Path("chair-2.png"), Path("c/CHAIR.webp"), Path("x.png")]
    names = [p.name for p in batch.output_names(inputs, tmp_path, ".glb")]
    assert names == ["chair.glb", "chair-2.glb", "chair-2-2.glb", "CHAIR-3.glb", "x.glb"]
    assert names == [p.name for p in batch.output_names(inputs, tmp_path, ".glb")]  # stable: resuming relies on it


def test_inputs_expand_in_order_once_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_inputs(tmp_path)
    expanded = batch.expand_inputs(["B.jpg", "refs", "shots/*.png", "refs/chair.png", "nothing/*.png"])
    assert [str(p) for p, problem in expanded if problem is None] == [
        "B.jpg", "refs/chair.png", "refs/small.png", "shots/chair.png", "shots/chair_flipped.png"]
    (pattern, problem), = [(p, e) for p, e in expanded if e]
    assert str(pattern) == "nothing/*.png" and "no images match" in problem.message


def test_six_inputs_one_corrupt_give_five_meshes_equal_to_single_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    loads = []
    real_load = triposr.load
    monkeypatch.setattr(triposr, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    status = cli.main(["generate", *make_inputs(tmp_path), "-o", "out/", "--format", "npz", "--json",
                       *map(str, TINY_ARGS)])
    captured = capsys.readouterr()
    assert status == batch.SOME_FAILED == 5, captured.err
    assert len(loads) == 1  # the model is loaded once for the batch

    lines = json_lines(captured.out)
    *per_image, summary = lines
    assert [line["input"] for line in per_image] == list(EXPECTED)
    assert {line["input"]: Path(line["output"]).name for line in per_image if line["event"] == "result"} == GOOD
    (failure,) = [line for line in per_image if line["event"] == "error"]
    assert failure["input"] == "broken.png" and failure["code"] == "bad_input" and "broken.png" in failure["message"]
    assert all(line["vertices"] > 0 and line["faces"] > 0 and line["total_seconds"] > 0
               for line in per_image if line["event"] == "result")
    assert summary == {**summary, "event": "summary", "images": 6, "done": 5, "failed": 1, "skipped": 0,
                       "not_run": 0, "interrupted": False, "exit_status": 5}
    assert "image 2/6: broken.png · failed: Image broken.png could not be decoded" in captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(GOOD.values())

    (tmp_path / "single").mkdir()
    for name, output in GOOD.items():  # each image alone, as `generate IMAGE -o OUT.npz` does it
        single = tmp_path / "single" / output
        r = run_cli(name, "-o", single, *TINY_ARGS, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert_equal_meshes(tmp_path / "out" / output, single)


def test_every_option_applies_to_every_image(tmp_path, monkeypatch, capsys):
    """--faces and --texture on two images of the same name: OBJ, MTL and texture per image, none shared."""
    monkeypatch.chdir(tmp_path)
    make_inputs(tmp_path)
    status = cli.main(["generate", "refs/chair.png", "shots/chair.png", "-o", "obj/", "--format", "obj", "--faces",
                       "300", "--texture", "512", "--json", *map(str, TINY_ARGS)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    results = json_lines(captured.out)[:-1]
    assert [r["faces"] <= 330 and r["texture"] == 512 for r in results] == [True, True]
    assert sorted(p.name for p in (tmp_path / "obj").iterdir()) == [
        "chair-2.mtl", "chair-2.obj", "chair-2_texture.png", "chair.mtl", "chair.obj", "chair_texture.png"]
    for stem in ("chair", "chair-2"):
        assert f"map_Kd {stem}_texture.png" in (tmp_path / "obj" / f"{stem}.mtl").read_text()
        assert f"mtllib {stem}.mtl" in (tmp_path / "obj" / f"{stem}.obj").read_text()


@pytest.mark.parametrize("args,status,fragment", [
    (["--weights", "/nonexistent/w"], 3, "model folder not found"),
    (["--resolution", "8"], 2, "resolution must be between 32 and 1024"),
    (["--model", "instantmesh-base", "--threshold", "3"], 2, "--threshold does not apply"),
    (["-o", "out.glb"], 2, "a batch writes one file per image into a folder"),
    (["--views", "grid.png"], 2, "they are for a single run, not a batch"),
])
def test_a_batch_that_cannot_start_exits_as_a_single_run_would(tmp_path, monkeypatch, capsys, args, status,
                                                                 fragment):
    monkeypatch.chdir(tmp_path)
    make_inputs(tmp_path)
    base = ["--weights", str(TINY), "--resolution", "32", "-o", "out/"]
    assert cli.main(["generate", "B.jpg", "shots/chair.png", *base, *args, "--json"]) == status
    captured = capsys.readouterr()
    assert fragment in captured.err and "Traceback" not in captured.err
    error, summary = json_lines(captured.out)
    assert error["event"] == "error" and fragment in error["message"]
    assert summary["event"] == "summary" and summary["exit_status"] == status and summary["done"] == 0
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _start_batch(cwd: Path, count: int, *extra):
    """A batch of ``count`` copies of the chair (each its own file) that reports its progress on stderr."""
    (cwd / "in").mkdir(exist_ok=True)
    for i in range(count):
        shutil.copy(IMAGE, cwd / "in" / f"view{i}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "backend", "generate", "in/", "-o", "out/", "--format", "npz",
                             *map(str, TINY_ARGS), *extra], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_line(proc, text: str) -> list:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never came:\n{''.join(seen)}")


def _assert_only_complete_files(folder: Path, names) -> None:
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(names), files  # no .partial, nothing half-written
    for name in files:
        assert len(meshio.load_npz(folder / name).faces) > 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT as a terminal sends it is POSIX")
def test_ctrl_c_finishes_the_current_image_then_skip_existing_resumes(tmp_path):
    count = 6
    proc = _start_batch(tmp_path, count)
    _wait_for_line(proc, f"image 2/{count}: in/view1.png · encoding")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "stopping after the current image" in err and "--skip-existing" in err
    done = sorted(p.name for p in (tmp_path / "out").iterdir())
    # image 2 was running: it is finished (and image 3 too, if it had started before the signal came)
    assert done in (["view0.npz", "view1.npz"], ["view0.npz", "view1.npz", "view2.npz"]), err
    _assert_only_complete_files(tmp_path / "out", done)

    r = run_cli("in/", "-o", "out/", "--format", "npz", "--skip-existing", "--json", *TINY_ARGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    *lines, summary = json_lines(r.stdout)
    assert [line["event"] for line in lines] == ["skipped"] * len(done) + ["result"] * (count - len(done))
    assert summary["done"] == count - len(done) and summary["skipped"] == len(done)
    _assert_only_complete_files(tmp_path / "out", [f"view{i}.npz" for i in range(count)])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT as a terminal sends it is POSIX")
def test_a_second_ctrl_c_stops_at_once_and_leaves_no_partial_file(tmp_path):
    count = 6
    proc = _start_batch(tmp_path, count)
    _wait_for_line(proc, f"image 2/{count}: in/view1.png · encoding")
    proc.send_signal(signal.SIGINT)
    _wait_for_line(proc, "stopping after the current image")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    done = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "view0.npz" in done and len(done) < count
    _assert_only_complete_files(tmp_path / "out", done)


def test_generate_offline_never_connects_and_names_the_missing_files(tmp_path):
    """As `download --offline`: no socket is opened (an audit hook watches the whole run), and missing weights
    are named with the folder to put them in."""
    watch = ("import sys, atexit; seen = []; "
             "sys.addaudithook(lambda e, a: e in ('socket.connect', 'socket.getaddrinfo') and seen.append(a)); "
             "atexit.register(lambda: print('connections:', seen, file=sys.stderr)); "
             "from backend.cli import main; sys.exit(main(sys.argv[1:]))")
    with StandInHub({}) as hub:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "IMAGE_TO_3D_MODELS": str(tmp_path / "models"),
               "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url}
        for name in ("HF_HUB_OFFLINE", "IMAGE_TO_3D_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(name, None)

        def generate(*args):
            return subprocess.run([sys.executable, "-c", watch, "generate", *map(str, args), "--offline"],
                                  capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

        missing = generate(IMAGE, "-o", tmp_path / "m.npz", "--resolution", 32)
        works = generate(IMAGE, "-o", tmp_path / "w.npz", "--resolution", 32, "--weights", TINY)
    assert missing.returncode == 3, missing.stderr
    assert "TripoSR weights not found" in missing.stderr and "online access is off (--offline)" in missing.stderr
    assert "config.yaml" in missing.stderr and "model.ckpt" in missing.stderr
    assert str(tmp_path / "models" / "triposr") in missing.stderr
    assert works.returncode == 0, works.stderr
    assert (tmp_path / "w.npz").is_file() and not (tmp_path / "m.npz").exists()
    assert "connections: []" in missing.stderr and "connections: []" in works.stderr
    assert hub.requests == []


def test_single_image_runs_are_unchanged_by_the_batch_options(tmp_path):
    out = tmp_path / "one.npz"
    r = run_backend("generate", IMAGE, "-o", out, "--weights", TINY, "--resolution", 32, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # one JSON object, as before
    assert summary["ok"] and summary["output"] == str(out) and "event" not in summary
    again = run_backend("generate", IMAGE, "-o", out, "--weights", TINY, "--skip-existing", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"]
    mismatch = run_backend("generate", IMAGE, "-o", out, "--format", "glb")
    assert mismatch.returncode == 2 and "--format glb does not match" in mismatch.stderr
