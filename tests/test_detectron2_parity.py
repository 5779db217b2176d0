"""Acceptance: detectron2's thin zoo models, loaded from their ``weights.pkl``, reproduce detectron2's outputs.

The three mask models of ``../shared/fixtures/detectron2`` (R50-FPN, R50-C4, X101-32x8d-FPN) keep the zoo's
exact structure with thin widths. Tolerances are the fixtures README's: features 1e-4, proposals 1e-2 px (the
order may differ only among objectness logits tied within 1e-4), the same detections (matched by class and box,
since scores within 1e-5 may swap places), boxes 1e-3 px, scores 1e-4, mask logits 1e-3, mask probabilities
1e-4, mask IoU >= 0.999, and the resized uint8 image identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import maskrcnn
from maskrcnn.ops.boxes import box_iou

MODELS = ["mask_rcnn_R_50_FPN", "mask_rcnn_R_50_C4", "mask_rcnn_X_101_32x8d_FPN"]
FEATURE_TOL = 1e-4
PROPOSAL_TOL = 1e-2
LOGIT_TIE = 1e-4
BOX_TOL = 1e-3
SCORE_TOL = 1e-4
MASK_LOGIT_TOL = 1e-3
MASK_PROB_TOL = 1e-4
MASK_IOU = 0.999
# A mask-logit error of MASK_LOGIT_TOL moves a probability near 0.5 by at most a quarter of it.
TIE_BAND = 0.25 * MASK_LOGIT_TOL


@pytest.fixture(scope="module", params=MODELS)
def run(request: pytest.FixtureRequest, fixtures_dir: Path, one_thread: None) -> dict:
    """Load the thin model from its .pkl, run every fixture image, keep our outputs beside detectron2's."""
    root = fixtures_dir / "detectron2" / request.param
    meta = json.loads((root / "config.json").read_text())
    predictor = maskrcnn.load_model(root / "weights.pkl", min_size=meta["test"]["min_size_test"],
                                    max_size=meta["test"]["max_size_test"])
    expected = torch.load(root / "expected.pt", weights_only=True)["images"]
    outputs = []
    for rec in expected:
        image = torch.from_numpy(np.array(Image.open(root / rec["image_file"]).convert("RGB"))).permute(2, 0, 1)
        outputs.append(predictor.detect([image], soft_masks=True, keep_intermediates=True)[0])
    return {"name": request.param, "model": predictor.model, "meta": meta, "expected": expected,
            "outputs": outputs, "root": root}


def test_variant_read_off_the_keys(run: dict) -> None:
    cfg, test = run["model"].cfg, run["meta"]["test"]
    assert cfg.model.backbone.layout == ("c4" if "C4" in run["name"] else "fpn")
    assert cfg.model.backbone.depth == test["resnets"]["DEPTH"]
    assert cfg.model.backbone.groups == test["resnets"]["NUM_GROUPS"]
    assert cfg.model.backbone.stride_in_1x1 == test["resnets"]["STRIDE_IN_1X1"]
    assert cfg.model.num_classes == len(run["meta"]["class_names"]) and cfg.model.background == "last"
    assert tuple(cfg.input.pixel_std) == pytest.approx(tuple(test["pixel_std"]))
    assert cfg.input.size_divisible == run["meta"]["size_divisibility"]


def test_resized_image_and_batch(run: dict) -> None:
    rec = run["expected"][0]
    for o, r in zip(run["outputs"], run["expected"]):
        assert tuple(o["resized_size"]) == tuple(r["resized_size"]), r["image_file"]
        assert tuple(o["batch_shape"]) == tuple(r["batch_shape"]), r["image_file"]
    image = torch.from_numpy(np.array(Image.open(run["root"] / rec["image_file"]).convert("RGB"))).permute(2, 0, 1)
    batch, _ = run["model"].preprocess([image], resize=True)
    h, w = rec["resized_size"]
    mean = torch.tensor(run["meta"]["test"]["pixel_mean"])[:, None, None]
    std = torch.tensor(run["meta"]["test"]["pixel_std"])[:, None, None]
    # Our normalised batch, undone, is the BGR uint8 image that Pillow resized in detectron2: exactly.
    ours = (batch[0, :, :h, :w] * std + mean).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(ours, rec["resized_image"])
    if "input_batch" in rec:
        err = (batch[0] - rec["input_batch"]).abs().max().item()
        assert err <= 1e-4, f"input batch differs by {err}"


def test_features(run: dict) -> None:
    rec, out = run["expected"][0], run["outputs"][0]
    ours = out["features"]
    names = {"p2": "0", "p3": "1", "p4": "2", "p5": "3", "p6": "pool", "res4": "res4"}
    worst = 0.0
    for k, ref in rec["features"].items():
        got = ours[names[k]][0, : ref.shape[0]]
        worst = max(worst, (got - ref).abs().max().item())
    print(f"{run['name']}: features max abs error {worst:.3g}")
    assert worst <= FEATURE_TOL


def test_proposals(run: dict) -> None:
    """Proposals agree up to the first near-tie of objectness logits; beyond it only the order may differ."""
    worst = 0.0
    for out, rec in zip(run["outputs"], run["expected"]):
        got, exp, logits = out["proposals"], rec["proposals"], rec["objectness_logits"]
        assert got.shape == exp.shape, rec["image_file"]
        close = (got - exp).abs().amax(dim=1) <= PROPOSAL_TOL
        n = int(close.long().cumprod(0).sum())  # leading rows that agree
        if n < exp.shape[0]:
            gap = (logits[n] - logits).abs()
            gap[n] = float("inf")
            # Beyond a swap of near-tied logits, NMS suppresses other boxes, so the rest of the list may differ.
            assert float(gap.min()) <= LOGIT_TIE, (
                f"{rec['image_file']}: proposal {n} differs and its logit ties with no other within {LOGIT_TIE}")
            print(f"{rec['image_file']}: first {n} of {exp.shape[0]} proposals agree, then near-tied logits swap")
        worst = max(worst, (got[:n] - exp[:n]).abs().max().item() if n else 0.0)
    print(f"{run['name']}: proposals max abs error {worst:.3g} px (before the first logit tie)")


def _match(out: dict, rec: dict) -> list[tuple[int, int]]:
    """(ours, theirs) index pairs: same class and the best box IoU (> 0.99), greedy in their score order."""
    classes = out["labels"] - 1  # ours 1..K, detectron2's 0-based
    iou = box_iou(rec["boxes"], out["boxes"])
    same = rec["classes"][:, None] == classes[None, :]
    iou = torch.where(same, iou, torch.zeros_like(iou))
    pairs, used = [], set()
    for j in range(rec["boxes"].shape[0]):
        order = torch.argsort(iou[j], descending=True).tolist()
        i = next((i for i in order if i not in used), None)
        if i is not None and float(iou[j, i]) > 0.99:
            pairs.append((i, j))
            used.add(i)
    return pairs


def test_detections(run: dict) -> None:
    thresh = run["meta"]["test"]["roi_heads"]["score_thresh_test"]
    worst_box = worst_score = 0.0
    total = 0
    for out, rec in zip(run["outputs"], run["expected"]):
        pairs = _match(out, rec)
        ours_left = set(range(out["boxes"].shape[0])) - {i for i, _ in pairs}
        theirs_left = set(range(rec["boxes"].shape[0])) - {j for _, j in pairs}
        last = float(rec["scores"][-1]) if rec["scores"].numel() else 1.0
        for s in [float(out["scores"][i]) for i in ours_left] + [float(rec["scores"][j]) for j in theirs_left]:
            assert abs(s - thresh) <= SCORE_TOL or abs(s - last) <= SCORE_TOL, (
                f"{rec['image_file']}: unmatched detection with score {s}")
        total += len(pairs)
        if pairs:
            i, j = map(list, zip(*pairs))
            worst_box = max(worst_box, (out["boxes"][i] - rec["boxes"][j]).abs().max().item())
            worst_score = max(worst_score, (out["scores"][i] - rec["scores"][j]).abs().max().item())
    print(f"{run['name']}: {total} detections matched; max errors boxes {worst_box:.3g} px, scores {worst_score:.3g}")
    assert total > 0
    assert worst_box <= BOX_TOL and worst_score <= SCORE_TOL


def test_masks(run: dict) -> None:
    worst_logit = worst_prob = 0.0
    worst_iou, ties, compared = 1.0, 0, 0
    for out, rec in zip(run["outputs"], run["expected"]):
        pairs = dict((j, i) for i, j in _match(out, rec))
        k = rec["mask_logits"].shape[0]
        for j in range(k):
            if j not in pairs:
                continue
            i = pairs[j]
            worst_logit = max(worst_logit, (out["mask_logits"][i] - rec["mask_logits"][j]).abs().max().item())
            prob = out["mask_logits"][i].sigmoid()
            worst_prob = max(worst_prob, (prob - rec["mask_probs"][j]).abs().max().item())
        h, w = rec["input_size"]
        exp = np.unpackbits(rec["masks_packed"].numpy(), axis=1, count=h * w).reshape(-1, h, w).astype(bool)
        for j in range(exp.shape[0]):
            if j not in pairs:
                continue
            i = pairs[j]
            got = out["masks"][i].numpy()
            union = (exp[j] | got).sum()
            iou = (exp[j] & got).sum() / union if union else 1.0
            worst_iou = min(worst_iou, float(iou))
            compared += 1
            if iou < MASK_IOU:
                diff = exp[j] != got
                dev = np.abs(out["soft_masks"][i].numpy()[diff] - 0.5).max()
                assert dev <= TIE_BAND, f"{rec['image_file']} detection {j}: mask IoU {iou:.5f}"
                ties += 1
    print(f"{run['name']}: mask logits {worst_logit:.3g}, probabilities {worst_prob:.3g}, min IoU {worst_iou:.5f} "
          f"over {compared} masks ({ties} below {MASK_IOU} only through threshold ties)")
    assert compared > 0
    assert worst_logit <= MASK_LOGIT_TOL and worst_prob <= MASK_PROB_TOL
