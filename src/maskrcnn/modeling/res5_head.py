"""The C4 layout's RoI head: ResNet stage 5 on 14x14 RoIs of res4, shared by the box and mask branches.

As in the Mask R-CNN paper's ResNet-C4 models (and detectron2's ``Res5ROIHeads``): the box branch average-pools
res5's 7x7 output before its predictor, and the mask branch deconvolves that same output to 14x14 masks.
"""

from __future__ import annotations

from torch import Tensor, nn

from maskrcnn.config import BackboneConfig
from maskrcnn.modeling.backbone import make_norm, make_stage, stage_plan


def build_res5(cfg: BackboneConfig, in_channels: int) -> nn.Sequential:
    """res5 (stage index 3) taking ``in_channels`` (res4's output); its first block has stride 2."""
    if cfg.res5_dilation != 1:
        raise ValueError("the C4 layout's res5 head is not dilated: set model.backbone.res5_dilation=1")
    return make_stage(cfg, 3, in_channels, make_norm(cfg.norm, cfg.norm_eps, cfg.gn_groups))


def res5_out_channels(cfg: BackboneConfig) -> int:
    """Output channels of res5 (2048 for ResNet-50 and wider)."""
    return stage_plan(cfg)[3]["out"]


class AvgPoolHead(nn.Module):
    """The C4 box head after res5: the mean over each RoI's spatial positions."""

    def __init__(self, channels: int) -> None:
        """``channels``: res5's output channels, which become the predictor's input features."""
        super().__init__()
        self.out_features = channels

    def forward(self, x: Tensor) -> Tensor:
        """(R, C, 7, 7) res5 output -> (R, C)."""
        return x.mean(dim=(2, 3))
