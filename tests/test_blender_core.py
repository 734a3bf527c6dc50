"""The bpy-free helpers of the Blender side: placement and its inverse, scaling, faces as loops (triangles
and quads), UVs per loop, texture pixels, colour conversion, PNG writing."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from backend import colour
from backend.client import mesh_arrays, png


def test_srgb_to_linear_matches_the_standard_curve():
    srgb = np.array([0.0, 0.04045, 0.5, 1.0], dtype=np.float32)
    expected = [0.0, 0.04045 / 12.92, ((0.5 + 0.055) / 1.055) ** 2.4, 1.0]
    np.testing.assert_allclose(colour.srgb_to_linear(srgb), expected, rtol=1e-6)
    values = np.linspace(0, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(colour.linear_to_srgb(colour.srgb_to_linear(values)), values, atol=1e-5)


def test_linear_rgba_adds_opaque_alpha_or_keeps_it():
    rgba = mesh_arrays.linear_rgba(np.array([[1.0, 0.5, 0.0]], dtype=np.float32))
    assert rgba.shape == (1, 4) and rgba[0, 3] == 1.0 and rgba[0, 0] == 1.0
    assert rgba[0, 1] == pytest.approx(0.2140, abs=1e-4)
    assert mesh_arrays.linear_rgba(np.array([[0.0, 0.0, 0.0, 0.25]]))[0, 3] == 0.25


def test_rest_on_origin_centres_xy_and_puts_the_lowest_point_at_zero():
    vertices = np.array([[1, 2, 3], [3, 6, 5], [2, 4, 4]], dtype=np.float32)
    placed = mesh_arrays.rest_on_origin(vertices)
    lo, hi = placed.min(axis=0), placed.max(axis=0)
    np.testing.assert_allclose((lo + hi)[:2] / 2, [0, 0])
    assert lo[2] == 0 and hi[2] == 2


def test_scale_to_height():
    vertices = np.array([[0, 0, -1], [2, 1, 1]], dtype=np.float32)
    scaled = mesh_arrays.scale_to_height(vertices, 5.0)
    assert np.ptp(scaled[:, 2]) == pytest.approx(5.0)
    assert np.ptp(scaled[:, 0]) == pytest.approx(5.0), "uniform scale"
    np.testing.assert_array_equal(mesh_arrays.scale_to_height(vertices, 0.0), vertices)
    flat = np.zeros((3, 3), dtype=np.float32)
    np.testing.assert_array_equal(mesh_arrays.scale_to_height(flat, 2.0), flat)


def test_prepare_gives_flat_arrays_for_foreach_set():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3]], dtype=np.int32)
    colors = np.full((4, 3), 0.5, dtype=np.float32)
    arrays = mesh_arrays.prepare(vertices, faces, colors, target_height=2.0)
    assert arrays.positions.dtype == np.float32 and arrays.positions.shape == (12,)
    assert arrays.corner_verts.dtype == np.int32 and arrays.corner_verts.tolist() == [0, 2, 1, 0, 1, 3]
    assert arrays.loop_starts.tolist() == [0, 3] and arrays.loop_totals.tolist() == [3, 3]
    assert arrays.rgba.shape == (16,) and arrays.rgba[3] == 1.0
    assert arrays.positions.reshape(-1, 3)[:, 2].max() == pytest.approx(2.0)
    assert arrays.uvs is None
    with pytest.raises(ValueError):
        mesh_arrays.prepare(vertices, np.array([[0, 1, 9]]), colors)
    with pytest.raises(ValueError):
        mesh_arrays.prepare(vertices, np.array([[0, 1, -1]]), colors)


def test_prepare_matches_scale_then_rest_on_origin():
    vertices = np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    arrays = mesh_arrays.prepare(vertices, np.zeros((0, 3)), np.zeros((50, 3)), target_height=1.5)
    expected = mesh_arrays.rest_on_origin(mesh_arrays.scale_to_height(vertices, 1.5))
    np.testing.assert_allclose(arrays.positions.reshape(-1, 3), expected, atol=1e-6)


def test_quads_and_triangles_become_loops_with_uvs_per_loop():
    vertices = np.zeros((6, 3), dtype=np.float32)
    faces = np.array([[0, 1, 2, 3], [1, 4, 2, -1], [2, 4, 5, 3]], dtype=np.int32)
    uvs = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    arrays = mesh_arrays.prepare(vertices, faces, np.zeros((6, 3)), uvs=uvs)
    assert arrays.loop_totals.tolist() == [4, 3, 4]
    assert arrays.loop_starts.tolist() == [0, 4, 7]
    assert arrays.corner_verts.tolist() == [0, 1, 2, 3, 1, 4, 2, 2, 4, 5, 3]
    expected_uvs = np.concatenate([uvs[0], uvs[1, :3], uvs[2]]).ravel()  # the padded corner's UV is dropped
    np.testing.assert_array_equal(arrays.uvs, expected_uvs)
    with pytest.raises(ValueError, match="fourth corner"):
        mesh_arrays.prepare(vertices, np.array([[0, -1, 2, 3]]), np.zeros((6, 3)))


def test_a_vertex_named_twice_in_a_face_is_mended_or_the_face_dropped():
    faces = np.array([[0, 1, 2, 3],  # fine
                      [0, 0, 1, 2],  # a repeat in a row: the triangle (0, 1, 2)
                      [0, 1, 0, 2],  # across the diagonal: dropped
                      [0, 0, 1, 1],  # two corners left: dropped
                      [1, 2, 2, -1],  # a degenerate triangle: dropped
                      [3, 4, 5, -1],  # fine
                      [0, 1, 2, 0]], dtype=np.int32)  # the last corner repeats the first: (0, 1, 2)
    uvs = np.arange(7 * 4 * 2, dtype=np.float32).reshape(7, 4, 2)
    arrays = mesh_arrays.prepare(np.zeros((6, 3)), faces, np.zeros((6, 3)), uvs=uvs)
    assert arrays.loop_totals.tolist() == [4, 3, 3, 3]
    assert arrays.corner_verts.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    expected = np.concatenate([uvs[0], uvs[1, 1:], uvs[5, :3], uvs[6, :3]]).ravel()  # each loop keeps its UV
    np.testing.assert_array_equal(arrays.uvs, expected)
    triangles = mesh_arrays.prepare(np.zeros((3, 3)), np.array([[0, 1, 2], [0, 1, 1]]), np.zeros((3, 3)))
    assert triangles.loop_totals.tolist() == [3]


def test_the_placement_round_trip_and_a_reused_placement():
    rng = np.random.default_rng(4)
    vertices = rng.normal(size=(40, 3)).astype(np.float32) + np.float32(3)
    arrays = mesh_arrays.prepare(vertices, np.zeros((0, 3)), np.zeros((40, 3)), target_height=2.5)
    local = arrays.positions.reshape(-1, 3)
    np.testing.assert_allclose(local, vertices * arrays.scale - arrays.offset, atol=1e-5)
    np.testing.assert_allclose(mesh_arrays.to_backend_frame(local, arrays.scale, arrays.offset), vertices,
                               atol=1e-5)
    other = vertices[:10] * np.float32(0.5)
    again = mesh_arrays.prepare(other, np.zeros((0, 3)), np.zeros((10, 3)), place=(arrays.scale, arrays.offset))
    assert (again.scale, again.offset.tolist()) == (arrays.scale, arrays.offset.tolist())
    np.testing.assert_allclose(again.positions.reshape(-1, 3), other * arrays.scale - arrays.offset, atol=1e-5)


def test_bake_request_arrays():
    local = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 0, 2]], dtype=np.float32)
    arrays = mesh_arrays.bake_request(local.ravel(), [0, 1, 2, 3, 0, 2, 1], [4, 3], 2.0, [1, 1, 0],
                                      uvs=np.zeros(14, dtype=np.float32))
    np.testing.assert_allclose(arrays["vertices"], (local + [1, 1, 0]) / 2)
    assert arrays["corner_verts"].dtype == np.int32 and arrays["loop_totals"].tolist() == [4, 3]
    assert arrays["uvs"].shape == (7, 2) and arrays["uvs"].dtype == np.float32
    assert "uvs" not in mesh_arrays.bake_request(local, [0, 1, 2], [3], 1.0, [0, 0, 0])


def test_texture_pixels_flip_rows_and_add_alpha():
    texture = np.random.default_rng(6).integers(0, 256, (3, 5, 3)).astype(np.uint8)
    pixels = mesh_arrays.texture_pixels(texture).reshape(3, 5, 4)
    np.testing.assert_allclose(pixels[::-1, :, :3] * 255, texture, atol=1e-4)  # Blender's row 0 is the bottom
    assert (pixels[..., 3] == 1).all()
    with pytest.raises(ValueError):
        mesh_arrays.texture_pixels(texture.astype(np.float32))


def test_empty_mesh_is_fine():
    arrays = mesh_arrays.prepare(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)))
    assert arrays.positions.size == arrays.corner_verts.size == arrays.loop_starts.size == arrays.rgba.size == 0


def test_png_round_trip_flips_rows_and_keeps_alpha(tmp_path):
    height, width = 3, 5
    rng = np.random.default_rng(1)
    top_first = rng.integers(0, 256, (height, width, 4)).astype(np.uint8)
    blender_pixels = (top_first[::-1].astype(np.float32) / 255).ravel()  # Blender: bottom row first
    path = tmp_path / "x.png"
    png.write_pixels(path, blender_pixels, width, height)
    with Image.open(path) as im:
        assert im.mode == "RGBA" and im.size == (width, height)
        np.testing.assert_array_equal(np.asarray(im), top_first)


def test_png_of_linear_pixels_is_converted_to_srgb(tmp_path):
    pixels = np.array([0.21586, 0.21586, 0.21586, 1.0], dtype=np.float32)
    path = tmp_path / "x.png"
    png.write_pixels(path, pixels, 1, 1, linear=True)
    with Image.open(path) as im:
        assert np.asarray(im)[0, 0].tolist() == [128, 128, 128, 255]


def test_png_chunks_are_well_formed():
    data = png.encode_rgba8(np.zeros((2, 2, 4), dtype=np.uint8))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[16 + length:20 + length])[0] == zlib.crc32(data[12:16 + length])
