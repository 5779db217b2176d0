"""Checkpoints: our format (safetensors + config JSON) and torchvision state dicts, loaded into MaskRCNN.

``load_model(path_or_name)`` accepts:
- a directory holding ``model.safetensors`` and ``config.json`` (what ``MaskRCNN.save`` writes), or one of
  those two files;
- a torchvision ``.pth`` state dict of ``maskrcnn_resnet50_fpn`` (v1) or ``maskrcnn_resnet50_fpn_v2``: the variant
  is told from the keys and the class count from the predictor's shape;
- a registry name (see :mod:`maskrcnn.hub`), resolved to the cached file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from maskrcnn.config import Config, ConfigError, get_preset
from maskrcnn.modeling.mask_rcnn import MaskRCNN

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEST_TIME_OVERRIDES = ("min_size", "max_size", "score_threshold", "nms_threshold", "detections_per_img", "device")


class WeightsError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the keys."""


def save_model(model: MaskRCNN, path: str | Path) -> Path:
    """Write ``model`` to directory ``path`` as ``model.safetensors`` (float32) + ``config.json``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "maskrcnn", "config": json.dumps(model.cfg.to_dict())})
    tmp.replace(path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2))
    return path


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
        from maskrcnn.coco_names import TORCHVISION_COCO_CLASS_NAMES  # noqa: PLC0415

        names = tuple(TORCHVISION_COCO_CLASS_NAMES)
    mask_enabled = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    model = dataclasses.replace(model, num_classes=k1 - 1, class_names=names, backbone=backbone,
                                mask_head=dataclasses.replace(model.mask_head, enabled=mask_enabled))
    return dataclasses.replace(cfg, model=model)


def _load_state(model: MaskRCNN, state: dict[str, torch.Tensor], source: str) -> None:
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


def load_model(path_or_name: str | Path, config: Config | None = None, optimize: bool = True,
               fast_math: bool = False, compile: bool = False, amp: str = "none", **overrides: Any) -> MaskRCNN:
    """Load a MaskRCNN in eval mode from our format, a torchvision ``.pth`` or a registry name.

    Keyword overrides of test-time settings: min_size, max_size, score_threshold, nms_threshold,
    detections_per_img, device ("cpu", "cuda", "auto"; default cpu). ``config`` replaces the stored config.
    ``optimize`` turns on the fast path (:meth:`MaskRCNN.optimize`); False gives the naive reference path.
    ``fast_math``, ``compile`` and ``amp`` ("bf16", "fp16") are its opt-in, not bit-exact speed-ups (see there).
    """
    if str(path_or_name).lower().endswith(".onnx"):  # an exported graph, run by onnxruntime (maskrcnn.export)
        from maskrcnn.export import load_onnx  # noqa: PLC0415

        return load_onnx(path_or_name, config, optimize, fast_math, compile, amp, **overrides)
    path = Path(path_or_name)
    class_names: tuple[str, ...] = ()
    if not path.exists():
        from maskrcnn import hub  # noqa: PLC0415 - network code only when a name is given

        entry = hub.REGISTRY.get(str(path_or_name))
        class_names = entry.class_names if entry is not None else ()
        path = hub.resolve_weights(str(path_or_name))
    if path.is_dir() or path.suffix == ".safetensors" or path.name == CONFIG_FILE:
        cfg, state = _read_ours(path)
    else:
        state = _read_torch_file(path)
        if "roi_heads.box_predictor.cls_score.weight" in state and any(k.startswith("backbone.body.") for k in state):
            cfg = config_for_torchvision(state)
        else:
            raise WeightsError(f"{path}: not a Mask R-CNN state dict this library knows (torchvision layout "
                               f"expected: backbone.body.*, rpn.*, roi_heads.*)")
    if config is not None:
        cfg = config
    elif class_names and len(class_names) == cfg.model.num_classes:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, class_names=tuple(class_names)))
    device = _resolve_device(overrides.get("device", "cpu"))
    cfg = _apply_overrides(cfg, overrides)
    model = MaskRCNN(cfg)
    _load_state(model, state, str(path))
    model = model.to(device).eval()
    return model.optimize(optimize, fast_math=fast_math, compile=compile, amp=amp)


def _read_ours(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    folder = path if path.is_dir() else path.parent
    wfile = folder / WEIGHTS_FILE if path.is_dir() or path.name == CONFIG_FILE else path
    cfile = folder / CONFIG_FILE
    if not wfile.is_file():
        raise WeightsError(f"{folder}: no {WEIGHTS_FILE} here (expected a model directory written by model.save)")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{wfile}: cannot read safetensors file ({e})") from e
    if cfile.is_file():
        try:
            data = json.loads(cfile.read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{cfile}: invalid JSON ({e})") from e
    else:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(wfile), "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise WeightsError(f"{wfile}: no {CONFIG_FILE} beside it and no config in its metadata")
        data = json.loads(meta["config"])
    try:
        cfg = Config.from_dict(data)
    except ConfigError as e:
        raise WeightsError(f"{cfile}: {e}") from e
    return cfg, state
