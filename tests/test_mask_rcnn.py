"""MaskRCNN: torchvision's preprocessing, input handling, losses, and a tiny overfitting run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_close_f32

from maskrcnn.config import Config, apply_overrides, get_preset
from maskrcnn.modeling import mask_rcnn as model_mod
from maskrcnn.io import to_chw_float
from maskrcnn.modeling.mask_rcnn import LOSS_KEYS, MaskRCNN, resize_boxes
from maskrcnn.predict import Predictor
from maskrcnn.structures import Result


def tiny_config(num_classes: int = 2) -> Config:
    """A ResNet-18-FPN small enough to train for a few steps on CPU in seconds."""
    cfg = get_preset("r18_fpn_demo")
    return apply_overrides(cfg, {
        "model.num_classes": num_classes, "model.class_names": [f"c{i}" for i in range(1, num_classes + 1)],
        "model.fpn.out_channels": 32, "model.mask_head.conv_dim": 32, "model.box_head.fc_dim": 64,
        "model.box_head.batch_size_per_image": 64, "model.rpn.batch_size_per_image": 64,
        "model.rpn.pre_nms_top_n_train": 200, "model.rpn.post_nms_top_n_train": 100,
        "model.rpn.pre_nms_top_n_test": 200, "model.rpn.post_nms_top_n_test": 100,
        "input.min_size_test": 64, "input.max_size_test": 96,
    })


def synthetic_pair(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A 64x80 image with a bright square (class 1) and a dark disc (class 2), and its targets."""
    g = np.random.default_rng(seed)
    img = np.full((64, 80, 3), 120, np.uint8)
    masks = np.zeros((2, 64, 80), np.uint8)
    x, y = g.integers(4, 30), g.integers(4, 30)
    masks[0, y:y + 24, x:x + 24] = 1
    yy, xx = np.mgrid[:64, :80]
    masks[1] = ((yy - 40) ** 2 + (xx - 58) ** 2) < 12**2
    masks[1] &= 1 - masks[0]
    img[masks[0] > 0] = (250, 240, 30)
    img[masks[1] > 0] = (20, 30, 200)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor([1, 2]),
              "masks": torch.from_numpy(masks)}
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), target


def test_preprocessing_matches_torchvision(ops_fixture: dict) -> None:
    t = ops_fixture["transform"]
    cfg = dataclasses.replace(tiny_config(), input=dataclasses.replace(
        tiny_config().input, pixel_mean=tuple(t["image_mean"]), pixel_std=tuple(t["image_std"]),
        size_divisible=t["size_divisible"]))
    model = MaskRCNN(cfg).eval()
    for case in t["cases"]:
        model.min_size_test, model.max_size_test = case["min_size"], case["max_size"]
        image = case.get("image", torch.rand(case["input_shape"]))
        batch, sizes = model.preprocess([image], resize=True)
        assert list(sizes[0]) == list(case["image_size"])
        assert list(batch.shape) == list(case["batch_shape"])
        if "output" in case:
            assert_close_f32(batch[0], case["output"], what="normalised image")
        if "boxes_resized" in case:
            back = resize_boxes(case["boxes_resized"], tuple(case["image_size"]), tuple(case["input_shape"][-2:]))
            assert_close_f32(back, case["boxes_original"], what="boxes to input")


@pytest.mark.parametrize("layout", ["hwc_uint8", "chw_uint8", "chw_float", "gray", "rgba"])
def test_image_inputs_become_rgb_float(layout: str) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    if layout == "hwc_uint8":
        x = rgb
    elif layout == "chw_uint8":
        x = torch.from_numpy(rgb).permute(2, 0, 1)
    elif layout == "chw_float":
        x = expected.clone()
    elif layout == "gray":
        x = rgb[..., 0]
        expected = expected[:1].expand(3, -1, -1)
    else:
        x = np.concatenate([rgb, np.full((12, 10, 1), 255, np.uint8)], -1)
    out = to_chw_float(x)
    assert out.shape == (3, 12, 10) and out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="channel"):
        to_chw_float(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(TypeError, match="dtype"):
        to_chw_float(torch.zeros(3, 4, 4, dtype=torch.int32))
    model = MaskRCNN(tiny_config()).train()
    img, _ = synthetic_pair(0)
    with pytest.raises(ValueError, match="targets"):
        model([img])
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        model([img], [{"boxes": torch.zeros(4), "labels": torch.zeros(1, dtype=torch.long),
                       "masks": torch.zeros(1, 64, 80)}])


def test_training_losses_and_empty_targets() -> None:
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config()).train()
    img, tgt = synthetic_pair(0)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)}
    losses = model([img, img.clone()], [tgt, empty])
    assert set(losses) == set(LOSS_KEYS)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_predict_returns_results_in_input_coordinates() -> None:
    model = MaskRCNN(tiny_config()).eval()
    img, _ = synthetic_pair(1)
    hwc = img.permute(1, 2, 0).numpy()
    results = Predictor(model).predict([hwc, img], score_threshold=0.0)
    assert len(results) == 2
    for r in results:
        assert r.masks is not None and r.masks.dtype == torch.bool and r.masks.shape[1:] == (64, 80)
        assert r.boxes.shape[0] == r.scores.shape[0] == r.labels.shape[0] == r.masks.shape[0]
        if len(r):
            assert float(r.boxes[:, 2].max()) <= 80 and float(r.boxes[:, 3].max()) <= 64
    assert torch.equal(results[0].boxes, results[1].boxes)


def test_cpu_predict_runs_images_alone_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a batch_size > 1 still gives one forward pass per image (see Predictor.predict); opt-in pads."""
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config()).eval()
    small = (torch.rand(3, 40, 56) * 255).to(torch.uint8)
    big = (torch.rand(3, 64, 80) * 255).to(torch.uint8)
    passes: list[int] = []
    detect = model.detect
    monkeypatch.setattr(model, "detect", lambda images, *a, **k: passes.append(len(images)) or detect(images, *a, **k))
    batched_alone = Predictor(model).predict([small, big], score_threshold=0.0, batch_size=2)
    assert passes == [1, 1]
    alone = [Predictor(model).predict(small, score_threshold=0.0)[0], Predictor(model).predict(big, score_threshold=0.0)[0]]
    for a, b in zip(batched_alone, alone):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks)
    passes.clear()
    model.batch_on_cpu = True
    padded = Predictor(model).predict([small, big], score_threshold=0.0, batch_size=2)
    assert passes == [2]
    assert [r.image_size for r in padded] == [(40, 56), (64, 80)]


def test_overfits_two_images() -> None:
    """A tiny ResNet-18-FPN drives its loss down on two synthetic images, then finds both objects."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MaskRCNN(cfg).train()
    data = [synthetic_pair(0), synthetic_pair(1)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    history = []
    for _ in range(60):
        losses = model([d[0] for d in data], [d[1] for d in data])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    tail = sum(history[-5:]) / 5
    assert tail < 0.35 * history[0], (history[0], tail)
    result = Predictor(model).predict(data[0][0], score_threshold=0.5)[0]
    assert sorted(result.labels.tolist())[:2] == [1, 2]


def test_compile_is_opt_in_and_close_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """optimize(compile=True) runs the body and FPN through torch.compile; results stay close; off restores eager."""
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config()).eval()
    img, _ = synthetic_pair(3)
    x = model.preprocess([img.float() / 255], resize=False)[0]
    with torch.no_grad():
        eager = model.backbone(x)
    if model_mod._cpp_compiler() is None:
        with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
            model.optimize(compile=True)
        return
    keys = set(model.state_dict())
    model.optimize(compile=True)
    assert model.compiled and set(model.state_dict()) == keys
    with torch.no_grad():
        compiled = model.backbone(x)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-4)
    model.optimize()
    assert not model.compiled and model.backbone.__dict__["_compiled"] is None
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        model.optimize(compile=True)


def test_failing_compiler_falls_back_to_eager_with_a_warning() -> None:
    """A compiled backbone whose compilation fails warns once and runs eagerly, with eager's results."""
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config()).eval()
    x = model.preprocess([synthetic_pair(4)[0].float() / 255], resize=False)[0]
    with torch.no_grad():
        eager = model.backbone(x)

        def broken(_: torch.Tensor) -> None:
            raise RuntimeError("CppCompileError: no compiler\ndetails")

        model.backbone.__dict__["_compiled"] = (broken, broken)
        with pytest.warns(UserWarning, match="torch.compile failed.*CppCompileError: no compiler"):
            out = model.backbone(x)
        assert not model.compiled  # the fallback is visible on the model
        for k in eager:
            assert torch.equal(out[k], eager[k])


def test_bf16_inference_is_opt_in_and_returns_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """optimize(amp="bf16") runs under autocast but hands back float32 boxes, scores and masks; bad values fail."""
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config()).eval()
    img, _ = synthetic_pair(2)
    ref = Predictor(model).predict(img, score_threshold=0.0)[0]
    seen: list[torch.dtype] = []
    head = model.rpn.head
    monkeypatch.setattr(head, "forward", lambda feats, f=head.forward: seen.append(feats[0].dtype) or f(feats))
    model.optimize(amp="bf16")
    out = Predictor(model).predict(img, score_threshold=0.0)[0]
    assert seen == [torch.bfloat16]  # the features reached the RPN in bfloat16
    assert out.boxes.dtype == out.scores.dtype == torch.float32 and out.masks.dtype == torch.bool
    assert len(out) == len(ref) > 0
    torch.testing.assert_close(out.scores.sort().values, ref.scores.sort().values, atol=0.05, rtol=0)
    model.optimize()
    assert model.amp == "none" and not model.fast_math
    with pytest.raises(ValueError, match="bf16"):
        model.optimize(amp="fp16")  # emulated on the CPU
    with pytest.raises(ValueError, match="amp must be one of"):
        model.optimize(amp="int8")
    with pytest.raises(ValueError, match="fast path"):
        model.optimize(False, amp="bf16")


@pytest.mark.parametrize("pixel_format", ["rgb01", "bgr255"])
def test_preprocessing_one_channel_at_a_time_is_bit_identical(pixel_format: str) -> None:
    """normalize + resize per channel gives the bits of the three-channel pass (which is the parity path)."""
    from maskrcnn.config import DETECTRON2_PIXEL_MEAN_BGR, DETECTRON2_PIXEL_STD_MSRA
    from maskrcnn.modeling.mask_rcnn import resize_image

    cfg = tiny_config()
    if pixel_format == "bgr255":
        cfg = dataclasses.replace(cfg, input=dataclasses.replace(
            cfg.input, pixel_format="bgr255", pixel_mean=DETECTRON2_PIXEL_MEAN_BGR, pixel_std=DETECTRON2_PIXEL_STD_MSRA))
    model = MaskRCNN(cfg).eval()
    g = torch.Generator().manual_seed(0)
    for h, w in ((333, 517), (480, 640), (61, 1000)):
        img = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1)  # a numpy-like view
        for src in (img, img.float() / 255):
            whole = model.normalize(src)
            for c in range(3):
                assert torch.equal(model.normalize(src, channel=c), whole[c:c + 1])
            batch, sizes = model.preprocess([src], resize=True)
            expected = resize_image(whole, model.min_size_test, model.max_size_test)
            assert sizes == [tuple(expected.shape[-2:])]
            assert torch.equal(batch[0, :, :sizes[0][0], :sizes[0][1]], expected)


def test_masks_are_kept_as_crops_of_their_boxes() -> None:
    """Results hold each mask over its box's window only: memory follows the detections, not the image."""
    from maskrcnn.ops.masks import MaskCrops

    torch.manual_seed(0)
    model = MaskRCNN(tiny_config()).eval()
    big = torch.zeros(3, 1200, 1600, dtype=torch.uint8)
    big[:, 300:700, 400:900] = 200
    (r,) = Predictor(model).predict(big, score_threshold=0.0)
    assert isinstance(r.masks, MaskCrops) and r.masks.shape == (len(r), 1200, 1600) and len(r) > 5
    window_px = int(r.masks.sizes.prod(1).sum())
    box_area = float(((r.boxes[:, 2] - r.boxes[:, 0] + 4) * (r.boxes[:, 3] - r.boxes[:, 1] + 4)).sum())
    assert window_px <= box_area * 1.2
    assert r.masks.nbytes() < 0.01 * len(r) * 1200 * 1600  # compressed: far below a byte per pixel
    # With soft masks asked for, the same path pastes dense masks: the crops hold exactly those.
    (dense,) = model.detect([big], score_threshold=0.0, soft_masks=True)
    assert isinstance(dense["masks"], torch.Tensor) and torch.equal(r.masks.dense(), dense["masks"])
    ref = Result(dense["boxes"], dense["scores"], dense["labels"], dense["masks"], image_size=(1200, 1600),
                 class_names_table=r.class_names_table)
    assert r.to_coco(1) == ref.to_coco(1)  # RLE from the crops = RLE of the dense masks
