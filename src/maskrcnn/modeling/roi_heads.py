"""RoI heads: proposal sampling in training, then the parallel box, mask and keypoint branches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.config import ModelConfig
from maskrcnn.modeling.box_head import (
    FastRCNNPredictor,
    build_box_head,
    fastrcnn_loss,
    postprocess_detections,
)
from maskrcnn.modeling.keypoint_head import KeypointRCNNHeads, KeypointRCNNPredictor, keypoint_inference, keypoint_loss
from maskrcnn.modeling.mask_head import (
    background_channel,
    build_mask_head,
    mask_channel,
    mask_channels,
    maskrcnn_inference,
    maskrcnn_loss,
    own_channel_logits,
)
from maskrcnn.modeling.matcher import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, BalancedPositiveNegativeSampler, Matcher
from maskrcnn.modeling.poolers import MultiScaleRoIAlign
from maskrcnn.modeling.res5_head import AvgPoolHead, build_res5, res5_out_channels
from maskrcnn.modeling.timing import stage
from maskrcnn.ops.boxes import BoxCoder, box_iou

FPN_LEVELS = ["0", "1", "2", "3"]


class RoIHeads(nn.Module):
    """Box branch (classification + regression), mask and keypoint branches over RoIs pooled from the backbone.

    FPN and DC5 layouts pool each branch's RoIs from the feature levels (P2..P5, or res5) into its own head. In
    the C4 layout both branches pool from res4 and run ``res5`` (the last ResNet stage) on their RoIs: the box
    branch averages its output, the mask branch deconvolves it. With ``fast`` set, inference computes only each
    detection's own mask channel (see ``class_logits`` of the mask predictors). The keypoint branch (when
    ``cfg.keypoint_head.enabled``) pools its own RoIs from the backbone's levels in every layout. Every pooler
    uses ``cfg.roi_pooler.type`` (RoIAlign, RoIPool or RoIWarp); the mask branch follows ``cfg.mask_head``'s
    type (FCN or MLP), loss (sigmoid or softmax) and class-agnostic switch.
    """

    fast = False

    def __init__(self, cfg: ModelConfig, in_channels: int, levels: list[str] | None = None) -> None:
        """Builds poolers, heads and predictors for ``cfg.num_classes`` foreground classes (+1 background).

        ``in_channels``: channels of the pooled feature ``levels`` (default the FPN's "0".."3").
        """
        super().__init__()
        bh, mh, kh = cfg.box_head, cfg.mask_head, cfg.keypoint_head
        levels = list(levels or FPN_LEVELS)
        feature_channels = in_channels
        k1 = cfg.num_classes + 1
        self.background = cfg.background
        self.box_cfg = bh
        self.mask_cfg = mh
        self.num_classes = cfg.num_classes
        kind = cfg.roi_pooler.type
        self.box_roi_pool = MultiScaleRoIAlign(levels, bh.pooler_resolution, bh.pooler_sampling_ratio,
                                               bh.pooler_aligned, mapper_eps=bh.pooler_level_eps,
                                               eps_inside_log=bh.pooler_eps_inside_log, kind=kind)
        self.res5: nn.Module | None = None
        if cfg.backbone.layout == "c4":
            self.res5 = build_res5(cfg.backbone, in_channels)
            in_channels = res5_out_channels(cfg.backbone)
            self.box_head: nn.Module = AvgPoolHead(in_channels)
        else:
            self.box_head = build_box_head(bh, in_channels)
        self.box_predictor = FastRCNNPredictor(self.box_head.out_features, k1, cfg.background)
        self.box_coder = BoxCoder(bh.bbox_reg_weights)
        self.proposal_matcher = Matcher(bh.fg_iou_thresh, bh.bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(bh.batch_size_per_image, bh.positive_fraction)
        self.mask_roi_pool: MultiScaleRoIAlign | None = None
        self.mask_head: nn.Module | None = None
        self.mask_predictor: nn.Module | None = None
        # Side of the predicted masks: the deconvolution doubles the pooled size, which res5 (C4) halves first.
        self.mask_size = mh.pooler_resolution * (1 if self.res5 is not None else 2)
        if mh.enabled:
            self.mask_roi_pool = MultiScaleRoIAlign(levels, mh.pooler_resolution, mh.pooler_sampling_ratio,
                                                    mh.pooler_aligned, mapper_eps=bh.pooler_level_eps,
                                                    eps_inside_log=bh.pooler_eps_inside_log, kind=kind)
            # res5 (C4) halves the pooled side before the mask head.
            head_input = mh.pooler_resolution // (2 if self.res5 is not None else 1)
            self.mask_head, self.mask_predictor = build_mask_head(
                mh, in_channels, head_input, self.mask_size, mask_channels(cfg.num_classes, cfg.background, mh))
        self.keypoint_cfg = kh
        self.keypoint_roi_pool: MultiScaleRoIAlign | None = None
        self.keypoint_head: KeypointRCNNHeads | None = None
        self.keypoint_predictor: KeypointRCNNPredictor | None = None
        if kh.enabled:
            self.keypoint_roi_pool = MultiScaleRoIAlign(levels, kh.pooler_resolution, kh.pooler_sampling_ratio,
                                                        kh.pooler_aligned, mapper_eps=bh.pooler_level_eps,
                                                        eps_inside_log=bh.pooler_eps_inside_log, kind=kind)
            self.keypoint_head = KeypointRCNNHeads(feature_channels, kh.conv_dims)
            self.keypoint_predictor = KeypointRCNNPredictor(self.keypoint_head.out_channels, kh.num_keypoints,
                                                            kh.deconv_kernel, kh.up_scale)

    # -- training-time sampling -------------------------------------------------------------------------

    def _assign_targets(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
                        ) -> tuple[list[Tensor], list[Tensor]]:
        matched_idxs, labels = [], []
        for props, boxes, labs in zip(proposals, gt_boxes, gt_labels):
            if boxes.numel() == 0:
                # An image without objects contributes background RoIs only.
                clamped = torch.zeros((props.shape[0],), dtype=torch.int64, device=props.device)
                lab = torch.zeros((props.shape[0],), dtype=torch.int64, device=props.device)
            else:
                idx = self.proposal_matcher(box_iou(boxes, props))
                clamped = idx.clamp(min=0)
                lab = labs[clamped].to(torch.int64)
                lab[idx == BELOW_LOW_THRESHOLD] = 0
                lab[idx == BETWEEN_THRESHOLDS] = -1
            matched_idxs.append(clamped)
            labels.append(lab)
        return matched_idxs, labels

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]],
                                generator: torch.Generator | None = None
                                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Append GT boxes to the proposals, match (IoU 0.5), sample 512 RoIs/image with 25% positives.

        Returns per image: sampled RoIs (R, 4), matched GT indices (R,), labels (R,) and regression targets (R, 4).
        """
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
        matched_idxs, labels = self._assign_targets(proposals, gt_boxes, gt_labels)
        pos, neg = self.fg_bg_sampler(labels, generator)
        out_props, out_idxs, out_labels, out_targets = [], [], [], []
        for i in range(len(proposals)):  # a loop over the images of the batch
            inds = torch.where(pos[i] | neg[i])[0]
            props = proposals[i][inds]
            out_props.append(props)
            out_idxs.append(matched_idxs[i][inds])
            out_labels.append(labels[i][inds])
            g = gt_boxes[i]
            if g.numel() == 0:
                g = torch.zeros((1, 4), dtype=dtype, device=props.device)
            out_targets.append(self.box_coder.encode(g[out_idxs[-1]], props))
        return out_props, out_idxs, out_labels, out_targets

    # -- forward ----------------------------------------------------------------------------------------

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None, generator: torch.Generator | None = None,
                score_thresh: float | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Proposals (Pi, 4) XYXY resized-image pixels -> detections per image (eval) or losses (train).

        In eval each detection dict has boxes (D, 4), scores (D,), labels (D,); with the mask branch
        ``mask_logits`` (D, M, M) of the predicted class and ``masks`` (D, 1, M, M) probabilities; with the keypoint
        branch ``keypoints`` (D, K, 4) and ``keypoint_logits`` (D, K, m, m) (see :meth:`_keypoint_branch`).
        """
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets, generator)
        with stage("box_head"):
            shared = None
            if self.training:
                with stage("box_head.roi_align"):
                    pooled = self.box_roi_pool(features, proposals, image_sizes)
                if self.res5 is not None:
                    pooled = shared = self.res5(pooled)
                box_features = self.box_head(pooled)
                del pooled
            else:
                box_features = self._box_features_in_chunks(features, proposals, image_sizes)
            class_logits, box_regression = self.box_predictor(box_features)
            # float32 for the losses and the box decoding under autocast (no-ops otherwise).
            class_logits, box_regression = class_logits.float(), box_regression.float()
            results: list[dict[str, Tensor]] = []
            if self.training:
                loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets,
                                                   self.box_cfg.smooth_l1_beta, self.background)
                losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
            else:
                results = postprocess_detections(class_logits, box_regression, proposals, image_sizes,
                                                 self.box_coder, self.box_cfg, score_thresh, self.background)
        pos_props: list[Tensor] = []
        pos_idxs: list[Tensor] = []
        pos_rows: list[Tensor] = []
        if self.training:
            offset = 0
            for props, lab, idx in zip(proposals, labels, matched_idxs):
                p = torch.where(lab > 0)[0]
                pos_props.append(props[p])
                pos_idxs.append(idx[p])
                pos_rows.append(p + offset)
                offset += props.shape[0]
        if self.mask_head is not None:
            self._mask_branch(features, image_sizes, targets, results, losses, pos_props, pos_idxs, pos_rows, shared)
        if self.keypoint_head is not None:
            self._keypoint_branch(features, image_sizes, targets, results, losses, pos_props, pos_idxs)
        return results, losses

    def _box_features_in_chunks(self, features: dict[str, Tensor], proposals: list[Tensor],
                                image_sizes: list[tuple[int, int]]) -> Tensor:
        """Per-image proposals (Pi, 4) -> box head features (sum Pi, F), ``box_cfg.inference_chunk`` RoIs a pass.

        Each RoI's features depend on that RoI alone (inference), so the chunks give what one pass would.
        """
        chunk = int(self.box_cfg.inference_chunk)
        total = sum(p.shape[0] for p in proposals)
        if chunk <= 0 or total <= chunk:
            with stage("box_head.roi_align"):
                pooled = self.box_roi_pool(features, proposals, image_sizes)
            return self.box_head(pooled if self.res5 is None else self.res5(pooled))
        out = []
        for i, props in enumerate(proposals):
            for start in range(0, props.shape[0], chunk):
                # The other images get no boxes, so that the pooler keeps each box's batch index.
                boxes = [props[start:start + chunk] if j == i else p[:0] for j, p in enumerate(proposals)]
                with stage("box_head.roi_align"):
                    pooled = self.box_roi_pool(features, boxes, image_sizes)
                out.append(self.box_head(pooled if self.res5 is None else self.res5(pooled)))
        return torch.cat(out)

    def _mask_branch(self, features: dict[str, Tensor], image_sizes: list[tuple[int, int]],
                     targets: list[dict[str, Tensor]] | None, results: list[dict[str, Tensor]],
                     losses: dict[str, Tensor], pos_props: list[Tensor], pos_idxs: list[Tensor],
                     pos_rows: list[Tensor], shared: Tensor | None) -> None:
        """Training: ``loss_mask`` on the positive RoIs. Inference: ``masks`` and ``mask_logits`` per detection."""
        assert self.mask_roi_pool is not None and self.mask_predictor is not None and self.mask_head is not None
        if self.training:
            assert targets is not None
            with stage("mask_head"):
                if shared is not None:
                    # C4: the box branch's res5 output of the positive RoIs is the mask branch's input too.
                    pooled = shared[torch.cat(pos_rows)]
                else:
                    with stage("mask_head.roi_align"):
                        pooled = self.mask_roi_pool(features, pos_props, image_sizes)
                mask_logits = self.mask_predictor(self.mask_head(pooled)).float()
                gt_channels = [self._mask_channel(t["labels"]) for t in targets]
                losses["loss_mask"] = maskrcnn_loss(mask_logits, pos_props, [t["masks"] for t in targets],
                                                    gt_channels, pos_idxs, self.mask_cfg.loss,
                                                    background_channel(self.num_classes, self.background))
            return
        det_boxes = [r["boxes"] for r in results]
        if sum(b.shape[0] for b in det_boxes) == 0:
            m = self.mask_size
            for r in results:
                r["mask_logits"] = r["boxes"].new_zeros((0, m, m))
                r["masks"] = r["boxes"].new_zeros((0, 1, m, m))
            return
        with stage("mask_head"):
            with stage("mask_head.roi_align"):
                pooled = self.mask_roi_pool(features, det_boxes, image_sizes)
            if self.res5 is not None:
                pooled = self.res5(pooled)
            labels_det = [self._mask_channel(r["labels"]) for r in results]
            counts = [b.shape[0] for b in det_boxes]
            if self.fast and self.mask_cfg.loss == "sigmoid":
                # A softmax needs every channel; a sigmoid only the detection's own.
                chosen = self.mask_predictor.class_logits(self.mask_head(pooled), torch.cat(labels_det)).float()
                probs = list(chosen.sigmoid()[:, None].split(counts, dim=0))
            else:
                mask_logits = self.mask_predictor(self.mask_head(pooled)).float()
                probs = maskrcnn_inference(mask_logits, labels_det, self.mask_cfg.loss)
                chosen = own_channel_logits(mask_logits, torch.cat(labels_det), self.mask_cfg.loss)
            for r, p, lg in zip(results, probs, chosen.split(counts)):
                r["masks"] = p
                r["mask_logits"] = lg

    def _mask_channel(self, labels: Tensor) -> Tensor:
        """Foreground labels (R,) in 1..K -> their mask logit channel (R,) under this head's switches."""
        return mask_channel(labels, self.num_classes, self.background, self.mask_cfg)

    def _keypoint_branch(self, features: dict[str, Tensor], image_sizes: list[tuple[int, int]],
                         targets: list[dict[str, Tensor]] | None, results: list[dict[str, Tensor]],
                         losses: dict[str, Tensor], pos_props: list[Tensor], pos_idxs: list[Tensor]) -> None:
        """Training: ``loss_keypoint`` on the positive RoIs. Inference, per detection: ``keypoints`` (D, K, 4)
        [x, y (resized-image px), logit, softmax score] and ``keypoint_logits`` (D, K, m, m)."""
        assert self.keypoint_roi_pool is not None and self.keypoint_head is not None
        assert self.keypoint_predictor is not None
        kh = self.keypoint_cfg
        if self.training:
            assert targets is not None
            if any("keypoints" not in t for t in targets):
                raise ValueError("a keypoint model trains on targets with 'keypoints' (N, K, 3) [x, y, visibility]")
            with stage("keypoint_head"):
                pooled = self.keypoint_roi_pool(features, pos_props, image_sizes)
                logits = self.keypoint_predictor(self.keypoint_head(pooled)).float()
                normalizer = None
                if not kh.normalize_by_visible:
                    # detectron2's fixed normaliser: the keypoints of a full quota of positive RoIs per image.
                    normalizer = (len(targets) * self.box_cfg.batch_size_per_image * self.box_cfg.positive_fraction
                                  * kh.num_keypoints)
                loss = keypoint_loss(logits, pos_props, [t["keypoints"] for t in targets], pos_idxs, normalizer)
                losses["loss_keypoint"] = loss * kh.loss_weight
            return
        det_boxes = [r["boxes"] for r in results]
        k = kh.num_keypoints
        if sum(b.shape[0] for b in det_boxes) == 0:
            m = kh.pooler_resolution * 2 * kh.up_scale
            for r in results:
                r["keypoints"] = r["boxes"].new_zeros((0, k, 4))
                r["keypoint_logits"] = r["boxes"].new_zeros((0, k, m, m))
            return
        with stage("keypoint_head"):
            pooled = self.keypoint_roi_pool(features, det_boxes, image_sizes)
            logits = self.keypoint_predictor(self.keypoint_head(pooled)).float()
            counts = [b.shape[0] for b in det_boxes]
            for r, kp, lg in zip(results, keypoint_inference(logits, det_boxes), logits.split(counts)):
                r["keypoints"] = kp
                r["keypoint_logits"] = lg
