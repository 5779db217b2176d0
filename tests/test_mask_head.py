"""Mask head switches of the paper's Table 2: RoI pooler type, softmax loss, class-agnostic masks, MLP head.

Each switch is checked for its shapes, its loss against a brute-force formula, gradients, a training step,
inference on both the naive and the fast path, and a save/reload round trip that keeps the switch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_mask_rcnn import synthetic_pair, tiny_config

import maskrcnn
from maskrcnn.config import Config, ConfigError, MaskHeadConfig, apply_overrides
from maskrcnn.export import export_onnx
from maskrcnn.modeling.mask_head import (
    MLPMaskHead,
    MLPMaskPredictor,
    mask_channel,
    mask_channels,
    maskrcnn_inference,
    maskrcnn_loss,
    own_channel_logits,
)
from maskrcnn.modeling.mask_rcnn import MaskRCNN

# The ablation variants, as config overrides of the paper's default (RoIAlign, sigmoid, class-specific, FCN).
SWITCHES = {
    "pool": {"model.roi_pooler.type": "pool"},
    "warp": {"model.roi_pooler.type": "warp"},
    "softmax": {"model.mask_head.loss": "softmax"},
    "agnostic": {"model.mask_head.class_agnostic": True},
    "mlp": {"model.mask_head.type": "mlp", "model.mask_head.mlp_dims": [48, 32]},
}


def test_defaults_are_the_papers_and_old_configs_load() -> None:
    cfg = Config()
    assert cfg.model.roi_pooler.type == "align"
    mh = cfg.model.mask_head
    assert (mh.loss, mh.class_agnostic, mh.type) == ("sigmoid", False, "fcn")
    # A config saved before these switches existed has no such keys: it loads with the defaults.
    data = cfg.to_dict()
    del data["model"]["roi_pooler"]
    for key in ("loss", "class_agnostic", "type", "mlp_dims"):
        del data["model"]["mask_head"][key]
    assert Config.from_dict(data) == cfg


@pytest.mark.parametrize(("override", "message"), [
    ("model.roi_pooler.type=crop", "must be one of"),
    ("model.mask_head.loss=focal", "must be one of"),
    ("model.mask_head.type=transformer", "must be one of"),
    ("model.mask_head.mlp_dims=[64,0]", "mlp_dims' must be >= 1"),
])
def test_bad_switch_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


def test_softmax_with_class_agnostic_is_refused() -> None:
    with pytest.raises(ConfigError, match="class_agnostic.*needs model.mask_head.loss=sigmoid"):
        apply_overrides(Config(), ["model.mask_head.loss=softmax", "model.mask_head.class_agnostic=true"])


@pytest.mark.parametrize("background", ["first", "last"])
def test_mask_channels_and_channel_of_each_label(background: str) -> None:
    labels = torch.tensor([1, 2, 3])
    k = 3
    sig, soft, agn = MaskHeadConfig(), MaskHeadConfig(loss="softmax"), MaskHeadConfig(class_agnostic=True)
    assert mask_channels(k, background, sig) == (4 if background == "first" else 3)
    assert mask_channels(k, background, soft) == 4  # K classes and background, wherever it sits
    assert mask_channels(k, background, agn) == 1
    want = [1, 2, 3] if background == "first" else [0, 1, 2]
    assert mask_channel(labels, k, background, sig).tolist() == want
    assert mask_channel(labels, k, background, soft).tolist() == want
    assert mask_channel(labels, k, background, agn).tolist() == [0, 0, 0]


def _loss_case(channels: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, channels, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    masks = torch.zeros(2, 16, 16, dtype=torch.float64)
    masks[0, 2:10, 3:12] = 1
    masks[1, 6:15, 0:8] = 1
    props = torch.tensor([[0.0, 0.0, 16.0, 16.0], [2.0, 1.0, 13.0, 11.0], [0.0, 5.0, 9.0, 16.0]], dtype=torch.float64)
    return logits, [props], [masks], [torch.tensor([0, 0, 1])]


def test_softmax_loss_is_the_multinomial_cross_entropy() -> None:
    from maskrcnn.ops.masks import roi_mask_targets

    logits, props, masks, idx = _loss_case(4)
    gt_channels = [torch.tensor([2, 3])]
    loss = maskrcnn_loss(logits, props, masks, gt_channels, idx, loss="softmax", background_channel=0)
    targets = roi_mask_targets(masks[0], props[0], idx[0], 4)
    want = 0.0
    for r, ch in enumerate([2, 2, 3]):
        for y in range(4):
            for x in range(4):
                z = logits[r, :, y, x].tolist()
                log_norm = math.log(sum(math.exp(v) for v in z))
                t = float(targets[r, y, x])
                want -= t * (z[ch] - log_norm) + (1 - t) * (z[0] - log_norm)
    assert float(loss.detach()) == pytest.approx(want / (3 * 16), rel=1e-12)
    assert torch.autograd.gradcheck(
        lambda lg: maskrcnn_loss(lg, props, masks, gt_channels, idx, loss="softmax", background_channel=0), (logits,))
    # The same as F.cross_entropy with per-pixel class probabilities t (GT class) and 1 - t (background).
    probs = torch.zeros(3, 4, 4, 4, dtype=torch.float64)
    for r, ch in enumerate([2, 2, 3]):
        probs[r, ch] = targets[r]
        probs[r, 0] = 1 - targets[r]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, probs))


def test_sigmoid_loss_on_the_gt_channel_only() -> None:
    logits, props, masks, idx = _loss_case(3)
    loss = maskrcnn_loss(logits, props, masks, [torch.tensor([1, 2])], idx)
    (grad,) = torch.autograd.grad(loss, logits)
    # Only the GT class's channel of each RoI gets a gradient; the class-agnostic head is this with one channel.
    assert grad[:, 0].abs().sum() == 0 and grad[2, 1].abs().sum() == 0 and grad[0, 2].abs().sum() == 0
    assert grad[0, 1].abs().sum() > 0 and grad[2, 2].abs().sum() > 0


def test_softmax_inference_is_the_predicted_class_probability() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, 3, 3, generator=gen) * 20  # large logits: probabilities that round to 0 and 1
    channels = torch.tensor([1, 3, 2, 1, 0])
    probs = torch.cat(maskrcnn_inference(logits, [channels[:2], channels[2:]], loss="softmax"))
    want = logits.softmax(dim=1)[torch.arange(5), channels][:, None]
    torch.testing.assert_close(probs, want)
    assert torch.isfinite(own_channel_logits(logits, channels, "softmax")).all()
    sig = torch.cat(maskrcnn_inference(logits, [channels], loss="sigmoid"))
    torch.testing.assert_close(sig, logits[torch.arange(5), channels][:, None].sigmoid())


def test_mlp_head_shapes_and_own_channel_shortcut() -> None:
    torch.manual_seed(0)
    head = MLPMaskHead(8 * 5 * 5, MaskHeadConfig(type="mlp", mlp_dims=(16, 12)))
    pred = MLPMaskPredictor(head.out_features, 4, 10)
    x = torch.randn(6, 8, 5, 5, requires_grad=True)
    feats = head(x)
    logits = pred(feats)
    assert feats.shape == (6, 12) and logits.shape == (6, 4, 10, 10)
    labels = torch.tensor([0, 3, 1, 2, 2, 1])
    torch.testing.assert_close(pred.class_logits(feats, labels), logits[torch.arange(6), labels])
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _config(layout: str, switch: str, background: str = "first") -> Config:
    overrides = dict(SWITCHES.get(switch, {}))
    overrides["model.background"] = background
    if layout == "c4":
        from test_layouts import thin

        return thin("mask_rcnn_R_50_C4_3x", **overrides)
    return apply_overrides(tiny_config(), overrides)


def _mask_params(model: MaskRCNN) -> list[torch.nn.Parameter]:
    return list(model.roi_heads.mask_predictor.parameters())


@pytest.mark.parametrize(("layout", "switch", "background"), [
    # The baseline is every other test module's model; background "last" is detectron2's class order.
    ("fpn", "pool", "first"), ("fpn", "warp", "last"), ("fpn", "softmax", "first"), ("fpn", "agnostic", "first"),
    ("fpn", "mlp", "first"), ("fpn", "mlp", "last"),
    ("c4", "pool", "last"), ("c4", "softmax", "last"), ("c4", "agnostic", "last"), ("c4", "mlp", "last"),
])
def test_switch_trains_predicts_saves_and_reloads(layout: str, switch: str, background: str, tmp_path: Path,
                                                  one_thread: None) -> None:
    torch.manual_seed(0)
    cfg = _config(layout, switch, background)
    model = MaskRCNN(cfg).train()
    k = cfg.model.num_classes
    mh = cfg.model.mask_head
    m = 14 if layout == "c4" else 28
    channels = 1 if mh.class_agnostic else (k + 1 if mh.loss == "softmax" or background == "first" else k)
    data = [synthetic_pair(0), synthetic_pair(1)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        losses = model([d[0] for d in data], [d[1] for d in data])
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _mask_params(model))
        opt.step()
    model.eval()
    # The last mask layer predicts `channels` masks of m x m.
    with torch.no_grad():
        feats = torch.zeros(1, *_head_input_shape(model, cfg))
        assert model.roi_heads.mask_predictor(model.roi_heads.mask_head(feats)).shape == (1, channels, m, m)
    # Inference finds something to mask at a low threshold; the naive and the fast path agree.
    det_fast = model.detect([data[0][0]], score_threshold=0.0, keep_intermediates=True)[0]
    model.optimize(False)
    det_naive = model.detect([data[0][0]], score_threshold=0.0, keep_intermediates=True)[0]
    model.optimize(True)
    assert det_fast["boxes"].shape[0] > 0
    assert det_fast["mask_logits"].shape[-2:] == (m, m)
    torch.testing.assert_close(det_fast["mask_logits"], det_naive["mask_logits"], rtol=1e-4, atol=1e-4)
    # Saved with its switch, reloaded with it, and the same detections come out.
    maskrcnn.save_model(model, tmp_path / "m")
    loaded = maskrcnn.load_model(tmp_path / "m")
    assert loaded.model.cfg == model.cfg
    got = loaded.predict(data[0][0], score_threshold=0.0)[0]
    want = maskrcnn.Predictor(model).predict(data[0][0], score_threshold=0.0)[0]
    torch.testing.assert_close(got.boxes, want.boxes)
    assert torch.equal(got.masks.dense(), want.masks.dense())


def _head_input_shape(model: MaskRCNN, cfg: Config) -> tuple[int, int, int]:
    mh = cfg.model.mask_head
    if cfg.model.backbone.layout == "c4":
        from maskrcnn.modeling.res5_head import res5_out_channels

        return res5_out_channels(cfg.model.backbone), mh.pooler_resolution // 2, mh.pooler_resolution // 2
    return cfg.model.fpn.out_channels, mh.pooler_resolution, mh.pooler_resolution


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_onnx_export_refuses_the_switches(switch: str, tmp_path: Path) -> None:
    model = MaskRCNN(_config("fpn", switch)).eval()
    key = next(iter(SWITCHES[switch]))
    with pytest.raises(NotImplementedError, match=key.replace(".", r"\.")):
        export_onnx(model, tmp_path / "m.onnx")
