"""Acceptance: torchvision checkpoints loaded through maskrcnn.load_model reproduce torchvision's outputs.

Tolerances are those of ../shared/fixtures/README.md. Each test reports its maximum error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import maskrcnn
from maskrcnn.io import to_chw_float

BOX_TOL = 1e-3
SCORE_TOL = 1e-4
LOGIT_TOL = 1e-3
PROPOSAL_TOL = 1e-2
FEATURE_TOL = 1e-4
MASK_IOU = 0.999
# A mask-logit error of LOGIT_TOL moves a probability near 0.5 by at most 0.25 * LOGIT_TOL.
TIE_BAND = 0.25 * LOGIT_TOL


def _weights_path(fixtures_dir: Path, variant: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = fixtures_dir / "torchvision" / f"maskrcnn_r50_fpn_{variant}"
    if variant == "v1":
        return root / "weights.pth"
    # The v2 fixture ships every tensor but the backbone body, which is shared with v1 (fixtures README).
    state = torch.load(root / "weights.pth", weights_only=True)
    v1 = torch.load(fixtures_dir / "torchvision" / "maskrcnn_r50_fpn_v1" / "weights.pth", weights_only=True)
    state.update({k: v for k, v in v1.items() if k.startswith("backbone.body.")})
    out = tmp_path_factory.mktemp("v2") / "maskrcnn_r50_fpn_v2.pth"
    torch.save(state, out)
    return out


@pytest.fixture(scope="module", params=["v1", "v2"])
def run(request: pytest.FixtureRequest, fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Load the variant's checkpoint, run every fixture image, keep outputs and expectations."""
    variant = request.param
    root = fixtures_dir / "torchvision" / f"maskrcnn_r50_fpn_{variant}"
    import json

    meta = json.loads((root / "config.json").read_text())
    model = maskrcnn.load_model(_weights_path(fixtures_dir, variant, tmp_path_factory),
                                min_size=meta["min_size"], max_size=meta["max_size"])
    expected = torch.load(root / "expected.pt", weights_only=True)["images"]
    outputs = []
    for rec in expected:
        image = np.asarray(Image.open(root / rec["image_file"]).convert("RGB"))
        outputs.append(model.detect([to_chw_float(image)], soft_masks=True, keep_intermediates=True)[0])
    return {"variant": variant, "model": model, "expected": expected, "outputs": outputs, "meta": meta}


def test_variant_detected(run: dict) -> None:
    cfg = run["model"].cfg
    assert cfg.name == f"torchvision_{run['variant']}"
    assert cfg.model.num_classes == run["meta"]["num_classes"] - 1
    if run["variant"] == "v1":
        assert cfg.model.backbone.norm == "frozen_bn" and cfg.model.backbone.norm_eps == 0.0
    else:
        assert cfg.model.backbone.norm == "bn" and cfg.model.fpn.norm == "bn" and cfg.model.rpn.num_convs == 2


def test_sizes(run: dict) -> None:
    for out, rec in zip(run["outputs"], run["expected"]):
        assert tuple(out["resized_size"]) == tuple(rec["resized_size"]), rec["image_file"]
        assert tuple(out["batch_shape"]) == tuple(rec["batch_shape"]), rec["image_file"]


def test_features(run: dict) -> None:
    rec, out = run["expected"][0], run["outputs"][0]
    if "features" not in rec:
        pytest.skip(f"{run['variant']} fixture has no features")
    worst = max((out["features"][k][0] - rec["features"][k]).abs().max().item() for k in rec["features"])
    print(f"{run['variant']} features max abs error {worst:.3g}")
    assert worst <= FEATURE_TOL


def test_proposals(run: dict) -> None:
    worst = 0.0
    for out, rec in zip(run["outputs"], run["expected"]):
        got, exp = out["proposals"], rec["proposals"]
        assert got.shape == exp.shape, rec["image_file"]
        err = (got - exp).abs().max().item()
        worst = max(worst, err)
        assert err <= PROPOSAL_TOL, f"{rec['image_file']}: proposals differ by {err}"
    print(f"{run['variant']} proposals max abs error {worst:.3g} px")


def _matched(out: dict, rec: dict, thresh: float) -> int:
    """Number of leading detections to compare, checking the README's count rule on any extra ones."""
    n_got, n_exp = out["boxes"].shape[0], rec["boxes"].shape[0]
    n = min(n_got, n_exp)
    extra = out["scores"][n:] if n_got > n_exp else rec["scores"][n:]
    last = rec["scores"][n - 1] if n else torch.tensor(1.0)
    for s in extra.tolist():
        assert abs(s - thresh) <= SCORE_TOL or abs(s - float(last)) <= SCORE_TOL, (
            f"{rec['image_file']}: unmatched detection with score {s}")
    return n


def test_detections(run: dict) -> None:
    thresh = run["meta"]["box_score_thresh"]
    worst_box = worst_score = worst_logit = 0.0
    total = 0
    for out, rec in zip(run["outputs"], run["expected"]):
        n = _matched(out, rec, thresh)
        assert out["boxes"].shape[0] == rec["boxes"].shape[0], rec["image_file"]
        total += n
        if n == 0:
            continue
        assert torch.equal(out["labels"][:n], rec["labels"][:n]), rec["image_file"]
        worst_box = max(worst_box, (out["boxes"][:n] - rec["boxes"][:n]).abs().max().item())
        worst_score = max(worst_score, (out["scores"][:n] - rec["scores"][:n]).abs().max().item())
        worst_logit = max(worst_logit, (out["mask_logits"][:n] - rec["mask_logits"][:n]).abs().max().item())
    print(f"{run['variant']}: {total} detections; max errors: boxes {worst_box:.3g} px, scores {worst_score:.3g}, "
          f"mask logits {worst_logit:.3g}")
    assert total > 0
    assert worst_box <= BOX_TOL
    assert worst_score <= SCORE_TOL
    assert worst_logit <= LOGIT_TOL


def test_masks(run: dict) -> None:
    worst_iou = 1.0
    ties = 0
    for out, rec in zip(run["outputs"], run["expected"]):
        n = min(out["boxes"].shape[0], rec["boxes"].shape[0])
        if n == 0:
            continue
        h, w = rec["input_size"]
        packed = rec["masks_packed"].numpy()
        exp = np.unpackbits(packed, axis=1, count=h * w).reshape(-1, h, w).astype(bool)[:n]
        got = out["masks"][:n].numpy()
        soft = out["soft_masks"][:n].numpy()
        inter = (exp & got).sum((1, 2))
        union = (exp | got).sum((1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        worst_iou = min(worst_iou, float(iou.min()))
        for i in np.where(iou < MASK_IOU)[0]:
            # Only a threshold tie may flip a pixel: a probability within the band that the allowed logit
            # error can move across 0.5.
            diff = exp[i] != got[i]
            dev = np.abs(soft[i][diff] - 0.5).max()
            assert dev <= TIE_BAND, (f"{rec['image_file']} detection {i}: mask IoU {iou[i]:.5f}, pixels differ "
                                     f"up to {dev:.3g} away from the 0.5 threshold")
            ties += 1
    print(f"{run['variant']}: min mask IoU {worst_iou:.5f}; detections below {MASK_IOU} only through "
          f"threshold ties: {ties}")
