"""Keypoint decoding: torchvision's keypointrcnn fixture, and properties of the decoding written out here.

detectron2's decoding is checked against its ops.pt cases in tests/test_detectron2_ops.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import _missing

from maskrcnn.ops.keypoints import heatmaps_to_keypoints


def test_heatmaps_to_keypoints_matches_torchvision_keypointrcnn(fixtures_dir: Path) -> None:
    path = fixtures_dir / "torchvision" / "keypointrcnn_r50_fpn" / "expected.pt"
    if not path.is_file():
        _missing(f"keypoint fixture not found at {path}")
    rec = torch.load(path, weights_only=True)["images"][0]
    maps = rec["keypoint_heatmaps"]  # the first two detections' 56 x 56 logits
    n = maps.shape[0]
    (in_h, in_w), (rs_h, rs_w) = rec["input_size"], rec["resized_size"]
    # torchvision's transform.postprocess scales by float32 (input / resized) ratios.
    ratio_h = torch.tensor(in_h, dtype=torch.float32) / torch.tensor(rs_h, dtype=torch.float32)
    ratio_w = torch.tensor(in_w, dtype=torch.float32) / torch.tensor(rs_w, dtype=torch.float32)
    # The fixture stores boxes in input pixels; the decoding saw them in resized pixels. Dividing the scaling back
    # out is exact to ~1 ulp of the coordinates (3e-5 px here), which moves x0 + (ix + 0.5) * w / ceil(w) by as
    # much, but not ceil(w) or ceil(h) (no side is within 1e-3 px of an integer), so the argmax and the score are
    # unchanged.
    boxes = rec["boxes"][:n].clone()
    boxes[:, 0::2] /= ratio_w
    boxes[:, 1::2] /= ratio_h
    sides = torch.cat([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    assert ((sides - sides.round()).abs() > 1e-3).all()
    out = heatmaps_to_keypoints(maps, boxes)
    x = out[..., 0] * ratio_w
    y = out[..., 1] * ratio_h
    want = rec["keypoints"][:n]
    assert (x - want[..., 0]).abs().max() <= 1e-4
    assert (y - want[..., 1]).abs().max() <= 1e-4
    assert torch.equal(want[..., 2], torch.ones_like(want[..., 2]))
    assert torch.equal(out[..., 2], rec["keypoints_scores"][:n])


def test_heatmaps_to_keypoints_geometry_and_scores() -> None:
    # One hot pixel per map: a box of exactly 56 x 56 px keeps the map's grid, so the keypoint lands on that
    # pixel's centre; detectron2's score is 1 / sum(exp(map - max)), torchvision's the value at the maximum.
    maps = torch.full((1, 2, 56, 56), -5.0)
    maps[0, 0, 10, 20] = 3.0
    maps[0, 1, 40, 7] = 2.0
    boxes = torch.tensor([[100.0, 50.0, 156.0, 106.0]])
    out = heatmaps_to_keypoints(maps, boxes)
    assert out[0, :, :2].tolist() == [[120.5, 60.5], [107.5, 90.5]]
    assert out[0, :, 2].tolist() == [3.0, 2.0]
    want = [1.0 / (1.0 + 3135 * torch.exp(torch.tensor(-d)).item()) for d in (8.0, 7.0)]
    torch.testing.assert_close(out[0, :, 3], torch.tensor(want), rtol=1e-6, atol=0)
    # A box under a pixel is decoded on a 1 x 1 map (sides clamp to 1), at its top-left corner + 0.5 px.
    tiny = heatmaps_to_keypoints(maps, torch.tensor([[3.0, 4.0, 3.25, 4.5]]))
    assert tiny[0, :, :2].tolist() == [[3.5, 4.5], [3.5, 4.5]]
    assert heatmaps_to_keypoints(maps[:0], boxes[:0]).shape == (0, 2, 4)


def test_heatmaps_to_keypoints_boxes_of_mixed_sizes_equal_one_at_a_time() -> None:
    # Boxes are grouped by resized size; each must get what decoding it alone gives.
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 3, 56, 56, generator=gen) * 5
    boxes = torch.tensor([[0.0, 0.0, 30.5, 40.0], [10.0, 5.0, 40.5, 45.0], [1.0, 2.0, 200.0, 30.0],
                          [0.0, 0.0, 0.5, 0.5], [7.0, 3.0, 37.2, 43.0], [50.0, 60.0, 56.0, 300.0]])
    together = heatmaps_to_keypoints(maps, boxes)
    alone = torch.cat([heatmaps_to_keypoints(maps[i: i + 1], boxes[i: i + 1]) for i in range(6)])
    assert torch.equal(together, alone)
