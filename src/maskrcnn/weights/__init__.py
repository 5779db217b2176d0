"""Checkpoints in every format we read, and the model zoo; :func:`load_model` is the one entry point.

``load_model(path_or_name)`` accepts:
- a directory holding ``model.safetensors`` and ``config.json`` (what ``Predictor.save`` writes), or one of
  those two files (:mod:`maskrcnn.weights.native`);
- a torchvision ``.pth`` state dict of ``maskrcnn_resnet50_fpn`` (v1), ``maskrcnn_resnet50_fpn_v2`` or
  ``keypointrcnn_resnet50_fpn``: the variant is told from the keys and the class count from the predictor's shape
  (:mod:`maskrcnn.weights.torchvision`);
- a detectron2 model-zoo ``.pkl`` or training checkpoint ``.pth`` of any Mask R-CNN layout or Keypoint R-CNN
  (:mod:`maskrcnn.weights.detectron2`), read without running code;
- a registry name (:mod:`maskrcnn.weights.zoo`), resolved to the cached file.

It returns a :class:`~maskrcnn.Predictor`, the facade; its ``.model`` is the :class:`~maskrcnn.MaskRCNN`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from maskrcnn.config import Config, ConfigError, get_preset
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.predict import Predictor
from maskrcnn.weights.detectron2 import (
    config_for_detectron2,
    convert_backbone_state,
    convert_detectron2_state,
    is_caffe2_resnet,
    is_detectron2_state,
    read_detectron2_pickle,
)
from maskrcnn.weights.errors import WeightsError
from maskrcnn.weights.native import CONFIG_FILE, WEIGHTS_FILE, is_native, read_native, save_model
from maskrcnn.weights.torchvision import (
    config_for_torchvision,
    convert_torchvision_backbone,
    detect_torchvision_variant,
    is_torchvision_resnet,
    is_torchvision_state,
)

__all__ = ["CONFIG_FILE", "TEST_TIME_OVERRIDES", "WEIGHTS_FILE", "WeightsError", "build_model",
           "config_for_torchvision", "detect_torchvision_variant", "load_model", "load_state", "read_checkpoint",
           "read_init_state",
           "save_model"]

TEST_TIME_OVERRIDES = ("min_size", "max_size", "score_threshold", "nms_threshold", "detections_per_img", "device")


def load_state(model: MaskRCNN, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (our key names) into ``model``; every missing, unexpected or mis-shaped key is an error."""
    own = model.state_dict()
    # A BatchNorm counter means nothing for inference and a frozen BN has none; accept both.
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {', '.join(mismatched)}")
        raise WeightsError(f"{source}: checkpoint does not fit the model; " + "; ".join(parts))
    converted = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(converted, strict=False)


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``, read with ``weights_only`` (never code); a training checkpoint's ``model``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling problem with the file's name
        raise WeightsError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a training checkpoint of ours: {"model": state, "optimizer": ...}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors)")
    return obj


def _apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    unknown = sorted(set(overrides) - set(TEST_TIME_OVERRIDES))
    if unknown:
        raise ConfigError(f"unknown load_model options: {', '.join(unknown)}; valid: {', '.join(TEST_TIME_OVERRIDES)}")
    inp, bh = cfg.input, cfg.model.box_head
    if overrides.get("min_size") is not None:
        inp = dataclasses.replace(inp, min_size_test=int(overrides["min_size"]))
    if overrides.get("max_size") is not None:
        inp = dataclasses.replace(inp, max_size_test=int(overrides["max_size"]))
    if overrides.get("score_threshold") is not None:
        bh = dataclasses.replace(bh, score_thresh=float(overrides["score_threshold"]))
    if overrides.get("nms_threshold") is not None:
        bh = dataclasses.replace(bh, nms_thresh=float(overrides["nms_threshold"]))
    if overrides.get("detections_per_img") is not None:
        bh = dataclasses.replace(bh, detections_per_img=int(overrides["detections_per_img"]))
    model = dataclasses.replace(cfg.model, box_head=bh)
    return dataclasses.replace(cfg, input=inp, model=model)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def read_init_state(path_or_name: str | Path) -> tuple[Config | None, dict[str, torch.Tensor], Path]:
    """Weights to start training from: a whole model's (config, state, file), or an ImageNet backbone's
    (None, its ``backbone.body.*`` state in our names, file): torchvision's ResNets, detectron2's R-50.pkl etc."""
    path = _resolve(path_or_name)[0]
    if not is_native(path):
        state = read_detectron2_pickle(path) if path.suffix == ".pkl" else _read_torch_file(path)
        if is_caffe2_resnet(state) or (not is_detectron2_state(state) and any(
                k.startswith(("stem.", "res2.")) for k in state)):
            return None, convert_backbone_state(state, str(path)), path
        if is_torchvision_resnet(state):
            return None, convert_torchvision_backbone(state), path
    return read_checkpoint(path)


def _resolve(path_or_name: str | Path) -> tuple[Path, Any]:
    """A file path for a path or registry name, with its registry entry (None when it is not a known file).

    A path whose file name is a registry entry's (the cache's name, torchvision's hub name) counts as that entry.
    """
    from maskrcnn.weights import zoo  # noqa: PLC0415 - the registry; downloads only for a name not on disk

    path = Path(path_or_name)
    if path.exists():
        entry = next((e for e in zoo.REGISTRY.values() if e.file_name == path.name), None)
        return path, entry
    entry = zoo.REGISTRY.get(str(path_or_name))
    return zoo.resolve_weights(str(path_or_name)), entry


def read_checkpoint(path_or_name: str | Path) -> tuple[Config, dict[str, torch.Tensor], Path]:
    """Any supported checkpoint or registry name -> (its config, its state dict in our key names, the file)."""
    path, entry = _resolve(path_or_name)
    class_names: tuple[str, ...] = entry.class_names if entry is not None else ()
    category_ids: tuple[int, ...] = entry.category_ids if entry is not None else ()
    if is_native(path):
        cfg, state = read_native(path)
    else:
        state = read_detectron2_pickle(path) if path.suffix == ".pkl" else _read_torch_file(path)
        if is_detectron2_state(state):
            state = convert_detectron2_state(state, str(path))
            cfg = config_for_detectron2(state, str(path))
        elif is_torchvision_state(state):
            cfg = config_for_torchvision(state)
            if entry is not None and cfg.model.keypoint_head.enabled:
                # Keypoint R-CNN's FrozenBN eps is not in its weights: the registry knows it of its published files.
                eps = get_preset(entry.preset).model.backbone.norm_eps
                cfg = dataclasses.replace(cfg, name=entry.preset, model=dataclasses.replace(
                    cfg.model, backbone=dataclasses.replace(cfg.model.backbone, norm_eps=eps)))
        elif is_caffe2_resnet(state) or is_torchvision_resnet(state):
            raise WeightsError(f"{path}: ImageNet weights of a ResNet body, not a Mask R-CNN: start training from "
                               f"them with 'maskrcnn train --weights {path_or_name}'")
        else:
            raise WeightsError(f"{path}: not a Mask R-CNN checkpoint this library knows (torchvision's names "
                               f"backbone.body.*, rpn.*, roi_heads.*, or detectron2's backbone.bottom_up.*, "
                               f"proposal_generator.*, roi_heads.*)")
    if class_names and len(class_names) == cfg.model.num_classes:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, class_names=tuple(class_names)))
    if category_ids and len(category_ids) == cfg.model.num_classes:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, category_ids=tuple(category_ids)))
    return cfg, state, path


def build_model(cfg: Config, state: dict[str, torch.Tensor] | None = None, source: str = "weights",
                device: str | torch.device | None = "cpu") -> MaskRCNN:
    """A MaskRCNN in eval mode built from ``cfg``, with ``state`` (our key names) loaded when given."""
    model = MaskRCNN(cfg)
    if state is not None:
        load_state(model, state, source)
    return model.to(_resolve_device(device)).eval()


def load_model(path_or_name: str | Path, config: Config | None = None, optimize: bool = True,
               fast_math: bool = False, compile: bool = False, amp: str = "none", **overrides: Any) -> Predictor:
    """Load a model in eval mode from our format, a torchvision ``.pth`` or a registry name; returns its Predictor.

    Keyword overrides of test-time settings: min_size, max_size, score_threshold, nms_threshold,
    detections_per_img, device ("cpu", "cuda", "auto"; default cpu). ``config`` replaces the stored config.
    ``optimize`` turns on the fast path (:meth:`MaskRCNN.optimize`); False gives the naive reference path.
    ``fast_math``, ``compile`` and ``amp`` ("bf16", "fp16") are its opt-in, not bit-exact speed-ups (see there).
    """
    if str(path_or_name).lower().endswith(".onnx"):  # an exported graph, run by onnxruntime (maskrcnn.export)
        from maskrcnn.export import load_onnx  # noqa: PLC0415

        return load_onnx(path_or_name, config, optimize, fast_math, compile, amp, **overrides)
    cfg, state, path = read_checkpoint(path_or_name)
    if config is not None:
        cfg = config
    cfg = _apply_overrides(cfg, overrides)
    model = build_model(cfg, state, str(path), overrides.get("device", "cpu"))
    return Predictor(model.optimize(optimize, fast_math=fast_math, compile=compile, amp=amp))
