"""The benchmark suite (a tiny smoke run, no timing assertions) and the fast path it measures.

The fast path (``MaskRCNN.optimize``, on by default in ``load_model``) must give the naive path's boxes, scores
and proposals bit for bit, and masks equal up to the mask head's float rounding; ``fast_math`` only close.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn import bench
from maskrcnn.cli import main
from maskrcnn.config import apply_overrides, get_preset
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.modeling.timing import StageTimer, stage
from maskrcnn.ops.masks import paste_masks, paste_masks_in_windows

TINY = bench.BenchSettings(height=64, width=96, models=("r18_fpn",), modes=("fast", "naive"), repeats=1, warmup=0,
                           detections=10, train_batches=(1,), train_model="r18_fpn", throughput_batch=2,
                           throughput_model="r18_fpn", throughput_repeats=1, isolate=False, conv_shape=(16, 16, 16),
                           random_weights=True)


def _frozen_bn_tiny(mask_norm: str = "none", box_head: str = "two_mlp") -> MaskRCNN:
    """A small ResNet-18-FPN with frozen BN and frozen early stages, like the torchvision models."""
    cfg = apply_overrides(get_preset("r18_fpn_demo"), {
        "model.box_head.head": box_head, "model.box_head.norm": "bn", "model.box_head.conv_dim": 32,
        "model.backbone.norm": "frozen_bn", "model.backbone.trainable_layers": 3, "model.fpn.norm": "none",
        "model.fpn.out_channels": 32, "model.mask_head.conv_dim": 32, "model.mask_head.norm": mask_norm,
        "model.box_head.fc_dim": 64, "model.rpn.pre_nms_top_n_test": 200, "model.rpn.post_nms_top_n_test": 100,
        "model.box_head.score_thresh": 0.0, "model.box_head.detections_per_img": 20,
        "input.min_size_test": 64, "input.max_size_test": 96})
    torch.manual_seed(0)
    model = MaskRCNN(cfg).eval()
    with torch.no_grad():  # non-trivial frozen statistics, so that the in-place BN has something to get wrong
        for m in model.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 64, 96, generator=g)


def test_smoke_run_report_and_json(tmp_path: Path) -> None:
    report = bench.run_benchmarks(TINY)
    fast, naive = report["results"]["fast"], report["results"]["naive"]
    inf = fast["inference"]["r18_fpn"]
    assert inf["detections"] == 10 and inf["median_s"] > 0 and inf["gflop"] > 0
    assert {"backbone", "fpn", "rpn", "box_head", "mask_head", "paste", "other"} <= set(inf["stages_s"])
    assert 0 < inf["conv_fraction"] and inf["conv_microbench"]["best_gflops"] > 0
    assert naive["training"]["batch1"]["median_s"] > 0 and "backward" in naive["training"]["batch1"]["stages_s"]
    assert fast["throughput"]["r18_fpn"]["images_per_s"] > 0
    assert "inference/r18_fpn/median_s" in report["comparisons"]["vs_naive"]
    text = bench.format_report(report)
    assert "inference r18_fpn" in text and "fast/naive" in text
    path = bench.write_json(report, tmp_path / "r.json")
    again = bench.compare(report, json.loads(path.read_text()))
    assert again["vs_baseline"]["inference/r18_fpn/median_s"] == pytest.approx(1.0)


def test_cli_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    code = main(["bench", "--only", "inference", "--models", "r18_fpn", "--modes", "fast", "--repeats", "1",
                 "--warmup", "0", "--height", "64", "--width", "64", "--detections", "5", "--no-isolate",
                 "--no-flops", "--random-weights", "--json", str(out)])
    assert code == 0
    assert "inference r18_fpn" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"]["fast"]["inference"]["r18_fpn"]["detections"] == 5
    assert main(["bench", "--modes", "turbo", "--no-isolate"]) == 2


@pytest.mark.parametrize("box_head", ["two_mlp", "conv_fc"])
def test_fast_path_is_bit_exact_up_to_the_roi_heads(box_head: str) -> None:
    """Features and proposals: the same bits; detections: the same ones, scores and boxes to the last bits."""
    model = _frozen_bn_tiny(box_head=box_head)
    images = [_image(0), _image(1)]
    naive = model.optimize(False).detect(images, soft_masks=True, keep_intermediates=True)
    fast = model.optimize(True).detect(images, soft_masks=True, keep_intermediates=True)
    for a, b in zip(fast, naive):
        assert torch.equal(a["proposals"], b["proposals"])
        for k in a["features"]:
            assert torch.equal(a["features"][k], b["features"][k])
        assert len(a["boxes"]) > 0 and torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-6, rtol=0)
        torch.testing.assert_close(a["mask_logits"], b["mask_logits"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a["soft_masks"], b["soft_masks"], atol=1e-5, rtol=0)
    binary = model.detect(images)  # the fast path's per-window binarisation
    for a, b in zip(binary, fast):
        assert a["masks"].dtype == torch.bool and torch.equal(a["masks"], b["soft_masks"] > 0.5)


def test_fast_math_is_close_and_state_dict_untouched() -> None:
    model = _frozen_bn_tiny(mask_norm="bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model.optimize(False).detect([_image(0)], keep_intermediates=True)[0]
    out = model.optimize(True, fast_math=True).detect([_image(0)], keep_intermediates=True)[0]
    for k in ref["features"]:
        torch.testing.assert_close(out["features"][k], ref["features"][k], atol=1e-3, rtol=1e-4)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # Changing a weight after folding must not leave a stale folded copy behind.
    with torch.no_grad():
        model.backbone.body.conv1.weight.mul_(0.5)
    out2 = model.detect([_image(0)], keep_intermediates=True)[0]
    ref2 = model.optimize(False).detect([_image(0)], keep_intermediates=True)[0]
    torch.testing.assert_close(out2["features"]["0"], ref2["features"]["0"], atol=1e-3, rtol=1e-4)


def test_training_losses_close_to_naive() -> None:
    model = _frozen_bn_tiny()
    model.cfg = dataclasses.replace(model.cfg, train=dataclasses.replace(model.cfg.train, channels_last=True))
    model.train()
    img = (_image(2) * 255).to(torch.uint8)
    target = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 96, dtype=torch.uint8)}
    target["masks"][0, 15:35, 15:45] = 1
    losses = {}
    for fast in (False, True):
        model.optimize(fast)
        out = model([img], [target], generator=torch.Generator().manual_seed(0))
        total = sum(out.values())
        model.zero_grad()
        total.backward()
        losses[fast] = (out, [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for k in losses[False][0]:  # the fast path trains channels-last (train.channels_last): rounding differs
        torch.testing.assert_close(losses[True][0][k], losses[False][0][k], atol=1e-6, rtol=1e-5)
    for g1, g0 in zip(losses[True][1], losses[False][1]):
        torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["legacy", "grid_sample"])
def test_windowed_paste_equals_full_image_paste(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(25, 1, 28, 28, generator=g)
    xy = torch.rand(25, 2, generator=g) * 120 - 30
    boxes = torch.cat([xy, xy + torch.rand(25, 2, generator=g) * 90], 1)
    boxes[0] = torch.tensor([30.0, 30.0, 29.0, 31.0])  # inverted
    boxes[1] = torch.tensor([-50.0, -40.0, -10.0, -5.0])  # outside the image
    boxes[2] = torch.tensor([0.0, 0.0, 500.0, 400.0])  # much larger than the image
    full = paste_masks(masks, boxes, (70, 80), mode)[:, 0]
    soft = paste_masks_in_windows(masks, boxes, (70, 80), mode)
    # grid_sample samples the same points; legacy resizes with F.interpolate, as torchvision does, where the
    # full-image version re-derives its taps (both agree with torchvision's fixture to 1e-5, see test_masks).
    torch.testing.assert_close(soft, full, atol=0.0 if mode == "grid_sample" else 1e-5, rtol=0)
    hard = paste_masks_in_windows(masks, boxes, (70, 80), mode, threshold=0.5)
    assert hard.dtype == torch.bool and torch.equal(hard, soft > 0.5)
    assert paste_masks_in_windows(masks[:0], boxes[:0], (7, 9), mode, threshold=0.5).shape == (0, 7, 9)


def test_stage_timer_is_off_by_default() -> None:
    with stage("nothing"):
        pass
    with StageTimer() as timer:
        with stage("a"), stage("a.b"):
            pass
    assert set(timer.seconds) == {"a", "a.b"} and timer.calls["a"] == 1


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("0", "0")])
def test_import_turns_on_huge_pages_for_torch_unless_set(preset: str | None, expected: str) -> None:
    """``import maskrcnn`` before torch sets THP_MEM_ALLOC_ENABLE=1 (torch reads it once); a user's value wins."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = "import os, maskrcnn; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_large_image_task_runs_predict_and_eval_at_two_sizes() -> None:
    """Smoke test of the large_image scenario at toy sizes (its figures are a benchmark's, not a test's)."""
    import dataclasses

    settings = dataclasses.replace(TINY, tasks=("large_image",), modes=("fast", "naive"), large_size=(240, 320),
                                   large_model="r18_fpn", large_test_size=(64, 96), count_flops=False, seed=5)
    report = bench.run_benchmarks(settings)
    figs = report["results"]["fast"]["large_image"]
    assert list(figs) == ["predict@240x320", "predict@64x96", "eval@240x320", "eval@64x96"]
    assert report["results"]["naive"]["large_image"] == {}  # fast mode only
    for key, fig in figs.items():
        assert fig["detections"] == 10 and fig["peak_rss_mb"] > 0, key
        assert fig["dense_masks_mb"] == pytest.approx(10 * fig["image"][1] * fig["image"][2] / 2**20)
    text = bench.format_report(report)
    assert "large images (r18_fpn" in text and "(baseline)" in text and "eval@240x320" in text


def test_serve_task_records_requests_per_second_and_latency() -> None:
    """``maskrcnn bench --only serve`` runs the bounded load test against a real ``maskrcnn serve`` and records
    requests/s and p50/p95 latency in the results (smoke run: 2 clients x 2 requests, no timing asserted)."""
    pytest.importorskip("starlette", reason="needs the [serve] extra")
    pytest.importorskip("uvicorn", reason="needs the [serve] extra")
    settings = dataclasses.replace(TINY, modes=("fast",), tasks=("serve",), serve_clients=2, serve_requests=2,
                                   count_flops=False)
    report = bench.run_benchmarks(settings)
    figs = report["results"]["fast"]["serve"]["r18_fpn"]
    assert figs["requests"] == 4 and figs["ok"] + figs["busy"] == 4 and figs["other"] == 0
    assert figs["requests_per_s"] > 0 and 0 < figs["p50_s"] <= figs["p95_s"]
    text = bench.format_report(report)
    assert "requests/s" in text and "p95" in text
    json.dumps(report)
