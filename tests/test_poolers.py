"""Multi-level RoIAlign and the FPN level mapper against torchvision."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("kind", ["align", "pool", "warp"])
def test_pooler_kinds_pool_each_roi_from_its_level(kind: str) -> None:
    from maskrcnn.ops.roi_align import roi_align, roi_pool, roi_warp

    gen = torch.Generator().manual_seed(3)
    feats = {str(i): torch.randn(2, 4, 64 >> i, 64 >> i, generator=gen) for i in range(4)}
    boxes = [torch.tensor([[3.0, 5.0, 40.0, 30.0], [0.0, 0.0, 250.0, 250.0]]), torch.tensor([[10.2, 7.7, 18.9, 20.1]])]
    naive = MultiScaleRoIAlign(list(feats), 7, 2, aligned=True, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], kind=kind)
    fast = MultiScaleRoIAlign(list(feats), 7, 2, aligned=True, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], kind=kind)
    fast.fast = fast.channels_last_output = True
    out = naive(feats, boxes, [(256, 256)] * 2)
    assert out.shape == (3, 4, 7, 7)
    torch.testing.assert_close(fast(feats, boxes, [(256, 256)] * 2), out, rtol=0, atol=0)
    levels = LevelMapper(2, 5)(boxes).tolist()
    rois = torch.cat([torch.tensor([[0.0], [0.0], [1.0]]), torch.cat(boxes)], dim=1)
    for i, level in enumerate(levels):
        feat, scale = feats[str(level)], 1 / 4 / 2**level
        want = {"align": lambda: roi_align(feat, rois[i:i + 1], 7, scale, 2, True),
                "pool": lambda: roi_pool(feat, rois[i:i + 1], 7, scale),
                "warp": lambda: roi_warp(feat, rois[i:i + 1], 7, scale, 2, True)}[kind]()
        torch.testing.assert_close(out[i:i + 1], want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown RoI pooler type"):
        MultiScaleRoIAlign(list(feats), 7, 2, kind="crop")
