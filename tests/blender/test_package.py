"""The extension as a user gets it: built and validated by Blender's own tool, installed from the zip
(Preferences › Get Extensions › Install from Disk runs the same operator) and enabled."""

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, blender_scripts_dir


def blender_ext(*args) -> subprocess.CompletedProcess:
    scripts = blender_scripts_dir()
    tool = scripts / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    tags = scripts / "modules" / "_bpy_internal" / "extensions" / "tags.py"
    return subprocess.run([sys.executable, str(tool), *args, "--valid-tags", str(tags)], capture_output=True,
                          text=True, timeout=120)


def copy_sources(dest: Path) -> Path:
    """The add-on's own files only (no venvs), as a fresh clone has them."""
    ignore = shutil.ignore_patterns(".venv*", ".git", "dist", "out", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = blender_ext("build", "--source-dir", str(ROOT), "--output-dir", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    (zip_path,) = out.glob("image_to_3d-*.zip")
    return zip_path


def test_the_zip_holds_the_add_on_and_nothing_else(built_zip):
    names = zipfile.ZipFile(built_zip).namelist()
    for needed in ("blender_manifest.toml", "__init__.py", "backend/client/pipe.py", "backend/protocol.py",
                   "backend/worker.py", "operators/generate.py", "operators/jobs.py", "panels/sidebar.py",
                   "backend/client/mesh_arrays.py"):
        assert needed in names
    for name in names:
        top = name.split("/")[0]
        assert top not in ("tests", "scripts", "dist", "out", "examples", "Makefile", "requirements-test.txt",
                           "wheels")  # a wheelhouse (make wheelhouse) is for the backend, not the extension
        assert not top.startswith("."), name
        assert "__pycache__" not in name and not name.endswith((".pyc", ".ckpt", ".zip"))
    r = blender_ext("validate", str(built_zip))
    assert r.returncode == 0, r.stdout + r.stderr


INSTALL_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp()
    import bpy
    result = bpy.ops.extensions.package_install_files(filepath=sys.argv[1], repo="user_default",
                                                      enable_on_install=True)
    name = "bl_ext.user_default.image_to_3d"
    enabled = name in bpy.context.preferences.addons
    info = {"result": sorted(result), "enabled": enabled}
    if enabled:
        info["operator"] = hasattr(bpy.ops.image_to_3d, "generate") and "image_to_3d" in dir(bpy.types.Scene)
        info["prefs"] = sorted(k for k in ("backend_python", "weights_dir", "device")
                               if hasattr(bpy.context.preferences.addons[name].preferences, k))
        info["panel"] = hasattr(bpy.types, "IMAGE_TO_3D_PT_sidebar")
        info["poll_without_image"] = bpy.ops.image_to_3d.generate.poll()
    print("RESULT " + json.dumps(info))
""")


def install(zip_path: Path) -> dict:
    """One fresh Blender process per install (leftover modules would mask a failure)."""
    r = subprocess.run([sys.executable, "-c", INSTALL_SCRIPT, str(zip_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) | {"log": r.stdout + r.stderr}


def test_the_built_zip_installs_and_is_enabled(built_zip):
    info = install(built_zip)
    assert info["enabled"], info["log"]
    assert info["operator"] and info["panel"]
    assert info["prefs"] == ["backend_python", "device", "weights_dir"]
    assert info["poll_without_image"] is False


@pytest.mark.parametrize("defect", [
    ("id = \"image_to_3d\"\n", ""),  # missing id
    ("version = \"0.1.0\"", "version = \"0.1\""),
    ("type = \"add-on\"", "type = \"addon\""),
    ("license = [", "licence = ["),
    ("[permissions]", "[permissions\n"),  # TOML syntax
])
def test_a_broken_manifest_is_caught_by_the_build(tmp_path, defect):
    source = copy_sources(tmp_path / "image_to_3d")
    manifest = source / "blender_manifest.toml"
    text = manifest.read_text()
    assert defect[0] in text
    manifest.write_text(text.replace(defect[0], defect[1], 1))
    out = tmp_path / "dist"
    out.mkdir()
    r = blender_ext("build", "--source-dir", str(source), "--output-dir", str(out))
    assert r.returncode != 0
    assert not list(out.glob("*.zip"))
