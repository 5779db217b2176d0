"""Mask operations: COCO polygons/RLE <-> bitmaps, RoI mask targets, and pasting RoI masks into images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def polygons_to_bitmap(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (lists of x,y in pixels) of one instance: (H, W) uint8 in {0, 1}."""
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)


def rle_to_bitmap(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (uncompressed ``counts`` list or compressed string): (H, W) uint8 in {0, 1}."""
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(np.uint8)


def segmentation_to_bitmap(segm: Any, height: int, width: int) -> np.ndarray:
    """Any COCO ``segmentation`` field (polygons, RLE or compressed RLE): (H, W) uint8 in {0, 1}."""
    if isinstance(segm, list):
        return polygons_to_bitmap(segm, height, width)
    if isinstance(segm, dict):
        return rle_to_bitmap(segm, height, width)
    raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")


def encode_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Encode (N, H, W) binary masks to compressed COCO RLEs with ``counts`` as a str (JSON-ready)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(arr)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles
