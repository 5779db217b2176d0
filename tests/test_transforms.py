"""Tests for maskrcnn.data.transforms: torchvision-exact resizing, flips, LSJ, seeding, config wiring."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.config import Config, InputConfig, get_preset
from maskrcnn.data.transforms import (
    Compose,
    LargeScaleJitter,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_transforms,
)


def _sample(h: int = 30, w: int = 40, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[2.0, 3.0, 12.0, 20.0], [20.0, 5.0, w - 1.0, h - 2.0]])
    masks = torch.zeros((2, h, w), dtype=torch.uint8)
    for m, b in zip(masks, boxes.int().tolist()):
        m[b[1]:b[3], b[0]:b[2]] = 1
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks, "image_id": 7}


def _torchvision_resize(image: torch.Tensor, min_size: float, max_size: float) -> torch.Tensor:
    """torchvision's _resize_image_and_masks image path in eager mode, written out (float image)."""
    im_shape = image.shape[-2:]
    scale = min(min_size / min(im_shape), max_size / max(im_shape))
    return F.interpolate(image[None], size=None, scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                         align_corners=False)[0]


@pytest.mark.parametrize("h, w, min_size, max_size", [
    (30, 40, 64, 100), (40, 30, 64, 100), (21, 100, 64, 200), (100, 21, 64, 200), (375, 500, 800, 1333),
    (200, 1000, 800, 1333), (33, 33, 16, 1000), (400, 400, 320, 512),
])
def test_resize_matches_torchvision(h, w, min_size, max_size):
    t = ResizeShortestEdge((min_size,), max_size)
    assert t.output_size(h, w, min_size) == tuple(_torchvision_resize(torch.zeros(1, h, w), min_size,
                                                                       max_size).shape[-2:])
    if h * w > 10_000:
        return
    image, target = _sample(h, w)
    out, tgt = t(image, target, None)
    ref = _torchvision_resize(image.float(), min_size, max_size)
    assert out.dtype == torch.uint8 and out.shape == ref.shape
    # uint8 results are the float result rounded to the nearest level (ties up; float32 noise allowed)
    assert (out.float() - ref.clamp(0, 255)).abs().max() <= 0.5 + 1e-3
    # float images stay float and match exactly
    fout, _ = t(image.float(), target, None)
    torch.testing.assert_close(fout, ref)
    nh, nw = out.shape[-2:]
    ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
    torch.testing.assert_close(tgt["boxes"], target["boxes"] * ratio)
    ref_masks = F.interpolate(target["masks"][:, None].float(), size=(nh, nw), mode="nearest")[:, 0].byte()
    assert torch.equal(tgt["masks"], ref_masks) and tgt["masks"].dtype == torch.uint8
    assert tgt["labels"] is target["labels"] and tgt["image_id"] == 7
    assert torch.equal(target["masks"], _sample(h, w)[1]["masks"])  # input not modified


def test_resize_multiscale_draws_from_generator():
    t = ResizeShortestEdge((20, 30, 40), 1000)
    image, target = _sample(10, 10)
    sizes = {t(image, target, torch.Generator().manual_seed(s))[0].shape[-1] for s in range(30)}
    assert sizes == {20, 30, 40}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [t(image, target, g1)[0].shape for _ in range(5)] == [t(image, target, g2)[0].shape for _ in range(5)]
    assert t(image, target, None)[0].shape[-1] == 40  # no generator: the last size, as at test time


def test_resize_empty_target():
    t = ResizeShortestEdge((20,), 100)
    image = torch.zeros((3, 10, 15), dtype=torch.uint8)
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros((0, 10, 15), dtype=torch.uint8)}
    out, tgt = t(image, target, None)
    assert out.shape == (3, 20, 30) and tgt["masks"].shape == (0, 20, 30) and tgt["boxes"].shape == (0, 4)


def test_flip():
    image, target = _sample()
    out, tgt = RandomHorizontalFlip(1.0)(image, target, torch.Generator())
    w = image.shape[-1]
    assert torch.equal(out, image.flip(-1)) and torch.equal(tgt["masks"], target["masks"].flip(-1))
    b = target["boxes"]
    assert torch.equal(tgt["boxes"], torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    # the flipped box still encloses the flipped mask
    ys, xs = torch.nonzero(tgt["masks"][0], as_tuple=True)
    assert xs.min() >= tgt["boxes"][0, 0] and xs.max() < tgt["boxes"][0, 2]
    back, btgt = RandomHorizontalFlip(1.0)(out, tgt, None)
    assert torch.equal(back, image) and torch.equal(btgt["boxes"], target["boxes"])
    same, stgt = RandomHorizontalFlip(0.0)(image, target, torch.Generator())
    assert same is image and stgt is target
    flips = [RandomHorizontalFlip(0.5)(image, target, torch.Generator().manual_seed(s))[0].equal(image)
             for s in range(40)]
    assert 5 < sum(flips) < 35


def test_large_scale_jitter():
    t = LargeScaleJitter((24, 32), (0.3, 2.0))
    image, target = _sample(30, 40)
    shapes = set()
    for s in range(20):
        out, tgt = t(image, target, torch.Generator().manual_seed(s))
        h, w = out.shape[-2:]
        shapes.add((h, w))
        assert h <= 24 and w <= 32
        n = len(tgt["labels"])
        assert tgt["boxes"].shape == (n, 4) and tgt["masks"].shape == (n, h, w)
        b = tgt["boxes"]
        assert (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all() and (b >= 0).all()
        assert ((b[:, 2] - b[:, 0]) > 0).all() and (tgt["masks"].flatten(1).sum(1) > 0).all()
        again, tgt2 = t(image, target, torch.Generator().manual_seed(s))
        assert torch.equal(out, again) and torch.equal(tgt["boxes"], tgt2["boxes"])
    assert len(shapes) > 5


def test_compose_passes_generator():
    calls = []

    def probe(image, target, generator):
        calls.append(generator)
        return image, target

    g = torch.Generator()
    image, target = _sample()
    Compose([probe, probe])(image, target, g)
    assert calls == [g, g]


def test_build_transforms():
    cfg = get_preset("r18_fpn_demo")
    train = build_transforms(cfg, train=True)
    assert [type(t) for t in train.transforms] == [ResizeShortestEdge, RandomHorizontalFlip]
    assert train.transforms[0].min_sizes == cfg.input.min_size_train
    assert train.transforms[0].max_size == cfg.input.max_size_train
    test = build_transforms(cfg, train=False)
    assert [type(t) for t in test.transforms] == [ResizeShortestEdge]
    assert test.transforms[0].min_sizes == (cfg.input.min_size_test,)
    assert build_transforms(cfg, train=False, resize=False).transforms == []
    no_flip = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, flip_prob=0.0))
    assert [type(t) for t in build_transforms(no_flip, train=True).transforms] == [ResizeShortestEdge]
    lsj = Config(input=InputConfig(lsj=True, lsj_scale=(0.5, 1.5)))
    first = build_transforms(lsj, train=True).transforms[0]
    assert isinstance(first, LargeScaleJitter) and first.scale_range == (0.5, 1.5)
    assert first.output_size == (800, 800)
    image, target = _sample(30, 40)
    out, _ = train(image, target, torch.Generator().manual_seed(0))
    assert min(out.shape[-2:]) in cfg.input.min_size_train
