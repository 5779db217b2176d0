"""Multi-level RoIAlign and the FPN level mapper against torchvision."""

from __future__ import annotations

import torch
from conftest import assert_close_f32

from maskrcnn.modeling.poolers import LevelMapper, MultiScaleRoIAlign


def test_multiscale_roi_align_matches_reference(ops_fixture: dict) -> None:
    for c in ops_fixture["multiscale_roi_align"]:
        pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], c["output_size"], c["sampling_ratio"], aligned=False)
        out = pooler(c["features"], c["boxes"], [tuple(s) for s in c["image_sizes"]])
        assert_close_f32(out, c["output"], what=f"multiscale {c['output_size']}")


def test_level_mapper_canonical_sizes() -> None:
    mapper = LevelMapper(2, 5)
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448], [0, 0, 10, 10], [0, 0, 2000, 2000.0]])
    # 224 px -> level 4; halving the size goes down one level; clamped to [2, 5]; index counted from k_min.
    assert mapper([boxes]).tolist() == [2, 1, 3, 0, 3]
