"""Painting from pictures (backend/postprocess/{paint,raster,cameras}.py) on synthetic meshes.

The pictures here are made by ray casting analytic shapes (spheres) in the test, not by our rasteriser, so the
painting is checked against an independent picture; the camera fit is checked from a mask alone.
"""

import numpy as np
import pytest

from backend.postprocess import cameras as cm
from backend.postprocess import paint as pt
from backend.postprocess.raster import depth_buffer


def uv_sphere(n_lat=32, n_lon=64, radius=1.0, centre=(0, 0, 0)):
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]]) * radius + np.asarray(centre)
    rid = lambda i, j: 1 + i * n_lon + j % n_lon  # noqa: E731
    faces = [(0, rid(0, j + 1), rid(0, j)) for j in range(n_lon)]
    for i in range(n_lat - 2):
        for j in range(n_lon):
            a, b, c, d = rid(i, j), rid(i + 1, j), rid(i + 1, j + 1), rid(i, j + 1)
            faces += [(a, c, b), (a, d, c)]
    s = len(v) - 1
    faces += [(s, rid(n_lat - 2, j), rid(n_lat - 2, j + 1)) for j in range(n_lon)]
    return v, np.array(faces, np.int64)[:, ::-1].copy()  # outward winding


def box(lo, hi):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)
    v = lo + corners * (hi - lo)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    f = [(a, b, c) for a, b, c, d in quads] + [(a, c, d) for a, b, c, d in quads]
    return v, np.array(f, np.int64)


def merge(*parts):
    vs, fs, n = [], [], 0
    for v, f in parts:
        vs.append(v)
        fs.append(f + n)
        n += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def figure():
    """An asymmetric figure: a body, a head forward and up, an arm on one side, a tail behind and low."""
    return merge(box((-0.4, -0.25, -0.6), (0.4, 0.25, 0.5)), uv_sphere(12, 24, 0.28, (0.1, -0.2, 0.75)),
                 box((0.4, -0.1, 0.1), (0.9, 0.1, 0.3)), box((-0.2, 0.25, -0.5), (0.0, 0.8, -0.35)),
                 box((-0.7, -0.1, -0.2), (-0.4, 0.05, 0.4)))


def pattern(points):
    """A sharp colour pattern on the surface: stripes of red/blue with a green band."""
    stripes = (np.floor(points[:, 0] * 6) % 2).astype(float)
    band = np.abs(points[:, 2]) < 0.15
    rgb = np.stack([stripes, band.astype(float), 1 - stripes], axis=1)
    return np.clip(rgb * 0.8 + 0.1, 0, 1)


def cast_sphere(camera, size, radius=1.0, centre=np.zeros(3), background=(1.0, 0.0, 1.0)):
    """Ray cast a sphere: its picture (coloured by ``pattern`` at the hit points) and its coverage mask, with 4x4
    supersampling so the border is antialiased like a real render."""
    ss = 4
    n = size * ss
    u = (np.arange(n) + 0.5) / n
    xs, ys = np.meshgrid((u - camera.centre[0]) / camera.focal, (u - camera.centre[1]) / camera.focal)
    dirs = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3) @ camera.rotation
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    oc = camera.position - centre
    b = dirs @ oc
    disc = b * b - (oc @ oc - radius ** 2)
    hit = disc > 0
    t = -b - np.sqrt(np.maximum(disc, 0))
    points = camera.position + t[:, None] * dirs
    rgb = np.where(hit[:, None], pattern(points), background)
    rgb = rgb.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    mask = hit.reshape(size, ss, size, ss).mean(axis=(1, 3))
    return rgb.astype(np.float32), mask.astype(np.float32)


def test_depth_buffer_of_a_square_matches_its_area_and_depth():
    cam = cm.look_at((0, -3, 0), focal=1.0)
    v = np.array([[-0.5, 0, -0.5], [0.5, 0, -0.5], [0.5, 0, 0.5], [-0.5, 0, 0.5]])
    depth = depth_buffer(v, np.array([[0, 1, 2], [0, 2, 3]]), cam, 120, 120)
    covered = np.isfinite(depth)
    side = 120 * 1.0 / 3  # focal · size / distance
    assert abs(covered.sum() - side ** 2) < 2 * 4 * side  # within a pixel ring
    assert np.allclose(depth[covered], 3.0, atol=1e-5)
    # A second square nearer the camera hides the first where they overlap.
    near = v * 0.5 + (0, -1, 0)
    depth2 = depth_buffer(np.concatenate([v, near]), np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]]),
                          cam, 120, 120)
    assert np.isclose(depth2[60, 60], 2.0, atol=1e-5) and np.isclose(depth2[60, 42], 3.0)  # near half side 15 px, far 20


def _front_view(size=256):
    cam = cm.orbit(0, 0, 3.0, 40.0)
    image, mask = cast_sphere(cam, size)
    return pt.View(image, mask, cam), cam


def test_painted_vertices_take_the_picture_where_seen_and_the_field_elsewhere():
    v, f = uv_sphere()
    view, cam = _front_view()
    field = np.full((len(v), 3), 0.3, np.float32)
    painter = pt.Painter(v, f, [view])
    colours, report = painter.paint_vertices(field)
    n = pt.vertex_normals(v, f)
    ray = cam.position - v
    facing = (n * ray).sum(1) / np.linalg.norm(ray, axis=1) > pt.COS_FULL + 0.05
    facing &= np.abs(v[:, 0] * 6 - np.rint(v[:, 0] * 6)) > 0.05  # not on a stripe's antialiased edge
    facing &= np.abs(np.abs(v[:, 2]) - 0.15) > 0.01
    assert np.abs(colours[facing] - pattern(v[facing])).max() < 0.06
    back = (n @ (cam.position / np.linalg.norm(cam.position))) < 0
    assert np.allclose(colours[back], 0.3)
    assert 0.15 < report["picture"] < 0.5 and abs(report["picture"] + report["field"] - 1) < 1e-3


@pytest.mark.parametrize("shift", [0.0, 0.02, -0.02])
def test_no_background_is_painted_even_when_the_silhouettes_disagree(shift):
    """The mesh moved by 2 % of its size against the picture: no vertex takes the magenta background."""
    v, f = uv_sphere(48, 96)
    view, _ = _front_view()
    v = v + np.array([shift * 2, 0, shift * 2])
    colours, _ = pt.Painter(v, f, [view]).paint_vertices(np.full((len(v), 3), 0.5, np.float32))
    magenta = (colours[:, 0] - colours[:, 1] > 0.5) & (colours[:, 2] - colours[:, 1] > 0.5)
    assert not magenta.any()


def test_without_a_field_unseen_points_take_colours_spread_from_painted_ones():
    v, f = uv_sphere()
    view, cam = _front_view()
    colours, report = pt.Painter(v, f, [view]).paint_vertices(None)
    assert "spread" in report and "field" not in report
    back = v[:, 1] > 0.5  # the far side
    assert not np.allclose(colours[back], 0.5, atol=0.02)  # not a flat default
    assert colours[back].min(axis=1).max() > 0.05  # not black
    # Each unseen vertex takes colours found on the seen part (red/blue stripes and the green band mixed).
    assert np.all(colours[back].max(axis=1) > 0.3)


def test_a_point_hidden_behind_another_takes_nothing_from_the_view():
    v1, f1 = uv_sphere(16, 32, 0.5, (0, 0, 0))
    v2, f2 = uv_sphere(16, 32, 0.3, (0, -1.0, 0))  # in front of the first, on the camera's axis
    v, f = merge((v1, f1), (v2, f2))
    cam = cm.orbit(0, 0, 3.0, 40.0)
    view = pt.View(np.ones((128, 128, 3), np.float32), np.ones((128, 128), np.float32), cam)
    colours, _ = pt.Painter(v, f, [view]).paint_vertices(np.zeros((len(v), 3), np.float32))
    hidden = (np.arange(len(v)) < len(v1)) & (np.abs(v[:, 0]) < 0.1) & (np.abs(v[:, 2]) < 0.1) & (v[:, 1] < 0)
    assert hidden.any() and np.allclose(colours[hidden], 0.0)
    front = (np.arange(len(v)) >= len(v1)) & (v[:, 1] < -1.25)
    assert np.all(colours[front] > 0.9)


def test_painted_texture_matches_the_picture_on_seen_texels():
    pytest.importorskip("xatlas")
    from backend.postprocess.atlas import unwrap_faces

    v, f = uv_sphere()
    view, cam = _front_view()
    f2, uvs, _, _ = unwrap_faces(v.astype(np.float32), f, 512)
    painter = pt.Painter(v, f2, [view])
    texture, mask, report = pt.paint_texture(painter, f2, uvs, 512, field=lambda p: np.full((len(p), 3), 0.3))
    from backend.postprocess.bake import texel_samples

    s = texel_samples(v, f2, uvs, 512)
    n = s.positions / np.linalg.norm(s.positions, axis=1, keepdims=True)
    facing = n @ (cam.position / 3.0) > 0.7
    got = texture[s.rows[facing], s.cols[facing]] / 255.0
    assert np.median(np.abs(got - pattern(s.positions[facing].astype(float))).max(axis=1)) < 0.03
    assert set(report) == {"picture", "field"}


@pytest.mark.parametrize("seed,reduced", [(1, False), (2, False), (3, True)])
def test_camera_fit_finds_the_view_of_a_mask(seed, reduced, monkeypatch):
    rng = np.random.default_rng(seed)
    v, f = figure()
    if reduced:  # a mesh denser than the fit needs is fitted on a reduction of it: the same view comes back
        monkeypatch.setattr(cm, "FIT_FACES", len(f) // 3)
    az, el = float(rng.uniform(0, 360)), float(rng.uniform(-20, 50))
    lo, hi = v.min(0), v.max(0)
    centre, radius = (lo + hi) / 2, np.linalg.norm(hi - lo) / 2
    truth = cm.orbit(az, el, cm.FIT_DISTANCE * radius, cm.FIT_FOV, centre).scaled(
        rng.uniform(0.8, 1.1), (0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)))
    mask = np.isfinite(depth_buffer(v, f, truth, 256, 256))
    fit = cm.fit_camera(v, f, mask)
    d_az = (fit.azimuth - az + 180) % 360 - 180
    assert abs(d_az) <= 3 and abs(fit.elevation - el) <= 3, (az, el, fit.azimuth, fit.elevation)
    assert fit.iou >= 0.95
