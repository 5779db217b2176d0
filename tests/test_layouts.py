"""Every layout of the model family trains: FPN, C4 and DC5 in detectron2's conventions, MSRA and ResNeXt bodies.

Each test shrinks a zoo preset (same structure and conventions, tiny widths) and overfits two synthetic images,
then checks that the trained model finds both objects with masks of the layout's size.
"""

from __future__ import annotations

import pytest
import torch
from test_mask_rcnn import synthetic_pair

from maskrcnn.config import Config, apply_overrides, get_preset
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.predict import Predictor

# Thin widths for every preset: the structure (layout, stride placement, groups, heads) stays the zoo's.
THIN = {
    "model.num_classes": 2, "model.class_names": ["square", "disc"],
    "model.backbone.depth": 50, "model.backbone.stem_out_channels": 16, "model.backbone.res2_out_channels": 32,
    "model.backbone.width_per_group": 8, "model.backbone.norm": "gn", "model.backbone.gn_groups": 4,
    "model.backbone.trainable_layers": 5,
    "model.fpn.out_channels": 32, "model.box_head.fc_dim": 64, "model.mask_head.conv_dim": 32,
    "model.anchors.sizes": [16, 32, 64, 128, 256],
    "model.box_head.batch_size_per_image": 64, "model.rpn.batch_size_per_image": 64,
    "model.rpn.pre_nms_top_n_train": 300, "model.rpn.post_nms_top_n_train": 100,
    "model.rpn.pre_nms_top_n_test": 300, "model.rpn.post_nms_top_n_test": 100,
    "input.min_size_test": 64, "input.max_size_test": 96,
}


def thin(preset: str, **extra: object) -> Config:
    """The zoo preset with thin widths, GroupNorm (trained from scratch) and the test sizes of the images."""
    overrides = dict(THIN)
    if get_preset(preset).model.backbone.groups > 1:
        overrides["model.backbone.width_per_group"] = 1  # 32 groups x 1 channel in res2
    overrides.update(extra)
    return apply_overrides(get_preset(preset), overrides)


@pytest.mark.parametrize("preset", ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_C4_3x", "mask_rcnn_R_50_DC5_3x",
                                    "mask_rcnn_X_101_32x8d_FPN_3x"])
def test_layout_overfits_two_images(preset: str, one_thread: None) -> None:
    torch.manual_seed(0)
    cfg = thin(preset)
    if cfg.model.backbone.depth == 101:
        cfg = apply_overrides(cfg, {"model.backbone.depth": 50})  # the layout is the point; keep it quick
    model = MaskRCNN(cfg).train()
    data = [synthetic_pair(0), synthetic_pair(1)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    history = []
    for _ in range(80):
        losses = model([d[0] for d in data], [d[1] for d in data])
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    assert sum(history[-5:]) / 5 < 0.4 * history[0], (history[0], history[-5:])
    result = Predictor(model).predict(data[0][0], score_threshold=0.3)[0]
    assert {1, 2} <= set(result.labels.tolist()), result
    mask_size = 14 if cfg.model.backbone.layout == "c4" else 28
    model.eval()
    with torch.no_grad():
        det = model.detect([data[0][0]], keep_intermediates=True)[0]
    assert det["mask_logits"].shape[-2:] == (mask_size, mask_size)


@pytest.mark.parametrize("preset", ["mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_50_C4_3x", "mask_rcnn_R_50_DC5_3x"])
def test_box_branch_in_chunks_gives_what_one_pass_gives(preset: str, one_thread: None) -> None:
    """model.box_head.inference_chunk bounds the box branch's memory at inference without changing a result."""
    images = [synthetic_pair(0)[0], synthetic_pair(1)[0]]
    outputs = []
    for chunk in (0, 7):
        torch.manual_seed(0)
        # Score threshold 0: the random weights still give detections of every proposal.
        model = MaskRCNN(thin(preset, **{"model.box_head.inference_chunk": chunk,
                                         "model.box_head.score_thresh": 0.0})).eval()
        with torch.no_grad():
            outputs.append(model.detect(images, keep_intermediates=True))
    for one, chunked in zip(*outputs):
        # The proposals outnumber the chunk, so several chunks and both images' batch indices were exercised.
        assert len(one["proposals"]) > 7 and len(one["boxes"]) > 0
        assert torch.equal(one["labels"], chunked["labels"])
        torch.testing.assert_close(one["boxes"], chunked["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(one["scores"], chunked["scores"], atol=1e-6, rtol=0)
        assert torch.equal(one["masks"], chunked["masks"])
