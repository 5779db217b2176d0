"""ResNet/ResNeXt bodies: torchvision's layout (parameter counts), norms, stage freezing, FPN shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from maskrcnn.config import BackboneConfig, FPNConfig
from maskrcnn.modeling.backbone import FrozenBatchNorm2d, ResNet
from maskrcnn.modeling.fpn import BackboneWithFPN, add_upsampled_

# Parameter counts of torchvision's classification models minus their final fc layer.
TORCHVISION_PARAMS = {
    (18, 1, 64): 11_689_512 - 513_000,
    (34, 1, 64): 21_797_672 - 513_000,
    (50, 1, 64): 25_557_032 - 2_049_000,
    (101, 1, 64): 44_549_160 - 2_049_000,
    (101, 32, 8): 88_791_336 - 2_049_000,
}


@pytest.mark.parametrize("key", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(key: tuple[int, int, int]) -> None:
    depth, groups, width = key
    body = ResNet(BackboneConfig(depth=depth, groups=groups, width_per_group=width, norm="bn", trainable_layers=5))
    assert sum(p.numel() for p in body.parameters()) == TORCHVISION_PARAMS[key]


def test_frozen_bn_matches_batchnorm_eval() -> None:
    bn = torch.nn.BatchNorm2d(8, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    frozen = FrozenBatchNorm2d(8, eps=1e-3)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x), atol=1e-5, rtol=1e-5)


def test_stage_freezing_counts_from_the_top() -> None:
    body = ResNet(BackboneConfig(depth=18, trainable_layers=2))
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert all(not p.requires_grad for p in ResNet(BackboneConfig(depth=18, trainable_layers=0)).parameters())
    with pytest.raises(ValueError):
        ResNet(BackboneConfig(depth=18, trainable_layers=6))


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn"])
def test_fpn_outputs_five_levels(norm: str) -> None:
    net = BackboneWithFPN(BackboneConfig(depth=18, norm=norm), FPNConfig(out_channels=32, norm="none"))
    feats = net(torch.randn(1, 3, 128, 96))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 24), (16, 12), (8, 6), (4, 3), (2, 2)]
    assert all(f.shape[1] == 32 for f in feats.values())


def test_unsupported_depth_and_layout() -> None:
    with pytest.raises(ValueError, match="depth"):
        ResNet(BackboneConfig(depth=42))
    with pytest.raises(ValueError, match="res5_dilation=2"):
        BackboneWithFPN(BackboneConfig(depth=50, layout="dc5"), FPNConfig())
    with pytest.raises(ValueError, match="BasicBlock"):
        ResNet(BackboneConfig(depth=18, groups=32, width_per_group=4))


def test_stride_sits_on_the_1x1_or_the_3x3_conv() -> None:
    """MSRA (stride_in_1x1, detectron2's R50/R101) strides the first 1x1 conv; torchvision the 3x3."""
    msra = ResNet(BackboneConfig(depth=50, stride_in_1x1=True, trainable_layers=0))
    tv = ResNet(BackboneConfig(depth=50, trainable_layers=0))
    assert msra.layer2[0].conv1.stride == (2, 2) and msra.layer2[0].conv2.stride == (1, 1)
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert [f.shape[-1] for f in msra(x).values()] == [16, 8, 4, 2] == [f.shape[-1] for f in tv(x).values()]


def test_widths_groups_and_dilation_follow_the_config() -> None:
    """Stem and res2 widths, groups x width per group, and a dilated res5 that keeps stride 16 (DC5)."""
    cfg = BackboneConfig(depth=50, groups=4, width_per_group=2, stem_out_channels=8, res2_out_channels=16,
                         res5_dilation=2, layout="dc5", trainable_layers=0)
    body = BackboneWithFPN(cfg, FPNConfig())
    assert body.body.conv1.out_channels == 8
    assert body.body.layer1[0].conv2.groups == 4 and body.body.layer1[0].conv1.out_channels == 8
    assert body.body.out_channels == [16, 32, 64, 128]
    assert body.body.layer4[0].conv2.dilation == (2, 2) and body.body.layer4[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        feats = body(torch.randn(1, 3, 64, 96))
    assert list(feats) == ["res5"] and feats["res5"].shape == (1, 128, 4, 6)
    c4 = BackboneWithFPN(dataclasses.replace(cfg, layout="c4", res5_dilation=1), FPNConfig())
    with torch.no_grad():
        feats = c4(torch.randn(1, 3, 64, 96))
    assert list(feats) == ["res4"] and feats["res4"].shape == (1, 64, 4, 6) and not hasattr(c4.body, "layer4")


@pytest.mark.parametrize("size", [(10, 14), (9, 13)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_add_upsampled_is_x_plus_nearest_upsampling(size: tuple[int, int], channels_last: bool) -> None:
    """``add_upsampled_`` against nearest upsampling written out here (source row floor(i * h / H)), in place
    outside autograd and out of place, with gradients, inside it."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    big_h, big_w = 20, 28
    x = torch.randn(2, 8, big_h, big_w).contiguous(memory_format=fmt)
    top = torch.randn(2, 8, *size).contiguous(memory_format=fmt)
    rows = torch.arange(big_h) * size[0] // big_h
    cols = torch.arange(big_w) * size[1] // big_w
    expected = x + top[:, :, rows][:, :, :, cols]
    with torch.no_grad():
        target = x.clone()
        out = add_upsampled_(target, top)
    assert torch.equal(out, expected)
    assert out.data_ptr() == target.data_ptr()  # in place: no second feature map
    x.requires_grad_(True)
    top.requires_grad_(True)
    out = add_upsampled_(x, top)
    assert torch.equal(out, expected) and out.data_ptr() != x.data_ptr()
    out.sum().backward()
    # Each top pixel feeds every output pixel it was copied to.
    counts = torch.zeros(size)
    counts.index_put_((rows[:, None].expand(-1, big_w), cols[None, :].expand(big_h, -1)), torch.ones(big_h, big_w),
                      accumulate=True)
    assert torch.equal(top.grad[0, 0], counts) and torch.equal(x.grad, torch.ones_like(x))
