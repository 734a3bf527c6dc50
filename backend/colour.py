"""sRGB <-> linear colour, the IEC 61966-2-1 curves Blender and glTF use (numpy only: both sides import it)."""

from __future__ import annotations

import numpy as np

GREY = 0.5  # sRGB: the colour of an object whose model makes none (never black)


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB display values in [0, 1] -> linear values."""
    c = np.clip(np.asarray(srgb, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(linear, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1 / 2.4) - 0.055).astype(np.float32)
