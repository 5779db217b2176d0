"""Mask head: a small FCN on 14x14 RoI features predicting K independent 28x28 sigmoid masks per RoI.

The paper's Table 2 ablations are options of the same head (``model.mask_head``): one class-agnostic channel
instead of one per class, a per-pixel softmax over the classes and background instead of per-class sigmoids,
and fully connected layers (MLP) instead of the FCN.
"""

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


class MLPMaskHead(nn.Module):
    """Flatten each pooled RoI, then fully connected layers + ReLU of ``cfg.mlp_dims`` (paper, Table 2e)."""

    def __init__(self, in_features: int, cfg: MaskHeadConfig) -> None:
        """``in_features`` = C x s x s of the pooled RoI features."""
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for dim in cfg.mlp_dims:
            fc = nn.Linear(prev, dim)
            # detectron2's c2_xavier_fill for its FC heads: uniform with gain 1 on fan-in, zero bias.
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            layers += [fc, nn.ReLU(inplace=True)]
            prev = dim
        self.fcs = nn.Sequential(*layers)
        self.out_features = prev

    def forward(self, x: Tensor) -> Tensor:
        """(R, C, s, s) -> (R, out_features)."""
        return self.fcs(x.flatten(start_dim=1))


class MLPMaskPredictor(nn.Module):
    """One fully connected layer to ``channels`` x m x m mask logits, reshaped (paper, Table 2e)."""

    def __init__(self, in_features: int, channels: int, mask_size: int) -> None:
        """``channels`` mask channels (per class, or one) of ``mask_size`` x ``mask_size`` logits."""
        super().__init__()
        self.channels = channels
        self.mask_size = mask_size
        self.mask_fc_logits = nn.Linear(in_features, channels * mask_size * mask_size)
        # Small logits at the start, as the FCN predictor's Kaiming-initialised 1x1 conv on ReLU inputs gives.
        nn.init.normal_(self.mask_fc_logits.weight, std=0.001)
        nn.init.zeros_(self.mask_fc_logits.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(R, D) -> (R, channels, m, m) logits."""
        m = self.mask_size
        return self.mask_fc_logits(x).view(-1, self.channels, m, m)

    def class_logits(self, x: Tensor, labels: Tensor) -> Tensor:
        """(R, D) features and (R,) channel indices -> (R, m, m) logits of each RoI's own channel only."""
        m = self.mask_size
        fc = self.mask_fc_logits
        weight = fc.weight.view(self.channels, m * m, -1)[labels]  # (R, m*m, D)
        bias = fc.bias.view(self.channels, m * m)[labels]
        return torch.baddbmm(bias.unsqueeze(2), weight, x.unsqueeze(2)).view(-1, m, m)


def mask_channels(num_classes: int, background: str, cfg: MaskHeadConfig) -> int:
    """Mask logits per RoI: 1 (class-agnostic), K+1 (softmax: classes and background), else the per-class count."""
    if cfg.class_agnostic:
        return 1
    if cfg.loss == "softmax":
        return num_classes + 1
    return num_classes + 1 if background == "first" else num_classes


def mask_channel(labels: Tensor, num_classes: int, background: str, cfg: MaskHeadConfig) -> Tensor:
    """Foreground labels (R,) in 1..K -> (R,) index of their mask channel among :func:`mask_channels`'s."""
    if cfg.class_agnostic:
        return torch.zeros_like(labels)
    # Per-class sigmoid channels and softmax channels (background at 0 or at K) both put class k at k or k - 1.
    return labels if background == "first" else labels - 1


def background_channel(num_classes: int, background: str) -> int:
    """Index of the softmax mask loss's background channel: 0, or K with model.background=last."""
    return 0 if background == "first" else num_classes


def build_mask_head(cfg: MaskHeadConfig, in_channels: int, pooled_size: int, mask_size: int, channels: int
                    ) -> tuple[nn.Module, nn.Module]:
    """(head, predictor) for ``cfg.type``: pooled (R, in_channels, s, s) -> (R, channels, mask_size, mask_size)."""
    if cfg.type == "mlp":
        head = MLPMaskHead(in_channels * pooled_size * pooled_size, cfg)
        return head, MLPMaskPredictor(head.out_features, channels, mask_size)
    fcn = MaskRCNNHeads(in_channels, cfg)
    return fcn, MaskRCNNPredictor(fcn.out_channels, cfg.conv_dim, channels)


def own_channel_logits(mask_logits: Tensor, channels: Tensor, loss: str = "sigmoid") -> Tensor:
    """(R, C, m, m) logits and (R,) channels -> (R, m, m) logits whose sigmoid is that channel's mask probability.

    Sigmoid masks: the channel's logit. Softmax masks: x_c - logsumexp of the other channels, the log-odds of
    the channel's softmax probability (exact, and finite where that probability rounds to 1).
    """
    index = torch.arange(mask_logits.shape[0], device=mask_logits.device)
    own = mask_logits[index, channels]
    if loss == "sigmoid":
        return own
    others = mask_logits.clone()
    others[index, channels] = float("-inf")
    return own - torch.logsumexp(others, dim=1)


def maskrcnn_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor], gt_channels: list[Tensor],
                  matched_idxs: list[Tensor], loss: str = "sigmoid", background_channel: int = 0) -> Tensor:
    """Mask loss of positive RoIs against RoIAlign-cropped (soft) GT masks, averaged over RoIs and pixels.

    mask_logits (R, C, M, M); per image: positive proposals (Ri, 4) XYXY, GT masks (Gi, H, W), each GT's mask
    channel (Gi,), matched GT index (Ri,). "sigmoid": BCE-with-logits on the GT channel (the paper's).
    "softmax": cross-entropy of the per-pixel softmax over the C channels against the target t on the GT channel
    and 1 - t on ``background_channel`` (t is 0 or 1 away from the mask's edges).
    """
    m = mask_logits.shape[-1]
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_channels, matched_idxs)], dim=0)
    targets = torch.cat([roi_mask_targets(gm, p, idx, m) for gm, p, idx in zip(gt_masks, proposals, matched_idxs)],
                        dim=0)
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    index = torch.arange(labels.shape[0], device=labels.device)
    if loss == "softmax":
        logp = F.log_softmax(mask_logits, dim=1)
        return -(targets * logp[index, labels] + (1.0 - targets) * logp[:, background_channel]).mean()
    return F.binary_cross_entropy_with_logits(mask_logits[index, labels], targets)


def maskrcnn_inference(mask_logits: Tensor, labels: list[Tensor], loss: str = "sigmoid") -> list[Tensor]:
    """Each detection's mask channel's probability (sigmoid, or softmax over the channels): per image (Di, 1, M, M).

    ``labels``: per image the (Di,) mask channel of each detection (:func:`mask_channel`).
    """
    boxes_per_image = [lab.shape[0] for lab in labels]
    labels_t = torch.cat(labels)
    probs = own_channel_logits(mask_logits, labels_t, loss).sigmoid()
    return list(probs[:, None].split(boxes_per_image, dim=0))
