"""Acceptance: one training step of torchvision's v1 Mask R-CNN, reproduced through our training forward.

``../shared/fixtures/torchvision/train_step.pt`` holds torchvision's five losses and the gradients of their sum
for one step from the v1 fixture weights, with samplers made deterministic (``batch_size_per_image`` = 10^7 for
the RPN and the RoI heads, so every labelled anchor and RoI is used). Limits (fixtures README): losses within
1e-4 relative, every gradient norm within 5e-3 relative, the small predictor gradients within 1e-3 of their
largest magnitude.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskrcnn.config import apply_overrides
from maskrcnn.weights import config_for_torchvision, load_model

LOSS_REL = 1e-4
GRAD_NORM_REL = 5e-3
SMALL_GRAD_REL = 1e-3


@pytest.fixture(scope="module")
def step(fixtures_dir: Path, one_thread: None) -> dict:
    """Our losses and gradients for each fixture case, beside torchvision's."""
    fixture = torch.load(fixtures_dir / "torchvision" / "train_step.pt", weights_only=True)
    weights = fixtures_dir / "torchvision" / "maskrcnn_r50_fpn_v1" / "weights.pth"
    settings = fixture["settings"]
    state = torch.load(weights, weights_only=True)
    cfg = apply_overrides(config_for_torchvision(state), [
        f"model.rpn.batch_size_per_image={settings['rpn.batch_size_per_image']}",
        f"model.box_head.batch_size_per_image={settings['roi_heads.batch_size_per_image']}",
        f"model.rpn.pre_nms_top_n_train={settings['pre_nms_top_n_train']}",
        f"model.rpn.post_nms_top_n_train={settings['post_nms_top_n_train']}",
    ])
    model = load_model(weights, config=cfg).model
    model.train()
    cases = []
    for case in fixture["cases"]:
        model.zero_grad(set_to_none=True)
        t = case["targets"]
        losses = model([case["image_uint8"]], [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"]}])
        sum(losses.values()).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        cases.append({"expected": case, "losses": {k: float(v.detach()) for k, v in losses.items()}, "grads": grads,
                      "trainable": trainable})
    return {"cases": cases}


def test_losses_match_torchvision(step: dict) -> None:
    worst = 0.0
    for case in step["cases"]:
        expected = case["expected"]["losses"]
        assert set(case["losses"]) == set(expected)
        for k, v in expected.items():
            rel = abs(case["losses"][k] - float(v)) / abs(float(v))
            worst = max(worst, rel)
            assert rel <= LOSS_REL, f"{case['expected']['image_file']} {k}: ours {case['losses'][k]} vs {float(v)}"
    print(f"\nlosses: max relative difference {worst:.2e} (limit {LOSS_REL})")


def test_trainable_parameters_match_torchvision(step: dict) -> None:
    for case in step["cases"]:
        assert case["trainable"] == set(case["expected"]["grad_norms"])


def test_gradient_norms_match_torchvision(step: dict) -> None:
    worst = 0.0
    for case in step["cases"]:
        for name, norm in case["expected"]["grad_norms"].items():
            ours = float(case["grads"][name].double().norm())
            rel = abs(ours - float(norm)) / max(abs(float(norm)), 1e-30)
            worst = max(worst, rel)
            assert rel <= GRAD_NORM_REL, f"{name}: gradient norm {ours} vs torchvision's {float(norm)}"
    print(f"\ngradient norms: max relative difference {worst:.2e} (limit {GRAD_NORM_REL})")


def test_small_predictor_gradients_match_torchvision(step: dict) -> None:
    worst = 0.0
    for case in step["cases"]:
        for name, expected in case["expected"]["grads"].items():
            scale = float(expected.abs().max())
            err = float((case["grads"][name] - expected).abs().max()) / scale
            worst = max(worst, err)
            assert err <= SMALL_GRAD_REL, f"{name}: max difference {err:.2e} of its largest magnitude"
    print(f"\nsmall gradients: max difference {worst:.2e} of their largest magnitude (limit {SMALL_GRAD_REL})")
