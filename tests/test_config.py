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


@pytest.mark.parametrize("override, message", [
    ("model.num_classes=-3", "config key 'model.num_classes' must be >= 1, got -3"),
    ("input.flip_prob=7", "config key 'input.flip_prob' must be in [0, 1], got 7.0"),
    ("solver.base_lr=-1", "config key 'solver.base_lr' must be > 0, got -1.0"),
    ("solver.ims_per_batch=0", "config key 'solver.ims_per_batch' must be >= 1, got 0"),
    ("solver.base_lr=.nan", "config key 'solver.base_lr' must be > 0, got nan"),
    ("input.min_size_train=[640,0]", "each item of config key 'input.min_size_train' must be >= 1, got (640, 0)"),
    ("model.backbone.depth=42", "config key 'model.backbone.depth' must be one of 18, 34, 50, 101, 152, got 42"),
    ("solver.momentum=1", "config key 'solver.momentum' must be in [0, 1), got 1.0"),
    ("model.rpn.bg_iou_thresh=0.8", "model.rpn.bg_iou_thresh=0.8 must be <= model.rpn.fg_iou_thresh=0.7"),
    ("solver.steps=[800,400]", "config key 'solver.steps' must be in increasing order"),
    ("train.max_bad_image_fraction=2", "config key 'train.max_bad_image_fraction' must be in [0, 1], got 2.0"),
    ("train.patience=-1", "config key 'train.patience' must be >= 0, got -1"),
    ("model.box_head.min_box_size=-1", "config key 'model.box_head.min_box_size' must be >= 0, got -1.0"),
])
def test_values_out_of_range_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset("torchvision_v1"), [override])
    assert message in str(info.value)


@pytest.mark.parametrize("overrides, key, channels, groups", [
    (["model.fpn.out_channels=48"], "model.fpn.out_channels", 48, 32),
    (["model.box_head.conv_dim=20"], "model.box_head.conv_dim", 20, 32),
    (["model.mask_head.conv_dim=40"], "model.mask_head.conv_dim", 40, 32),
    (["model.backbone.gn_groups=3"], "model.backbone.stem_out_channels", 64, 3),
    (["model.backbone.res2_out_channels=48"], "model.backbone.res2_out_channels", 48, 32),
])
def test_group_norm_channels_must_divide_into_groups(overrides: list[str], key: str, channels: int,
                                                     groups: int) -> None:
    """A GroupNorm width that its groups do not divide is a config error naming the key, not torch's raw error."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset("r18_fpn_demo"), overrides)
    assert f"config key {key!r} gives a GroupNorm layer {channels} channels, which {groups} groups" in str(info.value)
    # The same widths are fine without GroupNorm there.
    plain = ["model.fpn.norm=none", "model.box_head.norm=none", "model.mask_head.norm=none",
             "model.backbone.norm=frozen_bn"]
    apply_overrides(get_preset("r18_fpn_demo"), plain + overrides)


def test_every_numeric_field_has_a_range_that_its_defaults_and_presets_meet() -> None:
    import dataclasses

    from maskrcnn.config import FIELD_RANGES, numeric_fields

    sections = []

    def walk(cls: type) -> None:
        sections.append(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default))

    walk(Config)
    missing = [f"{cls.__name__}.{name}" for cls in sections for name in numeric_fields(cls)
               if f"{cls.__name__}.{name}" not in FIELD_RANGES]
    assert not missing, f"numeric config fields without a range in FIELD_RANGES: {missing}"
    assert len(FIELD_RANGES) > 80 and not [k for k in FIELD_RANGES if k.split(".")[0] not in
                                           {c.__name__ for c in sections}]
    for name in PRESETS:
        get_preset(name)  # validated when made


def test_bad_values_in_yaml_replace_and_saved_models(tmp_path: Path) -> None:
    import dataclasses
    import json

    from maskrcnn.weights import WeightsError, load_model

    path = tmp_path / "bad.yaml"
    path.write_text("preset: r18_fpn_demo\nsolver:\n  base_lr: -0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key 'solver\.base_lr' must be > 0, got -0\.5"):
        load_config(path)
    cfg = get_preset("r18_fpn_demo")
    with pytest.raises(ConfigError, match="'train.seed' must be >= 0"):
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=-1))
    from maskrcnn.modeling.mask_rcnn import MaskRCNN
    from maskrcnn.weights import save_model

    save_model(MaskRCNN(cfg), tmp_path / "model")
    data = json.loads((tmp_path / "model" / "config.json").read_text())
    data["model"]["box_head"]["detections_per_img"] = 0
    (tmp_path / "model" / "config.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"config\.json: config key 'model\.box_head\.detections_per_img' must be "
                                           r">= 1, got 0"):
        load_model(tmp_path / "model")
