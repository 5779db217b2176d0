"""ResNet / ResNeXt bodies in torchvision's layout (stride on the 3x3 conv), with frozen BN, BN, SyncBN or GN."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
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


# ---------------------------------------------------------------------------------------------------------------
# The fast path
#
# Inference on CPU spends a third of the backbone's time outside the convs, mostly in allocating (and page-faulting
# in) a fresh tensor for every BN multiply, BN add, residual add: a (1, 256, 200, 304) `x * s + b` takes ~34 ms,
# the same arithmetic in place ~3 ms. The default fast path therefore runs the same operations as the modules,
# bit for bit, but in place on the conv's fresh output. The opt-in ``fold`` path goes further and changes the
# rounding: a frozen BN (or a BatchNorm in eval mode) is an affine map per channel, so conv -> norm is one conv
# with scaled weight rows and a bias, and oneDNN adds that bias, the residual and the ReLU while the output tile
# is still in cache. Parameters and state-dict keys stay as they are in both: folded weights are a cache beside
# them, rebuilt when a parameter or statistic changes (tensor version counters).


def _norm_tensors(norm: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, float] | None:
    """(weight, bias, running_mean, running_var, eps) of a norm that is affine right now, else None."""
    if isinstance(norm, FrozenBatchNorm2d):
        return norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    if (isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
            and norm.running_mean is not None and norm.running_var is not None):
        return norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    return None


def _fold(conv: nn.Conv2d, stats: tuple[Tensor | None, Tensor | None, Tensor, Tensor, float]
          ) -> tuple[Tensor, Tensor]:
    weight, bias, mean, var, eps = stats
    # The same scale as FrozenBatchNorm2d.forward computes, so the only change is the rounding of w * scale.
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = weight * scale
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift


def folded_conv_params(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[Tensor, Tensor | None] | None:
    """Weight (O, I/g, kh, kw) and bias (O,) of one conv equal to ``norm(conv(x))``; None if ``norm`` is not affine.

    Without a norm these are the conv's own. Under autograd with trainable tensors the fold is recomputed (and
    differentiated through) on each call; otherwise it is cached on the norm until one of its inputs changes.
    """
    if norm is None:
        return conv.weight, conv.bias
    stats = _norm_tensors(norm)
    if stats is None:
        return None
    tensors = [t for t in (conv.weight, conv.bias, *stats[:4]) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _fold(conv, stats)
    key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors) + (
        conv.weight.is_contiguous(memory_format=torch.channels_last),)
    cache = norm.__dict__.get("_folded")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, *_fold(conv, stats))
        # A plain attribute, not a buffer: it must stay out of state dicts and is rebuilt after .to().
        norm.__dict__["_folded"] = cache
    return cache[1], cache[2]


def _needs_grad(x: Tensor, residual: Tensor | None, *modules: nn.Module | None) -> bool:
    """True when autograd must see this call: grad mode on and an input or a parameter requires grad."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or (residual is not None and residual.requires_grad):
        return True
    return any(p.requires_grad for m in modules if m is not None for p in m.parameters(recurse=False))


def _onednn_dtype(x: Tensor, weight: Tensor, grad: bool) -> torch.dtype | None:
    """The dtype a direct oneDNN call should compute in for this CPU inference call, or None for no such call.

    float32, or bfloat16 under CPU autocast: the oneDNN ops called directly are not autocast-aware, so the
    caller casts for them as autocast would for ``F.conv2d``/``F.linear``.
    """
    if grad or x.device.type != "cpu" or not torch.backends.mkldnn.is_available() or weight.dtype != torch.float32:
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype if dtype in (torch.float32, torch.bfloat16) and x.dtype in (torch.float32, dtype) else None


def _cast_params(owner: nn.Module, weight: Tensor, bias: Tensor | None, dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor | None]:
    """``weight`` and ``bias`` in ``dtype``, cast once and cached on ``owner`` until they change."""
    if dtype == weight.dtype:
        return weight, bias
    key = (weight.data_ptr(), weight._version, None if bias is None else (bias.data_ptr(), bias._version), dtype)
    cache = owner.__dict__.get("_cast")
    if cache is None or cache[0] != key:
        cache = (key, weight.to(dtype), None if bias is None else bias.to(dtype))
        owner.__dict__["_cast"] = cache  # a plain attribute: outside the state dict
    return cache[1], cache[2]


def _fused_conv(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Tensor | None, relu: bool,
                residual: Tensor | None, grad: bool) -> Tensor:
    """act(conv(x; weight, bias) + residual); one oneDNN call in CPU inference (float32, or bfloat16 autocast)."""
    dtype = _onednn_dtype(x, weight, grad) if x.dim() == 4 else None
    if dtype is not None:
        x = x.to(dtype)
        weight, bias = _cast_params(conv, weight, bias, dtype)
        if residual is not None:
            residual = residual.to(dtype)
        pad, stride, dil = list(conv.padding), list(conv.stride), list(conv.dilation)  # type: ignore[arg-type]
        act = "relu" if relu else "none"
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, pad, stride, dil, conv.groups, act, [], "")
        return torch.ops.mkldnn._convolution_pointwise(x, residual, weight, bias, pad, stride, dil, conv.groups,
                                                       "add", None, act if relu else None, [], "")
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        y = y + residual
    return F.relu(y, inplace=True) if relu else y


def linear_act(x: Tensor, linear: nn.Linear, relu: bool) -> Tensor:
    """act(linear(x)) for x (R, in_features) -> (R, out_features); CPU float32 inference runs oneDNN's matmul.

    ``F.linear`` on the CPU calls MKL's sgemm, which on AMD processors runs at half the speed of oneDNN's
    (the box head's fc6, 1000 x 12544 x 1024: 120 ms against 59 ms on 2 cores, same float64 error); oneDNN also
    applies the ReLU in the same pass. The two differ in the last bits only, which is why this is used in the
    RoI heads' fast path and not in the exact backbone.
    """
    dtype = _onednn_dtype(x, linear.weight, _needs_grad(x, None, linear)) if x.dim() == 2 else None
    if dtype is not None:
        w, b = _cast_params(linear, linear.weight, linear.bias, dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype).contiguous(), w, b, "relu" if relu else "none", [], "")
    y = linear(x)
    return F.relu(y) if relu else y


def conv_norm_act_forward(x: Tensor, conv: nn.Conv2d, norm: nn.Module | None, relu: bool,
                          residual: Tensor | None = None, fold: bool = False) -> Tensor:
    """act(norm(conv(x)) + residual) for x (N, Cin, H, W) -> (N, Cout, H', W'); ``residual`` has the output shape.

    Without autograd the norm, residual add and ReLU run in place on the conv's output: the same operations as
    the modules, so the same bits. ``fold`` folds an affine norm into the conv and fuses bias, residual and ReLU
    into it (fewer passes, different rounding). Under autograd it runs the modules (``fold``: with the folded,
    differentiable weights).
    """
    grad = _needs_grad(x, residual, conv, norm)
    if fold:
        params = folded_conv_params(conv, norm)
        if params is not None:
            return _fused_conv(x, conv, params[0], params[1], relu, residual, grad)
    y = conv(x)
    if grad:
        if norm is not None:
            y = norm(y)
        if residual is not None:
            y = y + residual
        return F.relu(y, inplace=True) if relu else y
    if isinstance(norm, FrozenBatchNorm2d):
        norm.forward_(y)
    elif norm is not None:
        y = norm(y)
    if residual is not None:
        y.add_(residual)
    return y.relu_() if relu else y


class ConvNormAct(nn.Sequential):
    """conv, optional norm, optional ReLU; an ``nn.Sequential`` so state-dict keys (``.0.weight``) match torchvision.

    With ``fast`` set (see :func:`set_fast_path`) they run through :func:`conv_norm_act_forward`.
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


def set_fast_path(module: nn.Module, enabled: bool, fold: bool = False) -> None:
    """Turn the fast conv path on or off in every submodule of ``module`` that has one; ``fold`` folds norms."""
    for m in module.modules():
        # Every module class with a fast path declares it with ``fast = False`` / ``fold = False`` class attributes.
        if isinstance(getattr(type(m), "fast", None), bool):
            m.fast = enabled
        if isinstance(getattr(type(m), "fold", None), bool):
            m.fold = enabled and fold
        if not (enabled and fold):
            m.__dict__.pop("_folded", None)  # drop cached folded weights with the path that used them


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

    def conv_norm_pairs(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        """(conv1, bn1), (conv2, bn2)."""
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]


class Bottleneck(_ResidualBlock):
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

    def conv_norm_pairs(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        """(conv1, bn1), (conv2, bn2), (conv3, bn3)."""
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]


class ResNet(nn.Module):
    """ResNet body returning the outputs of stages 1..4 (C2..C5, strides 4..32)."""

    fast = False
    fold = False

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
            downsample = ConvNormAct(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
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
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            out[str(i)] = x
        return out
