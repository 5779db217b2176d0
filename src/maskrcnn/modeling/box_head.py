"""Box head: RoI features -> class scores and per-class box deltas; its losses and test-time post-processing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.config import BoxHeadConfig
from maskrcnn.modeling.backbone import conv_stack, make_norm
from maskrcnn.ops.boxes import BoxCoder
from maskrcnn.ops.fused import linear_act
from maskrcnn.ops.postprocess import fast_rcnn_inference_single_image


class TwoMLPHead(nn.Module):
    """Flatten, then two fully connected layers with ReLU (torchvision v1, FPN paper)."""

    fast = False

    def __init__(self, in_features: int, fc_dim: int) -> None:
        """``in_features`` = C * 7 * 7 pooled inputs; ``fc_dim`` = 1024."""
        super().__init__()
        self.fc6 = nn.Linear(in_features, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.out_features = fc_dim

    def forward(self, x: Tensor) -> Tensor:
        """(R, C, 7, 7) -> (R, fc_dim)."""
        x = x.flatten(start_dim=1)
        if self.fast:
            return linear_act(linear_act(x, self.fc6, relu=True), self.fc7, relu=True)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class ConvFCHead(nn.Sequential):
    """``num_convs`` conv3x3+norm+ReLU, flatten, one FC + ReLU (torchvision v2's FastRCNNConvFCHead)."""

    fast = False

    def __init__(self, in_channels: int, resolution: int, cfg: BoxHeadConfig) -> None:
        """Convs of ``cfg.conv_dim`` channels, then an FC of ``cfg.fc_dim``; indices match torchvision's keys."""
        norm = None if cfg.norm == "none" else make_norm(cfg.norm, cfg.norm_eps)
        convs = conv_stack(in_channels, cfg.num_convs, cfg.conv_dim, norm)
        channels = cfg.conv_dim if convs else in_channels
        super().__init__(*convs, nn.Flatten(), nn.Linear(channels * resolution * resolution, cfg.fc_dim),
                         nn.ReLU(inplace=True))
        self.out_features = cfg.fc_dim

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """(R, C, 7, 7) -> (R, fc_dim)."""
        if not self.fast:
            return super().forward(x)
        *convs, flatten, fc, _ = self
        for conv in convs:
            x = conv(x)
        return linear_act(flatten(x), fc, relu=True)


def per_class_outputs(num_classes: int, background: str) -> int:
    """Channels of the per-class outputs (box deltas, mask logits): K+1 with the background first, else K."""
    return num_classes + 1 if background == "first" else num_classes


def class_channel(labels: Tensor, background: str) -> Tensor:
    """Foreground labels 1..K -> their index among the per-class outputs (box deltas, mask logits)."""
    return labels if background == "first" else labels - 1


def logit_target(labels: Tensor, num_classes: int, background: str) -> Tensor:
    """Labels 0..K (0 background) -> classifier targets: unchanged, or with the background at index K."""
    if background == "first":
        return labels
    return torch.where(labels > 0, labels - 1, torch.full_like(labels, num_classes))


class FastRCNNPredictor(nn.Module):
    """Linear classifier over K+1 classes and per-class box deltas: 4(K+1) (background first) or 4K (last)."""

    fast = False

    def __init__(self, in_features: int, num_classes_with_bg: int, background: str = "first") -> None:
        """``num_classes_with_bg`` includes the background class, at index 0 or K per ``background``."""
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes_with_bg)
        self.bbox_pred = nn.Linear(in_features, per_class_outputs(num_classes_with_bg - 1, background) * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, F) -> class logits (R, K+1) and deltas (R, 4(K+1)) or (R, 4K)."""
        x = x.flatten(start_dim=1)
        if self.fast:
            return linear_act(x, self.cls_score, relu=False), linear_act(x, self.bbox_pred, relu=False)
        return self.cls_score(x), self.bbox_pred(x)


def build_box_head(cfg: BoxHeadConfig, in_channels: int) -> nn.Module:
    """The box head named by ``cfg.head`` ("two_mlp" or "conv_fc") on ``in_channels`` x resolution^2 RoI features."""
    if cfg.head == "two_mlp":
        return TwoMLPHead(in_channels * cfg.pooler_resolution**2, cfg.fc_dim)
    if cfg.head == "conv_fc":
        return ConvFCHead(in_channels, cfg.pooler_resolution, cfg)
    raise ValueError(f"unknown box head {cfg.head!r}")


def fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                  regression_targets: list[Tensor], beta: float, background: str = "first") -> tuple[Tensor, Tensor]:
    """Cross-entropy over sampled RoIs and smooth-L1 on the GT class's deltas of positives (sum / #RoIs).

    ``labels`` per image (R_i,) in 0..K with 0 background, whatever ``background`` says of the logits' layout.
    """
    labels_t = torch.cat(labels, dim=0)
    targets_t = torch.cat(regression_targets, dim=0)
    num_classes = class_logits.shape[-1] - 1
    classification_loss = F.cross_entropy(class_logits, logit_target(labels_t, num_classes, background))
    pos = torch.where(labels_t > 0)[0]
    labels_pos = class_channel(labels_t[pos], background)
    n = class_logits.shape[0]
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(box_regression[pos, labels_pos], targets_t[pos], beta=beta, reduction="sum")
    return classification_loss, box_loss / max(labels_t.numel(), 1)


def postprocess_detections(class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                           image_sizes: list[tuple[int, int]], box_coder: BoxCoder, cfg: BoxHeadConfig,
                           score_thresh: float | None = None, background: str = "first") -> list[dict[str, Tensor]]:
    """Softmax, per-class decoding, clip, score threshold, optional small-box removal, per-class NMS, top-k.

    The selection is :func:`maskrcnn.ops.postprocess.fast_rcnn_inference_single_image` with this config's
    conventions. Returns per image {"boxes": (D, 4) XYXY resized-image pixels, "scores": (D,), "labels": (D,)
    int64 1..K}.
    """
    boxes_per_image = [p.shape[0] for p in proposals]
    pred_boxes = box_coder.decode(box_regression, torch.cat(proposals, dim=0))
    pred_scores = F.softmax(class_logits, -1)
    thresh = cfg.score_thresh if score_thresh is None else score_thresh
    last = background == "last"
    results = []
    for boxes, scores, size in zip(pred_boxes.split(boxes_per_image, 0), pred_scores.split(boxes_per_image, 0),
                                   image_sizes):  # a loop over the images of the batch
        boxes, scores, classes, _ = fast_rcnn_inference_single_image(
            boxes.reshape(boxes.shape[0], -1), scores, size, thresh, cfg.nms_thresh, cfg.detections_per_img,
            background_last=last, min_box_size=cfg.min_box_size, drop_non_finite=cfg.drop_non_finite)
        # The NMS categories above are the framework's own class indices; labels are 1..K either way.
        results.append({"boxes": boxes, "scores": scores, "labels": classes + 1 if last else classes})
    return results
