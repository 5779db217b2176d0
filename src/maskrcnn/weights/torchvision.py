"""torchvision Mask R-CNN and Keypoint R-CNN state dicts (``maskrcnn_resnet50_fpn`` v1 and v2,
``keypointrcnn_resnet50_fpn``): their variant and preset.

Our module names equal torchvision's, so the state dict loads unchanged; only the config must be told.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from maskrcnn.config import Config, get_preset
from maskrcnn.weights.errors import WeightsError


def is_torchvision_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has torchvision's Mask R-CNN layout (backbone.body.*, roi_heads.box_predictor.*)."""
    return "roi_heads.box_predictor.cls_score.weight" in state and any(k.startswith("backbone.body.") for k in state)


KEYPOINT_PREDICTOR = "roi_heads.keypoint_predictor.kps_score_lowres.weight"


def detect_torchvision_variant(state: dict[str, torch.Tensor]) -> str:
    """'torchvision_v1', 'torchvision_v2' or 'keypointrcnn_resnet50_fpn' from a torchvision state dict's keys."""
    if KEYPOINT_PREDICTOR in state and "roi_heads.box_head.fc6.weight" in state:
        return "keypointrcnn_resnet50_fpn"
    if "roi_heads.box_head.fc6.weight" in state:
        return "torchvision_v1"
    if any(k.startswith("roi_heads.box_head.0.") for k in state):
        return "torchvision_v2"
    raise WeightsError("not a torchvision Mask R-CNN state dict: no 'roi_heads.box_head.fc6.weight' (v1) or "
                       "'roi_heads.box_head.0.*' (v2) keys")


def config_for_torchvision(state: dict[str, torch.Tensor]) -> Config:
    """Preset matching a torchvision state dict, with the class count read from the predictor's shape.

    The published v1 COCO checkpoint was trained with FrozenBatchNorm eps=0; torchvision builds it with eps=0
    when loading those weights, so we do the same. A Keypoint R-CNN gets torchvision's builder default, eps 1e-5
    (its COCO_LEGACY weights, and models trained with torchvision); its COCO_V1 weights, whose eps is 0, are
    recognised by the registry (``keypointrcnn_resnet50_fpn_coco_v1`` preset). Its widths (FPN, box head,
    keypoint tower) and keypoint count are read off the tensors.
    """
    variant = detect_torchvision_variant(state)
    if variant == "keypointrcnn_resnet50_fpn":
        return _keypoint_config(state)
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




def _keypoint_config(state: dict[str, torch.Tensor]) -> Config:
    """``keypointrcnn_resnet50_fpn``'s preset with the classes, widths and keypoints of ``state``."""
    cfg = get_preset("keypointrcnn_resnet50_fpn")
    m = cfg.model
    k1 = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    num_kp = int(state[KEYPOINT_PREDICTOR].shape[1])
    tower = sorted((int(mt[1]), int(v.shape[0])) for key, v in state.items()
                   if (mt := re.fullmatch(r"roi_heads\.keypoint_head\.(\d+)\.weight", key)))
    kh = dataclasses.replace(m.keypoint_head, num_keypoints=num_kp, conv_dims=tuple(d for _, d in tower))
    if num_kp != len(kh.names):
        kh = dataclasses.replace(kh, names=(), skeleton=())
    fpn = m.fpn
    if "backbone.fpn.layer_blocks.0.0.weight" in state:
        fpn = dataclasses.replace(fpn, out_channels=int(state["backbone.fpn.layer_blocks.0.0.weight"].shape[0]))
    box_head = dataclasses.replace(m.box_head, fc_dim=int(state["roi_heads.box_head.fc6.weight"].shape[0]))
    mask_head = dataclasses.replace(get_preset("torchvision_v1").model.mask_head,
                                    enabled="roi_heads.mask_predictor.mask_fcn_logits.weight" in state)
    names = m.class_names if k1 - 1 == len(m.class_names) else ()
    model = dataclasses.replace(m, num_classes=k1 - 1, class_names=names, fpn=fpn, box_head=box_head,
                                mask_head=mask_head, keypoint_head=kh)
    return dataclasses.replace(cfg, model=model)


def is_torchvision_resnet(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is torchvision's ImageNet ResNet/ResNeXt classifier (conv1, layer1..4, fc)."""
    return "conv1.weight" in state and any(k.startswith("layer1.0.") for k in state) and "fc.weight" in state


def convert_torchvision_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet -> our ``backbone.body.*`` names, without the classifier (``fc``)."""
    return {f"backbone.body.{k}": v for k, v in state.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
