"""The keypoint head: heatmap targets against a brute-force reference, the loss and its normalisations, shapes,
and a tiny model that trains and predicts keypoints (with and without its mask head)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.config import apply_overrides, get_preset
from maskrcnn.modeling.keypoint_head import KeypointRCNNHeads, KeypointRCNNPredictor, keypoint_loss
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.ops.keypoints import keypoint_heatmap_targets


def _brute_targets(kps: list[list[float]], roi: list[float], m: int) -> list[tuple[int, bool]]:
    """One RoI's (cell index, valid) per keypoint, written out with Python floats per the frameworks' rule."""
    x0, y0, x1, y1 = roi
    out = []
    for x, y, v in kps:
        cx = m - 1 if x == x1 else math.floor((x - x0) * (m / (x1 - x0)))
        cy = m - 1 if y == y1 else math.floor((y - y0) * (m / (y1 - y0)))
        valid = v > 0 and 0 <= cx < m and 0 <= cy < m
        out.append((cy * m + cx if valid else 0, valid))
    return out


def test_heatmap_targets_match_a_brute_force_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    rois = torch.tensor([[10.0, 20.0, 66.0, 76.0], [0.0, 0.0, 13.5, 40.25], [5.0, 5.0, 200.0, 9.0]])
    kps = torch.rand((3, 12, 3), generator=gen) * torch.tensor([220.0, 90.0, 3.0])
    kps[..., 2] = kps[..., 2].floor()  # visibility 0, 1 or 2
    # Edge cases: on the right / bottom edge (last cell), on the left / top edge (cell 0), just outside.
    kps[0, 0] = torch.tensor([66.0, 76.0, 2.0])
    kps[0, 1] = torch.tensor([10.0, 20.0, 2.0])
    kps[0, 2] = torch.tensor([9.999, 30.0, 2.0])
    kps[0, 3] = torch.tensor([30.0, 30.0, 0.0])
    m = 56
    targets, valid = keypoint_heatmap_targets(kps, rois, m)
    for r in range(3):
        want = _brute_targets(kps[r].tolist(), rois[r].tolist(), m)
        assert [bool(v) for v in valid[r]] == [w[1] for w in want]
        assert [int(t) for t in targets[r]] == [w[0] for w in want]
    assert (int(targets[0, 0]), bool(valid[0, 0])) == (m * m - 1, True)
    assert (int(targets[0, 1]), bool(valid[0, 1])) == (0, True)
    assert not valid[0, 2] and not valid[0, 3]
    empty_t, empty_v = keypoint_heatmap_targets(kps[:0], rois[:0], m)
    assert empty_t.shape == empty_v.shape == (0, 12)


def test_head_and_predictor_shapes_and_names() -> None:
    head = KeypointRCNNHeads(32, (16, 16, 8))
    pred = KeypointRCNNPredictor(head.out_channels, 5)
    x = torch.randn(3, 32, 14, 14)
    out = pred(head(x))
    assert out.shape == (3, 5, 56, 56)
    assert [k for k in head.state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert tuple(pred.kps_score_lowres.weight.shape) == (8, 5, 4, 4)
    # The upsampling is plain bilinear x2 of the deconvolution's output.
    low = pred.kps_score_lowres(head(x))
    torch.testing.assert_close(out, F.interpolate(low, scale_factor=2.0, mode="bilinear", align_corners=False))


def test_keypoint_loss_is_mean_cross_entropy_over_valid_keypoints() -> None:
    gen = torch.Generator().manual_seed(1)
    m, k = 8, 3
    logits = torch.randn(2, k, m, m, generator=gen, requires_grad=True)
    rois = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[4.0, 4.0, 12.0, 12.0]])]
    gt = [torch.tensor([[[1.5, 2.5, 2.0], [7.2, 0.1, 1.0], [3.0, 3.0, 0.0]]]),
          torch.tensor([[[5.0, 6.0, 2.0], [20.0, 5.0, 2.0], [11.9, 11.9, 2.0]]])]
    idx = [torch.tensor([0]), torch.tensor([0])]
    loss = keypoint_loss(logits, rois, gt, idx)
    flat = logits.reshape(2 * k, m * m)
    # valid: roi 0 kps 0, 1 (kp 2 invisible); roi 1 kps 0, 2 (kp 1 outside): cells y * m + x.
    rows, cells = [0, 1, 3, 5], [2 * m + 1, 0 * m + 7, 2 * m + 1, 7 * m + 7]
    want = F.cross_entropy(flat[rows], torch.tensor(cells), reduction="sum")
    torch.testing.assert_close(loss, want / 4)
    torch.testing.assert_close(keypoint_loss(logits, rois, gt, idx, normalizer=10.0), want / 10)
    none_valid = [g.clone() for g in gt]
    for g in none_valid:
        g[..., 2] = 0
    zero = keypoint_loss(logits, rois, none_valid, idx)
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    zero.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def _tiny_cfg(mask: bool, **extra: object):
    return apply_overrides(get_preset("r18_fpn_demo"), {
        "model.num_classes": 1, "model.class_names": ["person"], "model.fpn.out_channels": 32,
        "model.box_head.conv_dim": 32, "model.box_head.fc_dim": 32, "model.mask_head.conv_dim": 32,
        "model.mask_head.enabled": mask, "model.keypoint_head.enabled": True,
        "model.keypoint_head.conv_dims": [16, 16], "model.keypoint_head.num_keypoints": 4,
        "model.keypoint_head.names": ["left_a", "right_a", "top", "bottom"], "model.keypoint_head.skeleton": [[0, 1]],
        "input.min_size_test": 64, "input.max_size_test": 80, **extra})


def _sample() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    image = torch.zeros((3, 64, 80), dtype=torch.uint8)
    image[:, 16:48, 20:60] = 200
    target = {"boxes": torch.tensor([[20.0, 16.0, 60.0, 48.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros((1, 64, 80), dtype=torch.uint8),
              "keypoints": torch.tensor([[[22.0, 32.0, 2.0], [58.0, 32.0, 2.0], [40.0, 18.0, 2.0], [40.0, 46.0, 1.0]]])}
    target["masks"][0, 16:48, 20:60] = 1
    return image, target


@pytest.mark.parametrize("mask", [False, True])
def test_tiny_model_trains_the_keypoint_branch(mask: bool) -> None:
    torch.manual_seed(0)
    model = MaskRCNN(_tiny_cfg(mask)).train()
    image, target = _sample()
    if not mask:
        del target["masks"]  # a keypoint-only model needs no masks
    losses = model([image], [target], generator=torch.Generator().manual_seed(0))
    assert ("loss_mask" in losses) == mask and "loss_keypoint" in losses
    assert float(losses["loss_keypoint"].detach()) > 0
    sum(losses.values()).backward()
    grad = model.roi_heads.keypoint_predictor.kps_score_lowres.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    model.eval()
    det = model.detect([image], score_threshold=0.0)[0]
    n = det["boxes"].shape[0]
    assert n > 0 and det["keypoints"].shape == (n, 4, 3)
    assert ("masks" in det) == mask
    # Keypoints lie in their box (the decoding never leaves it), in input pixels.
    b, kp = det["boxes"], det["keypoints"]
    assert bool(((kp[..., 0] >= b[:, None, 0] - 1e-4) & (kp[..., 0] <= b[:, None, 2] + 1e-4)).all())


def test_training_without_keypoints_is_a_clear_error() -> None:
    model = MaskRCNN(_tiny_cfg(False)).train()
    image, target = _sample()
    del target["keypoints"]
    with pytest.raises(ValueError, match="target 0: this model has a keypoint head.*'keypoints' of shape"):
        model([image], [target])


def test_detectron2_normaliser_divides_by_a_full_quota() -> None:
    """normalize_by_visible=False divides by images x RoIs per image x positive fraction x K (detectron2)."""
    torch.manual_seed(0)
    cfg = _tiny_cfg(False)
    image, target = _sample()
    del target["masks"]
    runs = {}
    for visible in (True, False):
        torch.manual_seed(0)
        model = MaskRCNN(apply_overrides(cfg, {"model.keypoint_head.normalize_by_visible": visible})).train()
        losses = model([image], [target], generator=torch.Generator().manual_seed(0))
        runs[visible] = float(losses["loss_keypoint"].detach())
    bh = cfg.model.box_head
    quota = bh.batch_size_per_image * bh.positive_fraction * cfg.model.keypoint_head.num_keypoints
    # Same sampled RoIs in both runs: the ratio of the losses is quota / number of valid keypoints, an integer.
    ratio = quota * runs[False] / runs[True]
    assert ratio == pytest.approx(round(ratio), rel=1e-5) and 1 <= round(ratio) <= quota
