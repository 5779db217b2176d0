"""Box operations on (N, 4) XYXY tensors: area, IoU, clipping, filtering, regression coding and NMS.

The arithmetic follows torchvision's ``box_ops``/``det_utils`` and its NMS kernel operation by operation, so that
results agree to the last bit where the same float operations are performed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskrcnn.config import BBOX_XFORM_CLIP


def box_area(boxes: Tensor) -> Tensor:
    """Areas of (N, 4) XYXY boxes: (N,), in squared pixels (no +1)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) XYXY boxes: (N, M)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / union


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp (..., 4) XYXY boxes to an image of (height, width) pixels."""
    dim = boxes.dim()
    boxes_x = boxes[..., 0::2]
    boxes_y = boxes[..., 1::2]
    height, width = size
    boxes_x = boxes_x.clamp(min=0, max=width)
    boxes_y = boxes_y.clamp(min=0, max=height)
    return torch.stack((boxes_x, boxes_y), dim=dim).reshape(boxes.shape)


def small_box_keep_mask(boxes: Tensor, min_size: float, inclusive: bool = True) -> Tensor:
    """(N,) bool of (N, 4) XYXY boxes whose width and height are both >= ``min_size`` px (> when not inclusive).

    torchvision's ``remove_small_boxes`` compares with >=; detectron2's ``Boxes.nonempty(threshold)`` with >,
    so with ``min_size`` 0 it drops exactly the empty (zero-width or zero-height) boxes.
    """
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    if inclusive:
        return (ws >= min_size) & (hs >= min_size)
    return (ws > min_size) & (hs > min_size)


def remove_small_boxes(boxes: Tensor, min_size: float, inclusive: bool = True) -> Tensor:
    """Indices (K,) of (N, 4) XYXY boxes whose width and height are both >= ``min_size`` px (> if not inclusive)."""
    return torch.where(small_box_keep_mask(boxes, min_size, inclusive))[0]


class BoxCoder:
    """Encodes XYXY boxes as (dx, dy, dw, dh) deltas relative to reference boxes, and decodes them back."""

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = BBOX_XFORM_CLIP) -> None:
        """``weights`` scale (dx, dy, dw, dh); ``bbox_xform_clip`` caps dw/dh before exp (log(1000/16))."""
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Deltas (N, 4) that turn (N, 4) ``proposals`` into (N, 4) ``reference_boxes`` (both XYXY pixels)."""
        wx, wy, ww, wh = self.weights
        ex_widths = proposals[:, 2] - proposals[:, 0]
        ex_heights = proposals[:, 3] - proposals[:, 1]
        ex_ctr_x = proposals[:, 0] + 0.5 * ex_widths
        ex_ctr_y = proposals[:, 1] + 0.5 * ex_heights
        gt_widths = reference_boxes[:, 2] - reference_boxes[:, 0]
        gt_heights = reference_boxes[:, 3] - reference_boxes[:, 1]
        gt_ctr_x = reference_boxes[:, 0] + 0.5 * gt_widths
        gt_ctr_y = reference_boxes[:, 1] + 0.5 * gt_heights
        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Apply (N, 4*C) deltas to (N, 4) XYXY boxes: (N, C, 4) XYXY boxes (dw, dh clamped)."""
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = rel_codes[:, 2::4] / ww
        dh = rel_codes[:, 3::4] / wh
        dw = torch.clamp(dw, max=self.bbox_xform_clip)
        dh = torch.clamp(dh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        half_h = 0.5 * pred_h
        half_w = 0.5 * pred_w
        out = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)
        return out.reshape(boxes.shape[0], rel_codes.shape[1] // 4, 4)


# ---------------------------------------------------------------------------------------------------
# Non-maximum suppression


NMS_BLOCK = 256  # rows of the suppression matrix built at a time: a few MB of temporaries, cache-sized


def _suppression_rows(boxes: Tensor, areas: Tensor, start: int, stop: int, iou_threshold: float) -> Tensor:
    """(stop - start, N - start) bool: box i in [start, stop) suppresses box j >= start (j > i) when IoU > thr.

    The IoU is computed exactly as torchvision's NMS kernel does (areas first, then inter / (a_i + a_j - inter)),
    so that decisions at the threshold agree bit for bit.
    """
    rows, cols = boxes[start:stop], boxes[start:]
    xx1 = torch.max(rows[:, 0:1], cols[None, :, 0])
    yy1 = torch.max(rows[:, 1:2], cols[None, :, 1])
    w = (torch.min(rows[:, 2:3], cols[None, :, 2]) - xx1).clamp_(min=0)
    h = (torch.min(rows[:, 3:4], cols[None, :, 3]) - yy1).clamp_(min=0)
    inter = w.mul_(h)
    iou = inter / (areas[start:stop, None] + areas[None, start:] - inter)
    return torch.triu(iou > iou_threshold, diagonal=1)


def _greedy_keep(suppress: Tensor, keep: Tensor) -> Tensor:
    """Greedy NMS on an upper-triangular (B, B) suppression matrix among candidates ``keep`` (B,) bool.

    Greedy NMS keeps box j iff it is a candidate and no *kept* box before it suppresses it. Iterating
    ``keep <- candidate and not any_i(keep_i and S_ij)`` from the candidates fixes one more prefix element per
    round and stops at the greedy solution (Cluster-NMS, Zheng et al. 2021); rounds are whole-matrix ops, so
    this runs as a few vectorised steps on CPU or GPU instead of a Python loop over boxes.
    """
    candidate = keep
    s = suppress.to(torch.float32)
    for _ in range(suppress.shape[0]):
        new_keep = candidate & ((keep.to(torch.float32) @ s) == 0)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def _nms_sorted(boxes: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of (N, 4) boxes already in decreasing score order: (N,) bool keep mask.

    Row blocks of the suppression matrix are built in order: a block's boxes are settled by the greedy rule
    among the candidates earlier blocks left, then its kept boxes remove the later boxes they overlap. The
    result equals greedy NMS over the whole matrix, with half the IoUs (the upper triangle) and temporaries
    small enough to stay in cache.
    """
    n = boxes.shape[0]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    for start in range(0, n, NMS_BLOCK):  # a loop over blocks of NMS_BLOCK boxes
        stop = min(start + NMS_BLOCK, n)
        sup = _suppression_rows(boxes, areas, start, stop, iou_threshold)
        block = _greedy_keep(sup[:, : stop - start], keep[start:stop])
        keep[start:stop] = block
        if stop < n:
            keep[stop:] &= (block.to(torch.float32) @ sup[:, stop - start:].to(torch.float32)) == 0
    return keep


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS over (N, 4) XYXY boxes: kept indices (K,) in decreasing score order (ties: lower index first)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    return order[_nms_sorted(boxes[order], iou_threshold)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS applied independently per category ``idxs``: kept indices (K,) sorted by decreasing score.

    Mirrors torchvision's dispatch: small inputs shift each category's boxes apart by an offset and run one NMS
    (the offset changes the float rounding of the IoU, so we must do the same to agree at the threshold); large
    inputs run one NMS per category.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 20000):
        max_coordinate = boxes.max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):  # a loop over categories, not boxes
        curr = torch.where(idxs == class_id)[0]
        keep_mask[curr[nms(boxes[curr], scores[curr], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True).indices]

