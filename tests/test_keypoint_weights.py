"""Keypoint R-CNN checkpoints: detectron2's full-size zoo key sets, torchvision's variant and FrozenBN eps, the
registry entries, and the presets' test-time settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.config import COCO_PERSON_KEYPOINT_NAMES, get_preset
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.weights import read_checkpoint
from maskrcnn.weights.detectron2 import config_for_detectron2, convert_detectron2_state
from maskrcnn.weights.torchvision import config_for_torchvision, detect_torchvision_variant
from maskrcnn.weights.zoo import REGISTRY

KEYPOINT_MODELS = ["keypoint_rcnn_R_50_FPN_3x", "keypoint_rcnn_R_101_FPN_3x", "keypoint_rcnn_X_101_32x8d_FPN_3x"]
# torchvision's KeypointRCNN_ResNet50_FPN_Weights meta: num_params of keypointrcnn_resnet50_fpn.
TORCHVISION_KEYPOINTRCNN_PARAMS = 59137258


@pytest.fixture(scope="module")
def manifests(fixtures_dir: Path) -> dict:
    """detectron2/manifests.json: every full-size zoo config's state-dict shapes and test settings."""
    return json.loads((fixtures_dir / "detectron2" / "manifests.json").read_text())["models"]


def _shapes(model: MaskRCNN) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", KEYPOINT_MODELS)
def test_full_size_key_set_builds_exactly_our_model(manifests: dict, name: str) -> None:
    """Converted zoo keys == our model's keys, with the same shapes; the preset of the name builds the same."""
    entry = manifests[name]
    shapes = {k: tuple(v) for k, v in entry["state_dict_shapes"].items()}
    converted = convert_detectron2_state(shapes, name)
    cfg = config_for_detectron2(converted, name)
    test = entry["test"]
    m = cfg.model
    assert (m.backbone.depth, m.backbone.groups) == (test["resnets"]["DEPTH"], test["resnets"]["NUM_GROUPS"])
    assert m.backbone.stride_in_1x1 == test["resnets"]["STRIDE_IN_1X1"]
    assert tuple(cfg.input.pixel_std) == pytest.approx(tuple(test["pixel_std"]))
    assert m.num_classes == test["roi_heads"]["num_classes"] == 1
    kt = test["roi_keypoint_head"]
    assert m.keypoint_head.enabled and not m.mask_head.enabled
    assert m.keypoint_head.conv_dims == tuple(kt["conv_dims"])
    assert m.keypoint_head.num_keypoints == kt["num_keypoints"]
    assert m.keypoint_head.pooler_resolution == kt["pooler_resolution"]
    assert m.keypoint_head.pooler_sampling_ratio == kt["pooler_sampling_ratio"] and m.keypoint_head.pooler_aligned
    assert 2 * m.keypoint_head.pooler_resolution * m.keypoint_head.up_scale == kt["heatmap_size"]
    for c in (cfg, get_preset(name)):
        with torch.device("meta"):
            ours = _shapes(MaskRCNN(c))
        assert sorted(set(converted) - set(ours)) == [] and sorted(set(ours) - set(converted)) == []
        assert {k: ours[k] for k in converted} == converted
    n_params = sum(int(np.prod(s)) for s in shapes.values() if s)
    assert n_params == entry["num_parameters"]


def test_keypoint_presets_match_the_zoo_test_settings(manifests: dict) -> None:
    for name in KEYPOINT_MODELS:
        cfg, test = get_preset(name), manifests[name]["test"]
        assert (cfg.input.min_size_test, cfg.input.max_size_test) == (test["min_size_test"], test["max_size_test"])
        assert tuple(cfg.input.pixel_mean) == pytest.approx(tuple(test["pixel_mean"]))
        assert cfg.input.pixel_format == "bgr255" and cfg.input.size_divisible == manifests[name]["size_divisibility"]
        assert cfg.model.rpn.pre_nms_top_n_test == test["rpn"]["pre_nms_topk_test"]
        assert cfg.model.box_head.score_thresh == test["roi_heads"]["score_thresh_test"]
        assert cfg.model.box_head.detections_per_img == test["roi_heads"]["detections_per_image"]
        assert cfg.model.keypoint_head.names == COCO_PERSON_KEYPOINT_NAMES


def test_detectron2_registry_entries(manifests: dict) -> None:
    for name in KEYPOINT_MODELS:
        entry, info = REGISTRY[f"detectron2_{name}"], manifests[name]
        assert entry.url == info["url"] and entry.format == "detectron2" and entry.preset == name
        assert entry.box_ap == info["published_ap_coco_val2017"]["box_AP"]
        assert entry.keypoint_ap == info["published_ap_coco_val2017"]["kp_AP"]
        assert entry.kind == "keypoint_rcnn" and entry.keypoint_names == COCO_PERSON_KEYPOINT_NAMES
        assert entry.class_names == ("person",) and entry.category_ids == (1,)


def test_torchvision_full_size_model_and_registry() -> None:
    with torch.device("meta"):
        model = MaskRCNN(get_preset("keypointrcnn_resnet50_fpn"))
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_KEYPOINTRCNN_PARAMS
    shapes = _shapes(model)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert detect_torchvision_variant(state) == "keypointrcnn_resnet50_fpn"
    cfg = config_for_torchvision(state)
    assert cfg.model.keypoint_head.conv_dims == (512,) * 8 and cfg.model.fpn.out_channels == 256
    assert cfg.model.num_classes == 1 and cfg.model.class_names == ("person",)
    v1, legacy = REGISTRY["keypointrcnn_resnet50_fpn"], REGISTRY["keypointrcnn_resnet50_fpn_legacy"]
    assert v1.url == "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth"
    assert (v1.sha256, v1.box_ap, v1.keypoint_ap) == ("fc266e95", 54.6, 65.0)
    assert legacy.url == "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-9f466800.pth"
    assert (legacy.sha256, legacy.box_ap, legacy.keypoint_ap) == ("9f466800", 50.6, 61.1)
    # torchvision restores eps 0 after loading COCO_V1 (trained so); COCO_LEGACY keeps the builder's 1e-5.
    assert get_preset(v1.preset).model.backbone.norm_eps == 0.0
    assert get_preset(legacy.preset).model.backbone.norm_eps == 1e-5


def _tiny_torchvision_state() -> dict[str, torch.Tensor]:
    cfg = get_preset("keypointrcnn_resnet50_fpn")
    from maskrcnn.config import apply_overrides

    cfg = apply_overrides(cfg, {"model.backbone.depth": 18, "model.fpn.out_channels": 8, "model.box_head.fc_dim": 16,
                                "model.keypoint_head.conv_dims": [8, 8], "model.keypoint_head.num_keypoints": 5})
    return MaskRCNN(cfg).state_dict()


def test_torchvision_eps_follows_the_registry_file_name(tmp_path: Path) -> None:
    """A published file, recognised by its name, gets the eps it was trained with; any other file 1e-5."""
    state = _tiny_torchvision_state()
    for file_name, eps in (("keypointrcnn_resnet50_fpn_coco-fc266e95.pth", 0.0),
                           ("keypointrcnn_resnet50_fpn_coco-9f466800.pth", 1e-5), ("my_keypoints.pth", 1e-5)):
        path = tmp_path / file_name
        torch.save(state, path)
        cfg = read_checkpoint(path)[0]
        assert cfg.model.backbone.norm_eps == eps, file_name
        kh = cfg.model.keypoint_head
        # 5 keypoints are not COCO's 17: no names or skeleton are invented for them.
        assert (kh.num_keypoints, kh.conv_dims, kh.names, kh.skeleton) == (5, (8, 8), (), ())
