"""``make demo``: Generate 3D in headless Blender (bpy as a module) on an example image.

Writes OUT/demo.blend, OUT/demo.glb (Blender's glTF exporter, vertex colours included) and OUT/demo.png
(a Workbench render with vertex colours, the camera framed on the object). ``--faces N --texture SIZE``
(the panel's Output) reduce the mesh and bake a texture from the model; the render then shows the texture.

Weights: IMAGE_TO_3D_WEIGHTS=DIR (a model folder in the official layout, e.g. the tiny test model
tests/data/triposr_tiny), else the official TripoSR files where the backend looks for them (the model store,
the Hugging Face cache), else they are downloaded into the model store. When they cannot be had (offline,
no network), it stops at once and says how to get them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADDON_ID = "image_to_3d"
REPO = "image_to_3d_demo"


def find_weights(backend_python: Path) -> Path:
    """The model folder: IMAGE_TO_3D_WEIGHTS, else where the backend looks (model store, Hugging Face cache),
    else a download of the official files (``backend download`` in the backend's Python, which has
    huggingface_hub). Fails fast when none of that works."""
    import subprocess

    sys.path.insert(0, str(ROOT))
    from backend.errors import BackendError
    from backend.hub import human_size
    from backend.models import registry

    spec = registry.get("triposr")
    named = os.environ.get("IMAGE_TO_3D_WEIGHTS")
    try:
        return registry.find_folder(spec, named).resolve()
    except BackendError as e:
        if named:
            sys.exit(f"demo: IMAGE_TO_3D_WEIGHTS: {e.message}")
        print(f"demo: {e.message}; downloading them ({human_size(spec.download_size)}) into the Hugging Face "
              f"cache", flush=True)
    download = subprocess.run([str(backend_python), "-m", "backend", "download", "--model", spec.id], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    if download.returncode == 0:
        return registry.find_folder(spec).resolve()
    sys.exit("\ndemo: the TripoSR weights could not be had (above: why)\n"
             f"  Put config.yaml and model.ckpt of https://huggingface.co/stabilityai/TripoSR into "
             f"{registry.store_folder(spec)}, or with a folder holding them:\n"
             "    IMAGE_TO_3D_WEIGHTS=/that/folder make demo\n"
             "  To try the whole path with the tiny test model instead:\n"
             "    IMAGE_TO_3D_WEIGHTS=tests/data/triposr_tiny make demo")


def enable_addon(bpy, repo_dir: Path):
    """Load the extension from this source tree through a local repository, as Blender loads it."""
    import addon_utils

    (repo_dir / ADDON_ID).symlink_to(ROOT, target_is_directory=True)
    bpy.context.preferences.extensions.repos.new(name=REPO, module=REPO, custom_directory=str(repo_dir),
                                                 source="USER")
    errors = []
    addon_utils.enable(f"bl_ext.{REPO}.{ADDON_ID}", default_set=True, handle_error=errors.append)
    if errors:
        sys.exit(f"demo: the add-on failed to enable: {errors}")
    return bpy.context.preferences.addons[f"bl_ext.{REPO}.{ADDON_ID}"].preferences


def frame_camera(bpy, obj, size=512):
    """A camera looking at the object's front (-Y) from a little right and above, fitting it in view."""
    from mathutils import Vector

    scene = bpy.context.scene
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    centre = sum(corners, Vector()) / 8
    radius = max((c - centre).length for c in corners)
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    fov = camera.data.angle
    direction = Vector((0.45, -1.0, 0.4)).normalized()
    camera.location = centre + direction * (radius / math.sin(fov / 2) * 1.05)
    camera.rotation_euler = (-direction).to_track_quat("-Z", "Y").to_euler()
    camera.data.clip_end = max(100.0, radius * 20)
    scene.camera = camera
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100


def render_preview(bpy, path: Path, textured: bool = False):
    scene = bpy.context.scene
    try:
        scene.render.engine = "BLENDER_WORKBENCH"
    except TypeError:  # a build without Workbench: Cycles on the CPU, few samples
        scene.render.engine = "CYCLES"
        scene.cycles.device, scene.cycles.samples = "CPU", 16
    shading = scene.display.shading
    shading.light = "STUDIO"
    shading.color_type = "TEXTURE" if textured else "VERTEX"  # the generated colours
    shading.show_cavity = False
    scene.display.render_aa = "8"
    scene.render.film_transparent = False
    world = bpy.data.worlds.new("Demo") if scene.world is None else scene.world
    scene.world = world
    world.color = (0.18, 0.18, 0.2)
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(ROOT / "examples" / "chair.png"))
    parser.add_argument("--out", default=str(ROOT / "out"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--faces", type=int, default=0, help="face budget (0: as extracted)")
    parser.add_argument("--quads", action="store_true")
    parser.add_argument("--texture", choices=("NONE", "512", "1024", "2048", "4096"), default="NONE")
    parser.add_argument("--backend-python", default=str(ROOT / ".venv" / "bin" / "python"))
    args = parser.parse_args()

    backend_python = Path(args.backend_python)
    if not backend_python.is_file():
        sys.exit(f"demo: backend Python {backend_python} not found; run `make venv` first")
    weights = find_weights(backend_python)  # before the slow part: fail fast
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    user_dir = tempfile.mkdtemp(prefix="image_to_3d-demo-user-")
    repo_dir = Path(tempfile.mkdtemp(prefix="image_to_3d-demo-repo-"))
    os.environ["BLENDER_USER_RESOURCES"] = user_dir  # keep the user's Blender config out of it

    import bpy

    try:
        prefs = enable_addon(bpy, repo_dir)
        bpy.ops.wm.read_homefile(use_empty=True)
        prefs.backend_python = str(backend_python)
        prefs.weights_dir = str(weights)
        settings = bpy.context.scene.image_to_3d
        settings.image = bpy.data.images.load(str(Path(args.image).resolve()))
        settings.resolution = args.resolution
        settings.target_height = 1.0
        settings.faces, settings.quads, settings.texture = args.faces, args.quads, args.texture
        print(f"demo: Generate 3D on {args.image} with {weights} at resolution {args.resolution}", flush=True)
        started = time.monotonic()
        try:
            result = bpy.ops.image_to_3d.generate()
        except RuntimeError:  # how bpy.ops reports the operator's error; the panel's text says it better
            result = {"CANCELLED"}
        if result != {"FINISHED"} or bpy.context.active_object is None:
            sys.exit(f"demo: Generate 3D failed: {settings.last_error} {settings.last_hint}")
        obj = bpy.context.active_object
        print(f"demo: {settings.last_info} ({time.monotonic() - started:.1f} s)", flush=True)

        frame_camera(bpy, obj)
        render_preview(bpy, out / "demo.png", textured=args.texture != "NONE")
        bpy.ops.export_scene.gltf(filepath=str(out / "demo.glb"), export_format="GLB", use_selection=True)
        bpy.context.preferences.filepaths.save_version = 0  # no demo.blend1 backups
        bpy.ops.wm.save_as_mainfile(filepath=str(out / "demo.blend"))
        addon_utils_disable(bpy)
        summary = {"object": obj.name if obj else None, "files": [str(out / f"demo.{x}") for x in ("blend", "glb", "png")]}
        print("demo: " + json.dumps(summary), flush=True)
    finally:
        shutil.rmtree(user_dir, ignore_errors=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
    return 0


def addon_utils_disable(bpy):
    import addon_utils

    addon_utils.disable(f"bl_ext.{REPO}.{ADDON_ID}", default_set=True)  # stops the worker


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: bpy 4.2 as a module crashes there after a glTF export (segfault in its
    # exit handlers), once every file is written. Nothing is left to clean up at this point.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
