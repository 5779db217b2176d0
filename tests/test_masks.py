"""Mask ops: paste (torchvision legacy, exact), COCO codecs, and RoI mask targets."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from conftest import assert_close_f32, uncompressed_rle

from maskrcnn.ops.masks import (
    encode_rle,
    paste_masks,
    paste_masks_in_windows,
    polygons_to_bitmap,
    rle_to_bitmap,
    roi_mask_targets,
    segmentation_to_bitmap,
)


def _paste_one_reference(mask: torch.Tensor, box: torch.Tensor, h: int, w: int, padding: int = 1) -> torch.Tensor:
    """torchvision's per-box paste, written out with F.interpolate, for comparison."""
    m = mask.shape[-1]
    scale = float(m + 2 * padding) / m
    padded = F.pad(mask[None, None], (padding,) * 4)
    cx, cy = (box[2] + box[0]) * 0.5, (box[3] + box[1]) * 0.5
    hw, hh = (box[2] - box[0]) * 0.5 * scale, (box[3] - box[1]) * 0.5 * scale
    b = torch.stack([cx - hw, cy - hh, cx + hw, cy + hh]).to(torch.int64).tolist()
    bw, bh = max(b[2] - b[0] + 1, 1), max(b[3] - b[1] + 1, 1)
    res = F.interpolate(padded, size=(bh, bw), mode="bilinear", align_corners=False)[0, 0]
    out = torch.zeros(h, w)
    x0, x1, y0, y1 = max(b[0], 0), min(b[2] + 1, w), max(b[1], 0), min(b[3] + 1, h)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = res[y0 - b[1]:y1 - b[1], x0 - b[0]:x1 - b[0]]
    return out


def test_paste_matches_torchvision_reference(ops_fixture: dict) -> None:
    for c in ops_fixture["paste_masks"]:
        out = paste_masks(c["masks"], c["boxes"], tuple(c["image_shape"]), "legacy", c["padding"])
        assert_close_f32(out, c["output"], what="paste")


def test_paste_matches_per_box_interpolate() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 1, 28, 28, generator=g)
    xy = torch.rand(20, 2, generator=g) * 90 - 20
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 60], 1)
    boxes[0] = torch.tensor([30.0, 30.0, 29.0, 31.0])  # degenerate
    out = paste_masks(masks, boxes, (70, 80))
    for i in range(20):
        torch.testing.assert_close(out[i, 0], _paste_one_reference(masks[i, 0], boxes[i], 70, 80), atol=1e-5, rtol=0)


def test_paste_empty_and_grid_sample() -> None:
    assert paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (10, 12)).shape == (0, 1, 10, 12)
    ones = torch.ones(1, 1, 28, 28)
    out = paste_masks(ones, torch.tensor([[2.0, 3.0, 8.0, 9.0]]), (12, 12), mode="grid_sample")[0, 0]
    assert out[5, 5] == 1.0 and out[0, 0] == 0.0


def test_polygon_rle_codecs_round_trip() -> None:
    square = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]
    bm = polygons_to_bitmap(square, 16, 20)
    assert bm.shape == (16, 20) and bm.dtype == np.uint8 and 90 <= bm.sum() <= 121
    rle = encode_rle(torch.from_numpy(bm[None].astype(bool)))[0]
    assert isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_bitmap(rle, 16, 20), bm)
    assert np.array_equal(segmentation_to_bitmap(rle, 16, 20), bm)
    # Uncompressed RLE: column-major run lengths starting with zeros.
    runs = uncompressed_rle(bm)
    assert np.array_equal(segmentation_to_bitmap({"size": [16, 20], "counts": runs}, 16, 20), bm)


def test_roi_mask_targets_crop_and_resize() -> None:
    gt = torch.zeros(2, 40, 40, dtype=torch.uint8)
    gt[0, 10:30, 10:30] = 1
    gt[1, :, :20] = 1
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 40.0, 40.0]])
    t = roi_mask_targets(gt, boxes, torch.tensor([0, 1]), 28)
    assert t.shape == (2, 28, 28)
    # Legacy RoIAlign (aligned=False) samples half a pixel late, so the last row/column reaches past the object.
    assert torch.all(t[0, :-1, :-1] > 0.99) and 0.0 < t[0, -1, -1] < 0.5
    assert torch.all(t[1, :, :13] > 0.99) and torch.all(t[1, :, 14:] < 0.01)  # left half only


def _random_boxes(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """Boxes inside, across the border of and outside an (h, w) image, some tiny."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w * 0.2, h * 0.2])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6]) + 0.5
    return torch.cat([xy, xy + wh], 1)


def test_mask_crops_equal_the_windowed_paste() -> None:
    from maskrcnn.ops.masks import paste_mask_crops

    g = torch.Generator().manual_seed(0)
    h, w = 61, 90
    for mode, inclusive in (("legacy", False), ("grid_sample", True)):
        masks = torch.rand(40, 1, 28, 28, generator=g)
        boxes = _random_boxes(g, 40, h, w)
        dense = paste_masks_in_windows(masks, boxes, (h, w), mode, 1, threshold=0.5, threshold_inclusive=inclusive)
        crops = paste_mask_crops(masks, boxes, (h, w), mode, 1, threshold=0.5, threshold_inclusive=inclusive)
        assert crops.shape == (40, h, w) and torch.equal(crops.dense(), dense)
        # Memory: each window is at most its (grown) box, and it is held compressed.
        assert int(crops.sizes.prod(1).sum()) < 0.5 * dense.numel() and crops.nbytes() < 0.05 * dense.numel()
        for i in (0, 7, 39):
            assert torch.equal(crops[i], dense[i])
        keep = torch.arange(40) % 3 == 0
        assert torch.equal(crops[keep].dense(), dense[keep]) and torch.equal(crops[5:9].dense(), dense[5:9])
        assert torch.equal(crops.select(torch.tensor([3, 1])).dense(), dense[[3, 1]])
        # Used as a tensor, it is the dense tensor.
        assert torch.equal(crops, dense) and torch.equal(crops.any(0), dense.any(0))
        assert np.array_equal(np.asarray(crops), dense.numpy()) and torch.equal(crops.area(), dense.sum((1, 2)))
        assert crops.to_rle() == encode_rle(dense)
    empty = paste_mask_crops(torch.rand(0, 1, 28, 28), torch.zeros(0, 4), (5, 6))
    assert empty.shape == (0, 5, 6) and empty.dense().shape == (0, 5, 6) and empty.to_rle() == []


def test_crop_to_rle_matches_pycocotools_on_the_dense_mask() -> None:
    from maskrcnn.ops.masks import crop_to_rle

    rng = np.random.default_rng(0)
    for _ in range(500):
        big_h, big_w = int(rng.integers(1, 16)), int(rng.integers(1, 16))
        h, w = int(rng.integers(0, big_h + 1)), int(rng.integers(0, big_w + 1))
        y0, x0 = int(rng.integers(0, big_h - h + 1)), int(rng.integers(0, big_w - w + 1))
        crop = rng.random((h, w)) < rng.random()
        full = np.zeros((big_h, big_w), bool)
        full[y0:y0 + h, x0:x0 + w] = crop
        assert crop_to_rle(crop, x0, y0, big_h, big_w) == encode_rle(full[None])[0]
