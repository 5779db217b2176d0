"""Shortest-edge resizing arithmetic shared by the model's preprocessing and the data transforms."""

from __future__ import annotations

import math


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """Scale factor bringing the short side to ``min_size`` unless the long side would pass ``max_size``.

    Computed with Python floats (double precision), as torchvision does in eager mode, so the resized size
    agrees to the pixel (a float32 division can land just under a whole size and lose a row: 320/400 in float32
    is 0.79999995, and floor(400 * 0.79999995) = 319).
    """
    return min(float(min_size) / min(height, width), float(max_size) / max(height, width))


def resized_size(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """(H, W) after resizing by :func:`resize_scale`, as ``F.interpolate(recompute_scale_factor=True)`` floors it."""
    scale = resize_scale(height, width, min_size, max_size)
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
