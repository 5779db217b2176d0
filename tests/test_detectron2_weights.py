"""detectron2 checkpoints: the full-size zoo key sets, the safe unpickler, and the variant read off the keys."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.config import Config, get_preset
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.weights import WeightsError, load_model
from maskrcnn.weights.detectron2 import config_for_detectron2, convert_detectron2_state, read_detectron2_pickle

MASK_MODELS = ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_101_FPN_3x", "mask_rcnn_X_101_32x8d_FPN_3x",
               "mask_rcnn_R_50_C4_3x", "mask_rcnn_R_101_C4_3x", "mask_rcnn_R_50_DC5_3x"]


@pytest.fixture(scope="module")
def manifests(fixtures_dir: Path) -> dict:
    """detectron2/manifests.json: every full-size zoo config's state-dict shapes and test settings."""
    return json.loads((fixtures_dir / "detectron2" / "manifests.json").read_text())["models"]


@pytest.mark.parametrize("name", MASK_MODELS)
def test_full_size_key_set_builds_exactly_our_model(manifests: dict, name: str) -> None:
    """Converted zoo keys == our model's keys, with the same shapes: none missing, none unexpected."""
    entry = manifests[name]
    shapes = {k: tuple(v) for k, v in entry["state_dict_shapes"].items()}
    converted = convert_detectron2_state(shapes, name)
    cfg = config_for_detectron2(converted, name)
    test = entry["test"]
    assert cfg.model.backbone.depth == test["resnets"]["DEPTH"]
    assert cfg.model.backbone.groups == test["resnets"]["NUM_GROUPS"]
    assert cfg.model.backbone.stride_in_1x1 == test["resnets"]["STRIDE_IN_1X1"]
    assert cfg.model.backbone.res5_dilation == test["resnets"]["RES5_DILATION"]
    assert tuple(cfg.input.pixel_std) == pytest.approx(tuple(test["pixel_std"]))
    assert cfg.model.num_classes == test["roi_heads"]["num_classes"]
    with torch.device("meta"):
        model = MaskRCNN(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(converted) - set(ours)) == []
    assert sorted(set(ours) - set(converted)) == []
    assert {k: ours[k] for k in converted} == converted
    n_params = sum(int(np.prod(s)) for s in shapes.values() if s)
    assert n_params == sum(int(np.prod(s)) for s in ours.values() if s)


def test_preset_of_each_zoo_config_matches_its_test_settings(manifests: dict) -> None:
    for name in MASK_MODELS:
        cfg, test = get_preset(name), manifests[name]["test"]
        assert cfg.input.min_size_test == test["min_size_test"] and cfg.input.max_size_test == test["max_size_test"]
        assert tuple(cfg.input.pixel_mean) == pytest.approx(tuple(test["pixel_mean"]))
        assert cfg.model.rpn.pre_nms_top_n_test == test["rpn"]["pre_nms_topk_test"]
        assert cfg.model.rpn.post_nms_top_n_test == test["rpn"]["post_nms_topk_test"]
        assert cfg.model.box_head.pooler_resolution == test["roi_box_head"]["pooler_resolution"]
        assert cfg.model.box_head.score_thresh == test["roi_heads"]["score_thresh_test"]
        assert cfg.model.box_head.nms_thresh == test["roi_heads"]["nms_thresh_test"]
        assert cfg.model.box_head.detections_per_img == test["roi_heads"]["detections_per_image"]
        assert cfg.input.size_divisible == manifests[name]["test"].get("size_divisibility",
                                                                       manifests[name].get("size_divisibility", 32))


class _Evil:
    """Unpickling this would run ``os.system``: the loader must refuse before it happens."""

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model_final_evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": _Evil()}}, protocol=3))
    with pytest.raises(WeightsError, match=r"refused.*posix\.system|refused.*os\.system"):
        read_detectron2_pickle(path)
    with pytest.raises(WeightsError, match="refused"):
        load_model(path)


def test_pickle_of_arrays_loads_and_keeps_values(tmp_path: Path) -> None:
    arrays = {"backbone.res2.0.conv1.weight": np.arange(6, dtype=np.float16).reshape(2, 3, 1, 1)}
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}, protocol=3))
    state = read_detectron2_pickle(path)
    assert torch.equal(state["backbone.res2.0.conv1.weight"], torch.arange(6, dtype=torch.float16).view(2, 3, 1, 1))


def test_unknown_keys_are_listed(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"kp\.pkl: 1 detectron2 keys have no counterpart.*conv_fcn1\.norm"):
        convert_detectron2_state({"roi_heads.keypoint_head.conv_fcn1.norm.weight": (4,)}, "kp.pkl")


def test_training_checkpoint_pth_loads_like_the_pkl(fixtures_dir: Path, tmp_path: Path) -> None:
    """detectron2's own ``model_final.pth`` ({"model": state_dict, ...}) gives the same model as the zoo .pkl."""
    pkl = fixtures_dir / "detectron2" / "mask_rcnn_R_50_FPN" / "weights.pkl"
    state = read_detectron2_pickle(pkl)
    pth = tmp_path / "model_final.pth"
    torch.save({"model": {k: v.float() for k, v in state.items()}, "iteration": 458}, pth)
    a, b = load_model(pkl).model.state_dict(), load_model(pth).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _thin_r50() -> Config:
    """A thin MSRA ResNet-50 FPN config (detectron2 conventions) for backbone-initialisation tests."""
    from maskrcnn.config import apply_overrides

    return apply_overrides(get_preset("mask_rcnn_R_50_FPN_3x"), {
        "model.backbone.stem_out_channels": 8, "model.backbone.res2_out_channels": 16,
        "model.backbone.width_per_group": 4, "model.fpn.out_channels": 16, "model.box_head.fc_dim": 32,
        "model.mask_head.conv_dim": 16, "model.num_classes": 2})


def _caffe2_names(body: dict) -> dict:
    """Our backbone.body.* tensors under Caffe2's ResNet names, written out independently of the converter."""
    out = {}
    for k, v in body.items():
        parts = k[len("backbone.body."):].split(".")
        if parts[0] == "conv1":
            out["conv1_w"] = v
        elif parts[0] == "bn1":
            if parts[1] in ("weight", "bias"):
                out["res_conv1_bn_" + ("s" if parts[1] == "weight" else "b")] = v
        else:
            stage, block = int(parts[0][len("layer"):]) + 1, parts[1]
            if parts[2] == "downsample":
                base = f"res{stage}_{block}_branch1"
                what = "w" if parts[3] == "0" else ("bn_s" if parts[4] == "weight" else "bn_b")
                if parts[3] == "1" and parts[4] not in ("weight", "bias"):
                    continue
            else:
                k_ = parts[2][-1]
                base = f"res{stage}_{block}_branch2{'abc'[int(k_) - 1]}"
                if parts[2].startswith("conv"):
                    what = "w"
                elif parts[3] in ("weight", "bias"):
                    what = "bn_s" if parts[3] == "weight" else "bn_b"
                else:
                    continue
            out[f"{base}_{what}"] = v
    out["fc1000_w"] = np.zeros((1000, 4), np.float32)
    return out


def test_caffe2_imagenet_backbone_initialises_training(tmp_path: Path) -> None:
    """detectron2's ImageNet R-50.pkl (Caffe2 names, affine-only BN) fills the body; heads stay fresh."""
    from maskrcnn.engine.runs import init_from

    cfg = _thin_r50()
    torch.manual_seed(1)
    src = MaskRCNN(cfg)
    body = {k: v.detach().numpy().copy() for k, v in src.state_dict().items() if k.startswith("backbone.body.")}
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": _caffe2_names(body)}, protocol=2))
    with pytest.raises(WeightsError, match="ImageNet weights of a ResNet body"):
        load_model(path)
    torch.manual_seed(2)
    model = MaskRCNN(cfg)
    head_before = model.state_dict()["roi_heads.box_predictor.cls_score.weight"].clone()
    init_from(model, str(path))
    state = model.state_dict()
    for k, v in body.items():
        if k.endswith("running_mean"):
            assert torch.equal(state[k], torch.zeros_like(state[k])), k  # Caffe2 BN: affine only
        elif k.endswith("running_var"):
            assert torch.equal(state[k], torch.ones_like(state[k])), k
        else:
            assert torch.equal(state[k], torch.from_numpy(v)), k
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"], head_before)


def test_torchvision_imagenet_resnet_initialises_training_and_c4_res5(tmp_path: Path) -> None:
    """torchvision's ImageNet ResNet (conv1, layer1..4, fc) fills the body; in C4, layer4 fills the res5 head."""
    from maskrcnn.config import apply_overrides
    from maskrcnn.engine.runs import init_from

    cfg = apply_overrides(_thin_r50(), {"model.backbone.layout": "c4", "model.mask_head.num_convs": 0,
                                        "model.anchors.strides": [16]})
    full = apply_overrides(cfg, {"model.backbone.layout": "fpn", "model.anchors.strides": [4, 8, 16, 32, 64]})
    torch.manual_seed(3)
    src = MaskRCNN(full).state_dict()
    tv = {k[len("backbone.body."):]: v for k, v in src.items() if k.startswith("backbone.body.")}
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 4), torch.zeros(1000)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(tv, path)
    model = MaskRCNN(cfg)
    init_from(model, str(path))
    state = model.state_dict()
    assert torch.equal(state["backbone.body.layer3.0.conv1.weight"], tv["layer3.0.conv1.weight"])
    assert torch.equal(state["roi_heads.res5.2.conv3.weight"], tv["layer4.2.conv3.weight"])
    deep = apply_overrides(cfg, {"model.backbone.depth": 101})
    with pytest.raises(WeightsError, match="do not fit the config's backbone"):
        init_from(MaskRCNN(deep), str(path))


def test_zoo_lists_every_detectron2_mask_model_with_the_manifest_urls(manifests: dict) -> None:
    from maskrcnn.weights import zoo

    for name, entry in manifests.items():
        if not name.startswith("mask_rcnn"):
            continue
        reg = zoo.REGISTRY[f"detectron2_{name}"]
        assert reg.url == entry["url"] and reg.format == "detectron2" and reg.preset == name
        assert (reg.box_ap, reg.mask_ap) == (entry["published_ap_coco_val2017"]["box_AP"],
                                             entry["published_ap_coco_val2017"]["mask_AP"])
        assert len(reg.class_names) == 80 and len(reg.category_ids) == 80
