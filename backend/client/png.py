"""Write Blender image pixels to a PNG file for the worker, with numpy and zlib only.

Used for images that are not a readable file on disk (packed, generated, rendered). Blender's pixel
buffer is float RGBA, bottom row first; PNG is top row first.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from ..colour import linear_to_srgb


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_rgba8(rgba: np.ndarray) -> bytes:
    """(H, W, 4) uint8, top row first -> PNG bytes."""
    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    height, width = rgba.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgba.reshape(height, width * 4)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))


def pixels_to_rgba8(pixels: np.ndarray, width: int, height: int, linear: bool) -> np.ndarray:
    """Blender's flat float pixels (bottom row first) -> (H, W, 4) uint8 sRGB, top row first.

    ``linear``: the buffer holds linear values (float images); byte images hold display values already.
    """
    rgba = np.asarray(pixels, dtype=np.float32).reshape(height, width, 4)[::-1].copy()
    if linear:
        rgba[..., :3] = linear_to_srgb(rgba[..., :3])
    return np.clip(np.rint(rgba * 255.0), 0, 255).astype(np.uint8)


def write_pixels(path, pixels: np.ndarray, width: int, height: int, linear: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(encode_rgba8(pixels_to_rgba8(pixels, width, height, linear)))
