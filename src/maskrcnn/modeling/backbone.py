"""ResNet / ResNeXt bodies in torchvision's or MSRA's layout (stride on the 3x3 or 1x1 conv), any widths, a dilated
res5; frozen BN, BN, SyncBN or GN."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from maskrcnn.config import HEAD_GN_GROUPS, BackboneConfig
from maskrcnn.ops.fused import conv_norm_act_forward

_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, never trained)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        """``eps`` is added to the running variance (0.0 for torchvision's published v1 COCO weights)."""
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[no-untyped-def]
        # Checkpoints trained with a real BatchNorm carry a counter that a frozen one has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(1, C, 1, 1) scale and shift, computed as torchvision does (rsqrt of var + eps)."""
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return scale, b - rm * scale

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W): x * scale + shift."""
        scale, shift = self.scale_shift()
        return x * scale + shift

    def forward_(self, x: Tensor) -> Tensor:
        """In-place :meth:`forward` on (N, C, H, W) ``x`` (same operations, same rounding, no new tensor)."""
        scale, shift = self.scale_shift()
        return x.mul_(scale).add_(shift)

    def extra_repr(self) -> str:
        """Module summary line."""
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, eps: float = 1e-5, gn_groups: int = HEAD_GN_GROUPS) -> Callable[[int], nn.Module]:
    """Factory ``channels -> norm module`` for "frozen_bn", "bn", "syncbn" or "gn"."""
    if kind == "frozen_bn":
        return lambda c: FrozenBatchNorm2d(c, eps=eps)
    if kind == "bn":
        return lambda c: nn.BatchNorm2d(c, eps=eps)
    if kind == "syncbn":
        return lambda c: nn.SyncBatchNorm(c, eps=eps)
    if kind == "gn":
        return lambda c: nn.GroupNorm(gn_groups, c, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected frozen_bn, bn, syncbn or gn")


class ConvNormAct(nn.Sequential):
    """conv, optional norm, optional ReLU; an ``nn.Sequential`` so state-dict keys (``.0.weight``) match torchvision.

    With ``fast`` set (see :func:`maskrcnn.ops.fused.set_fast_path`) they run through
    :func:`~maskrcnn.ops.fused.conv_norm_act_forward`.
    """

    fast = False
    fold = False

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """(N, Cin, H, W) -> (N, Cout, H', W')."""
        if not self.fast:
            return super().forward(x)
        return conv_norm_act_forward(x, self[0], self.norm, isinstance(self[-1], nn.ReLU), fold=self.fold)

    @property
    def norm(self) -> nn.Module | None:
        """The norm module, or None."""
        return self[1] if len(self) > 1 and not isinstance(self[1], nn.ReLU) else None


def conv_norm_act(in_ch: int, out_ch: int, kernel: int, norm: Callable[[int], nn.Module] | None, relu: bool,
                  stride: int = 1, dilation: int = 1) -> ConvNormAct:
    """torchvision's Conv2dNormActivation: conv (biased only without norm), optional norm, optional ReLU.

    Kept as an ``nn.Sequential`` so that state-dict keys (``.0.weight``, ``.1.running_mean``) match torchvision.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding=(kernel - 1) // 2 * dilation,
                                         dilation=dilation, bias=norm is None)]
    if norm is not None:
        layers.append(norm(out_ch))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return ConvNormAct(*layers)


def conv_stack(in_channels: int, num_convs: int, conv_dim: int, norm: Callable[[int], nn.Module] | None,
               dilation: int = 1) -> list[ConvNormAct]:
    """``num_convs`` x (conv3x3 [+ norm] + ReLU) of ``conv_dim`` channels, Kaiming-normal (fan-out) initialised.

    The RoI heads' conv towers (torchvision's ``FastRCNNConvFCHead`` and ``MaskRCNNHeads``).
    """
    layers = []
    prev = in_channels
    for _ in range(num_convs):
        layers.append(conv_norm_act(prev, conv_dim, 3, norm, relu=True, dilation=dilation))
        prev = conv_dim
    for layer in layers:
        nn.init.kaiming_normal_(layer[0].weight, mode="fan_out", nonlinearity="relu")
        if layer[0].bias is not None:
            nn.init.zeros_(layer[0].bias)
    return layers


class _ResidualBlock(nn.Module):
    """conv-norm-ReLU pairs, the last one's ReLU after adding the (optionally downsampled) input."""

    fast = False
    fold = False
    downsample: nn.Module | None
    relu: nn.ReLU

    def conv_norm_pairs(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        """The block's (conv, norm) pairs in order."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """(N, Cin, H, W) -> (N, Cout, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        *inner, (conv, norm) = self.conv_norm_pairs()
        out = x
        if self.fast:
            for c, n in inner:
                out = conv_norm_act_forward(out, c, n, relu=True, fold=self.fold)
            return conv_norm_act_forward(out, conv, norm, relu=True, residual=identity, fold=self.fold)
        for c, n in inner:
            out = self.relu(n(c(out)))
        return self.relu(norm(conv(out)) + identity)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs with a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, width: int, out_channels: int, stride: int, downsample: nn.Module | None,
                 norm: Callable[[int], nn.Module], groups: int = 1, stride_in_1x1: bool = False,
                 dilation: int = 1) -> None:
        """A block mapping ``inplanes`` to ``out_channels`` (= ``width``) channels with the given stride."""
        super().__init__()
        if groups != 1 or width != out_channels or dilation != 1:
            raise ValueError("BasicBlock (ResNet-18/34) supports only groups=1, width == output channels and no "
                             "dilation")
        self.conv1 = nn.Conv2d(inplanes, width, 3, stride, 1, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = norm(width)
        self.downsample = downsample

    def conv_norm_pairs(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        """(conv1, bn1), (conv2, bn2)."""
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1 with a residual (ResNet-50+ and ResNeXt).

    The stride sits on the 3x3 conv (torchvision) or on the first 1x1 conv (``stride_in_1x1``: MSRA's ResNets,
    as detectron2's R50/R101 weights were trained).
    """

    expansion = 4

    def __init__(self, inplanes: int, width: int, out_channels: int, stride: int, downsample: nn.Module | None,
                 norm: Callable[[int], nn.Module], groups: int = 1, stride_in_1x1: bool = False,
                 dilation: int = 1) -> None:
        """A block mapping ``inplanes`` to ``out_channels`` through ``width`` bottleneck channels."""
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, width, 1, s1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, s3, dilation, dilation=dilation, groups=groups, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def conv_norm_pairs(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        """(conv1, bn1), (conv2, bn2), (conv3, bn3)."""
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]


def stage_plan(cfg: BackboneConfig) -> list[dict[str, int]]:
    """Per stage res2..res5: blocks, bottleneck width, output channels, stride and dilation of its first block."""
    if cfg.depth not in _DEPTHS:
        raise ValueError(f"unsupported ResNet depth {cfg.depth}; choose one of {sorted(_DEPTHS)}")
    kind, layers = _DEPTHS[cfg.depth]
    expansion = 1 if kind == "basic" else 4
    res2_out = cfg.res2_out_channels or 64 * expansion
    # A basic block's convs are as wide as its output, so res2_out_channels thins ResNet-18/34 too.
    width = res2_out if kind == "basic" else cfg.groups * cfg.width_per_group
    plan = []
    for i, blocks in enumerate(layers):
        dilation = cfg.res5_dilation if i == 3 else 1
        # A dilated res5 keeps res4's resolution (DC5): dilation replaces the stride.
        stride = 1 if i == 0 or dilation > 1 else 2
        plan.append({"blocks": blocks, "width": width * 2**i, "out": res2_out * 2**i, "stride": stride,
                     "dilation": dilation})
    return plan


def make_stage(cfg: BackboneConfig, index: int, inplanes: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    """ResNet stage ``index`` (0 = res2 .. 3 = res5) taking ``inplanes`` channels, as ``cfg`` describes it."""
    kind, _ = _DEPTHS[cfg.depth]
    block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
    st = stage_plan(cfg)[index]
    downsample = None
    if st["stride"] != 1 or inplanes != st["out"]:
        downsample = ConvNormAct(nn.Conv2d(inplanes, st["out"], 1, st["stride"], bias=False), norm(st["out"]))
    layers = [block(inplanes, st["width"], st["out"], st["stride"], downsample, norm, cfg.groups, cfg.stride_in_1x1,
                    st["dilation"])]
    layers += [block(st["out"], st["width"], st["out"], 1, None, norm, cfg.groups, cfg.stride_in_1x1,
                     st["dilation"]) for _ in range(1, st["blocks"])]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet body returning the outputs of stages 1..4 (C2..C5, strides 4..32)."""

    fast = False
    fold = False

    def __init__(self, cfg: BackboneConfig, num_stages: int = 4) -> None:
        """The stem and the first ``num_stages`` stages (res2..) for ``cfg.depth`` (18..152), groups and widths."""
        super().__init__()
        norm = make_norm(cfg.norm, cfg.norm_eps, cfg.gn_groups)
        plan = stage_plan(cfg)
        stem = cfg.stem_out_channels
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem
        for i in range(num_stages):
            self.add_module(f"layer{i + 1}", make_stage(cfg, i, inplanes, norm))
            inplanes = plan[i]["out"]
        self.num_stages = num_stages
        self.out_channels = [plan[i]["out"] for i in range(num_stages)]
        self._init_weights()
        self.freeze(cfg.trainable_layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def freeze(self, trainable_layers: int) -> None:
        """Freeze all but the top ``trainable_layers`` stages (0..5), as torchvision's trainable_backbone_layers."""
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            train.append("bn1")
        for name, p in self.named_parameters():
            if all(not name.startswith(t) for t in train):
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """(N, 3, H, W) -> {"0": C2 (stride 4), "1": C3, "2": C4 (16), "3": C5 (32, or 16 dilated)}, built stages."""
        if self.fast:
            x = conv_norm_act_forward(x, self.conv1, self.bn1, relu=True, fold=self.fold)
            nchw = not x.is_contiguous(memory_format=torch.channels_last)
            if x.device.type == "cpu" and nchw and not x.requires_grad:
                # ATen's NCHW max-pool is ~3x slower than its channels-last one; a max is the same in any layout.
                x = self.maxpool(x.contiguous(memory_format=torch.channels_last)).contiguous()
            else:
                x = self.maxpool(x)
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            out[str(i)] = x
        return out
