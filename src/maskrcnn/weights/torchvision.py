"""torchvision Mask R-CNN state dicts (``maskrcnn_resnet50_fpn`` v1 and v2): their variant and preset.

Our module names equal torchvision's, so the state dict loads unchanged; only the config must be told.
"""

from __future__ import annotations

import dataclasses

import torch

from maskrcnn.config import Config, get_preset
from maskrcnn.weights.errors import WeightsError


def is_torchvision_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has torchvision's Mask R-CNN layout (backbone.body.*, roi_heads.box_predictor.*)."""
    return "roi_heads.box_predictor.cls_score.weight" in state and any(k.startswith("backbone.body.") for k in state)


def detect_torchvision_variant(state: dict[str, torch.Tensor]) -> str:
    """'torchvision_v1' or 'torchvision_v2' from a torchvision Mask R-CNN state dict's keys."""
    if "roi_heads.box_head.fc6.weight" in state:
        return "torchvision_v1"
    if any(k.startswith("roi_heads.box_head.0.") for k in state):
        return "torchvision_v2"
    raise WeightsError("not a torchvision Mask R-CNN state dict: no 'roi_heads.box_head.fc6.weight' (v1) or "
                       "'roi_heads.box_head.0.*' (v2) keys")


def config_for_torchvision(state: dict[str, torch.Tensor]) -> Config:
    """Preset matching a torchvision state dict, with the class count read from the predictor's shape.

    The published v1 COCO checkpoint was trained with FrozenBatchNorm eps=0; torchvision builds it with eps=0
    when loading those weights, so we do the same.
    """
    variant = detect_torchvision_variant(state)
    cfg = get_preset(variant)
    if "roi_heads.box_predictor.cls_score.weight" not in state:
        raise WeightsError("state dict lacks 'roi_heads.box_predictor.cls_score.weight'; cannot tell the classes")
    k1 = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    model = cfg.model
    backbone = model.backbone
    if variant == "torchvision_v1":
        backbone = dataclasses.replace(backbone, norm_eps=0.0)
    names: tuple[str, ...] = ()
    if k1 == 91:
        from maskrcnn.weights.coco_names import TORCHVISION_COCO_CLASS_NAMES  # noqa: PLC0415

        names = tuple(TORCHVISION_COCO_CLASS_NAMES)
    mask_enabled = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    model = dataclasses.replace(model, num_classes=k1 - 1, class_names=names, backbone=backbone,
                                mask_head=dataclasses.replace(model.mask_head, enabled=mask_enabled))
    return dataclasses.replace(cfg, model=model)




def is_torchvision_resnet(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is torchvision's ImageNet ResNet/ResNeXt classifier (conv1, layer1..4, fc)."""
    return "conv1.weight" in state and any(k.startswith("layer1.0.") for k in state) and "fc.weight" in state


def convert_torchvision_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet -> our ``backbone.body.*`` names, without the classifier (``fc``)."""
    return {f"backbone.body.{k}": v for k, v in state.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
