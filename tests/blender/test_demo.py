"""``make demo``'s script: the three files with the tiny model, and a fast, clear failure without weights."""

import os
import subprocess
import sys

import numpy as np

from .conftest import ROOT, TINY_MODEL

DEMO = ROOT / "scripts" / "demo.py"


def run_demo(out, env_extra, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_TO_3D_WEIGHTS", "BLENDER_USER_RESOURCES")}
    env.update(env_extra)
    return subprocess.run([sys.executable, str(DEMO), "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_demo_with_the_tiny_model_writes_blend_glb_and_png(tmp_path):
    r = run_demo(tmp_path, {"IMAGE_TO_3D_WEIGHTS": str(TINY_MODEL)}, "--resolution", "64")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("demo.blend", "demo.glb", "demo.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert (tmp_path / "demo.glb").read_bytes()[:4] == b"glTF"
    assert b"COLOR_0" in (tmp_path / "demo.glb").read_bytes()[:4096], "vertex colours exported"

    import bpy

    image = bpy.data.images.load(str(tmp_path / "demo.png"))
    pixels = np.empty(image.size[0] * image.size[1] * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    rgb = pixels.reshape(-1, 4)[:, :3]
    background = rgb[0]
    covered = np.abs(rgb - background).max(axis=1) > 0.02
    assert 0.02 < covered.mean() < 0.9, "the object is in frame, not filling it"
    assert rgb[covered].std(axis=0).max() > 0.01, "vertex colours vary"
    bpy.data.images.remove(image)


def test_demo_without_weights_fails_fast_and_says_how_to_get_them(tmp_path):
    # Offline, so that the download it would try never reaches the real hub.
    r = run_demo(tmp_path / "out", {"HF_HOME": str(tmp_path / "hf"), "IMAGE_TO_3D_MODELS": str(tmp_path / "m"),
                                    "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "online access is off" in r.stderr and str(tmp_path / "m" / "triposr") in r.stderr
    assert "IMAGE_TO_3D_WEIGHTS" in r.stderr and "stabilityai/TripoSR" in r.stderr
    assert not (tmp_path / "out").exists() and not any((tmp_path / "m").rglob("*.partial"))


def test_demo_downloads_the_weights_when_it_can(tmp_path):
    """A stand-in hub on 127.0.0.1 serves files that are not the official ones: the download runs and the
    files are refused (size/checksum), so the demo stops with that reason and keeps nothing."""
    from hubserver import StandInHub

    sys.path.insert(0, str(ROOT))  # the registry is standard-library only: the test reads the same records
    try:
        from backend.models import registry
    finally:
        sys.path.remove(str(ROOT))
    spec = registry.get("triposr")
    served = {f"/{f.repo}/resolve/{f.revision}/{f.path}": (TINY_MODEL / f.path).read_bytes() for f in spec.files}
    with StandInHub(served) as hub:
        r = run_demo(tmp_path / "out", {"HF_HOME": str(tmp_path / "hf"), "IMAGE_TO_3D_MODELS": str(tmp_path / "m"),
                                        "HF_ENDPOINT": hub.url})
    assert r.returncode != 0
    assert "downloading them" in r.stdout and "instead of 987: removed" in r.stderr
    assert hub.requests and [p for p in (tmp_path / "m").rglob("*") if p.is_file()] == []
