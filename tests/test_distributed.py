"""Multi-process training and evaluation: 2 CPU processes on gloo, a tiny ResNet-18-FPN and 64 px images.

The 2-process work runs once per module (``two_ranks``), through ``maskrcnn.engine.dist.launch`` (torch's elastic
launcher, i.e. what ``torchrun`` runs), and every test compares a part of it with the same work done in this
single process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from maskrcnn.cli import main
from maskrcnn.config import Config, apply_overrides, get_preset
from maskrcnn.data import CocoDataset
from maskrcnn.data.loader import build_train_loader
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine import dist as du
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.evaluator import Evaluator
from maskrcnn.engine.trainer import Trainer, read_metrics
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.modeling.matcher import BalancedPositiveNegativeSampler

# Filled by the jobs below, printed when the module ends (pytest -s shows it); a report, not a test.
TIMINGS: dict[str, float] = {}


@pytest.fixture(autouse=True, scope="module")
def _report_timings():
    yield
    if TIMINGS:
        print("\n" + json.dumps(TIMINGS, indent=2))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread, as in every worker: same arithmetic, and no oversubscription of a 2-core runner."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------
# The setup shared by both sides


def tiny_config() -> Config:
    """GroupNorm R18-FPN (no BatchNorm statistics in training), 2 images per iteration in all, no warmup.

    Sampling sizes are chosen so that every image contributes the same number of samples to every loss:
    RPN 64 anchors (an image has thousands of negatives), box head 8 RoIs of which 2 positives (the GT boxes are
    among the proposals and each image has >= 2 objects), hence 2 mask RoIs per image.
    """
    cfg = get_preset("r18_fpn_demo")
    return apply_overrides(cfg, {
        "model.fpn.out_channels": 32, "model.mask_head.conv_dim": 32, "model.box_head.fc_dim": 64,
        "model.rpn.batch_size_per_image": 64, "model.box_head.batch_size_per_image": 8,
        "model.box_head.positive_fraction": 0.25,
        "model.rpn.pre_nms_top_n_train": 200, "model.rpn.post_nms_top_n_train": 100,
        "model.rpn.pre_nms_top_n_test": 200, "model.rpn.post_nms_top_n_test": 100,
        "model.box_head.detections_per_img": 20,
        "input.min_size_test": 64, "input.max_size_test": 80,
        # The global batch; the LR follows the linear scaling rule from a reference batch of 4: 0.02 * 2/4.
        "solver.ims_per_batch": 2, "solver.reference_batch_size": 4, "solver.scale_lr": True,
        "solver.base_lr": 0.02, "solver.warmup_iters": 0, "solver.max_iter": 1,
        # The paper's SGD: a step proportional to the gradient (the demo preset's AdamW would normalise it away).
        "solver.optimizer": "sgd",
        "train.num_workers": 0, "train.checkpoint_period": 0, "train.keep_last": 0, "train.log_period": 1,
        "train.seed": 3, "train.device": "cpu", "train.dist_timeout_s": 120,
    })


def with_iters(cfg: Config, max_iter: int, checkpoint_period: int = 0) -> Config:
    """``cfg`` with another run length and checkpoint period (the schedule has no warmup or step in reach)."""
    return dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, max_iter=max_iter),
                               train=dataclasses.replace(cfg.train, checkpoint_period=checkpoint_period))


def first_k_sampling(self: BalancedPositiveNegativeSampler, matched_idxs: list[torch.Tensor],
                     generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The balanced sampler with the random permutation replaced by index order: the first positives/negatives."""
    pos_idx, neg_idx = [], []
    for labels in matched_idxs:
        positive = torch.where(labels >= 1)[0]
        negative = torch.where(labels == 0)[0]
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        pos_mask = torch.zeros_like(labels, dtype=torch.uint8)
        neg_mask = torch.zeros_like(labels, dtype=torch.uint8)
        pos_mask[positive[:num_pos]] = 1
        neg_mask[negative[:num_neg]] = 1
        pos_idx.append(pos_mask)
        neg_idx.append(neg_mask)
    return pos_idx, neg_idx


def make_data(root: Path) -> dict[str, str]:
    """4 training images of 64x64 with 2-3 objects each; 5 validation images of varied sizes."""
    train = generate_shapes(root / "train", 4, seed=11, image_size=(64, 64), min_objects=2, max_objects=3)
    val = generate_shapes(root / "val", 5, seed=12, image_size=((48, 64), (56, 80)), min_objects=1, max_objects=2)
    return {"train": str(train), "train_dir": str(root / "train"), "val": str(val), "val_dir": str(root / "val")}


def datasets(data: dict[str, str]) -> tuple[CocoDataset, CocoDataset]:
    """Training set without augmentation (the images are already 64 px) and the validation set."""
    train = CocoDataset(data["train"], data["train_dir"], transforms=None)
    val = CocoDataset(data["val"], data["val_dir"], filter_empty=False, category_ids=train.category_ids)
    return train, val


def fresh_model(cfg: Config) -> MaskRCNN:
    """The same random initial weights in every process."""
    torch.manual_seed(0)
    return MaskRCNN(cfg)


def evaluate(model: MaskRCNN, val: CocoDataset, out_dir: Path) -> dict[str, Any]:
    """COCO metrics of ``model``, batched in pairs so that shards are whole batches of different images."""
    model.eval()
    return Evaluator.from_dataset(val, progress=False, batch_size=2, out_dir=out_dir).evaluate(model)


def train_one_step_f64(cfg: Config, train: CocoDataset, out_dir: Path) -> None:
    """One training step of the float64 model, whose arithmetic leaves no rounding to hide a mismatch in.

    The model converts its uint8 images to its own dtype, so a ``.double()`` model trains in float64 throughout.
    """
    Trainer(fresh_model(cfg).double(), with_iters(cfg, 1), train, out_dir).train()


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state of a training checkpoint."""
    return load_checkpoint(path)["model"]


# ---------------------------------------------------------------------------------------------------
# The 2-process job (module-level so the spawned workers can import it)


def two_rank_job(root: str, data: dict[str, str]) -> dict[str, Any]:
    """Everything the tests need from 2 ranks; returns this rank's small results (files hold the rest)."""
    torch.set_num_threads(1)
    BalancedPositiveNegativeSampler.__call__ = first_k_sampling  # see test_one_step_equals_single_process
    out = Path(root)
    cfg = tiny_config()
    with du.distributed_session("cpu", cfg.train.dist_timeout_s):
        rank, world = du.get_rank(), du.get_world_size()
        train, val = datasets(data)
        res: dict[str, Any] = {"rank": rank, "world_size": world}

        # Which images each rank sees in the first two epochs.
        sampler = build_train_loader(train, cfg).batch_sampler
        res["epochs"] = [sampler.epoch_batches(e) for e in range(2)]

        # C: uninterrupted 3 iterations, a checkpoint after each (the first is the one-step result).
        t = time.perf_counter()
        Trainer(fresh_model(cfg), with_iters(cfg, 3, 1), train, out / "C").train()
        res["train_C_s"] = time.perf_counter() - t

        # D: the one step again, in float64.
        train_one_step_f64(cfg, train, out / "D")

        # A: 2 iterations writing only its final checkpoint; B2 resumes it on 2 ranks to iteration 3.
        Trainer(fresh_model(cfg), with_iters(cfg, 2), train, out / "A").train()
        if rank == 0:
            shutil.copytree(out / "A", out / "B2")
        du.barrier()
        Trainer(fresh_model(cfg), with_iters(cfg, 3), train, out / "B2").train(resume=True)

        # Distributed evaluation of C's final model.
        model = MaskRCNN(cfg)
        model.load_state_dict(weights(out / "C" / "checkpoints" / "model_0000003.pt"))
        t = time.perf_counter()
        res["metrics"] = json.dumps(evaluate(model, val, out / "eval2"), sort_keys=True)
        res["eval_s"] = time.perf_counter() - t
    return res


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    """The module's datasets (``make_data``)."""
    return make_data(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, shapes: dict[str, str]) -> dict[str, Any]:
    """Runs ``two_rank_job`` on 2 processes once; its output folder and each rank's results."""
    root = tmp_path_factory.mktemp("dist")
    data = shapes
    t = time.perf_counter()
    results = du.launch(two_rank_job, 2, (str(root), data))
    TIMINGS["two_rank_job_s"] = time.perf_counter() - t
    return {"root": root, "data": data, "ranks": results}


# ---------------------------------------------------------------------------------------------------
# Tests


def test_ranks_see_disjoint_shards_of_each_epoch(two_ranks: dict[str, Any]) -> None:
    """Per epoch, the ranks' images are disjoint and together cover the dataset; 1 image per rank per batch."""
    ranks = two_ranks["ranks"]
    assert sorted(ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks.values())
    for epoch in range(2):
        seen = [sorted(i for batch in ranks[r]["epochs"][epoch] for i in batch) for r in (0, 1)]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == [0, 1, 2, 3]
        # One image per rank per iteration: the global batch of 2 is split.
        assert all(len(batch) == 1 for r in (0, 1) for batch in ranks[r]["epochs"][epoch])


def test_one_step_equals_single_process(two_ranks: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    """One SGD step on 2 ranks x 1 image equals one step of 1 process on the same 2 images.

    Why the comparison is exact by construction:
    - Images: 1 process's first batch is ``perm[0:2]`` of the seeded epoch permutation; rank r's first batch is
      ``perm[r]`` (the sampler shards ``perm[r::2]``). All 4 images are 64x64, so each is padded the same way
      alone or in a pair, and GroupNorm normalises each image on its own: every per-image activation is equal.
    - Loss normalisation: each loss is a mean over the samples of the whole batch, and DDP averages the ranks'
      gradients. Mean-of-2-means equals the mean over both images only when both images contribute the same
      count, so the config fixes the counts (see ``tiny_config``): 64 RPN anchors, 8 RoIs with 2 positives and 2
      mask RoIs per image.
    - Sampling: the samplers draw ``randperm``s from one RNG stream. One process draws image 0's then image 1's
      permutations from one stream; two ranks draw from two streams, so no seed makes the stock draws agree.
      Both runs therefore use ``first_k_sampling`` (the same sampler taking candidates in index order), which
      makes each image's sampled set a function of that image alone.
    - LR: ``ims_per_batch`` is global (2 in both runs), so the linear scaling rule gives 0.01 in both; a
      per-rank batch in the rule would halve the DDP step.
    What remains is rounding: batch-of-2 versus batch-of-1 kernels and the order of the gradient sums. In float32
    it is amplified to ~0.2% of the update (the random-init network's gradients are ill-conditioned; a
    same-process check, batch-of-2 gradient versus the mean of the two batch-of-1 gradients, shows the same).
    So the step is also taken in float64, where the two runs must agree to ~1e-15: that comparison is the proof
    of equivalence, the float32 one checks the real setting against a 2% bound (a wrong LR scaling, a sum
    instead of a mean over ranks or a wrong shard would be off by 50-100% of the update).
    """
    monkeypatch.setattr(BalancedPositiveNegativeSampler, "__call__", first_k_sampling)
    cfg = tiny_config()
    train, _ = datasets(two_ranks["data"])
    init = {k: v.clone().double() for k, v in fresh_model(cfg).state_dict().items()}
    Trainer(fresh_model(cfg), with_iters(cfg, 1), train, tmp_path / "single").train()
    train_one_step_f64(cfg, train, tmp_path / "single64")

    def compare(single_dir: Path, ddp_dir: Path) -> tuple[float, float]:
        single = weights(single_dir / "checkpoints" / "model_0000001.pt")
        ddp = weights(ddp_dir / "checkpoints" / "model_0000001.pt")
        assert single.keys() == ddp.keys()
        floats = [k for k in single if single[k].is_floating_point()]
        err = max(float((single[k] - ddp[k]).abs().max()) for k in floats)
        step = max(float((single[k].double() - init[k]).abs().max()) for k in floats)
        return err, step

    err32, step32 = compare(tmp_path / "single", two_ranks["root"] / "C")
    err64, step64 = compare(tmp_path / "single64", two_ranks["root"] / "D")
    TIMINGS.update(step_err_f32=err32, step_update_f32=step32, step_err_f64=err64, step_update_f64=step64)
    print(f"\none-step equivalence, max |w_2ranks - w_1proc|: float32 {err32:.3g}, float64 {err64:.3g} "
          f"(largest weight update {step32:.3g})")
    assert step32 > 1e-3 and step64 > 1e-3, "the step must move the weights for the comparison to mean anything"
    assert err64 < 1e-12
    assert err32 < 2e-2 * step32


def test_distributed_evaluation_equals_single_process(two_ranks: dict[str, Any], tmp_path: Path) -> None:
    """2-rank evaluation returns the single-process metrics on every rank and writes the same results.json."""
    ranks = two_ranks["ranks"]
    # Metrics are computed once (rank 0) and every rank returns the same.
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    cfg = tiny_config()
    _, val = datasets(two_ranks["data"])
    model = MaskRCNN(cfg)
    model.load_state_dict(weights(two_ranks["root"] / "C" / "checkpoints" / "model_0000003.pt"))
    metrics = evaluate(model, val, tmp_path / "eval1")
    assert json.dumps(metrics, sort_keys=True) == ranks[0]["metrics"]
    # The gathered records are the single-process records, in the same order.
    one = json.loads((tmp_path / "eval1" / "results.json").read_text())
    two = json.loads((two_ranks["root"] / "eval2" / "results.json").read_text())
    assert len(one) > 0 and one == two
    assert {r["image_id"] for r in one} == set(val.coco.getImgIds())


def test_checkpoint_of_2_ranks_resumes_on_2_and_on_1(two_ranks: dict[str, Any], monkeypatch, caplog) -> None:
    """A 2-rank run writes one checkpoint; resumed on 2 ranks it equals the uninterrupted run; 1 rank continues."""
    root: Path = two_ranks["root"]
    ckpt_dir = root / "A" / "checkpoints"
    # Rank 0 alone wrote: one checkpoint file (the final one) and the pointer to it; one metrics log.
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last_checkpoint", "model_0000002.pt"]
    ckpt = load_checkpoint(ckpt_dir / "model_0000002.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rank_states"]) == 2
    assert [r["iter"] for r in read_metrics(root / "A" / "metrics.jsonl") if r["type"] == "train"] == [1, 2]

    # Resumed on 2 ranks: exactly the uninterrupted 2-rank run (same data shards, restored RNG streams).
    resumed, straight = (weights(root / d / "checkpoints" / "model_0000003.pt") for d in ("B2", "C"))
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    assert [r["iter"] for r in read_metrics(root / "B2" / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3]

    # Resumed on 1 process: the same weights at iteration 2, then it trains on (the whole global batch).
    monkeypatch.setattr(BalancedPositiveNegativeSampler, "__call__", first_k_sampling)
    shutil.copytree(root / "A", root / "B1")
    cfg = with_iters(tiny_config(), 3)
    train, _ = datasets(two_ranks["data"])
    trainer = Trainer(fresh_model(cfg), cfg, train, root / "B1")
    with caplog.at_level(logging.WARNING, logger="maskrcnn.engine.trainer"):
        out = trainer.train(resume=True)
    assert "written by 2 processes, now 1" in caplog.text
    assert out["iteration"] == 3 and [h["iter"] for h in trainer.history] == [3]
    final = weights(root / "B1" / "checkpoints" / "model_0000003.pt")
    at2 = ckpt["model"]
    assert any(not torch.equal(final[k], at2[k]) for k in at2 if at2[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------------
# A rank that stops answering


class _Tiny(torch.nn.Module):
    """A one-parameter stand-in with the detector's training interface."""

    def __init__(self) -> None:
        """One weight, 1.0."""
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A quadratic "loss" of the images' mean."""
        return {"loss": (self.w * torch.stack([im.float().mean() for im in images]).mean()) ** 2}


class _Stalled(Exception):
    """Raised by the stalled rank once it wakes up, to end its process cleanly."""


def stand_in_job(root: str) -> dict[str, Any]:
    """Resume without a shared filesystem, then a rank that stops answering, with the one-parameter stand-in.

    1. Each rank works in its own folder and names the run folder relatively, as machines without a shared
       filesystem would: rank 1 cannot see the checkpoint rank 0 wrote, so it must receive it from rank 0.
    2. Rank 1 stops answering at its 3rd batch; rank 0 must fail within the 2 s timeout, naming the cause.
    """
    torch.set_num_threads(1)
    cfg = dataclasses.replace(tiny_config(), train=dataclasses.replace(tiny_config().train, dist_timeout_s=2))
    res: dict[str, Any] = {}
    with du.distributed_session("cpu", cfg.train.dist_timeout_s):
        rank = du.get_rank()
        own = Path(root) / f"machine{rank}"
        own.mkdir()
        os.chdir(own)

        def batches(start_iter: int):
            """Batch i of this rank: a constant image, different per rank and iteration."""
            for i in range(start_iter, 10**6):
                yield [torch.full((3, 4, 4), float(i + 10 * rank))], [{}]

        Trainer(_Tiny(), with_iters(cfg, 2), batches, "run").train()
        res["files"] = sorted(p.name for p in Path("run").glob("checkpoints/*"))
        trainer = Trainer(_Tiny(), with_iters(cfg, 3), batches, "run")
        log = logging.getLogger("maskrcnn.engine.trainer")
        seen: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            res["resumed"] = trainer.train(resume=True)["iteration"], [h["iter"] for h in trainer.history]
        finally:
            log.removeHandler(handler)
        res["log"] = seen
        res["w"] = float(trainer.model.w.detach())

        def stalling(start_iter: int):
            """As ``batches``, but rank 1 sleeps past the timeout instead of producing batch 2."""
            for i in range(start_iter, 10):
                if rank == 1 and i == 2:
                    time.sleep(4)  # twice the timeout
                    raise _Stalled
                yield [torch.full((3, 4, 4), float(i))], [{}]

        t = time.perf_counter()
        try:
            Trainer(_Tiny(), with_iters(cfg, 10), stalling, "stall").train()
            res["stall"] = "no error"
        except du.RankFailureError as e:
            res["stall"] = f"{time.perf_counter() - t:.1f}s {e}"
        except _Stalled:
            res["stall"] = "stalled"
        except Exception as e:  # noqa: BLE001 - the test reports whatever else came out
            res["stall"] = f"unexpected {type(e).__name__}: {e}"
    return res


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> dict[int, Any]:
    """Each rank's results of ``stand_in_job``."""
    t = time.perf_counter()
    results = du.launch(stand_in_job, 2, (str(tmp_path_factory.mktemp("stand_in")),))
    TIMINGS["stand_in_job_s"] = time.perf_counter() - t
    return results


def test_resume_without_a_shared_filesystem(stand_in: dict[int, Any]) -> None:
    """A rank that cannot see rank 0's checkpoint receives it and resumes at the same iteration."""
    assert stand_in[0]["files"] == ["last_checkpoint", "model_0000002.pt"] and stand_in[1]["files"] == []
    for rank in (0, 1):
        assert stand_in[rank]["resumed"] == (3, [3])
    assert stand_in[0]["w"] == stand_in[1]["w"]
    assert any("is not visible to every rank; rank 0 sends it" in m for m in stand_in[1]["log"])


def test_stalled_rank_stops_the_others_with_a_clear_error(stand_in: dict[int, Any]) -> None:
    """Rank 0 raises RankFailureError within seconds of the 2 s timeout instead of waiting for rank 1."""
    message = stand_in[0]["stall"]
    assert "another process died or did not answer within train.dist_timeout_s=2s" in message, message
    assert "iteration 3" in message
    assert float(message.split("s ", 1)[0]) < 30
    assert stand_in[1]["stall"] == "stalled"


# ---------------------------------------------------------------------------------------------------
# The command line: maskrcnn train --devices 2 (torchrun -m maskrcnn train underneath)


def test_cli_train_on_2_devices_then_resume(shapes: dict[str, str], tmp_path: Path, capsys) -> None:
    """``maskrcnn train --devices 2`` trains, evaluates and saves once (rank 0), and resumes on 2 workers."""
    data = shapes
    out = tmp_path / "run"
    overrides = ["model.fpn.out_channels=32", "model.mask_head.conv_dim=32", "model.box_head.fc_dim=64",
                 "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=100",
                 "model.rpn.pre_nms_top_n_test=200", "model.rpn.post_nms_top_n_test=100",
                 "model.box_head.detections_per_img=20",
                 "input.min_size_train=[64]", "input.max_size_train=80", "input.min_size_test=64",
                 "input.max_size_test=80", "solver.ims_per_batch=2", "solver.warmup_iters=0", "train.num_workers=0",
                 "train.checkpoint_period=0", "train.dist_timeout_s=120"]
    args = ["train", "--data", data["train"], "--images", data["train_dir"], "--out", str(out),
            "--preset", "r18_fpn_demo", "--device", "cpu", "--devices", "2", "--val-data", data["val"],
            "--val-images", data["val_dir"]]
    t = time.perf_counter()
    assert main([*args, *overrides, "solver.max_iter=1"]) == 0
    TIMINGS["cli_train_2_devices_s"] = time.perf_counter() - t
    assert (out / "model_final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last_checkpoint", "model_0000001.pt"]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "bbox" in metrics and "segm" in metrics
    assert [r["type"] for r in read_metrics(out / "metrics.jsonl")] == ["train", "eval"]

    # The same run continued by 2 workers from its checkpoint.
    assert main([*args, "--resume", *overrides, "solver.max_iter=2"]) == 0
    assert [r["iter"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"] == [1, 2]

    # maskrcnn eval --devices 2 writes what the single-process command writes.
    ev = ["eval", "--weights", str(out / "model_final"), "--data", data["val"], "--images", data["val_dir"],
          "--device", "cpu", "--batch-size", "2"]
    assert main([*ev, "--out", str(tmp_path / "eval2"), "--devices", "2"]) == 0
    assert main([*ev, "--out", str(tmp_path / "eval1")]) == 0
    for name in ("results.json", "metrics.json"):
        one, two = (json.loads((tmp_path / d / name).read_text()) for d in ("eval1", "eval2"))
        if name == "metrics.json":
            one.pop("info"), two.pop("info")
        assert one == two, name


def test_cli_reports_a_failed_worker(tmp_path: Path, capsys) -> None:
    """Workers that fail make ``maskrcnn train --devices 2`` exit 2 with one line naming the failed rank."""
    bad = tmp_path / "bad.json"
    bad.write_text("{}")  # exists, so the workers start, and each fails reading it
    code = main(["train", "--data", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--devices", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: worker rank" in err and "of 2 failed" in err
