"""The bpy-free helpers of the Blender side: placement, scaling, colour conversion, PNG writing."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core import mesh_arrays, png


def test_srgb_to_linear_matches_the_standard_curve():
    srgb = np.array([0.0, 0.04045, 0.5, 1.0], dtype=np.float32)
    expected = [0.0, 0.04045 / 12.92, ((0.5 + 0.055) / 1.055) ** 2.4, 1.0]
    np.testing.assert_allclose(mesh_arrays.srgb_to_linear(srgb), expected, rtol=1e-6)
    values = np.linspace(0, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(mesh_arrays.linear_to_srgb(mesh_arrays.srgb_to_linear(values)), values, atol=1e-5)


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
    positions, corners, starts, rgba = mesh_arrays.prepare(vertices, faces, colors, target_height=2.0)
    assert positions.dtype == np.float32 and positions.shape == (12,)
    assert corners.dtype == np.int32 and corners.tolist() == [0, 2, 1, 0, 1, 3]
    assert starts.tolist() == [0, 3]
    assert rgba.shape == (16,) and rgba[3] == 1.0
    assert positions.reshape(-1, 3)[:, 2].max() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        mesh_arrays.prepare(vertices, np.array([[0, 1, 9]]), colors)


def test_empty_mesh_is_fine():
    positions, corners, starts, rgba = mesh_arrays.prepare(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)))
    assert positions.size == corners.size == starts.size == rgba.size == 0


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
