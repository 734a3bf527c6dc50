"""The command-line tool as a user runs it: outputs, the JSON summary, exit statuses and messages."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import TINY, assert_same_mesh, run_backend

from backend import mesh as meshio
from backend.models import triposr

IMAGE = TINY / "input_rgba.png"


def run_cli(*args, env=None):
    return run_backend("generate", *args, env=env)


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def test_generate_reproduces_the_reference_mesh_in_blender_frame(tmp_path):
    out = tmp_path / "out.npz"
    r = run_cli(IMAGE, "-o", out, "--weights", TINY, "--resolution", 64, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    mesh = meshio.load_npz(out)
    assert summary["ok"] and summary["vertices"] == len(mesh.vertices) and summary["faces"] == len(mesh.faces)
    assert set(summary["seconds"]) >= {"removing_background", "loading_model", "encoding", "building_triplanes",
                                       "extracting_surface", "colouring"}
    assert summary["device"] == "cpu" and summary["peak_rss_mb"] > 0
    with np.load(out) as data:
        assert data["vertices"].dtype == np.float32 and data["faces"].dtype == np.int32
        assert data["colors"].dtype == np.float32 and data["colors"].shape == data["vertices"].shape
        assert 0.0 <= data["colors"].min() and data["colors"].max() <= 1.0
    with np.load(TINY / "expected.npz") as e:
        ref_vertices, ref_faces = triposr.to_blender_frame(e["mesh64_vertices"]), e["mesh64_faces"]
    assert_same_mesh(mesh.vertices, mesh.faces, ref_vertices, ref_faces)
    assert leftovers(tmp_path) == ["out.npz"]


@pytest.fixture(scope="module")
def small_mesh():
    model = triposr.load(TINY, torch.device("cpu"))
    from backend.options import Options
    from backend.progress import Stages

    conditioning = np.asarray(Image.open(TINY / "conditioning.png").convert("RGB"))
    return model.reconstruct(conditioning, Options(resolution=32, threshold=25.0), Stages(None, None))


def test_ply_obj_glb_round_trip(small_mesh, tmp_path):
    n, m = len(small_mesh.vertices), len(small_mesh.faces)
    ply = meshio.save(small_mesh, tmp_path / "m.ply").read_bytes()
    header, body = ply.split(b"end_header\n", 1)
    assert f"element vertex {n}".encode() in header and f"element face {m}".encode() in header
    verts = np.frombuffer(body[: n * 15], dtype=[("p", "<f4", 3), ("c", "u1", 3)])
    assert np.allclose(verts["p"], small_mesh.vertices)
    faces = np.frombuffer(body[n * 15:], dtype=[("n", "u1"), ("i", "<i4", 3)])
    assert (faces["n"] == 3).all() and (faces["i"] == small_mesh.faces).all()

    obj = (meshio.save(small_mesh, tmp_path / "m.obj")).read_text().splitlines()
    v = np.array([line.split()[1:] for line in obj if line.startswith("v ")], float)
    f = np.array([line.split()[1:] for line in obj if line.startswith("f ")], int)
    assert np.allclose(v[:, :3], meshio._y_up(small_mesh.vertices), atol=1e-5)
    assert np.allclose(v[:, 3:], small_mesh.colors, atol=1e-4) and (f - 1 == small_mesh.faces).all()

    glb = meshio.save(small_mesh, tmp_path / "m.glb").read_bytes()
    magic, version, total = struct.unpack_from("<4sII", glb)
    assert (magic, version, total) == (b"glTF", 2, len(glb))
    json_len = struct.unpack_from("<I", glb, 12)[0]
    gltf = json.loads(glb[20:20 + json_len])
    binary = glb[28 + json_len:]
    acc, views = gltf["accessors"], gltf["bufferViews"]
    pos = np.frombuffer(binary, np.float32, acc[0]["count"] * 3, views[0]["byteOffset"]).reshape(-1, 3)
    idx = np.frombuffer(binary, np.uint32, acc[2]["count"], views[2]["byteOffset"]).reshape(-1, 3)
    assert np.allclose(pos, meshio._y_up(small_mesh.vertices)) and (idx == small_mesh.faces).all()
    assert acc[0]["min"] == pos.min(axis=0).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.glb", "m.obj", "m.ply"]


def test_failed_save_leaves_no_file(small_mesh, tmp_path, monkeypatch):
    def broken(mesh, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(meshio, "_write_ply", broken)
    with pytest.raises(OSError):
        meshio.save(small_mesh, tmp_path / "m.ply")
    assert leftovers(tmp_path) == []


def corrupt_png(path):
    path.write_bytes(IMAGE.read_bytes()[:2000])
    return path


def empty_alpha_png(path):
    Image.new("RGBA", (64, 64), (200, 10, 10, 0)).save(path)
    return path


def opaque_png(path):
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    return path


def tampered_weights(tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(TINY, folder)
    data = bytearray((folder / "model.ckpt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\0" * 4096
    (folder / "model.ckpt").write_bytes(bytes(data[:-100]))
    return folder


def weights_without_ckpt(tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(TINY, folder)
    (folder / "model.ckpt").unlink()
    return folder


BAD = [
    # (name, image maker, extra args, exit status, message fragment)
    ("missing image", lambda t: t / "nope.png", [], 2, "nope.png"),
    ("corrupt image", lambda t: corrupt_png(t / "bad.png"), [], 2, "bad.png"),
    ("text file", lambda t: (t / "a.png").write_text("hello") and t / "a.png", [], 2, "a.png"),
    ("empty alpha", lambda t: empty_alpha_png(t / "clear.png"), [], 2, "nothing to reconstruct"),
    ("resolution too high", lambda t: IMAGE, ["--resolution", "2048"], 2, "resolution must be between 32 and 1024"),
    ("resolution too low", lambda t: IMAGE, ["--resolution", "8"], 2, "resolution must be between 32 and 1024"),
    ("bad ratio", lambda t: IMAGE, ["--foreground-ratio", "0"], 2, "foreground ratio"),
    ("unknown model", lambda t: IMAGE, ["--model", "nerfzilla"], 2, "unknown model 'nerfzilla'"),
    ("no gpu", lambda t: IMAGE, ["--device", "cuda"], 2, "sees no CUDA GPU"),
    ("missing weights folder", lambda t: IMAGE, ["--weights", "/nonexistent/w"], 3, "model folder not found"),
]


@pytest.mark.parametrize("name,make_image,extra,status,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, name, make_image, extra, status, fragment):
    if name == "no gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    image = make_image(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [image, "-o", out_dir / "m.glb", "--resolution", 32, *extra]
    if "--weights" not in extra:
        args += ["--weights", TINY]
    r = run_cli(*args)
    assert r.returncode == status, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("make_weights,fragment", [
    (tampered_weights, "could not be read as a PyTorch checkpoint"),
    (weights_without_ckpt, "lacks model.ckpt"),
])
def test_bad_weights_exit_3(tmp_path, make_weights, fragment):
    out = tmp_path / "m.npz"
    r = run_cli(IMAGE, "-o", out, "--weights", make_weights(tmp_path), "--resolution", 32, "--json")
    assert r.returncode == 3, r.stderr
    assert fragment in r.stderr and "hint:" in r.stderr
    assert json.loads(r.stdout)["error"]["code"] == "weights"
    assert not out.exists()


def test_weights_not_found_says_where_it_looked(tmp_path):
    env = {"IMAGE_TO_3D_MODELS": str(tmp_path / "models"), "HF_HOME": str(tmp_path / "hf")}
    r = run_cli(IMAGE, "-o", tmp_path / "m.npz", "--resolution", 32, env=env)
    assert r.returncode == 3
    assert "TripoSR weights not found" in r.stderr and str(tmp_path / "models" / "triposr") in r.stderr
    assert "huggingface.co/stabilityai/TripoSR" in r.stderr


def test_opaque_image_without_u2net_says_how_to_get_it(tmp_path):
    image = opaque_png(tmp_path / "opaque.png")
    r = run_cli(image, "-o", tmp_path / "m.npz", "--weights", TINY, "--resolution", 32,
                "--u2net", tmp_path / "missing" / "u2net.onnx")
    assert r.returncode == 3, r.stderr
    assert "u2net.onnx" in r.stderr and "--no-remove-background" in r.stderr
    assert leftovers(tmp_path) == ["opaque.png"]


def test_output_format_and_folder_are_checked_first(tmp_path):
    r = run_cli(IMAGE, "-o", tmp_path / "m.fbx", "--weights", TINY)
    assert r.returncode == 2 and "unsupported output format '.fbx'" in r.stderr
    r = run_cli(IMAGE, "-o", tmp_path / "no" / "m.glb", "--weights", TINY)
    assert r.returncode == 2 and "output folder does not exist" in r.stderr


def test_no_remove_background_uses_an_opaque_image_as_given(tmp_path):
    image = tmp_path / "prepared.png"
    Image.open(TINY / "conditioning.png").save(image)
    out = tmp_path / "m.ply"
    r = run_cli(image, "-o", out, "--weights", TINY, "--resolution", 32, "--no-remove-background", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["faces"] > 0 and out.stat().st_size > 0


def test_cancel_stops_between_chunks_and_writes_nothing(tmp_path):
    from backend.errors import Cancelled
    from backend.options import Options
    from backend.pipeline import generate

    seen = []

    def progress(stage, fraction, message):
        seen.append(stage)

    def cancelled():
        return "extracting_surface" in seen

    with pytest.raises(Cancelled):
        generate(IMAGE, Options(weights=str(TINY), resolution=64), progress, cancelled)
    assert seen[-1] == "extracting_surface" and "colouring" not in seen


def test_model_cache_skips_loading(tmp_path):
    from backend.options import Options
    from backend.pipeline import generate

    cache = {}
    first = generate(IMAGE, Options(weights=str(TINY), resolution=32), model_cache=cache)
    second = generate(IMAGE, Options(weights=str(TINY), resolution=32), model_cache=cache)
    assert len(cache) == 1
    assert second.stats["seconds"]["loading_model"] < first.stats["seconds"]["loading_model"]
    assert (first.faces == second.faces).all()
