"""Proposal selection and detection post-processing as pure tensor functions, in both frameworks' conventions.

Each framework difference is a named parameter; the defaults are detectron2's (the functions are named after
detectron2's), and each docstring gives the values that reproduce torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from maskrcnn.ops.boxes import batched_nms, clip_boxes_to_image, small_box_keep_mask


def find_top_rpn_proposals(
    proposals: Sequence[Tensor],
    logits: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float = 0.0,
    *,
    min_size_inclusive: bool = False,
    score_thresh: float | None = None,
    sigmoid_scores: bool = False,
    drop_non_finite: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per level, decoded boxes (N, A_l, 4) XYXY batch px and logits (N, A_l) -> per image boxes (P, 4), scores (P,).

    Per image: the top ``pre_nms_topk`` logits of each level, levels concatenated, boxes clipped to the image's
    (H, W), boxes with a side <= ``min_box_size`` dropped, NMS within each level, the first ``post_nms_topk``
    kept, in decreasing score order. The scores are the logits (detectron2) or their sigmoid.

    torchvision's ``RegionProposalNetwork.filter_proposals`` is ``min_box_size=1e-3, min_size_inclusive=True,
    score_thresh=0.0, sigmoid_scores=True, drop_non_finite=False``: its NMS ranks sigmoid probabilities, whose
    float32 ties (logits above ~17 all round to 1.0) order boxes by index rather than by logit.
    - ``min_size_inclusive``: keep sides >= ``min_box_size`` (torchvision) rather than > (detectron2's
      ``Boxes.nonempty``).
    - ``score_thresh``: keep scores >= it (after the sigmoid, if any); None skips the test.
    - ``drop_non_finite``: drop boxes or logits that are inf or NaN before clipping (detectron2 at test time).
    """
    if len(proposals) != len(logits):
        raise ValueError(f"{len(proposals)} proposal levels but {len(logits)} logit levels")
    device = logits[0].device
    top_scores, top_boxes, levels = [], [], []
    for level, (boxes_l, logits_l) in enumerate(zip(proposals, logits)):  # a loop over pyramid levels
        k = min(pre_nms_topk, logits_l.shape[1])
        scores_l, idx = logits_l.topk(k, dim=1)
        batch_idx = torch.arange(logits_l.shape[0], device=device)[:, None]
        top_boxes.append(boxes_l[batch_idx, idx])
        top_scores.append(scores_l)
        levels.append(torch.full((k,), level, dtype=torch.int64, device=device))
    all_scores = torch.cat(top_scores, dim=1)
    all_boxes = torch.cat(top_boxes, dim=1)
    all_levels = torch.cat(levels, dim=0)
    if sigmoid_scores:
        all_scores = torch.sigmoid(all_scores)
    out_boxes, out_scores = [], []
    for boxes, scores, size in zip(all_boxes, all_scores, image_sizes):  # a loop over the images of the batch
        lvl = all_levels
        if drop_non_finite:
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
        boxes = clip_boxes_to_image(boxes, size)
        keep = small_box_keep_mask(boxes, min_box_size, min_size_inclusive)
        if score_thresh is not None:
            keep &= scores >= score_thresh
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, nms_thresh)[:post_nms_topk]
        out_boxes.append(boxes[keep])
        out_scores.append(scores[keep])
    return out_boxes, out_scores


def fast_rcnn_inference_single_image(
    boxes: Tensor,
    scores: Tensor,
    image_shape: tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
    *,
    background_last: bool = True,
    min_box_size: float | None = None,
    drop_non_finite: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One image's box-head outputs -> boxes (D, 4) XYXY px of that image, scores (D,), classes (D,), rows (D,).

    ``boxes`` (R, 4C) are the decoded boxes of R proposals in the (resized) image of (H, W) ``image_shape``, with
    C = 1 (class-agnostic), K, or K + 1 (a box for the background column too, which is ignored); ``scores``
    (R, K + 1) are softmax probabilities. Boxes are clipped, candidates with score > ``score_thresh`` taken in
    row-major (proposal, class) order, NMS run per class, and the first ``topk_per_image`` (< 0: all) kept in
    decreasing score order. ``classes`` are column indices of ``scores`` without the background: 0..K-1 with
    ``background_last`` (detectron2), 1..K otherwise (torchvision's labels); they are also the NMS categories,
    whose values change the float rounding of batched NMS's coordinate offsets, so they must be the framework's.
    ``rows`` are the indices into the R proposals of each detection (detectron2 returns them counted after
    dropping non-finite rows; they are the same whenever every row is finite).

    torchvision's ``postprocess_detections`` is ``background_last=False, min_box_size=1e-2,
    drop_non_finite=False`` with ``boxes = box_coder.decode(deltas, proposals).reshape(R, -1)`` and ``scores =
    softmax(class_logits)``; ``min_box_size`` drops candidates with a side < it (None: no removal, detectron2).
    """
    num_rows = scores.shape[0]
    rows = torch.arange(num_rows, device=scores.device)
    if drop_non_finite:
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
        boxes, scores, rows = boxes[valid], scores[valid], rows[valid]
    num_classes = scores.shape[1] - 1
    num_box_classes = boxes.shape[1] // 4
    boxes = clip_boxes_to_image(boxes.reshape(-1, 4), image_shape).view(-1, num_box_classes, 4)
    first = 0 if background_last else 1
    fg_scores = scores[:, first:first + num_classes]
    if num_box_classes == num_classes + 1:
        boxes = boxes[:, first:first + num_classes]
    elif num_box_classes not in (1, num_classes):
        raise ValueError(f"{num_box_classes} boxes per proposal for {num_classes} classes")
    candidates = fg_scores > score_thresh  # (R, K): nonzero() walks it row-major, (proposal, class)
    inds = candidates.nonzero()
    boxes = boxes[inds[:, 0], 0] if num_box_classes == 1 else boxes[candidates]
    cand_scores = fg_scores[candidates]
    classes = inds[:, 1] + first
    if min_box_size is not None:
        keep = torch.where(small_box_keep_mask(boxes, min_box_size, inclusive=True))[0]
        boxes, cand_scores, classes, inds = boxes[keep], cand_scores[keep], classes[keep], inds[keep]
    keep = batched_nms(boxes, cand_scores, classes, nms_thresh)
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    return boxes[keep], cand_scores[keep], classes[keep], rows[inds[keep, 0]]


def detector_postprocess(
    boxes: Tensor,
    resized_size: tuple[int, int],
    output_size: tuple[int, int],
    keypoints: Tensor | None = None,
    *,
    clip: bool = True,
    drop_empty: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(D, 4) XYXY px of the (h, w) resized image -> (D', 4) XYXY px of the (H, W) output, keep (D,) bool, keypoints.

    Boxes are scaled by (W / w, H / h), computed in double precision and applied as float32 multiplies (as
    detectron2's ``Boxes.scale`` multiplies by Python floats), clipped to the output image, and the detections
    whose box is then empty (a side <= 0) dropped; ``keep`` marks the kept rows. ``keypoints`` (D, K, >= 2) get
    x and y scaled the same way (not clipped) and the same rows kept. ``clip=False, drop_empty=False`` skips the
    last two steps (torchvision does neither, and divides the sizes in float32).
    """
    scale_x = output_size[1] / resized_size[1]
    scale_y = output_size[0] / resized_size[0]
    scaled = boxes.clone()
    scaled[:, 0::2] *= scale_x
    scaled[:, 1::2] *= scale_y
    if clip:
        scaled = clip_boxes_to_image(scaled, output_size)
    if drop_empty:
        keep = small_box_keep_mask(scaled, 0.0, inclusive=False)
    else:
        keep = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if keypoints is not None:
        keypoints = keypoints.clone()
        keypoints[..., 0] *= scale_x
        keypoints[..., 1] *= scale_y
        keypoints = keypoints[keep]
    return scaled[keep], keep, keypoints
