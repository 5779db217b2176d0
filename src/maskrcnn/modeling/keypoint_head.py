"""Keypoint head (paper, Sec. 5): a conv3x3 tower on 14 x 14 RoI features, a 4 x 4 stride-2 transposed conv to K
heatmap logits and x2 bilinear upsampling (56 x 56); a softmax cross-entropy over the m^2 positions of each visible
keypoint in training, (x, y, score) per keypoint at test time.

Module names are torchvision's (``keypoint_head.{2i}``, ``keypoint_predictor.kps_score_lowres``), so its state
dicts load unchanged; detectron2's ``conv_fcn{i}`` and ``score_lowres`` are renamed by the weights converter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.keypoints import heatmaps_to_keypoints, keypoint_heatmap_targets


class KeypointRCNNHeads(nn.Sequential):
    """One conv3x3 (stride 1, padding 1) + ReLU per entry of ``conv_dims``: torchvision's ``KeypointRCNNHeads``."""

    def __init__(self, in_channels: int, conv_dims: Sequence[int]) -> None:
        """Convs of ``conv_dims`` output channels on ``in_channels`` inputs, Kaiming-normal (fan-out), zero bias."""
        layers: list[nn.Module] = []
        prev = in_channels
        for dim in conv_dims:
            conv = nn.Conv2d(prev, dim, 3, stride=1, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            prev = dim
        super().__init__(*layers)
        self.out_channels = prev


class KeypointRCNNPredictor(nn.Module):
    """Transposed conv (``deconv_kernel``, stride 2) to K logit maps, then bilinear upsampling by ``up_scale``."""

    def __init__(self, in_channels: int, num_keypoints: int, deconv_kernel: int = 4, up_scale: int = 2) -> None:
        """(R, in_channels, s, s) -> (R, num_keypoints, 2 s up_scale, 2 s up_scale) heatmap logits."""
        super().__init__()
        # padding k/2 - 1 with stride 2 gives exactly twice the input side for an even kernel.
        self.kps_score_lowres = nn.ConvTranspose2d(in_channels, num_keypoints, deconv_kernel, stride=2,
                                                   padding=deconv_kernel // 2 - 1)
        nn.init.kaiming_normal_(self.kps_score_lowres.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.kps_score_lowres.bias)
        self.up_scale = up_scale
        self.out_channels = num_keypoints

    def forward(self, x: Tensor) -> Tensor:
        """(R, C, s, s) tower features -> (R, K, m, m) heatmap logits, m = 2 s up_scale."""
        x = self.kps_score_lowres(x)
        # The given factor, not one recomputed from the sizes: what both frameworks pass to the kernel.
        return F.interpolate(x, scale_factor=float(self.up_scale), mode="bilinear", align_corners=False,
                             recompute_scale_factor=False)


def keypoint_loss(logits: Tensor, proposals: list[Tensor], gt_keypoints: list[Tensor], matched_idxs: list[Tensor],
                  normalizer: float | None = None) -> Tensor:
    """Softmax cross-entropy over the m x m positions of every visible keypoint inside its positive RoI.

    logits (R, K, m, m) of the positive RoIs of all images; per image: the RoIs (Ri, 4) XYXY px of the (resized)
    training image, its ground-truth keypoints (Gi, K, 3) [x, y, visibility] in the same pixels and each RoI's
    matched ground-truth index (Ri,). The summed loss is divided by the number of valid keypoints in the batch
    (``normalizer`` None, both frameworks' default) or by ``normalizer``. Zero (with gradient) when none is valid.
    """
    num_rois, num_kp, height, width = logits.shape
    if height != width:
        raise ValueError(f"keypoint heatmaps must be square, got {height} x {width}")
    targets, valid = [], []
    for rois, kps, idx in zip(proposals, gt_keypoints, matched_idxs):
        t, v = keypoint_heatmap_targets(kps[idx], rois, height)
        targets.append(t.reshape(-1))
        valid.append(v.reshape(-1))
    target = torch.cat(targets) if targets else logits.new_zeros((0,), dtype=torch.int64)
    keep = torch.where(torch.cat(valid))[0] if valid else target
    if keep.numel() == 0:
        return logits.sum() * 0
    flat = logits.reshape(num_rois * num_kp, height * width)
    loss = F.cross_entropy(flat[keep], target[keep], reduction="sum")
    return loss / (keep.numel() if normalizer is None else normalizer)


def keypoint_inference(logits: Tensor, boxes: list[Tensor]) -> list[Tensor]:
    """(D, K, m, m) logits of all images' detections and per-image (Di, 4) XYXY boxes -> per image (Di, K, 4).

    Columns: x, y in the boxes' pixels, the logit at the maximum and its softmax probability over the heatmap
    (see :func:`maskrcnn.ops.keypoints.heatmaps_to_keypoints`).
    """
    counts = [b.shape[0] for b in boxes]
    if not counts:
        return []
    decoded = heatmaps_to_keypoints(logits, torch.cat(boxes))
    return list(decoded.split(counts, dim=0))
