"""Mask head: a small FCN on 14x14 RoI features predicting K independent 28x28 sigmoid masks per RoI."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.config import MaskHeadConfig
from maskrcnn.modeling.backbone import conv_stack, make_norm
from maskrcnn.ops.masks import roi_mask_targets


class MaskRCNNHeads(nn.Sequential):
    """``num_convs`` x (conv3x3 [+ norm] + ReLU), indices matching torchvision's ``mask_head.{i}.0`` keys."""

    def __init__(self, in_channels: int, cfg: MaskHeadConfig) -> None:
        """Convs of ``cfg.conv_dim`` channels with ``cfg.dilation``; BN/GN when ``cfg.norm`` is set (v2)."""
        norm = None if cfg.norm == "none" else make_norm(cfg.norm, cfg.norm_eps)
        super().__init__(*conv_stack(in_channels, cfg.num_convs, cfg.conv_dim, norm, cfg.dilation))
        self.out_channels = cfg.conv_dim if cfg.num_convs else in_channels


class MaskRCNNPredictor(nn.Sequential):
    """2x2 stride-2 transposed conv + ReLU, then a 1x1 conv to K+1 mask logits (28x28 from 14x14)."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes_with_bg: int) -> None:
        """Upsample ``in_channels`` to ``dim_reduced`` channels, then predict one mask per class."""
        super().__init__(OrderedDict([
            ("conv5_mask", nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
            ("relu", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes_with_bg, 1, 1, 0)),
        ]))
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")
            elif "bias" in name:
                nn.init.constant_(param, 0)

    def class_logits(self, x: Tensor, labels: Tensor) -> Tensor:
        """(R, C, m, m) features and (R,) class indices -> (R, 2m, 2m) logits of each RoI's own class only.

        Inference needs one of the K+1 mask channels per RoI, so the 1x1 logits conv becomes a per-RoI dot
        product with that class's weight row: 1/(K+1) of the work and no (R, K+1, 2m, 2m) tensor.
        """
        y = torch.relu_(self.conv5_mask(x))
        r, c, h, w = y.shape
        head = self.mask_fcn_logits
        weight = head.weight[labels, :, 0, 0]  # (R, C)
        bias = head.bias[labels] if head.bias is not None else weight.new_zeros(r)
        # A free view when y is channels-last (the fast path); otherwise one copy into that layout.
        rows = y.permute(0, 2, 3, 1).reshape(r, h * w, c)
        return torch.baddbmm(bias.view(r, 1, 1), rows, weight.unsqueeze(2)).view(r, h, w)


def maskrcnn_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor], gt_labels: list[Tensor],
                  matched_idxs: list[Tensor]) -> Tensor:
    """Per-pixel BCE-with-logits on the GT class's channel of positive RoIs, against RoIAlign-cropped GT masks.

    mask_logits (R, K+1, M, M); per image: positive proposals (Ri, 4) XYXY, GT masks (Gi, H, W), GT labels (Gi,),
    matched GT index (Ri,).
    """
    m = mask_logits.shape[-1]
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_labels, matched_idxs)], dim=0)
    targets = torch.cat([roi_mask_targets(gm, p, idx, m) for gm, p, idx in zip(gt_masks, proposals, matched_idxs)],
                        dim=0)
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(mask_logits[torch.arange(labels.shape[0], device=labels.device), labels],
                                              targets)


def maskrcnn_inference(mask_logits: Tensor, labels: list[Tensor]) -> list[Tensor]:
    """Sigmoid of each detection's predicted-class channel: per image (Di, 1, M, M) probabilities."""
    probs = mask_logits.sigmoid()
    boxes_per_image = [lab.shape[0] for lab in labels]
    labels_t = torch.cat(labels)
    index = torch.arange(probs.shape[0], device=labels_t.device)
    return list(probs[index, labels_t][:, None].split(boxes_per_image, dim=0))
