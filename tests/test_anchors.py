"""Anchor generator against torchvision's anchors (rounded base anchors, integer-division strides)."""

from __future__ import annotations

import torch

from maskrcnn.config import AnchorConfig
from maskrcnn.modeling.anchors import AnchorGenerator, cell_anchors


def test_anchors_match_reference(ops_fixture: dict) -> None:
    d = ops_fixture["anchors"]
    gen = AnchorGenerator(AnchorConfig(sizes=tuple(d["sizes"]), aspect_ratios=tuple(d["aspect_ratios"])))
    for case in d["cases"]:
        feats = [tuple(s) for s in case["feature_sizes"]]
        anchors = gen(tuple(case["batch_shape"][-2:]), feats, torch.float32, torch.device("cpu"))
        assert torch.equal(anchors, case["anchors"])
        for size, expected in zip(d["sizes"], case["cell_anchors"]):
            assert torch.equal(cell_anchors(size, tuple(d["aspect_ratios"]), True), expected)


def test_unrounded_anchors_keep_exact_area() -> None:
    base = cell_anchors(32, (0.5, 1.0, 2.0), round_base=False)
    areas = (base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1])
    torch.testing.assert_close(areas, torch.full((3,), 32.0 * 32.0))
    ratios = (base[:, 3] - base[:, 1]) / (base[:, 2] - base[:, 0])
    torch.testing.assert_close(ratios, torch.tensor([0.5, 1.0, 2.0]))
