"""detectron2 checkpoints: the model zoo's ``model_final_*.pkl`` and training checkpoints ``model_final.pth``.

A zoo ``.pkl`` is a pickle of ``{"model": {name: numpy.ndarray}, "__author__": ...}``. Pickles can run code, so
it is read with :class:`ArrayUnpickler`, which admits numpy arrays, numpy dtypes and plain containers and
refuses everything else. A ``.pth`` training checkpoint (``{"model": state_dict, ...}``) is read with
``torch.load(weights_only=True)``.

The state dict is then renamed to our module names (which are torchvision's) and its variant is read from the
keys and shapes: layout (FPN, C4 or DC5), depth, groups and widths, heads, class count. What the weights cannot
tell is taken from detectron2's zoo conventions: MSRA ResNets (groups 1) put the stride on the 1x1 conv and take
pixels with std 1; ResNeXt puts it on the 3x3 conv and divides by the zoo's std. Pass ``config=`` to
:func:`maskrcnn.load_model` (or override keys) for a checkpoint trained otherwise.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskrcnn.config import Config, get_preset
from maskrcnn.weights.errors import WeightsError

__all__ = ["ArrayUnpickler", "config_for_detectron2", "convert_detectron2_state", "is_detectron2_state",
           "read_detectron2_pickle"]

# What a zoo pickle may reference: numpy's array reconstruction (numpy 1.x and 2.x module names), and nothing
# that can run code. Containers (dict, list, tuple) and scalars are pickle opcodes, not globals.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1"): a pure function.
    ("_codecs", "encode"),
}

KEYPOINT_PREDICTOR = "roi_heads.keypoint_predictor.kps_score_lowres.weight"

# Keys of a detectron2 state dict that mean nothing to the model: anchor buffers of the 2019 zoo files and the
# (non-persistent since) pixel statistics, which the config holds.
_IGNORED = re.compile(r"^(proposal_generator\.anchor_generator\.cell_anchors\.\d+|pixel_mean|pixel_std)$")


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowed numpy globals; anything else raises :class:`pickle.UnpicklingError` naming it."""
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed (only numpy arrays may be loaded)")


def read_detectron2_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a detectron2 zoo ``.pkl`` as tensors (their dtype kept), read without running code."""
    try:
        data = ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: refused to load this pickle: {e}. A detectron2 .pkl holds only numpy arrays; "
                           f"a file that references other objects could run code when unpickled") from e
    except Exception as e:  # noqa: BLE001 - truncated or foreign files: report with the file name
        raise WeightsError(f"{path}: cannot read as a detectron2 .pkl ({type(e).__name__}: {e})") from e
    # Zoo models hold {"model": ...}; Detectron's ImageNet backbones (R-50.pkl) {"blobs": ...} or the arrays.
    state = (data.get("model") or data.get("blobs") or data) if isinstance(data, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"{path}: expected a pickle of {{'model': {{name: array}}}}")
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, np.ndarray):
            raise WeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not an array")
        out[str(k)] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def is_detectron2_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict has detectron2's Mask R-CNN names (backbone.* with res stages, roi_heads.*)."""
    has_body = any(k.startswith(("backbone.bottom_up.res", "backbone.res", "backbone.stem.")) for k in state)
    return has_body and any(k.startswith("roi_heads.") for k in state)


def _block(rest: str) -> str | None:
    """A residual block's inner name (``conv2.norm.weight``) in ours (``bn2.weight``), or None if unknown."""
    m = re.fullmatch(r"conv(\d)\.weight", rest)
    if m:
        return f"conv{m[1]}.weight"
    m = re.fullmatch(r"conv(\d)\.norm\.(weight|bias|running_mean|running_var)", rest)
    if m:
        return f"bn{m[1]}.{m[2]}"
    m = re.fullmatch(r"shortcut\.weight", rest)
    if m:
        return "downsample.0.weight"
    m = re.fullmatch(r"shortcut\.norm\.(weight|bias|running_mean|running_var)", rest)
    if m:
        return f"downsample.1.{m[1]}"
    return None


def _rename(key: str) -> str | None:
    """Our name for one detectron2 key, or None when the key has no counterpart here."""
    m = re.fullmatch(r"backbone\.(?:bottom_up\.)?stem\.conv1\.(weight|norm\.(?:weight|bias|running_mean|running_var))",
                     key)
    if m:
        return "backbone.body." + ("conv1.weight" if m[1] == "weight" else "bn1." + m[1].split(".", 1)[1])
    m = re.fullmatch(r"backbone\.(?:bottom_up\.)?res([2-5])\.(\d+)\.(.+)", key)
    if m and (inner := _block(m[3])):
        return f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.{inner}"
    m = re.fullmatch(r"roi_heads\.res5\.(\d+)\.(.+)", key)
    if m and (inner := _block(m[2])):
        return f"roi_heads.res5.{m[1]}.{inner}"
    m = re.fullmatch(r"backbone\.fpn_(lateral|output)([2-5])\.(weight|bias)", key)
    if m:
        blocks = "inner_blocks" if m[1] == "lateral" else "layer_blocks"
        return f"backbone.fpn.{blocks}.{int(m[2]) - 2}.0.{m[3]}"
    m = re.fullmatch(r"proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)", key)
    if m:
        name = {"conv": "conv.0.0", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}[m[1]]
        return f"rpn.head.{name}.{m[2]}"
    m = re.fullmatch(r"roi_heads\.box_head\.fc([12])\.(weight|bias)", key)
    if m:
        return f"roi_heads.box_head.fc{int(m[1]) + 5}.{m[2]}"
    m = re.fullmatch(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)", key)
    if m:
        return f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"
    m = re.fullmatch(r"roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)", key)
    if m:
        return f"roi_heads.mask_predictor.{'conv5_mask' if m[1] == 'deconv' else 'mask_fcn_logits'}.{m[2]}"
    # KRCNNConvDeconvUpsampleHead: conv_fcn1..N (each followed by a parameterless ReLU), then score_lowres.
    m = re.fullmatch(r"roi_heads\.keypoint_head\.conv_fcn(\d+)\.(weight|bias)", key)
    if m:
        return f"roi_heads.keypoint_head.{2 * (int(m[1]) - 1)}.{m[2]}"
    m = re.fullmatch(r"roi_heads\.keypoint_head\.score_lowres\.(weight|bias)", key)
    if m:
        return f"roi_heads.keypoint_predictor.kps_score_lowres.{m[1]}"
    return None


def convert_detectron2_state(state: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """detectron2 names -> ours (values untouched); unknown keys raise :class:`WeightsError` listing them."""
    out: dict[str, Any] = {}
    unknown = []
    for k, v in state.items():
        if _IGNORED.match(k):
            continue
        new = _rename(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        hint = ""
        if any(k.startswith("roi_heads.box_head.conv") for k in unknown):
            hint = " (convolutional box heads of detectron2 are not supported yet)"
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise WeightsError(f"{source}: {len(unknown)} detectron2 keys have no counterpart in this library{hint}: "
                           f"{shown}")
    return out


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """Shape of ``state[key]`` (a tensor, an array, or a shape list as in manifests)."""
    v = state[key]
    return tuple(int(d) for d in (v.shape if hasattr(v, "shape") else v))


def config_for_detectron2(state: Mapping[str, Any], source: str = "checkpoint") -> Config:
    """The preset matching a state dict in **our** names converted from detectron2, with its sizes read off it.

    Layout: FPN when it has FPN keys, C4 when res5 is in the RoI heads, DC5 otherwise. Depth from res4's block
    count, groups and widths from the conv shapes, classes from the classifier, head widths from their layers.
    A keypoint head (``keypoint_predictor``) selects the zoo's Keypoint R-CNN conventions, its tower widths and
    keypoint count read off the tensors.
    """
    keys = set(state)
    body = "backbone.body."
    if f"{body}conv1.weight" not in keys or "roi_heads.box_predictor.cls_score.weight" not in keys:
        raise WeightsError(f"{source}: not a detectron2 Mask R-CNN (no stem or box predictor)")
    if any(k.startswith("backbone.fpn.") for k in keys):
        layout = "fpn"
    elif any(k.startswith("roi_heads.res5.") for k in keys):
        layout = "c4"
    else:
        layout = "dc5"
    res4 = {int(m[1]) for k in keys if (m := re.match(r"backbone\.body\.layer3\.(\d+)\.", k))}
    depth = {6: 50, 23: 101, 36: 152}.get(len(res4))
    if depth is None:
        raise WeightsError(f"{source}: res4 has {len(res4)} blocks; expected 6 (R50), 23 (R101) or 36 (R152)")
    width = _shape(state, f"{body}layer1.0.conv1.weight")[0]
    groups = width // _shape(state, f"{body}layer1.0.conv2.weight")[1]
    stem = _shape(state, f"{body}conv1.weight")[0]
    res2_out = _shape(state, f"{body}layer1.0.conv3.weight")[0]
    k1 = _shape(state, "roi_heads.box_predictor.cls_score.weight")[0]
    # The zoo's conventions, which weights cannot show: MSRA R50/R101 vs ResNeXt (see the module docstring).
    name = f"detectron2_{'X' if groups > 1 else 'R'}_{depth}_{layout.upper()}"
    cfg = get_preset("mask_rcnn_X_101_32x8d_FPN_3x" if groups > 1 else f"mask_rcnn_R_50_{layout.upper()}_3x")
    keypoint_head = cfg.model.keypoint_head
    if KEYPOINT_PREDICTOR in keys:
        # The zoo's keypoint conventions (softmax scores, +0.5 px COCO offset, ROIAlignV2); the zoo has FPN only.
        kp_cfg = get_preset("keypoint_rcnn_X_101_32x8d_FPN_3x" if groups > 1 else "keypoint_rcnn_R_50_FPN_3x")
        if layout == "fpn":
            cfg = kp_cfg
        tower = sorted((int(mt[1]), _shape(state, k)[0]) for k in keys
                       if (mt := re.fullmatch(r"roi_heads\.keypoint_head\.(\d+)\.weight", k)))
        num_kp = _shape(state, KEYPOINT_PREDICTOR)[1]
        keypoint_head = dataclasses.replace(kp_cfg.model.keypoint_head, num_keypoints=num_kp,
                                            conv_dims=tuple(d for _, d in tower))
        if num_kp != len(keypoint_head.names):
            keypoint_head = dataclasses.replace(keypoint_head, names=(), skeleton=())
    m = cfg.model
    backbone = dataclasses.replace(m.backbone, depth=depth, groups=groups, width_per_group=width // groups,
                                   stem_out_channels=stem, res2_out_channels=res2_out)
    fpn = m.fpn
    if layout == "fpn":
        fpn = dataclasses.replace(fpn, out_channels=_shape(state, "backbone.fpn.layer_blocks.0.0.weight")[0])
    box_head = m.box_head
    if "roi_heads.box_head.fc6.weight" in keys:
        box_head = dataclasses.replace(box_head, fc_dim=_shape(state, "roi_heads.box_head.fc6.weight")[0])
    mask_keys = [k for k in keys if re.fullmatch(r"roi_heads\.mask_head\.\d+\.0\.weight", k)]
    mask_head = dataclasses.replace(m.mask_head, enabled="roi_heads.mask_predictor.mask_fcn_logits.weight" in keys,
                                    num_convs=len(mask_keys))
    if "roi_heads.mask_predictor.conv5_mask.weight" in keys:
        mask_head = dataclasses.replace(mask_head,
                                        conv_dim=_shape(state, "roi_heads.mask_predictor.conv5_mask.weight")[1])
    model = dataclasses.replace(m, num_classes=k1 - 1, class_names=(), category_ids=(), backbone=backbone, fpn=fpn,
                                box_head=box_head, mask_head=mask_head, keypoint_head=keypoint_head)
    return dataclasses.replace(cfg, name=name, model=model)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-initialised backbones of detectron2's zoo (ImageNetPretrained/MSRA/R-50.pkl, R-101.pkl in Caffe2's
# names; FAIR/X-101-32x8d.pkl in detectron2's), for training the way the paper did.


def _caffe2_rename(key: str) -> str | None:
    """Our ``backbone.body.*`` name for one Caffe2 ResNet key (``res2_0_branch2a_bn_s``), or None."""
    m = re.fullmatch(r"conv1_w", key)
    if m:
        return "conv1.weight"
    m = re.fullmatch(r"res_conv1_bn_([sb])", key)
    if m:
        return "bn1." + ("weight" if m[1] == "s" else "bias")
    m = re.fullmatch(r"res([2-5])_(\d+)_branch(2[abc]|1)_(w|bn_s|bn_b)", key)
    if m:
        stage, block, branch, what = int(m[1]) - 1, m[2], m[3], m[4]
        if branch == "1":
            conv, norm = "downsample.0", "downsample.1"
        else:
            k = "abc".index(branch[1]) + 1
            conv, norm = f"conv{k}", f"bn{k}"
        tail = {"w": f"{conv}.weight", "bn_s": f"{norm}.weight", "bn_b": f"{norm}.bias"}[what]
        return f"layer{stage}.{block}.{tail}"
    return None


def is_caffe2_resnet(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a Caffe2-named ImageNet ResNet (``conv1_w``, ``res2_0_branch2a_w``)."""
    return "conv1_w" in state and any(k.startswith("res2_0_branch2a") for k in state)


def convert_backbone_state(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """An ImageNet ResNet in Caffe2's or detectron2's names -> our ``backbone.body.*`` names.

    Caffe2's batch norms are affine only (scale ``_bn_s``, shift ``_bn_b``): their frozen statistics become mean 0
    and variance 1, as detectron2 loads them. Classifier weights (``fc1000``, ``linear``) are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    if is_caffe2_resnet(state):
        for k, v in state.items():
            new = _caffe2_rename(k)
            if new is None:
                continue  # fc1000_w / fc1000_b: the ImageNet classifier
            out[f"backbone.body.{new}"] = v
        for k in [k for k in out if k.endswith(".weight") and (".bn" in k or ".downsample.1." in k)]:
            stem = k[: -len("weight")]
            out.setdefault(stem + "running_mean", torch.zeros_like(out[k]))
            out.setdefault(stem + "running_var", torch.ones_like(out[k]))
    else:
        prefixed = {(k if k.startswith("backbone.") else f"backbone.bottom_up.{k}"): v for k, v in state.items()
                    if not k.startswith(("linear.", "fc."))}
        for k, v in prefixed.items():
            new = _rename(k)
            if new is not None and new.startswith("backbone.body."):
                out[new] = v
    if not out:
        raise WeightsError(f"{source}: no ResNet backbone weights found (expected Caffe2 names such as 'conv1_w' "
                           f"and 'res2_0_branch2a_w', or detectron2's 'stem.conv1.weight', 'res2.0.conv1.weight')")
    return out
