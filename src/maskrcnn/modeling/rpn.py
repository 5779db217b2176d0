"""Region Proposal Network: shared conv head, anchor decoding, per-level top-k, NMS, and its training losses."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.config import AnchorConfig, RPNConfig
from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.modeling.backbone import conv_norm_act
from maskrcnn.modeling.matcher import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    BalancedPositiveNegativeSampler,
    Matcher,
)
from maskrcnn.modeling.timing import stage
from maskrcnn.ops.boxes import BoxCoder, box_iou
from maskrcnn.ops.postprocess import find_top_rpn_proposals


class RPNHead(nn.Module):
    """``num_convs`` 3x3 conv+ReLU layers shared by all levels, then 1x1 objectness and box-delta convs."""

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 1) -> None:
        """A objectness logits and 4A deltas per position."""
        super().__init__()
        self.conv = nn.Sequential(*[conv_norm_act(in_channels, in_channels, 3, None, relu=True)
                                    for _ in range(num_convs)])
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level (N, C, H, W) -> objectness (N, A, H, W) and deltas (N, 4A, H, W)."""
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten_level(x: Tensor, n: int, a: int, c: int, h: int, w: int) -> Tensor:
    """(N, A*C, H, W) -> (N, H*W*A, C): position-major then anchor, matching the anchor order."""
    return x.view(n, -1, c, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, c)


def concat_box_prediction_layers(logits: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Flatten per-level predictions: objectness (N*sum HWA, 1) and deltas (N*sum HWA, 4)."""
    flat_cls, flat_reg = [], []
    for cls, reg in zip(logits, deltas):
        n, axc, h, w = cls.shape
        a = reg.shape[1] // 4
        c = axc // a
        flat_cls.append(_flatten_level(cls, n, a, c, h, w))
        flat_reg.append(_flatten_level(reg, n, a, 4, h, w))
    return torch.cat(flat_cls, dim=1).flatten(0, -2), torch.cat(flat_reg, dim=1).reshape(-1, 4)


class RegionProposalNetwork(nn.Module):
    """Proposals from anchors; in training also the objectness and box-regression losses."""

    def __init__(self, cfg: RPNConfig, anchor_cfg: AnchorConfig, in_channels: int, num_levels: int = 5) -> None:
        """Builds the anchor generator, the head and the training-time matcher/sampler from the configs.

        With one feature level (C4, DC5) every anchor size sits on it (15 anchors per position).
        """
        super().__init__()
        self.cfg = cfg
        sizes = anchor_cfg.sizes if num_levels > 1 else (tuple(anchor_cfg.sizes),)
        if anchor_cfg.strides and len(anchor_cfg.strides) != len(sizes):
            raise ValueError(f"model.anchors.strides gives {len(anchor_cfg.strides)} strides for {len(sizes)} feature "
                             f"level(s) of this layout: set one stride per level (e.g. [16] for C4 and DC5, "
                             f"[4, 8, 16, 32, 64] for FPN), or [] to derive them from the feature maps")
        self.anchor_generator = AnchorGenerator(
            dataclasses.replace(anchor_cfg, sizes=sizes), strides=anchor_cfg.strides or None,
            offset=anchor_cfg.offset, size_major=anchor_cfg.size_major,
            compute_dtype=torch.float64 if anchor_cfg.cell_dtype == "float64" else None)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors_per_location, cfg.num_convs)
        self.box_coder = BoxCoder(cfg.bbox_reg_weights)
        self.proposal_matcher = Matcher(cfg.fg_iou_thresh, cfg.bg_iou_thresh, cfg.allow_low_quality_matches)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(cfg.batch_size_per_image, cfg.positive_fraction)

    def _pre_nms_top_n(self) -> int:
        return self.cfg.pre_nms_top_n_train if self.training else self.cfg.pre_nms_top_n_test

    def _post_nms_top_n(self) -> int:
        return self.cfg.post_nms_top_n_train if self.training else self.cfg.post_nms_top_n_test

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """(N, A_total, 4) decoded anchors + logits -> per image (P, 4) XYXY proposals and (P,) scores.

        Top-k per level, clip to the image, drop small boxes, NMS within each level, keep the post-NMS top-n
        (:func:`maskrcnn.ops.postprocess.find_top_rpn_proposals`, with this config's conventions).
        """
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        c = self.cfg
        return find_top_rpn_proposals(
            list(proposals.split(num_anchors_per_level, 1)), list(objectness.split(num_anchors_per_level, 1)),
            image_sizes, c.nms_thresh, self._pre_nms_top_n(), self._post_nms_top_n(), c.min_box_size,
            min_size_inclusive=c.min_size_inclusive, score_thresh=c.score_thresh, sigmoid_scores=c.sigmoid_scores,
            drop_non_finite=c.drop_non_finite and not self.training)

    def assign_targets_to_anchors(self, anchors: Tensor, targets: list[dict[str, Tensor]]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: anchor labels (A_total,) float (1 fg, 0 bg, -1 ignore) and matched GT boxes (A_total, 4)."""
        labels, matched_gt_boxes = [], []
        for target in targets:
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:
                matched_gt_boxes.append(torch.zeros(anchors.shape, dtype=torch.float32, device=anchors.device))
                labels.append(torch.zeros((anchors.shape[0],), dtype=torch.float32, device=anchors.device))
                continue
            matched_idxs = self.proposal_matcher(box_iou(gt_boxes, anchors))
            matched_gt_boxes.append(gt_boxes[matched_idxs.clamp(min=0)])
            lab = (matched_idxs >= 0).to(torch.float32)
            lab[matched_idxs == BELOW_LOW_THRESHOLD] = 0.0
            lab[matched_idxs == BETWEEN_THRESHOLDS] = -1.0
            labels.append(lab)
        return labels, matched_gt_boxes

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor], generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
        """Binary cross-entropy over sampled anchors and smooth-L1 (beta 1/9) over the positive ones."""
        pos, neg = self.fg_bg_sampler(labels, generator)
        pos_inds = torch.where(torch.cat(pos, dim=0))[0]
        neg_inds = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos_inds, neg_inds], dim=0)
        objectness = objectness.flatten()
        labels_t = torch.cat(labels, dim=0)
        targets_t = torch.cat(regression_targets, dim=0)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos_inds], targets_t[pos_inds], beta=self.cfg.smooth_l1_beta,
                                    reduction="sum") / max(sampled.numel(), 1)
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels_t[sampled])
        return obj_loss, box_loss

    def forward(self, features: list[Tensor], batch_shape: tuple[int, int], image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None, generator: torch.Generator | None = None
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Per-level features of a padded batch -> per image proposals (P, 4) XYXY resized-image pixels, losses."""
        with stage("rpn.head"):
            logits, deltas = self.head(features)
            # Under autocast the head's outputs are half precision; proposals are decoded and ranked in float32
            # (a no-op otherwise), as half precision cannot hold pixel coordinates of a large image.
            logits, deltas = [t.float() for t in logits], [t.float() for t in deltas]
        with stage("rpn.proposals"):
            boxes, anchors, objectness, pred_bbox_deltas = self._proposals(features, batch_shape, image_sizes,
                                                                           logits, deltas)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = [self.box_coder.encode(m, anchors) for m in matched_gt_boxes]
            loss_obj, loss_reg = self.compute_loss(objectness, pred_bbox_deltas, labels, regression_targets,
                                                   generator)
            losses = {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_reg}
        return boxes, losses

    def _proposals(self, features: list[Tensor], batch_shape: tuple[int, int], image_sizes: list[tuple[int, int]],
                   logits: list[Tensor], deltas: list[Tensor]) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """Head outputs -> per-image proposals, the anchors, flat objectness and flat deltas."""
        anchors = self.anchor_generator(batch_shape, [tuple(f.shape[-2:]) for f in features],
                                        features[0].dtype, features[0].device)
        num_images = features[0].shape[0]
        num_anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in logits]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(logits, deltas)
        all_anchors = anchors.repeat(num_images, 1)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), all_anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, image_sizes, num_anchors_per_level)
        return boxes, anchors, objectness, pred_bbox_deltas

