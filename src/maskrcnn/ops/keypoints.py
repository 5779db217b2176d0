"""Keypoints as one-hot heatmaps (paper, Sec. 5): training targets from RoIs, and decoding heatmap logits to
(x, y, score), as torchvision and detectron2 do both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def heatmaps_to_keypoints(maps: Tensor, rois: Tensor, min_size: float = 1.0) -> Tensor:
    """Logits (R, K, Hm, Wm) over (R, 4) XYXY px boxes -> (R, K, 4): x, y (px of the boxes' image), logit, score.

    Each box's maps are resized bicubically (``F.interpolate``, align_corners=False) to
    (ceil(max(h, ``min_size``)), ceil(max(w, ``min_size``))) pixels; the first maximum (row-major) of each map
    gives (ix, iy), and x = (ix + 0.5) * w / ceil(w) + x0 (w clamped as above), the same in y.
    - column 2 is the resized map's value at the maximum: torchvision's keypoint score (a logit);
    - column 3 is detectron2's score, exp(v - m) / sum(exp(heatmap - m)) with m the resized map's maximum and
      the sum over the (Hm, Wm) heatmap: a softmax normalised at the heatmap's resolution, so that boxes of
      different sizes get comparable scores. With huge logits the sum can underflow to 0 (score inf).
    torchvision's keypoints are columns (0, 1) with a third value of 1, and its scores column 2; detectron2's
    ``pred_keypoints`` are columns (0, 1, 3).
    """
    maps = maps.detach()
    rois = rois.detach()
    num_rois, num_kp = maps.shape[:2]
    out = maps.new_zeros((num_rois, num_kp, 4))
    if num_rois == 0:
        return out
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=min_size)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=min_size)
    widths_ceil = widths.ceil()
    heights_ceil = heights.ceil()
    # One host sync: the resized sizes decide tensor shapes.
    sizes = torch.stack([heights_ceil, widths_ceil], dim=1).to(torch.int64)
    size_list = [tuple(s) for s in sizes.tolist()]
    max_h, max_w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    # Every resized map, padded with -inf to the largest: row-major argmax over the padded grid visits each
    # map's own pixels in the same order, so it finds the same first maximum.
    resized = maps.new_full((num_rois, num_kp, max_h, max_w), float("-inf"))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(size_list):
        groups.setdefault(s, []).append(i)
    for (h, w), members in groups.items():  # a loop over distinct output sizes: interpolate takes one per call
        idx = torch.tensor(members, device=maps.device)
        # F.interpolate computes every output element independently, so a group's batch gives each box's values.
        resized[idx, :, :h, :w] = F.interpolate(maps[idx], size=(h, w), mode="bicubic", align_corners=False)
    flat = resized.flatten(2)
    max_vals = flat.amax(dim=2)
    pos = flat.argmax(dim=2)  # argmax returns the first of tied maxima
    stride = max_w
    x_int = pos % stride
    y_int = torch.div(pos - x_int, stride, rounding_mode="floor")
    x = (x_int.to(maps.dtype) + 0.5) * (widths / widths_ceil)[:, None]
    y = (y_int.to(maps.dtype) + 0.5) * (heights / heights_ceil)[:, None]
    out[:, :, 0] = x + rois[:, 0:1]
    out[:, :, 1] = y + rois[:, 1:2]
    out[:, :, 2] = max_vals
    # exp(v - m) at the maximum is exp(0) = 1 exactly, so the score is 1 / sum(exp(heatmap - m)).
    denom = (maps - max_vals[:, :, None, None]).exp().sum((2, 3))
    out[:, :, 3] = 1.0 / denom
    return out


def keypoint_heatmap_targets(keypoints: Tensor, rois: Tensor, heatmap_size: int) -> tuple[Tensor, Tensor]:
    """(R, K, 3) keypoints [x, y, visibility] and (R, 4) XYXY RoIs, both px of one image -> targets and validity.

    Each keypoint is mapped into its RoI's ``heatmap_size`` x ``heatmap_size`` grid: the cell is
    floor((x - x0) * m / (x1 - x0)), the same in y, so the half-open [x0, x1) maps onto 0..m-1 and a keypoint
    exactly on the right or bottom edge is put in the last cell. Returns the row-major cell index (R, K) int64
    (0 where invalid) and (R, K) bool: visible (v > 0) and inside the RoI. The frameworks' arithmetic, in order.
    """
    if rois.numel() == 0:
        return rois.new_zeros((0, keypoints.shape[1]), dtype=torch.int64), rois.new_zeros(
            (0, keypoints.shape[1]), dtype=torch.bool)
    offset_x = rois[:, 0][:, None]
    offset_y = rois[:, 1][:, None]
    scale_x = (heatmap_size / (rois[:, 2] - rois[:, 0]))[:, None]
    scale_y = (heatmap_size / (rois[:, 3] - rois[:, 1]))[:, None]
    x = keypoints[..., 0]
    y = keypoints[..., 1]
    on_right = x == rois[:, 2][:, None]
    on_bottom = y == rois[:, 3][:, None]
    xi = ((x - offset_x) * scale_x).floor().long()
    yi = ((y - offset_y) * scale_y).floor().long()
    xi[on_right] = heatmap_size - 1
    yi[on_bottom] = heatmap_size - 1
    valid = (xi >= 0) & (yi >= 0) & (xi < heatmap_size) & (yi < heatmap_size) & (keypoints[..., 2] > 0)
    return (yi * heatmap_size + xi) * valid, valid
