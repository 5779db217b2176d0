"""Our checkpoint format: a folder with ``model.safetensors`` (float32 weights) and ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from maskrcnn.atomic import atomic_dir, atomic_write, atomic_write_text
from maskrcnn.config import Config, ConfigError
from maskrcnn.weights.errors import WeightsError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def is_native(path: Path) -> bool:
    """Whether ``path`` names a model folder, its safetensors file or its config.json."""
    return path.is_dir() or path.suffix == ".safetensors" or path.name == CONFIG_FILE


def save_model(model: Any, path: str | Path) -> Path:
    """Write a MaskRCNN (or a Predictor's) to directory ``path`` as ``model.safetensors`` (float32) + ``config.json``.

    The folder appears complete or not at all: both files are written into a temp folder beside it, fsynced and
    renamed into place. A ``path`` that already holds other files than these two keeps them: the two files are
    then replaced one at a time, each atomically (weights first; they carry the config in their metadata too).
    """
    model = getattr(model, "model", model)
    from safetensors.torch import save  # noqa: PLC0415

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = json.dumps(model.cfg.to_dict())
    blob = save(state, metadata={"format": "maskrcnn", "config": config})
    config_text = json.dumps(model.cfg.to_dict(), indent=2)
    foreign = path.is_dir() and any(p.name not in (WEIGHTS_FILE, CONFIG_FILE) for p in path.iterdir())
    if foreign:
        atomic_write(path / WEIGHTS_FILE, True, lambda f: f.write(blob))
        atomic_write_text(path / CONFIG_FILE, config_text)
        return path
    with atomic_dir(path) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(blob)
        (tmp / CONFIG_FILE).write_text(config_text)
    return path


def read_native(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, state dict) of a model folder, its safetensors file (config from the metadata) or its config.json."""
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
