"""Config: presets, YAML/JSON round trips, dotted overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskrcnn.config import PRESETS, Config, ConfigError, apply_overrides, get_preset, load_config, save_config


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_presets_round_trip(name: str, suffix: str, tmp_path: Path) -> None:
    cfg = get_preset(name)
    path = tmp_path / f"cfg{suffix}"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_paper_defaults() -> None:
    cfg = get_preset("torchvision_v1")
    assert cfg.solver.momentum == 0.9 and cfg.solver.weight_decay == 1e-4
    assert cfg.model.mask_head.pooler_resolution * 2 == 28
    assert cfg.model.box_head.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)
    assert (cfg.model.rpn.fg_iou_thresh, cfg.model.rpn.bg_iou_thresh) == (0.7, 0.3)
    assert (cfg.input.min_size_test, cfg.input.max_size_test) == (800, 1333)


def test_overrides_parse_values() -> None:
    cfg = apply_overrides(get_preset("torchvision_v1"), ["solver.max_iter=300", "input.min_size_train=[256, 288]",
                                                         "model.box_head.pooler_aligned=true", "solver.amp=bf16"])
    assert cfg.solver.max_iter == 300 and cfg.input.min_size_train == (256, 288)
    assert cfg.model.box_head.pooler_aligned is True and cfg.solver.amp == "bf16"


@pytest.mark.parametrize("override, message", [
    ("solver.maxiter=3", "unknown config key 'solver.maxiter'"),
    ("solver=3", "is a section"),
    ("solver.max_iter=abc", "must be an integer"),
    ("solver.amp=fp8", "must be one of"),
    ("no_equals_sign", "key=value"),
    ("model.nothing.x=1", "is not a section"),
])
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("torchvision_v1"), [override])


def test_yaml_file_with_preset_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "a.yaml"
    good.write_text("preset: r18_fpn_demo\nsolver:\n  max_iter: 7\n")
    cfg = load_config(good)
    assert cfg.name == "r18_fpn_demo" and cfg.solver.max_iter == 7
    bad = tmp_path / "b.yaml"
    bad.write_text("solver:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"b.yaml.*unknown config keys in section 'solver': lr"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")
