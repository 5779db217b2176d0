"""Batching of (image, target) samples into lists (images keep their own sizes; the model pads them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """[(image (3,H_i,W_i), target_i), ...] -> ([image_i, ...], [target_i, ...]) without stacking or padding."""
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets
