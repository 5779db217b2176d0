"""Tests for maskrcnn.engine.schedule: the SGD param groups and the per-iteration LR schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from maskrcnn.config import SolverConfig
from maskrcnn.engine.schedule import WarmupLRFactor, build_lr_scheduler, build_optimizer, lr_scale


class _FrozenBatchNorm2d(nn.Module):
    """Stand-in for a custom norm layer (matched by class name) with trainable affine parameters."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))


def _net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3),
        nn.GroupNorm(2, 4),
        _FrozenBatchNorm2d(4),
        nn.Linear(4, 2),
    )
    net[0].weight.requires_grad_(False)  # frozen: must not be in any group
    return net


def _lrs(solver: SolverConfig, n: int, max_iter: int | None = None) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=solver.base_lr)
    sched = build_lr_scheduler(opt, solver, max_iter)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _group_of(opt: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    (g,) = [g for g in opt.param_groups if any(q is param for q in g["params"])]
    return g


def test_optimizer_defaults_sgd_momentum_single_decay():
    net = _net()
    opt = build_optimizer(net, SolverConfig())
    assert isinstance(opt, torch.optim.SGD)
    assert len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 and g["lr"] == 0.02
    n_trainable = sum(1 for p in net.parameters() if p.requires_grad)
    assert len(g["params"]) == n_trainable
    assert not any(p is net[0].weight for p in g["params"])


def test_optimizer_no_decay_on_norm_and_bias():
    net = _net()
    opt = build_optimizer(net, SolverConfig(weight_decay_norm=0.0, weight_decay_bias=0.0))
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-4]
    for norm in (net[1], net[3], net[4]):
        assert _group_of(opt, norm.weight)["weight_decay"] == 0.0
        assert _group_of(opt, norm.bias)["weight_decay"] == 0.0
    assert _group_of(opt, net[2].bias)["weight_decay"] == 0.0
    assert _group_of(opt, net[5].bias)["weight_decay"] == 0.0
    assert _group_of(opt, net[2].weight)["weight_decay"] == 1e-4
    assert _group_of(opt, net[5].weight)["weight_decay"] == 1e-4
    # Every trainable parameter exactly once.
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in net.parameters() if p.requires_grad)


def test_optimizer_bias_rule_wins_over_norm_rule():
    net = _net()
    opt = build_optimizer(net, SolverConfig(weight_decay_norm=0.0, weight_decay_bias=5e-5))
    assert _group_of(opt, net[1].weight)["weight_decay"] == 0.0
    assert _group_of(opt, net[1].bias)["weight_decay"] == 5e-5
    assert _group_of(opt, net[5].weight)["weight_decay"] == 1e-4


def test_optimizer_shared_parameter_appears_once():
    lin = nn.Linear(2, 2)
    net = nn.Sequential(lin, lin)
    opt = build_optimizer(net, SolverConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == 2


def test_optimizer_rejects_model_without_trainable_params():
    net = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(net, SolverConfig())


def test_warmup_is_linear_from_warmup_factor():
    s = SolverConfig(base_lr=1.0, warmup_iters=10, warmup_factor=0.001, steps=(100,), max_iter=200)
    lrs = _lrs(s, 12)
    assert lrs[0] == pytest.approx(0.001)
    for i in range(10):
        alpha = i / 10
        assert lrs[i] == pytest.approx(0.001 * (1 - alpha) + alpha)
    assert lrs[10] == pytest.approx(1.0) and lrs[11] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))


def test_multistep_decay():
    s = SolverConfig(base_lr=0.5, warmup_iters=0, steps=(3, 6), gamma=0.1, max_iter=10)
    lrs = _lrs(s, 10)
    assert lrs[:3] == pytest.approx([0.5] * 3)
    assert lrs[3:6] == pytest.approx([0.05] * 3)
    assert lrs[6:] == pytest.approx([0.005] * 4)


def test_cosine_decays_to_zero_at_max_iter():
    s = SolverConfig(base_lr=0.1, warmup_iters=0, lr_schedule="cosine", max_iter=10)
    f = WarmupLRFactor(s, 10)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)
    assert f(20) == pytest.approx(0.0, abs=1e-12)
    lrs = _lrs(s, 10)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[3] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 10)))


def test_cosine_with_warmup_and_explicit_max_iter():
    s = SolverConfig(base_lr=1.0, warmup_iters=4, warmup_factor=0.0, lr_schedule="cosine", max_iter=999)
    f = WarmupLRFactor(s, 8)  # the explicit max_iter wins over solver.max_iter
    assert f(0) == 0.0
    assert f(2) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert f(8) == pytest.approx(0.0, abs=1e-12)


def test_linear_scaling_rule():
    base = SolverConfig(base_lr=0.02, ims_per_batch=4, reference_batch_size=16, warmup_iters=0)
    assert lr_scale(base) == 1.0
    assert _lrs(base, 1)[0] == pytest.approx(0.02)
    scaled = dataclasses.replace(base, scale_lr=True)
    assert lr_scale(scaled) == 0.25
    assert _lrs(scaled, 1)[0] == pytest.approx(0.005)
    up = dataclasses.replace(scaled, ims_per_batch=32)
    assert _lrs(up, 1)[0] == pytest.approx(0.04)


def test_scheduler_state_dict_round_trip():
    s = SolverConfig(base_lr=1.0, warmup_iters=3, steps=(5,), max_iter=10)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_lr_scheduler(opt, s)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["steps"] == (5,)  # the schedule object is recorded, not dropped
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_lr_scheduler(opt2, s)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    for _ in range(4):
        opt.step(), sched.step()
        opt2.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_bad_schedule_settings_raise():
    with pytest.raises(ValueError, match="increasing"):
        WarmupLRFactor(SolverConfig(steps=(10, 5)), 20)
