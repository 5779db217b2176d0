"""The optimiser and the per-iteration learning-rate schedule (linear warmup, then multi-step or cosine)."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from maskrcnn.config import SolverConfig

# Parameters of these modules count as "norm" parameters for weight_decay_norm.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module) -> bool:
    # Duck-typed too, so FrozenBatchNorm2d or a custom norm with trainable affine parameters counts.
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def lr_scale(solver: SolverConfig) -> float:
    """Factor the linear scaling rule applies to base_lr (1.0 unless ``solver.scale_lr``)."""
    if not solver.scale_lr:
        return 1.0
    if solver.reference_batch_size <= 0:
        raise ValueError(f"solver.reference_batch_size must be positive, got {solver.reference_batch_size}")
    return solver.ims_per_batch / solver.reference_batch_size


def build_optimizer(model: nn.Module, solver: SolverConfig) -> torch.optim.Optimizer:
    """SGD with momentum (or AdamW); one param group per weight decay (norm params and biases may get their own)."""
    if solver.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"unsupported solver.optimizer {solver.optimizer!r}; choose 'sgd' or 'adamw'")
    wd_norm = solver.weight_decay if solver.weight_decay_norm is None else solver.weight_decay_norm
    wd_bias = solver.weight_decay if solver.weight_decay_bias is None else solver.weight_decay_bias
    groups: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for p_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))  # shared parameters must appear in exactly one group
            wd = solver.weight_decay
            if _is_norm(module):
                wd = wd_norm
            # As in detectron2, the bias rule wins over the norm rule for a norm layer's bias.
            if p_name == "bias":
                wd = wd_bias
            groups.setdefault(wd, []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    param_groups = [{"params": params, "weight_decay": wd} for wd, params in groups.items()]
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=solver.base_lr, betas=tuple(solver.adam_betas),
                                 weight_decay=solver.weight_decay)
    return torch.optim.SGD(param_groups, lr=solver.base_lr, momentum=solver.momentum,
                           weight_decay=solver.weight_decay)


class WarmupLRFactor:
    """LR multiplier at an iteration: scale x linear warmup x (multi-step or cosine decay).

    A plain object rather than a closure so that ``LambdaLR.state_dict`` records its settings.
    """

    def __init__(self, solver: SolverConfig, max_iter: int) -> None:
        """Capture the schedule's settings from ``solver``; ``max_iter`` ends the cosine at 0."""
        if solver.lr_schedule not in ("multistep", "cosine"):
            raise ValueError(f"unknown solver.lr_schedule {solver.lr_schedule!r}; use 'multistep' or 'cosine'")
        if list(solver.steps) != sorted(solver.steps):
            raise ValueError(f"solver.steps must be increasing, got {solver.steps}")
        self.scale = lr_scale(solver)
        self.schedule = solver.lr_schedule
        self.steps = tuple(int(s) for s in solver.steps)
        self.gamma = float(solver.gamma)
        self.warmup_iters = int(solver.warmup_iters)
        self.warmup_factor = float(solver.warmup_factor)
        self.max_iter = int(max_iter)

    def __call__(self, it: int) -> float:
        """Multiplier of base_lr for 0-based iteration ``it``."""
        if self.schedule == "multistep":
            main = self.gamma ** bisect.bisect_right(self.steps, it)
        else:
            frac = min(it, self.max_iter) / max(self.max_iter, 1)
            main = 0.5 * (1.0 + math.cos(math.pi * frac))
        warm = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            warm = self.warmup_factor * (1.0 - alpha) + alpha
        return self.scale * warm * main


def build_lr_scheduler(optimizer: torch.optim.Optimizer, solver: SolverConfig,
                       max_iter: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR (step it once per iteration) following ``solver``'s warmup and decay."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLRFactor(solver, max_iter or solver.max_iter))
