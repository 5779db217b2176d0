"""The CPU fast path's kernels: in-place conv -> norm -> residual -> ReLU, norm folding, fused oneDNN calls.

Inference on CPU spends a third of the backbone's time outside the convs, mostly in allocating (and page-faulting
in) a fresh tensor for every BN multiply, BN add, residual add: a (1, 256, 200, 304) `x * s + b` takes ~34 ms,
the same arithmetic in place ~3 ms. The default fast path therefore runs the same operations as the modules,
bit for bit, but in place on the conv's fresh output. The opt-in ``fold`` path goes further and changes the
rounding: a frozen BN (or a BatchNorm in eval mode) is an affine map per channel, so conv -> norm is one conv
with scaled weight rows and a bias, and oneDNN adds that bias, the residual and the ReLU while the output tile
is still in cache. Parameters and state-dict keys stay as they are in both: folded weights are a cache beside
them, rebuilt when a parameter or statistic changes (tensor version counters).

These are plain functions over modules' tensors; the modules (``modeling/``) decide when to call them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv_norm_act_forward", "folded_conv_params", "is_frozen_norm", "linear_act", "needs_grad",
           "set_fast_path"]


def is_frozen_norm(norm: nn.Module | None) -> bool:
    """Whether ``norm`` is a frozen batch norm: fixed statistics, with an in-place ``forward_``."""
    return norm is not None and callable(getattr(norm, "forward_", None)) and hasattr(norm, "running_var")


def _norm_tensors(norm: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, float] | None:
    """(weight, bias, running_mean, running_var, eps) of a norm that is affine right now, else None."""
    if is_frozen_norm(norm):
        return norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    if (isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
            and norm.running_mean is not None and norm.running_var is not None):
        return norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    return None


def _fold(conv: nn.Conv2d, stats: tuple[Tensor | None, Tensor | None, Tensor, Tensor, float]
          ) -> tuple[Tensor, Tensor]:
    weight, bias, mean, var, eps = stats
    # The same scale as the frozen norm's forward computes, so the only change is the rounding of w * scale.
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


def needs_grad(x: Tensor, residual: Tensor | None, *modules: nn.Module | None) -> bool:
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
    dtype = _onednn_dtype(x, linear.weight, needs_grad(x, None, linear)) if x.dim() == 2 else None
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
    grad = needs_grad(x, residual, conv, norm)
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
    if is_frozen_norm(norm):
        norm.forward_(y)
    elif norm is not None:
        y = norm(y)
    if residual is not None:
        y.add_(residual)
    return y.relu_() if relu else y



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
