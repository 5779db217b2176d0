"""ResNet / ResNeXt bodies in torchvision's layout (stride on the 3x3 conv), with frozen BN, BN, SyncBN or GN."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from maskrcnn.config import BackboneConfig

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

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H, W): x * scale + shift, computed as torchvision does (rsqrt of var + eps)."""
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def extra_repr(self) -> str:
        """Module summary line."""
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, eps: float = 1e-5, gn_groups: int = 32) -> Callable[[int], nn.Module]:
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


def conv_norm_act(in_ch: int, out_ch: int, kernel: int, norm: Callable[[int], nn.Module] | None, relu: bool,
                  stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (biased only without norm), optional norm, optional ReLU.

    Kept as an ``nn.Sequential`` so that state-dict keys (``.0.weight``, ``.1.running_mean``) match torchvision.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding=(kernel - 1) // 2 * dilation,
                                         dilation=dilation, bias=norm is None)]
    if norm is not None:
        layers.append(norm(out_ch))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 norm: Callable[[int], nn.Module], groups: int = 1, base_width: int = 64) -> None:
        """A block mapping ``inplanes`` to ``planes`` channels with the given stride."""
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """(N, Cin, H, W) -> (N, planes, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, grouped) -> 1x1 with a residual (ResNet-50+ and ResNeXt)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 norm: Callable[[int], nn.Module], groups: int = 1, base_width: int = 64) -> None:
        """A block mapping ``inplanes`` to ``planes * 4`` channels with the stride on the 3x3 conv."""
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """(N, Cin, H, W) -> (N, 4*planes, H/stride, W/stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet body returning the outputs of stages 1..4 (C2..C5, strides 4..32)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        """Builds the stem and four stages for ``cfg.depth`` (18..152) and ``cfg.groups``/``width_per_group``."""
        super().__init__()
        if cfg.depth not in _DEPTHS:
            raise ValueError(f"unsupported ResNet depth {cfg.depth}; choose one of {sorted(_DEPTHS)}")
        kind, layers = _DEPTHS[cfg.depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        norm = make_norm(cfg.norm, cfg.norm_eps, cfg.gn_groups)
        self.groups = cfg.groups
        self.base_width = cfg.width_per_group
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, norm)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, norm)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, norm)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, norm)
        self.out_channels = [64 * block.expansion * 2**i for i in range(4)]
        self._init_weights()
        self.freeze(cfg.trainable_layers)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int,
                    norm: Callable[[int], nn.Module]) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       norm(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, norm, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, norm, self.groups, self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

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
        """(N, 3, H, W) -> {"0": C2 (stride 4), "1": C3, "2": C4, "3": C5 (stride 32)}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            out[str(i)] = x
        return out
