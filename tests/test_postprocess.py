"""ops.postprocess in torchvision's settings equals torchvision's RPN and box-head post-processing, bit for bit.

detectron2's settings are checked against its fixtures in tests/test_detectron2_ops.py. The model now runs these
functions, so the references here are torchvision's algorithms written out in the test (as the model ran them
before it switched over), not the model's own methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskrcnn.config import BoxHeadConfig, RPNConfig
from maskrcnn.ops.boxes import BoxCoder, batched_nms, clip_boxes_to_image, remove_small_boxes
from maskrcnn.ops.postprocess import detector_postprocess, fast_rcnn_inference_single_image, find_top_rpn_proposals


def _random_boxes(gen: torch.Generator, n: int, size: tuple[int, int], scale: float) -> torch.Tensor:
    h, w = size
    ctr = torch.rand(n, 2, generator=gen) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    wh = torch.rand(n, 2, generator=gen) * scale + 0.2
    return torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)


def _torchvision_filter_proposals(proposals: list[torch.Tensor], logits: list[torch.Tensor],
                                  image_sizes: list[tuple[int, int]], cfg: RPNConfig
                                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """torchvision's RegionProposalNetwork.filter_proposals: per-level top-k, sigmoid, clip, small boxes, NMS."""
    idx, offset = [], 0
    for lg in logits:
        k = min(cfg.pre_nms_top_n_test, lg.shape[1])
        idx.append(lg.topk(k, dim=1)[1] + offset)
        offset += lg.shape[1]
    idx = torch.cat(idx, dim=1)
    levels = torch.cat([torch.full((lg.shape[1],), i, dtype=torch.int64) for i, lg in enumerate(logits)])
    all_boxes, all_logits = torch.cat(proposals, 1), torch.cat(logits, 1)
    out_b, out_s = [], []
    for i, size in enumerate(image_sizes):
        boxes, probs, lvl = all_boxes[i, idx[i]], torch.sigmoid(all_logits[i, idx[i]]), levels[idx[i]]
        boxes = clip_boxes_to_image(boxes, size)
        keep = remove_small_boxes(boxes, cfg.min_box_size)
        boxes, probs, lvl = boxes[keep], probs[keep], lvl[keep]
        keep = torch.where(probs >= cfg.score_thresh)[0]
        boxes, probs, lvl = boxes[keep], probs[keep], lvl[keep]
        keep = batched_nms(boxes, probs, lvl, cfg.nms_thresh)[: cfg.post_nms_top_n_test]
        out_b.append(boxes[keep])
        out_s.append(probs[keep])
    return out_b, out_s


def _torchvision_postprocess(class_logits: torch.Tensor, box_regression: torch.Tensor,
                             proposals: list[torch.Tensor], image_sizes: list[tuple[int, int]], coder: BoxCoder,
                             cfg: BoxHeadConfig) -> list[dict[str, torch.Tensor]]:
    """torchvision's RoIHeads.postprocess_detections (background column 0, small-box removal)."""
    counts = [p.shape[0] for p in proposals]
    decoded = coder.decode(box_regression, torch.cat(proposals))
    probs = F.softmax(class_logits, -1)
    out = []
    for boxes, scores, size in zip(decoded.split(counts), probs.split(counts), image_sizes):
        boxes = clip_boxes_to_image(boxes, size)
        labels = torch.arange(scores.shape[1]).view(1, -1).expand_as(scores)
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        keep = torch.where(scores > cfg.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, cfg.min_box_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def test_find_top_rpn_proposals_reproduces_torchvision_filter_proposals() -> None:
    gen = torch.Generator().manual_seed(0)
    cfg = RPNConfig(pre_nms_top_n_test=300, post_nms_top_n_test=200)
    per_level = [1200, 300, 80, 20]
    image_sizes = [(96, 128), (120, 80)]
    proposals, logits = [], []
    for n in per_level:
        proposals.append(torch.stack([_random_boxes(gen, n, (128, 128), 60.0) for _ in image_sizes]))
        lg = torch.randn(len(image_sizes), n, generator=gen) * 4
        # Logits above ~17 all have sigmoid 1.0 in float32: torchvision's NMS then ranks them by index.
        lg[:, : n // 10] = 17.0 + torch.rand(len(image_sizes), n // 10, generator=gen) * 5
        lg[:, n // 10: n // 5] = lg[:, : n // 10]  # exact logit ties too
        logits.append(lg)
    want_boxes, want_scores = _torchvision_filter_proposals(proposals, logits, image_sizes, cfg)
    boxes, scores = find_top_rpn_proposals(proposals, logits, image_sizes, cfg.nms_thresh, cfg.pre_nms_top_n_test,
                                           cfg.post_nms_top_n_test, cfg.min_box_size, min_size_inclusive=True,
                                           score_thresh=cfg.score_thresh, sigmoid_scores=True,
                                           drop_non_finite=False)
    for b, s, wb, ws in zip(boxes, scores, want_boxes, want_scores, strict=True):
        assert b.shape[0] > 50
        assert torch.equal(b, wb)
        assert torch.equal(s, ws)
    # The sigmoid's ties change the NMS order: ranking the logits instead gives another list.
    by_logit, _ = find_top_rpn_proposals(proposals, logits, image_sizes, cfg.nms_thresh, cfg.pre_nms_top_n_test,
                                         cfg.post_nms_top_n_test, cfg.min_box_size, min_size_inclusive=True)
    assert not all(torch.equal(a, b) for a, b in zip(by_logit, boxes))


def test_fast_rcnn_inference_reproduces_torchvision_postprocess_detections() -> None:
    gen = torch.Generator().manual_seed(1)
    cfg = BoxHeadConfig()
    coder = BoxCoder(cfg.bbox_reg_weights)
    num_classes = 4  # background + 3
    image_sizes = [(100, 140), (90, 60)]
    proposals = [_random_boxes(gen, 150, s, 50.0) for s in image_sizes]
    class_logits = torch.randn(300, num_classes, generator=gen) * 3
    box_regression = torch.randn(300, 4 * num_classes, generator=gen)
    # Sub-pixel boxes, which torchvision's min_box_size removes.
    box_regression[:20, 2::4] = -8.0
    want = _torchvision_postprocess(class_logits, box_regression, proposals, image_sizes, coder, cfg)
    decoded = coder.decode(box_regression, torch.cat(proposals)).reshape(300, -1)
    probs = F.softmax(class_logits, -1)
    start = 0
    for props, size, w in zip(proposals, image_sizes, want, strict=True):
        rows = slice(start, start + props.shape[0])
        start += props.shape[0]
        boxes, scores, classes, kept = fast_rcnn_inference_single_image(
            decoded[rows], probs[rows], size, cfg.score_thresh, cfg.nms_thresh, cfg.detections_per_img,
            background_last=False, min_box_size=cfg.min_box_size, drop_non_finite=False)
        assert boxes.shape[0] > 10
        assert torch.equal(boxes, w["boxes"])
        assert torch.equal(scores, w["scores"])
        assert torch.equal(classes, w["labels"])
        # kept rows point at the proposals whose boxes, in the detection's class, became the detections.
        clipped = clip_boxes_to_image(decoded[rows].view(-1, num_classes, 4), size)
        assert torch.equal(clipped[kept, classes], boxes)


def test_fast_rcnn_inference_kept_rows_count_non_finite_rows() -> None:
    # Rows with NaN scores are dropped; the returned rows still index the input's rows.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0], [40.0, 40.0, 60.0, 50.0]])
    scores = torch.tensor([[float("nan"), 0.0], [0.9, 0.1], [0.8, 0.2]])
    out_boxes, out_scores, classes, kept = fast_rcnn_inference_single_image(boxes, scores, (100, 100), 0.05, 0.5, 10)
    assert kept.tolist() == [1, 2]
    assert classes.tolist() == [0, 0]
    assert torch.equal(out_boxes, boxes[1:])
    assert torch.equal(out_scores, torch.tensor([0.9, 0.8]))


def test_detector_postprocess_scales_clips_and_drops() -> None:
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [-5.0, 5.0, 700.0, 30.0], [300.0, 10.0, 330.0, 40.0]])
    kps = torch.tensor([[[10.0, 20.0, 0.5]], [[0.0, 0.0, 1.0]], [[1.0, 1.0, 1.0]]])
    out, keep, out_kps = detector_postprocess(boxes, (100, 200), (50, 150), kps)
    # scale (150/200, 50/100): the third box lies right of the 150 px output once scaled, and is dropped.
    assert keep.tolist() == [True, True, False]
    assert out.tolist() == [[7.5, 10.0, 37.5, 30.0], [0.0, 2.5, 150.0, 15.0]]
    assert out_kps is not None and out_kps[0].tolist() == [[7.5, 10.0, 0.5]]
    raw, keep_all, _ = detector_postprocess(boxes, (100, 200), (50, 150), clip=False, drop_empty=False)
    assert keep_all.all() and raw[2].tolist() == [225.0, 5.0, 247.5, 20.0]
