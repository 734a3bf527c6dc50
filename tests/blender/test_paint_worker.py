"""Output › Colours through the real worker (#22): the tiny TripoSR, OpenLRM and InstantMesh models generate
once From Model and once From Images. The two meshes are the same; their colours differ only where a view
sees the surface: a vertex that faces away from every camera the job says it painted from keeps the model's
colour (within 1/255), and a good share of the vertices the views saw take other colours.
"""

import json
import os
import subprocess

import bpy
import numpy as np
import pytest

from .conftest import BACKEND_PYTHON, INPUT_IMAGE, ROOT, TINY_MODEL, addon_module, prefs, session, start_async, \
    tick_until
from .test_instantmesh import tiny_folder  # noqa: F401  (the tiny two-stage InstantMesh folder)
from .test_models_ui import OPENLRM_IMAGE, PACKED, mesh_threshold
from .test_texture_worker import pixels, texture_of

# A vertex is unseen when its normal faces away from every camera by this much more than the painting's own
# cut-off (paint.COS_NONE): the object's normals and the backend's may differ a little.
UNSEEN_COS = -0.1


def camera_positions(kind) -> np.ndarray:
    """The positions of the cameras a model's views were taken from (the picture's first), from the backend's
    Python: OpenLRM's and InstantMesh's constants live in modules that import torch."""
    code = ("import json, sys; from backend.postprocess import cameras as c; k = sys.argv[1]; "
            "cams = [c.reference_camera(k)] + (c.zero123pp_cameras() if k == 'instantmesh' else []); "
            "print(json.dumps([cam.position.tolist() for cam in cams]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([str(BACKEND_PYTHON), "-c", code, kind], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return np.array(json.loads(r.stdout))


def generate(settings, colours):
    settings.colours = colours
    timer = start_async()
    job = session().current_job()
    assert tick_until(timer, timeout=300), job
    assert not settings.last_error, (settings.last_error, settings.last_hint)
    obj = bpy.context.active_object
    return obj, dict(job.stats)


def object_arrays(obj):
    """The object's vertices in the backend's frame, its triangles and its vertex colours (sRGB)."""
    mesh = obj.data
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    stored = obj["image_to_3d"].to_dict()
    vertices = (co.reshape(-1, 3) + np.array(stored["placement_offset"])) / stored["placement_scale"]
    mesh.calc_loop_triangles()
    tris = np.empty(len(mesh.loop_triangles) * 3, np.int32)
    mesh.loop_triangles.foreach_get("vertices", tris)
    rgba = np.empty(len(mesh.vertices) * 4, np.float32)
    mesh.color_attributes["Color"].data.foreach_get("color", rgba)
    srgb = addon_module("backend.colour").linear_to_srgb(rgba.reshape(-1, 4)[:, :3])
    return vertices.astype(np.float64), tris.reshape(-1, 3), srgb


def unseen_vertices(vertices, triangles, positions):
    corners = vertices[triangles]
    n = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, triangles[:, k], n)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-20)
    away = np.ones(len(vertices), bool)
    for position in positions:
        ray = position - vertices
        cos = (normals * ray).sum(axis=1) / np.linalg.norm(ray, axis=1)
        away &= cos < UNSEEN_COS
    return away


def vertex_areas(vertices, triangles):
    corners = vertices[triangles]
    area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    out = np.zeros(len(vertices))
    for k in range(3):
        np.add.at(out, triangles[:, k], area)
    return out


def setup_triposr(s, folder):
    prefs().weights_dir = str(TINY_MODEL)
    s.model = "triposr"
    s.resolution = 64
    s.texture = "512"  # and a texture, painted too


def setup_openlrm(s, folder):
    s.image = bpy.data.images.load(str(OPENLRM_IMAGE), check_existing=True)
    s.model = "openlrm-mix-base"
    prefs().weights_dir = str(PACKED)
    s.resolution = 64
    s.threshold = mesh_threshold()


def setup_instantmesh(s, folder):
    s.model = "instantmesh-large"
    prefs().weights_dir = str(folder)
    s.steps, s.seed = 2, 7


CASES = {"triposr": (setup_triposr, "triposr"), "openlrm": (setup_openlrm, "openlrm"),
         "instantmesh": (setup_instantmesh, "instantmesh")}


@pytest.mark.parametrize("case", list(CASES))
def test_images_change_only_what_a_view_sees(addon, config_dir, tiny_folder, case):  # noqa: F811
    bpy.ops.wm.read_homefile(use_empty=True)
    p = prefs()
    p.backend_python, p.device = str(BACKEND_PYTHON), "cpu"
    s = bpy.context.scene.image_to_3d
    s.image = bpy.data.images.load(str(INPUT_IMAGE), check_existing=True)
    s.remove_background = False
    setup, kind = CASES[case]
    setup(s, tiny_folder)
    if addon_module("operators.generate").why_not(bpy.context).startswith("Accept"):
        assert bpy.ops.image_to_3d.accept_licence(model=s.model) == {"FINISHED"}

    field_obj, field_stats = generate(s, "field")
    painted_obj, stats = generate(s, "images")
    assert "colour_sources" not in field_stats
    assert stats["colours"] == "images" and stats["views"], stats
    sources = stats["colour_sources"]["vertices"]
    assert sources["field"] < 1.0 and sum(sources.values()) == pytest.approx(1.0, abs=2e-3), sources

    vertices, triangles, field = object_arrays(field_obj)
    vertices2, triangles2, painted = object_arrays(painted_obj)
    np.testing.assert_allclose(vertices2, vertices, atol=1e-5)  # the same mesh: only its colours differ
    assert np.array_equal(triangles2, triangles)

    # The picture's framing may be refitted; its camera's position is the model's.
    positions = camera_positions(kind)
    if kind == "instantmesh":
        assert [v["view"] for v in stats["views"]] == ["picture", "generated views"]
    else:
        assert [v["view"] for v in stats["views"]] == ["picture"]
    unseen = unseen_vertices(vertices, triangles, positions)
    diff = np.abs(painted - field).max(axis=1)
    areas = vertex_areas(vertices, triangles)
    kept, changed = diff <= 1 / 255, diff > 2 / 255
    kept_share, changed_share = areas[kept].sum() / areas.sum(), areas[changed].sum() / areas.sum()
    views_share = 1.0 - sources["field"]  # the share of the surface the views coloured, as the job reports it
    print(f"{case}: {len(vertices)} vertices, {unseen.mean():.0%} facing away from every view, "
          f"{changed.mean():.0%} changed ({changed_share:.0%} of the area, kept {kept_share:.0%}); sources {sources}")
    if kind == "instantmesh":  # seven views around it: the tiny model's box faces one of them everywhere
        assert not unseen.any()
    else:  # one picture: the back is the model's
        assert unseen.mean() > 0.2, unseen.mean()
        assert diff[unseen].max() <= 1 / 255 + 1e-6, (diff[unseen].max(), unseen.sum())
    # The job's account (area-weighted; the field's share is 1 - coverage): what kept the field's colours is
    # within the field's share, and the views changed at least half of their own share.
    assert kept_share <= sources["field"] + 0.01, (kept_share, sources)
    assert views_share > 0.02 and changed_share >= 0.5 * views_share, (changed_share, sources)
    if case == "triposr":
        assert set(stats["colour_sources"]) == {"vertices", "texture"}
        a, b = pixels(texture_of(field_obj)), pixels(texture_of(painted_obj))
        assert a.shape == b.shape
        assert (np.abs(a - b).max(axis=2) > 2 / 255).mean() > 0.05  # the picture painted the texture too
