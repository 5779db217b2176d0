"""Box ops against torchvision's reference outputs and brute-force code written here."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_f32

from maskrcnn.ops import boxes as boxes_mod
from maskrcnn.ops.boxes import (
    BoxCoder,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes_to_image,
    nms,
    remove_small_boxes,
)


def _brute_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    b = boxes.tolist()
    s = scores.tolist()
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    keep: list[int] = []
    removed = set()
    for a, i in enumerate(order):
        if i in removed:
            continue
        keep.append(i)
        for j in order[a + 1:]:
            inter = max(min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]), 0.0) * \
                max(min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]), 0.0)
            ai = (b[i][2] - b[i][0]) * (b[i][3] - b[i][1])
            aj = (b[j][2] - b[j][0]) * (b[j][3] - b[j][1])
            if inter / (ai + aj - inter) > thr:
                removed.add(j)
    return keep


def test_iou_and_area_match_reference(ops_fixture: dict) -> None:
    c = ops_fixture["box_iou"]
    assert_close_f32(box_iou(c["boxes1"], c["boxes2"]), c["iou"], what="iou")
    assert_close_f32(box_area(c["boxes1"]), c["area1"], what="area")


def test_box_coder_matches_reference(ops_fixture: dict) -> None:
    for c in ops_fixture["box_coder"]:
        coder = BoxCoder(tuple(c["weights"]), c["bbox_xform_clip"])
        assert_close_f32(coder.encode(c["reference_boxes"], c["proposals"]), c["encoded"], what="encode")
        assert_close_f32(coder.decode(c["rel_codes"], c["proposals"]), c["decoded"], what="decode")


def test_box_coder_round_trip_and_clamp() -> None:
    g = torch.Generator().manual_seed(0)
    props = torch.rand(50, 2, generator=g) * 100
    props = torch.cat([props, props + 1 + torch.rand(50, 2, generator=g) * 50], 1)
    gt = torch.rand(50, 2, generator=g) * 100
    gt = torch.cat([gt, gt + 1 + torch.rand(50, 2, generator=g) * 50], 1)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    back = coder.decode(coder.encode(gt, props), props)[:, 0]
    torch.testing.assert_close(back, gt, atol=1e-3, rtol=1e-5)
    huge = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    out = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), huge)[0, 0]
    # dw is capped at log(1000/16): the box grows at most 62.5x.
    assert torch.allclose(out[2] - out[0], torch.tensor(100 * 1000 / 16.0))


def test_nms_keep_lists_identical(ops_fixture: dict) -> None:
    for c in ops_fixture["nms"]:
        assert torch.equal(nms(c["boxes"], c["scores"], c["iou_threshold"]), c["keep"])
        assert torch.equal(batched_nms(c["boxes"], c["scores"], c["idxs"], c["iou_threshold"]), c["keep_batched"])


@pytest.mark.parametrize("block", [7, 64, 256])
def test_nms_equals_brute_force_with_ties(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy NMS, whatever the row-block size of the suppression matrix (one block, several, many)."""
    monkeypatch.setattr(boxes_mod, "NMS_BLOCK", block)
    g = torch.Generator().manual_seed(3)
    for n, thr, spread in [(1, 0.5, 60), (30, 0.3, 60), (120, 0.5, 60), (300, 0.7, 60), (400, 0.5, 8)]:
        xy = torch.rand(n, 2, generator=g) * spread  # spread 8: long suppression chains across blocks
        boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], 1)
        scores = (torch.rand(n, generator=g) * 10).round() / 10  # many exact ties
        boxes[n // 2:n // 2 + 3] = boxes[0]  # identical boxes
        assert nms(boxes, scores, thr).tolist() == _brute_nms(boxes, scores, thr)


def test_batched_nms_large_input_path_matches_per_class() -> None:
    g = torch.Generator().manual_seed(1)
    n = 1500  # > 4000 coordinates: the per-category path
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 40], 1)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, 4, (n,), generator=g)
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = []
    for k in range(4):
        sel = torch.where(idxs == k)[0]
        expected += sel[torch.tensor(_brute_nms(boxes[sel], scores[sel], 0.5), dtype=torch.long)].tolist()
    assert sorted(keep.tolist()) == sorted(expected)
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])


def test_nms_empty() -> None:
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)


def test_clip_and_remove_small() -> None:
    boxes = torch.tensor([[-5.0, -2.0, 50.0, 70.0], [10.0, 10.0, 10.5, 30.0], [0.0, 0.0, 3.0, 3.0]])
    clipped = clip_boxes_to_image(boxes, (60, 40))
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 60.0], [10.0, 10.0, 10.5, 30.0], [0.0, 0.0, 3.0, 3.0]]
    assert remove_small_boxes(clipped, 1.0).tolist() == [0, 2]
