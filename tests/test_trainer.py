"""Tests for maskrcnn.engine.trainer with a tiny stand-in detector and synthetic per-iteration batches."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.config import Config, SolverConfig, TrainConfig, load_config
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.trainer import (NonFiniteLossError, NonFiniteWeightsError, Trainer, read_metrics,
                                     resolve_device)

NUM_CLASSES = 3
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops run fastest single-threaded (and the suite shares 2 cores); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------
# Stand-ins: data whose batch i depends only on (seed, i), and a tiny model with the MaskRCNN train interface


def make_batch(g: torch.Generator, batch_size: int = 2) -> tuple[list[torch.Tensor], list[dict]]:
    """One collated batch drawn from ``g``: random sizes, boxes, masks and a random horizontal flip."""
    images, targets = [], []
    for _ in range(batch_size):
        h, w = (int(v) for v in torch.randint(12, 20, (2,), generator=g))
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        n = int(torch.randint(1, 3, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + torch.tensor([w / 3, h / 3])], dim=1).float()
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        if bool(torch.rand(1, generator=g) < 0.5):  # augmentation, also a function of (seed, iteration)
            img, masks = img.flip(-1), masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        labels = torch.randint(1, NUM_CLASSES + 1, (n,), generator=g)
        images.append(img)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks,
                        "image_id": int(torch.randint(0, 1000, (1,), generator=g))})
    return images, targets


def loader_factory(seed: int = 0, crash_at: int | None = None):
    """Contract 2: factory(start_iter) -> infinite iterable; batch i drawn from a generator seeded by (seed, i)."""
    def factory(start_iter: int):
        def stream():
            i = start_iter
            while True:
                if crash_at is not None and i == crash_at:
                    raise RuntimeError("simulated preemption")
                yield make_batch(torch.Generator().manual_seed(seed * 1_000_003 + i))
                i += 1
        return stream()
    return factory


class StatefulLoader:
    """Contract 3 with state: a finite 'epoch' of batches whose position is saved in checkpoints."""

    def __init__(self, seed: int = 0, epoch_len: int = 4, crash_at: int | None = None) -> None:
        self.seed, self.epoch_len, self.crash_at = seed, epoch_len, crash_at
        self.consumed = 0  # batches handed out so far, over all epochs

    def __iter__(self):
        while True:
            i = self.consumed
            if self.crash_at is not None and i == self.crash_at:
                raise RuntimeError("simulated preemption")
            self.consumed += 1
            yield make_batch(torch.Generator().manual_seed(self.seed * 1_000_003 + i))
            if self.consumed % self.epoch_len == 0:
                return

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


class ListLoader:
    """Contract 3 without state: a fixed list of batches, re-iterated per epoch (resume skips batches)."""

    def __init__(self, seed: int = 0, n: int = 4, crash_at: int | None = None) -> None:
        self.batches = [make_batch(torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in range(n)]
        self.crash_at = crash_at
        self.served = 0

    def __iter__(self):
        for b in self.batches:
            if self.crash_at is not None and self.served == self.crash_at:
                raise RuntimeError("simulated preemption")
            self.served += 1
            yield b


class TinyDetector(nn.Module):
    """A few-parameter model with MaskRCNN's train interface; uses dropout, global randperm and a Generator."""

    def __init__(self, init_seed: int = 0, nan_at_call: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(init_seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.cls = nn.Linear(8, NUM_CLASSES + 1)
        self.box = nn.Linear(8, 4)
        self.mask = nn.Conv2d(8, 1, 1)
        self.obj = nn.Conv2d(8, 1, 1)
        self.drop = nn.Dropout(0.3)
        self.gen = torch.Generator().manual_seed(123)  # explicit generator, restored on resume
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> dict[str, torch.Tensor]:
        self.calls += 1
        out = {k: torch.zeros(()) for k in LOSS_KEYS}
        for im, t in zip(images, targets):
            h, w = im.shape[-2:]
            f = F.relu(self.norm(self.conv(im.float()[None] / 255.0)))
            pooled = self.drop(f.mean((2, 3)))
            out["loss_classifier"] = out["loss_classifier"] + F.cross_entropy(self.cls(pooled), t["labels"][:1])
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            out["loss_box_reg"] = out["loss_box_reg"] + F.smooth_l1_loss(self.box(pooled)[0], t["boxes"][0] / scale)
            fg = t["masks"].amax(0).float()
            out["loss_mask"] = out["loss_mask"] + F.binary_cross_entropy_with_logits(self.mask(f)[0, 0], fg)
            pos = torch.randperm(h * w, generator=self.gen)[:16]
            obj = self.obj(f)[0, 0].flatten()[pos]
            out["loss_objectness"] = out["loss_objectness"] + F.binary_cross_entropy_with_logits(
                obj, fg.flatten()[pos])
            sel = torch.randperm(h * w)[:8]  # global RNG, as torchvision's samplers use
            feats = f[0].flatten(1)[:, sel].t()
            out["loss_rpn_box_reg"] = out["loss_rpn_box_reg"] + (self.box(feats) - t["boxes"][:1] / scale).abs().mean()
        out = {k: v / len(images) for k, v in out.items()}
        if self.nan_at_call is not None and self.calls == self.nan_at_call:
            out["loss_mask"] = out["loss_mask"] * float("nan")
        return out


def make_cfg(**train_kw) -> Config:
    solver = SolverConfig(base_lr=0.05, ims_per_batch=2, max_iter=6, steps=(4,), gamma=0.5, warmup_iters=2,
                          warmup_factor=0.1, weight_decay_norm=0.0)
    train = TrainConfig(seed=7, num_workers=0, checkpoint_period=3, keep_last=2, log_period=1, device="cpu")
    train = dataclasses.replace(train, **train_kw)
    return Config(solver=solver, train=train)


def loss_rows(records: list[dict]) -> list[tuple]:
    return [(r["iter"], r["lr"], *(r[k] for k in LOSS_KEYS)) for r in records if r.get("type") == "train"]


def history_rows(history: list[dict]) -> list[tuple]:
    return [(h["iter"], h["lr"], *(h[k] for k in LOSS_KEYS)) for h in history]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------------
# Resume


DATA_KINDS = {
    "factory": lambda crash_at=None: loader_factory(seed=5, crash_at=crash_at),
    "stateful": lambda crash_at=None: StatefulLoader(seed=5, epoch_len=4, crash_at=crash_at),
    "list": lambda crash_at=None: ListLoader(seed=5, n=4, crash_at=crash_at),
}


@pytest.mark.parametrize("kind", list(DATA_KINDS))
def test_resume_is_bit_identical(tmp_path, kind):
    cfg = make_cfg()
    if kind == "factory":
        cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, clip_grad_norm=0.5))

    ref_model = TinyDetector(init_seed=0)
    ref = Trainer(ref_model, cfg, DATA_KINDS[kind](), tmp_path / "ref")
    ref.train()
    assert [h["iter"] for h in ref.history] == [1, 2, 3, 4, 5, 6]

    # Run 1: dies while fetching the batch of the 5th iteration (after checkpoint 3 and the log of iter 4).
    out = tmp_path / "run"
    crashed = TinyDetector(init_seed=0)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        Trainer(crashed, cfg, DATA_KINDS[kind](crash_at=4), out).train()
    assert (out / "checkpoints" / "last_checkpoint").read_text().strip() == "model_0000003.pt"
    assert [r["iter"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]

    # Run 2: a new process -- differently initialised model, fresh loader, RNGs elsewhere.
    torch.manual_seed(999)
    resumed_model = TinyDetector(init_seed=1)
    resumed = Trainer(resumed_model, cfg, DATA_KINDS[kind](), out)
    result = resumed.train(resume=True)
    assert result["iteration"] == 6
    assert [h["iter"] for h in resumed.history] == [4, 5, 6]

    # Exactly the same losses (==, not approx) for the re-run iterations and the same final weights.
    assert history_rows(resumed.history) == history_rows(ref.history)[3:]
    assert_same_weights(resumed_model, ref_model)
    assert torch.equal(resumed_model.gen.get_state(), ref_model.gen.get_state())
    for p_ref, p_res in zip(ref.optimizer.param_groups, resumed.optimizer.param_groups):
        for a, b in zip(p_ref["params"], p_res["params"]):
            assert torch.equal(ref.optimizer.state[a]["momentum_buffer"], resumed.optimizer.state[b]["momentum_buffer"])
    # metrics.jsonl: every iteration exactly once, identical to the uninterrupted run's.
    assert loss_rows(read_metrics(out / "metrics.jsonl")) == loss_rows(read_metrics(tmp_path / "ref" / "metrics.jsonl"))


def test_resume_from_explicit_checkpoint_path(tmp_path):
    cfg = make_cfg(keep_last=0)
    ref_model = TinyDetector()
    Trainer(ref_model, cfg, loader_factory(), tmp_path / "a").train()
    ck3 = tmp_path / "a" / "checkpoints" / "model_0000003.pt"
    model = TinyDetector(init_seed=3)
    Trainer(model, cfg, loader_factory(), tmp_path / "b").train(resume=ck3)
    assert_same_weights(model, ref_model)


def test_resume_without_checkpoint_starts_fresh_and_finished_run_is_noop(tmp_path):
    cfg = make_cfg()
    a = TinyDetector()
    t = Trainer(a, cfg, loader_factory(), tmp_path)
    t.train(resume=True)  # nothing to resume from
    assert len(t.history) == 6
    b = TinyDetector(init_seed=4)
    t2 = Trainer(b, cfg, loader_factory(), tmp_path)
    res = t2.train(resume=True)
    assert res["iteration"] == 6 and t2.history == []
    assert_same_weights(a, b)
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_in_old_dir_restarts_metrics(tmp_path):
    cfg = make_cfg()
    Trainer(TinyDetector(), cfg, loader_factory(), tmp_path).train()
    Trainer(TinyDetector(), cfg, loader_factory(), tmp_path).train()
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------
# Non-finite losses and weights


def test_nan_loss_raises_naming_iteration_and_terms_and_keeps_last_good_checkpoint(tmp_path):
    cfg = make_cfg(checkpoint_period=2, keep_last=3)
    model = TinyDetector(nan_at_call=5)
    trainer = Trainer(model, cfg, loader_factory(), tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    err = info.value
    assert isinstance(err, FloatingPointError)
    msg = str(err)
    assert "iteration 5/6" in msg and "loss_mask=nan" in msg
    for k in LOSS_KEYS:
        assert k in msg
    assert err.iteration == 5 and math.isnan(err.losses["loss_mask"])
    assert math.isfinite(err.losses["loss_classifier"])
    assert "model_0000004.pt" in msg
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["last_checkpoint", "model_0000002.pt", "model_0000004.pt"]
    state = load_checkpoint(tmp_path / "checkpoints" / "model_0000004.pt")
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # The failed iteration did not update the weights.
    assert_same_weights(model, _load_model(state))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["type"] == "error" and records[-1]["iter"] == 5


def _load_model(state: dict) -> nn.Module:
    m = TinyDetector()
    m.load_state_dict(state["model"])
    return m


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    cfg = make_cfg()
    trainer = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path)
    with torch.no_grad():
        trainer.model.cls.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="cls.weight"):
        trainer.save_checkpoint(3)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------------
# Outputs: metrics, config, plots, evaluation


def test_metrics_config_and_plot(tmp_path, caplog):
    cfg = make_cfg(log_period=2)
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, max_iter=5))
    trainer = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path)
    with caplog.at_level(logging.INFO, logger="maskrcnn.engine.trainer"):
        result = trainer.train()
    assert any("iter 4/5" in r.getMessage() and "eta" in r.getMessage() for r in caplog.records)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iter"] for r in records] == [2, 4, 5]
    hist = {h["iter"]: h for h in trainer.history}
    for rec, window in zip(records, ([1, 2], [3, 4], [5])):
        assert rec["type"] == "train"
        for key in ("lr", "total_loss", "time", "data_time", "eta_seconds", *LOSS_KEYS):
            assert key in rec, key
        assert rec["lr"] == hist[rec["iter"]]["lr"]
        for k in LOSS_KEYS:
            assert rec[k] == pytest.approx(sum(hist[i][k] for i in window) / len(window))
        assert rec["total_loss"] == pytest.approx(sum(rec[k] for k in LOSS_KEYS))
        assert rec["time"] >= rec["data_time"] >= 0
    assert records[-1]["eta_seconds"] == 0
    # The lr follows the warmup (factor 0.1 over 2 iterations) then the step at 4 (gamma 0.5).
    assert [hist[i]["lr"] for i in range(1, 6)] == pytest.approx([0.005, 0.0275, 0.05, 0.05, 0.025])
    assert load_config(tmp_path / "config.yaml") == cfg
    png = tmp_path / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["checkpoint"] == tmp_path / "checkpoints" / "model_0000005.pt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last_checkpoint", "model_0000003.pt", "model_0000005.pt"]


def test_periodic_eval_is_logged_and_does_not_perturb_training(tmp_path):
    cfg = make_cfg(eval_period=4)
    calls = []

    def eval_fn(model: nn.Module, iteration: int) -> dict:
        calls.append((iteration, model.training, torch.is_grad_enabled()))
        torch.randn(100)  # consumes global RNG; must not change the training run
        return {"bbox_AP": 0.1 * iteration}

    with_eval = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path / "e", eval_fn=eval_fn)
    res = with_eval.train()
    without = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path / "n")
    without.train()
    assert calls == [(4, False, False), (6, False, False)]  # every eval_period, and at the end
    assert res["eval"] == {"bbox_AP": pytest.approx(0.6)}
    assert history_rows(with_eval.history) == history_rows(without.history)
    assert_same_weights(with_eval.model, without.model)
    evals = [r for r in read_metrics(tmp_path / "e" / "metrics.jsonl") if r["type"] == "eval"]
    assert [(r["iter"], r["bbox_AP"]) for r in evals] == [(4, pytest.approx(0.4)), (6, pytest.approx(0.6))]


class _FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records (tag, value, step) and its log folder."""

    made: list = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_flag_writes_events_or_says_why_not(tmp_path, monkeypatch, caplog):
    import sys
    import types

    cfg = make_cfg(tensorboard=True, eval_period=2)
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, max_iter=4))
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeSummaryWriter.made.clear()
    Trainer(TinyDetector(), cfg, loader_factory(), tmp_path / "tb",
            eval_fn=lambda m, it: {"segm_AP": 0.1 * it}).train()
    (writer,) = _FakeSummaryWriter.made
    assert writer.log_dir == str(tmp_path / "tb" / "tensorboard") and writer.closed
    tags = {(tag, step) for tag, _, step in writer.scalars}
    assert {("train/total_loss", i) for i in range(1, 5)} <= tags and ("train/lr", 1) in tags
    assert ("eval/segm_AP", 2) in tags and ("eval/segm_AP", 4) in tags
    records = {r["iter"]: r for r in read_metrics(tmp_path / "tb" / "metrics.jsonl") if r["type"] == "train"}
    logged = [v for tag, v, _ in writer.scalars if tag == "train/total_loss"]
    assert logged == [records[s]["total_loss"] for s in range(1, 5)]
    # Without tensorboard installed the run goes on and says why there are no events.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="maskrcnn"):
        Trainer(TinyDetector(), cfg, loader_factory(), tmp_path / "none").train()
    assert any("tensorboard is not installed" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "none" / "metrics.jsonl").exists() and not (tmp_path / "none" / "tensorboard").exists()


# ---------------------------------------------------------------------------------------------------
# AMP, devices, inputs


def test_bf16_autocast_on_cpu_trains(tmp_path):
    cfg = make_cfg()
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, amp="bf16", max_iter=2))
    t = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path)
    t.train()
    assert len(t.history) == 2 and all(math.isfinite(h["total_loss"]) for h in t.history)


def test_fp16_on_cpu_is_rejected_clearly(tmp_path):
    cfg = make_cfg()
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, amp="fp16"))
    with pytest.raises(ValueError, match="bf16"):
        Trainer(TinyDetector(), cfg, loader_factory(), tmp_path)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bad_training_data_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="training data"):
        Trainer(TinyDetector(), make_cfg(), 42, tmp_path)


def test_model_must_return_loss_dict(tmp_path):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, images, targets):
            return self.w.sum()

    with pytest.raises(TypeError, match="dict of losses"):
        Trainer(Bad(), make_cfg(), loader_factory(), tmp_path).train()


def test_resume_with_longer_schedule_follows_new_config(tmp_path):
    cfg = make_cfg()
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, lr_schedule="cosine", max_iter=4))
    Trainer(TinyDetector(), cfg, loader_factory(), tmp_path).train()
    longer = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, max_iter=8))
    t = Trainer(TinyDetector(), longer, loader_factory(), tmp_path)
    t.train(resume=True)
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(4, 8)]
    assert [h["lr"] for h in t.history] == pytest.approx(expected)
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))


# ---------------------------------------------------------------------------------------------------
# The real pieces: CocoDataset + build_train_loader + MaskRCNN (skipped until they exist)


class _CrashingDataset(torch.utils.data.Dataset):
    """Forwards to a CocoDataset and raises on the ``crash_after + 1``-th sample, like a killed job."""

    def __init__(self, dataset, crash_after: int | None = None) -> None:
        self.dataset, self.crash_after, self.calls = dataset, crash_after, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def aspect_ratios(self) -> list[float]:
        return self.dataset.aspect_ratios()

    def get(self, index: int, generator=None):
        if self.crash_after is not None and self.calls == self.crash_after:
            raise RuntimeError("simulated preemption")
        self.calls += 1
        return self.dataset.get(index, generator)


def test_real_maskrcnn_and_loader_resume_bit_identical(tmp_path):
    from maskrcnn import data
    from maskrcnn.config import apply_overrides, get_preset
    from maskrcnn.modeling.mask_rcnn import MaskRCNN

    ann = data.generate_shapes(tmp_path / "shapes", 6, seed=0, image_size=(40, 48))
    cfg = apply_overrides(get_preset("r18_fpn_demo"), {
        "input.min_size_train": [36, 40], "input.max_size_train": 64, "solver.max_iter": 3,
        "solver.ims_per_batch": 2, "solver.warmup_iters": 2, "solver.steps": [2], "train.checkpoint_period": 1,
        "train.log_period": 1, "train.device": "cpu", "train.num_workers": 0,
        "model.rpn.pre_nms_top_n_train": 200, "model.rpn.post_nms_top_n_train": 100,
        "model.box_head.batch_size_per_image": 32})

    def dataset(crash_after=None):
        ds = data.CocoDataset(ann, tmp_path / "shapes", transforms=data.build_transforms(cfg, train=True))
        return _CrashingDataset(ds, crash_after)

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return MaskRCNN(cfg)

    ref_model = model(0)
    ref = Trainer(ref_model, cfg, dataset(), tmp_path / "ref")
    ref.train()
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated preemption"):
        Trainer(model(0), cfg, dataset(crash_after=2), out).train()  # dies fetching iteration 2
    resumed_model = model(1)
    resumed = Trainer(resumed_model, cfg, dataset(), out)
    resumed.train(resume=True)
    assert [h["iter"] for h in resumed.history] == [2, 3]
    assert history_rows(resumed.history) == history_rows(ref.history)[1:]
    assert_same_weights(resumed_model, ref_model)


def test_real_loader_passed_as_dataloader_resumes_by_consumed_count(tmp_path):
    from maskrcnn import data

    ann = data.generate_shapes(tmp_path / "shapes", 5, seed=1, image_size=(24, 32))
    cfg = make_cfg()

    def loader(crash_after=None):
        ds = data.CocoDataset(ann, tmp_path / "shapes", transforms=data.build_transforms(
            dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, min_size_train=(20, 24),
                                                               max_size_train=40)), train=True))
        return data.build_train_loader(_CrashingDataset(ds, crash_after), cfg)

    ref_model = TinyDetector()
    ref = Trainer(ref_model, cfg, loader(), tmp_path / "ref")
    ref.train()
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated preemption"):
        Trainer(TinyDetector(), cfg, loader(crash_after=4 * 2), out).train()
    state = load_checkpoint(out / "checkpoints" / "model_0000003.pt")
    assert state["rank_states"][0]["data"] == {"iteration": 3}
    model = TinyDetector(init_seed=2)
    resumed = Trainer(model, cfg, loader(), out)
    resumed.train(resume=True)
    assert history_rows(resumed.history) == history_rows(ref.history)[3:]
    assert_same_weights(model, ref_model)


# ---------------------------------------------------------------------------------------------------
# Best model, early stopping, the final model before the final evaluation


def scripted_eval(values: dict[int, float], calls: list | None = None):
    """An eval_fn returning segm_AP ``values[iteration]`` and a validation loss that falls with it."""
    def eval_fn(model: nn.Module, iteration: int) -> dict:
        if calls is not None:
            calls.append(iteration)
        return {"segm_AP": values[iteration], "val_total_loss": 1.0 - values[iteration]}
    return eval_fn


def saver(log: list):
    """A save_model stand-in recording (folder name, a copy of the weights)."""
    def save(model: nn.Module, folder):
        log.append((folder.name, {k: v.clone() for k, v in model.state_dict().items()}))
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return save


AP_SEQUENCE = {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.25, 5: 0.5, 6: 0.6}


def test_best_model_and_patience(tmp_path):
    cfg = make_cfg(eval_period=1, patience=2)
    saved: list = []
    t = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path / "run", eval_fn=scripted_eval(AP_SEQUENCE),
                save_model=saver(saved))
    res = t.train()
    # Best at 2 (0.3); 3 and 4 do not beat it: patience 2 stops after iteration 4, checkpointed there.
    assert res["stopped_early"] and res["iteration"] == 4
    assert res["best"] == {"metric": "segm_AP", "value": 0.3, "iteration": 2, "since": 2}
    assert [name for name, _ in saved] == ["model_best", "model_best", "model_final"]
    assert (tmp_path / "run" / "checkpoints" / "model_0000004.pt").is_file()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "model_0000004.pt")
    assert ckpt["best"]["iteration"] == 2
    # A resumed early-stopped run stays stopped.
    again = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path / "run", eval_fn=scripted_eval(AP_SEQUENCE),
                    save_model=saver(saved))
    assert again.train(resume=True)["stopped_early"] and again.history == []
    # Without patience the run goes on; a lower-is-better metric is minimised.
    lossy = make_cfg(eval_period=1, best_metric="val_total_loss")
    saved2: list = []
    r2 = Trainer(TinyDetector(), lossy, loader_factory(), tmp_path / "loss", eval_fn=scripted_eval(AP_SEQUENCE),
                 save_model=saver(saved2)).train()
    assert not r2["stopped_early"] and r2["best"]["iteration"] == 6
    assert [n for n, _ in saved2].count("model_best") == 4  # iterations 1, 2, 5, 6
    records = read_metrics(tmp_path / "loss" / "metrics.jsonl")
    assert [r["val_total_loss"] for r in records if r["type"] == "eval"] == pytest.approx(
        [1 - AP_SEQUENCE[i] for i in range(1, 7)])


def test_best_state_resumes(tmp_path):
    """Killed after the checkpoint of iteration 3 and resumed, the run keeps its best and its patience count."""
    cfg = make_cfg(eval_period=1, patience=3)
    ref = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path / "ref", eval_fn=scripted_eval(AP_SEQUENCE),
                  save_model=saver([])).train()
    with pytest.raises(RuntimeError, match="simulated preemption"):
        Trainer(TinyDetector(), cfg, loader_factory(crash_at=3), tmp_path / "run",
                eval_fn=scripted_eval(AP_SEQUENCE), save_model=saver([])).train()
    calls: list = []
    saved: list = []
    resumed = Trainer(TinyDetector(), cfg, loader_factory(), tmp_path / "run",
                      eval_fn=scripted_eval(AP_SEQUENCE, calls), save_model=saver(saved)).train(resume=True)
    assert calls == [4, 5, 6] and resumed["best"] == ref["best"] == {
        "metric": "segm_AP", "value": 0.6, "iteration": 6, "since": 0}
    assert [n for n, _ in saved] == ["model_best", "model_final", "model_best"]


def test_model_final_is_written_before_the_final_evaluation(tmp_path):
    saved: list = []

    def failing_eval(model: nn.Module, iteration: int) -> dict:
        raise ValueError("a validation image cannot be read")

    with pytest.raises(ValueError, match="validation image"):
        Trainer(TinyDetector(), make_cfg(), loader_factory(), tmp_path, eval_fn=failing_eval,
                save_model=saver(saved)).train()
    assert [n for n, _ in saved] == ["model_final"]
    assert (tmp_path / "checkpoints" / "model_0000006.pt").is_file()


def test_plot_shows_validation_losses_and_ap(tmp_path):
    pytest.importorskip("matplotlib")
    from maskrcnn.engine.trainer import loss_curves_figure

    Trainer(TinyDetector(), make_cfg(eval_period=2), loader_factory(), tmp_path,
            eval_fn=scripted_eval(AP_SEQUENCE)).train()
    fig = loss_curves_figure(read_metrics(tmp_path / "metrics.jsonl"))
    labels = {ln.get_label() for ax in fig.axes for ln in ax.get_lines()}
    assert {"val_total_loss", "segm_AP", "total_loss", "loss_mask"} <= labels
    ap_axis = next(ax for ax in fig.axes if any(ln.get_label() == "segm_AP" for ln in ax.get_lines()))
    line = next(ln for ln in ap_axis.get_lines() if ln.get_label() == "segm_AP")
    assert list(line.get_xdata()) == [2, 4, 6] and list(line.get_ydata()) == [0.3, 0.25, 0.6]
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


KILL_DURING_SAVE = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from test_trainer import TinyDetector, loader_factory, make_cfg
from maskrcnn.engine.trainer import Trainer

real_save = torch.save
count = {{"n": 0}}

def save_then_die(obj, f, *args, **kwargs):
    count["n"] += 1
    if count["n"] == 2:  # the second checkpoint: half written, then the process is killed
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_then_die
torch.set_num_threads(1)
Trainer(TinyDetector(), make_cfg(), loader_factory(), {out!r}).train()
"""


def test_checkpoint_save_killed_midway(tmp_path):
    """SIGKILL while the second checkpoint is written: the first stays loadable and the next start cleans up."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    script = KILL_DURING_SAVE.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = out / "checkpoints"
    stale = [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".model_0000006.pt.")
    assert load_checkpoint(ckpts / "model_0000003.pt")["iteration"] == 3
    ref = Trainer(TinyDetector(), make_cfg(), loader_factory(), tmp_path / "ref")
    ref.train()
    model = TinyDetector(init_seed=4)
    resumed = Trainer(model, make_cfg(), loader_factory(), out)
    resumed.train(resume=True)
    assert [h["iter"] for h in resumed.history] == [4, 5, 6]
    assert_same_weights(model, ref.model)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last_checkpoint", "model_0000003.pt", "model_0000006.pt"]
