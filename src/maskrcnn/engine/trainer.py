"""The iteration-based training loop: optimiser, schedule, AMP, clipping, checkpoints, exact resume, logging.

Data-loader contract (what exact resume needs)
----------------------------------------------
``Trainer`` takes one of three kinds of training data. A *batch* is ``(images, targets)``: a list of ``(3, H, W)``
image tensors and a list of target dicts (``boxes``, ``labels``, ``masks``, ``image_id``), as the collate of
``maskrcnn.data`` returns.

1. A map-style dataset (``torch.utils.data.Dataset``): the trainer calls
   ``maskrcnn.data.build_train_loader(dataset, cfg, rank=rank, world_size=world_size, start_iter=k)``.
2. A *loader factory* ``factory(start_iter: int) -> Iterable[batch]``: an iterable whose ``j``-th batch is the
   batch of iteration ``start_iter + j``. If it ends, the trainer calls ``factory(i)`` again at the next
   iteration ``i``.
3. Any other iterable of batches (e.g. a ``DataLoader``). If it, or its ``batch_sampler``, has
   ``state_dict()`` / ``load_state_dict()``, that state is saved in checkpoints and restored on resume; it must
   describe the batches the trainer has *consumed* (beware of worker prefetch). Otherwise the trainer
   re-iterates it from the start and skips the first ``k`` batches. It is re-iterated when exhausted (epochs).

A target may list, under ``"skipped_images"``, the images that the loader could not read and replaced by this
sample (``[(file, reason), ...]``, as ``maskrcnn.data.SeededSamples`` does). The trainer logs each, lists them in
``skipped_images.txt`` and stops with :class:`TooManyBadImagesError` once more than
``train.max_bad_image_fraction`` of the images are unreadable.

For a bit-identical resume, the content of the batch of iteration ``i`` (order *and* augmentation) must depend
only on ``(seed, i)`` -- e.g. a per-iteration ``torch.Generator`` seeded from both -- and never on global RNG
state or on worker seeds drawn when an iterator is created. The trainer restores the global torch / CUDA /
numpy / python RNGs and every ``torch.Generator`` held as a model attribute, so randomness inside the model
(proposal sampling, dropout) resumes exactly; evaluation runs with the RNG states saved and restored around it.

Several processes (torchrun)
----------------------------
With a process group initialised (``maskrcnn.engine.dist.init_distributed``), the model is wrapped in DDP (its
BatchNorm layers first become SyncBatchNorm when ``model.backbone.norm=syncbn``), a dataset is sharded by the
rank-aware grouped sampler at ``solver.ims_per_batch // world_size`` images per process, and only rank 0 writes
files, logs and shows the progress bar. Checkpoints hold every rank's RNG and data state, so a resume on the same
number of processes is exact. A collective that fails because a peer died or timed out
(``train.dist_timeout_s``) raises ``maskrcnn.engine.dist.RankFailureError``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskrcnn.atomic import atomic_write, remove_stale_temp
from maskrcnn.config import Config, save_config
from maskrcnn.engine import dist as du
from maskrcnn.engine.checkpoint import (CheckpointManager, atomic_write_text, get_rng_state, load_checkpoint,
                                        module_generators, set_rng_state)
from maskrcnn.engine.schedule import WarmupLRFactor, build_lr_scheduler, build_optimizer, lr_scale

__all__ = [
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "TooManyBadImagesError",
    "Trainer",
    "build_lr_scheduler",
    "best_metric_name",
    "build_optimizer",
    "loss_curves_figure",
    "plot_loss_curves",
    "read_metrics",
    "resolve_device",
    "seed_all",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "maskrcnn-train-checkpoint"
CHECKPOINT_VERSION = 1

SKIPPED_KEY = "skipped_images"  # the target key maskrcnn.data.loader.SKIPPED_KEY writes
SKIPPED_FILE = "skipped_images.txt"

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]
EvalFn = Callable[[nn.Module, int], dict[str, Any]]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; ``iteration`` (1-based) and ``losses`` (term -> value) say where and which."""

    def __init__(self, iteration: int, max_iter: int, losses: dict[str, float], checkpoint: Path | None) -> None:
        """Build the message from the iteration, each loss term's value and the last good checkpoint."""
        self.iteration = iteration
        self.losses = dict(losses)
        self.checkpoint = checkpoint
        terms = ", ".join(f"{k}={v!r}" for k, v in losses.items())
        where = (f"the last good checkpoint is {checkpoint} (train again with resume=True to continue from it)"
                 if checkpoint is not None else "no checkpoint had been written yet")
        super().__init__(f"non-finite loss at iteration {iteration}/{max_iter}: {terms}; training stopped "
                         f"before the optimiser step, {where}. Lower solver.base_lr, lengthen the warmup or "
                         f"set solver.clip_grad_norm.")


class NonFiniteWeightsError(FloatingPointError):
    """Model weights hold NaN/inf at a checkpoint; the checkpoint is not written."""


class TooManyBadImagesError(ValueError):
    """More than ``train.max_bad_image_fraction`` of the training images could not be read."""


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> this rank's CUDA device if available else CPU; other strings are used as given."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device() if du.is_dist() else 0)
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device!r} but CUDA is not available; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None and du.is_dist():
        # Each rank owns the GPU init_distributed selected (LOCAL_RANK); DDP needs it by index.
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _stateful(obj: Any) -> Any | None:
    """The object that carries the data position: ``obj`` itself or its ``batch_sampler``, if stateful."""
    for cand in (obj, getattr(obj, "batch_sampler", None)):
        if cand is not None and callable(getattr(cand, "state_dict", None)) \
                and callable(getattr(cand, "load_state_dict", None)):
            return cand
    return None


class _DataStream:
    """Turns any of the three accepted data sources into ``next_batch(iteration)`` (see module docstring)."""

    def __init__(self, source: Any, cfg: Config, rank: int, world_size: int) -> None:
        self._loader: Any = None
        self._it: Iterator[Any] | None = None
        self._warned = False
        # Number of images the data covers (None when it cannot be told): the base of max_bad_image_fraction.
        dataset = source if isinstance(source, torch.utils.data.Dataset) else getattr(source, "dataset", None)
        try:
            self.num_images: int | None = len(dataset) if dataset is not None else None
        except TypeError:
            self.num_images = None
        if isinstance(source, torch.utils.data.Dataset) and not isinstance(source, torch.utils.data.IterableDataset):
            try:
                from maskrcnn.data import build_train_loader  # noqa: PLC0415 - only needed for datasets
            except ImportError as e:
                raise ImportError("Trainer was given a dataset but maskrcnn.data.build_train_loader is not "
                                  "available; pass a data loader or a loader factory instead") from e

            def factory(start_iter: int) -> Iterable[Any]:
                """The dataset's training loader positioned at ``start_iter``."""
                return build_train_loader(source, cfg, rank=rank, world_size=world_size, start_iter=start_iter)

            self.kind = "factory"
            self._factory: Callable[[int], Iterable[Any]] | None = factory
        elif hasattr(source, "__iter__"):
            self.kind = "iterable"
            self._factory = None
            self._loader = source
        elif callable(source):
            self.kind = "factory"
            self._factory = source
        else:
            raise TypeError(f"training data must be a Dataset, an iterable of batches or a factory "
                            f"start_iter -> iterable, got {type(source).__name__}")

    def start(self, start_iter: int, sampler_state: Any = None) -> None:
        """Position the stream so that the next batch is that of iteration ``start_iter``."""
        if self._factory is not None:
            self._loader = self._factory(start_iter)
            self._it = iter(self._loader)
            return
        holder = _stateful(self._loader)
        if start_iter > 0 and holder is not None and sampler_state is not None:
            holder.load_state_dict(sampler_state)
            self._it = iter(self._loader)
            return
        self._it = iter(self._loader)
        if start_iter > 0:
            logger.warning("the training data has no restorable position; skipping %d batches to resume",
                           start_iter)
            for i in range(start_iter):
                self.next_batch(i)

    def next_batch(self, iteration: int) -> Any:
        """The batch of 0-based ``iteration``, starting a new pass over the data when one ends."""
        assert self._it is not None, "start() first"
        try:
            return next(self._it)
        except StopIteration:
            pass
        if self._factory is not None:
            self._loader = self._factory(iteration)
        self._it = iter(self._loader)
        try:
            return next(self._it)
        except StopIteration:
            raise RuntimeError(f"the training data yielded no batch for iteration {iteration}") from None

    def state(self, iteration: int) -> Any:
        """Data position after ``iteration`` consumed batches, in the form ``start()`` takes back."""
        if self._factory is not None:
            return {"iteration": iteration}  # the factory is positioned by the iteration alone
        holder = _stateful(self._loader)
        if holder is None:
            return None
        if _is_grouped_sampler(holder):
            # Its own position runs ahead of the trainer by the DataLoader's prefetch; the consumed count
            # does not, and the sampler maps it back to (epoch, position).
            return {"iteration": iteration}
        if getattr(self._loader, "num_workers", 0) > 0 and holder is not self._loader and not self._warned:
            self._warned = True
            logger.warning("saving the batch sampler's state of a DataLoader with workers: prefetching may have "
                           "moved it past the batches trained on, so a resumed run can skip a few batches; "
                           "pass a loader factory (start_iter -> loader) for an exact resume")
        return holder.state_dict()


def _is_grouped_sampler(obj: Any) -> bool:
    try:
        from maskrcnn.data.samplers import GroupedBatchSampler  # noqa: PLC0415 - data is optional here
    except ImportError:
        return False
    return isinstance(obj, GroupedBatchSampler)


def _maybe_sync_bn(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """With ``model.backbone.norm=syncbn`` (and several processes), every BatchNorm of the model syncs its stats."""
    if cfg.model.backbone.norm != "syncbn":
        return model
    if device.type == "cpu":
        raise ValueError("model.backbone.norm='syncbn' with several processes needs CUDA devices (PyTorch's "
                         "SyncBatchNorm has no CPU implementation); use 'frozen_bn', 'gn' or 'bn' on CPU")
    # The FPN and head norms are converted too: asking for SyncBN means no BN layer should see only one
    # process's few images.
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def best_metric_name(cfg: Config) -> str:
    """``train.best_metric``, with "auto" resolved: keypoints_AP for keypoint models, else segm_AP, else bbox_AP."""
    name = str(cfg.train.best_metric)
    if name != "auto":
        return name
    keypoints = getattr(cfg.model, "keypoint_head", None)
    if keypoints is not None and getattr(keypoints, "enabled", False):
        return "keypoints_AP"
    return "segm_AP" if cfg.model.mask_head.enabled else "bbox_AP"


def _lower_is_better(metric: str) -> bool:
    """Losses are minimised; everything else (AP, AR) is maximised."""
    return "loss" in metric


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _merge_skipped(lists: Iterable[list[list[Any]]]) -> list[list[Any]]:
    """[file, first iteration, reason] entries of several processes, one per file (its earliest), sorted."""
    merged: dict[str, list[Any]] = {}
    for entries in lists:
        for f, i, r in entries:
            if f not in merged or int(i) < int(merged[f][1]):
                merged[f] = [f, int(i), r]
    return [merged[f] for f in sorted(merged)]


def _stream_seed(seed: int, rank: int, start_iter: int) -> int:
    """Seed of a rank's RNG streams when a resume cannot restore them (the checkpoint's world size differs)."""
    return int(np.random.SeedSequence([seed, rank, start_iter]).generate_state(1)[0])


def _to_device(batch: Any, device: torch.device) -> Batch:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"a training batch must be (images, targets), got {type(batch).__name__}")
    images, targets = batch
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    return images, targets


class _MetricsLog:
    """Append-only JSON-lines file, one record per line, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._f: Any = None

    def open(self, keep_until: int) -> None:
        """Drop records past iteration ``keep_until`` (left by a run that died after its last checkpoint)."""
        if not self.enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(rec, dict) and int(rec.get("iter", 0)) <= keep_until:
                    kept.append(line + "\n")
            atomic_write_text(self.path, "".join(kept))
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it, so a crash loses nothing already logged."""
        if self._f is None:
            return
        self._f.write(json.dumps(record, default=_json_default) + "\n")
        self._f.flush()

    def close(self) -> None:
        """Close the file."""
        if self._f is not None:
            self._f.close()
            self._f = None


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Trains ``model`` for ``cfg.solver.max_iter`` iterations, writing everything under ``out_dir``.

    Files: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/model_{iter:07d}.pt`` + ``checkpoints/last_checkpoint``,
    ``loss_curves.png`` (with matplotlib) and TensorBoard events under ``tensorboard/`` (when enabled). With
    ``save_model`` (``fn(model, folder)``, e.g. :func:`maskrcnn.weights.save_model`) also ``model_final/``, written
    before the final evaluation so that a failing evaluation loses only the metrics, and, with ``eval_fn``,
    ``model_best/``: the weights of the evaluation with the best ``train.best_metric``. ``train.patience`` stops
    the run after that many evaluations without a new best.
    """

    def __init__(self, model: nn.Module, cfg: Config, train_loader_or_dataset: Any, out_dir: str | Path,
                 eval_fn: EvalFn | None = None, device: str | torch.device | None = None,
                 save_model: Callable[[nn.Module, Path], Any] | None = None) -> None:
        """Set up device, optimiser, schedule, AMP and data; the data follows the module docstring's contract."""
        self.cfg = cfg
        self.solver = cfg.solver
        self.max_iter = int(cfg.solver.max_iter)
        self.out_dir = Path(out_dir)
        self.eval_fn = eval_fn
        self.save_model_fn = save_model
        # The best evaluation so far ("value" None before the first) and evaluations since it (for patience).
        self.best: dict[str, Any] = {"metric": best_metric_name(cfg), "value": None, "iteration": None,
                                     "since": 0}
        self.stopped_early = False
        self.rank = du.get_rank()
        self.world_size = du.get_world_size()
        self.is_main = self.rank == 0
        self.device = resolve_device(device if device is not None else cfg.train.device)

        ddp = nn.parallel.DistributedDataParallel
        bare = model.module if isinstance(model, ddp) else model
        if self.world_size > 1 and not isinstance(model, ddp):
            bare = _maybe_sync_bn(bare, cfg, self.device)
        # self.model is always the bare module (checkpoints hold its keys, without "module."); the forward
        # pass goes through the DDP wrapper when there is one.
        self.model: nn.Module = bare.to(self.device)
        self._train_model: nn.Module = model if isinstance(model, ddp) else self.model
        if self.world_size > 1 and not isinstance(model, ddp):
            ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP broadcasts rank 0's weights here, so every rank starts from the same model even when each
            # built its own random init. Frozen BN has no parameters, so there is nothing else to keep in step.
            self._train_model = ddp(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.solver, self.max_iter)
        self._setup_amp()

        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", cfg.train.keep_last)
        self._data = _DataStream(train_loader_or_dataset, cfg, self.rank, self.world_size)
        self._metrics = _MetricsLog(self.out_dir / "metrics.jsonl", self.is_main)
        self.iteration = 0
        if self.world_size > 1 and self.is_main:
            total, solver = int(cfg.solver.ims_per_batch), cfg.solver
            scaling = (f"base_lr {solver.base_lr:g} x {total}/{solver.reference_batch_size} by the linear scaling "
                       f"rule" if solver.scale_lr else "solver.scale_lr is off")
            logger.info("distributed training on %d processes (%s): %d images per iteration in all, %s per "
                        "process; peak lr %g (%s)", self.world_size, torch.distributed.get_backend(), total,
                        f"{total // self.world_size}" if total % self.world_size == 0 else f"{total}/{self.world_size}",
                        solver.base_lr * lr_scale(solver), scaling)
        # Per-iteration values of this process's run: {"iter", "lr", "total_loss", <loss terms>}.
        self.history: list[dict[str, float]] = []
        self.last_eval: dict[str, Any] | None = None
        # Training images this process could not read: file -> (first iteration, reason).
        self.skipped: dict[str, tuple[int, str]] = {}
        # Rank 0: every process's skipped images as of the last checkpoint ([file, iteration, reason] entries).
        self._gathered_skips: list[list[Any]] = []

    # -- setup ------------------------------------------------------------------------------------

    def _setup_amp(self) -> None:
        amp = self.solver.amp
        self._amp_dtype: torch.dtype | None = None
        if amp == "fp16":
            if self.device.type != "cuda":
                raise ValueError("solver.amp='fp16' needs a CUDA device (it uses a GradScaler); "
                                 "use solver.amp='bf16' on CPU")
            self._amp_dtype = torch.float16
        elif amp == "bf16":
            if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                raise ValueError("solver.amp='bf16' is not supported by this GPU; use 'fp16'")
            self._amp_dtype = torch.bfloat16
        elif amp != "none":
            raise ValueError(f"unknown solver.amp {amp!r}; use 'none', 'fp16' or 'bf16'")
        # bf16 keeps fp32's exponent range, so only fp16 needs loss scaling.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    # -- checkpoints --------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        return {
            "rng": get_rng_state(),
            "generators": {k: g.get_state() for k, g in module_generators(self.model).items()},
        }

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        set_rng_state(state["rng"])
        gens = module_generators(self.model)
        for name, gstate in state.get("generators", {}).items():
            if name in gens:
                gens[name].set_state(gstate.cpu())
            else:
                logger.warning("checkpoint holds the state of generator %s, which the model no longer has", name)

    def _check_weights_finite(self, iteration: int) -> None:
        bad = [n for n, t in self.model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteWeightsError(
                f"non-finite model weights after iteration {iteration}/{self.max_iter} in {', '.join(bad[:8])}"
                f"{' ...' if len(bad) > 8 else ''}; checkpoint not written, the last good one is "
                f"{self.checkpoints.latest() if self.is_main else '(see rank 0)'}")

    def save_checkpoint(self, iteration: int) -> Path | None:
        """Write the full training state after ``iteration`` completed iterations (path on rank 0, else None)."""
        self._check_weights_finite(iteration)
        rank_states = du.all_gather_object({**self._rng_state(), "data": self._data.state(iteration),
                                            "skipped": self._skipped_list()})
        path = None
        if self.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "world_size": self.world_size,
                "rank_states": rank_states,
                "config": self.cfg.to_dict(),
                "best": dict(self.best),
            }
            self._gathered_skips = _merge_skipped(st.get("skipped") or [] for st in rank_states)
            if self._gathered_skips:
                self._write_skipped()
            path = self.checkpoints.save(iteration, state)
            logger.info("saved checkpoint %s", path)
        du.barrier()
        return path

    def _load_for_resume(self, resume: bool | str | Path) -> tuple[int, dict[str, Any] | None]:
        path = self.checkpoints.latest() if resume is True else Path(resume)
        if self.world_size > 1:
            # Rank 0 (the writer) chooses, so that every rank resumes from the same iteration.
            chosen = du.broadcast_object((str(path), path.is_file()) if path is not None else None)
            if chosen is not None and not chosen[1]:
                raise FileNotFoundError(f"checkpoint not found on rank 0: {chosen[0]}")
            path = Path(chosen[0]) if chosen is not None else None
        if path is None:
            logger.info("resume: no checkpoint in %s, starting from scratch", self.checkpoints.directory)
            return 0, None
        if du.all_ranks_true(path.is_file(), self.device):
            ckpt = load_checkpoint(path, map_location="cpu")
        else:
            # Some rank cannot see rank 0's files (no shared filesystem between machines): send it the state.
            logger.info("resume: %s is not visible to every rank; rank 0 sends it over the process group", path)
            ckpt = du.broadcast_object(load_checkpoint(path, map_location="cpu") if self.is_main else None)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a training checkpoint of this trainer (format "
                             f"{ckpt.get('format')!r}); load plain weights into the model instead")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._reapply_schedule()
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        iteration = int(ckpt["iteration"])
        if self.is_main:
            logger.info("resuming from %s at iteration %d", path, iteration)
        return iteration, ckpt

    def _reapply_schedule(self) -> None:
        # LambdaLR.load_state_dict restores the saved schedule's settings; the current config's schedule
        # (e.g. a longer max_iter) should drive the rest of the run. With an unchanged config this sets
        # exactly the values the uninterrupted run had (same expression as LambdaLR.get_lr).
        factor = WarmupLRFactor(self.solver, self.max_iter)
        sched = self.scheduler
        sched.lr_lambdas = [factor for _ in self.optimizer.param_groups]
        sched.base_lrs = [float(self.solver.base_lr) for _ in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, sched.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # -- the loop -----------------------------------------------------------------------------------

    def train(self, resume: bool | str | Path = False) -> dict[str, Any]:
        """Run (or, with ``resume``, continue from the latest / given checkpoint) to ``solver.max_iter``."""
        start_iter, ckpt = self._load_for_resume(resume) if resume else (0, None)
        rank_state = None
        if ckpt is not None:
            states = ckpt.get("rank_states") or []
            if len(states) == self.world_size:
                rank_state = states[self.rank]
            elif self.is_main:
                logger.warning("checkpoint was written by %d processes, now %d: weights, optimiser, schedule and "
                               "data position resume, but per-process RNG streams start afresh, so the run will "
                               "not repeat a %d-process run exactly", len(states), self.world_size, len(states))
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # A run killed while writing leaves hidden temporaries; no other process writes here now.
            for folder in (self.out_dir, self.checkpoints.directory, self.out_dir / "eval"):
                for p in remove_stale_temp(folder):
                    logger.info("removed %s, left by an interrupted write", p)
            save_config(self.cfg, self.out_dir / "config.yaml")
            if not resume and self.checkpoints.list_checkpoints():
                logger.warning("%s already holds checkpoints from an earlier run; they will be overwritten or "
                               "rotated away (pass resume=True to continue that run instead)",
                               self.checkpoints.directory)
        self.iteration = start_iter
        bar = tb = None
        try:
            self._metrics.open(keep_until=start_iter)
            tb = self._open_tensorboard()
            # The iterator is made before the RNGs are set: creating one may draw from the global RNG, which
            # in the original run happened at iteration 0, not here.
            if start_iter < self.max_iter:
                self._data.start(start_iter, rank_state["data"] if rank_state else None)
            if rank_state is not None:
                self.skipped = {f: (int(i), str(r)) for f, i, r in rank_state.get("skipped") or []}
            if ckpt is not None and self.is_main:
                self._gathered_skips = _merge_skipped(st.get("skipped") or [] for st in ckpt.get("rank_states") or [])
            if ckpt is not None and isinstance(ckpt.get("best"), dict) and \
                    ckpt["best"].get("metric") == self.best["metric"]:
                self.best = dict(ckpt["best"])
            if rank_state is not None:
                self._set_rng_state(rank_state)
            elif ckpt is None:
                # A different stream per rank (proposal sampling, any global-RNG augmentation), the same streams
                # for the same seed and world size. Data augmentation is seeded per sample by the loader.
                seed_all(self.cfg.train.seed + self.rank)
            else:
                seed_all(_stream_seed(self.cfg.train.seed, self.rank, start_iter))
            self._train_model.train()
            bar = self._open_bar(start_iter)
            try:
                if self._patience_ran_out():
                    self.stopped_early = True  # the run being resumed had stopped early already
                else:
                    self._loop(start_iter, bar, tb)
                if self.iteration >= self.max_iter and start_iter >= self.max_iter:
                    self._save_model("model_final")  # resumed at the end: nothing trained, the model still goes out
            except Exception as e:
                if self.world_size > 1 and du.is_peer_failure(e):
                    raise du.RankFailureError(
                        f"rank {self.rank} of {self.world_size}: training stopped at iteration {self.iteration + 1}: "
                        f"another process died or did not answer within train.dist_timeout_s="
                        f"{self.cfg.train.dist_timeout_s:g}s ({' '.join(str(e).split())[:300]})") from e
                raise
        finally:
            if bar is not None:
                bar.close()
            self._metrics.close()
            if tb is not None:
                tb.close()
        if self.is_main:
            plot_loss_curves(self.out_dir / "metrics.jsonl", self.out_dir / "loss_curves.png")
            if self.skipped:
                logger.warning("%d training image(s) could not be read and were replaced by others; they are "
                               "listed in %s", len(self.skipped), self.out_dir / SKIPPED_FILE)
        return {
            "iteration": self.iteration,
            "losses": dict(self.history[-1]) if self.history else {},
            "eval": self.last_eval,
            "checkpoint": self.checkpoints.latest() if self.is_main else None,
            "best": dict(self.best),
            "stopped_early": self.stopped_early,
        }

    def _loop(self, start_iter: int, bar: Any, tb: Any) -> None:
        cfg_t = self.cfg.train
        log_period = max(int(cfg_t.log_period), 1)
        ckpt_period = int(cfg_t.checkpoint_period)
        eval_period = int(cfg_t.eval_period)
        clip = float(self.solver.clip_grad_norm)
        window: dict[str, float] = {}
        window_n = 0
        loop_start = time.perf_counter()
        for i in range(start_iter, self.max_iter):
            it_num = i + 1  # 1-based: iterations completed once this one is done
            t0 = time.perf_counter()
            batch = self._data.next_batch(i)
            self._note_skips(batch, it_num)
            images, targets = _to_device(batch, self.device)
            t_data = time.perf_counter() - t0

            with self._autocast():
                loss_dict = self._train_model(images, targets)
            if not isinstance(loss_dict, dict) or not loss_dict:
                raise TypeError(f"in train mode the model must return a non-empty dict of losses, got "
                                f"{type(loss_dict).__name__}")
            names = list(loss_dict)
            losses = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
            total = sum(loss_dict.values())
            finite = bool(torch.isfinite(losses).all())
            if not du.all_ranks_true(finite, self.device):
                values = dict(zip(names, losses.tolist()))
                self._metrics.write({"type": "error", "iter": it_num, "error": "non-finite loss", **values})
                raise NonFiniteLossError(it_num, self.max_iter, values,
                                         self.checkpoints.latest() if self.is_main else None)

            lr = float(self.optimizer.param_groups[0]["lr"])
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            grad_norm = None
            if clip > 0:
                self.scaler.unscale_(self.optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.iteration = it_num
            t_iter = time.perf_counter() - t0

            values = dict(zip(names, losses.tolist()))
            total_f = float(sum(values.values()))
            self.history.append({"iter": it_num, "lr": lr, "total_loss": total_f, **values})
            for k, v in (*values.items(), ("total_loss", total_f), ("time", t_iter), ("data_time", t_data)):
                window[k] = window.get(k, 0.0) + v
            if grad_norm is not None:
                window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
            window_n += 1
            if bar is not None:
                bar.update(1)

            if it_num % log_period == 0 or it_num == self.max_iter:
                elapsed = time.perf_counter() - loop_start
                self._log(it_num, lr, window, window_n, elapsed / (it_num - start_iter), bar, tb)
                window, window_n = {}, 0
            final = it_num == self.max_iter
            evaluate = self.eval_fn is not None and ((eval_period > 0 and it_num % eval_period == 0) or final)
            if evaluate and not final:
                # Before the checkpoint of the same iteration, so that it holds the best-model state.
                self._evaluate(it_num, tb)
            stop = evaluate and not final and self._patience_ran_out()
            if (ckpt_period > 0 and it_num % ckpt_period == 0) or final or stop:
                self.save_checkpoint(it_num)
            if stop:
                self.stopped_early = True
                if self.is_main:
                    logger.warning("early stop at iteration %d: %s has not improved on %s (iteration %s) for %d "
                                   "evaluations (train.patience)", it_num, self.best["metric"],
                                   _fmt(self.best["value"]), self.best["iteration"], self.best["since"])
                self._save_model("model_final")
                return
            if final:
                self._save_model("model_final")
                if evaluate:
                    try:
                        self._evaluate(it_num, tb)
                    except Exception:
                        if self.is_main:
                            logger.error("the final evaluation failed; the trained model is saved in %s",
                                         self.out_dir / "model_final")
                        raise

    def _skipped_list(self) -> list[list[Any]]:
        return [[f, i, r] for f, (i, r) in sorted(self.skipped.items())]

    def _write_skipped(self) -> None:
        entries = _merge_skipped([self._skipped_list(), self._gathered_skips])
        lines = ["# training images that could not be read and were replaced: file<TAB>first iteration<TAB>reason"]
        lines += [f"{f}\t{i}\t{r}" for f, i, r in entries]
        atomic_write_text(self.out_dir / SKIPPED_FILE, "\n".join(lines) + "\n")

    def _note_skips(self, batch: Any, it_num: int) -> None:
        """Log and record the images the loader replaced in this batch; stop when too many are unreadable."""
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else ()
        new = 0
        for t in targets:
            for file, reason in (t.get(SKIPPED_KEY) or ()) if isinstance(t, dict) else ():
                if file in self.skipped:
                    continue  # seen in an earlier epoch: already logged and listed
                self.skipped[str(file)] = (it_num, str(reason))
                new += 1
                logger.warning("iteration %d: skipped training image %s (%s); another image of the dataset took "
                               "its place (%d unreadable so far)", it_num, file, reason, len(self.skipped))
        if not new:
            return
        if self.is_main:
            self._write_skipped()
        frac = float(self.cfg.train.max_bad_image_fraction)
        total = self._data.num_images
        if total is None:
            return
        share = total / self.world_size  # the images this process trains on
        if len(self.skipped) > frac * share:
            where = self.out_dir / SKIPPED_FILE if self.is_main else f"rank {self.rank}'s log"
            raise TooManyBadImagesError(
                f"{len(self.skipped)} of the {share:g} training images of this process could not be read, more "
                f"than train.max_bad_image_fraction={frac:g} allows; training stopped at iteration {it_num} "
                f"(they are listed in {where}). Check the data with 'maskrcnn data check', fix or remove them, "
                f"or raise train.max_bad_image_fraction, then continue with --resume")

    def _log(self, it_num: int, lr: float, window: dict[str, float], n: int, sec_per_iter: float, bar: Any,
             tb: Any) -> None:
        keys = list(window)
        means = torch.tensor([window[k] / n for k in keys], dtype=torch.float64)
        if self.world_size > 1:
            # Averages over ranks; every rank reaches this point at the same iteration.
            means = du.all_reduce_mean(means.to(self.device)).cpu()
        record: dict[str, Any] = {"type": "train", "iter": it_num, "lr": lr}
        record.update(dict(zip(keys, means.tolist())))
        record["eta_seconds"] = sec_per_iter * (self.max_iter - it_num)
        if self.device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.is_main:
            return
        self._metrics.write(record)
        loss_terms = {k: v for k, v in record.items() if k.startswith("loss")}
        logger.info("iter %d/%d  total_loss %.4f  (%s)  lr %.3g  %.3f s/it (data %.3f)  eta %s", it_num,
                    self.max_iter, record["total_loss"], "  ".join(f"{k} {v:.4f}" for k, v in loss_terms.items()),
                    lr, record["time"], record["data_time"], _format_eta(record["eta_seconds"]))
        if bar is not None:
            bar.set_postfix({"loss": f"{record['total_loss']:.4f}", "lr": f"{lr:.3g}",
                             **{k.removeprefix("loss_"): f"{v:.3f}" for k, v in loss_terms.items()}}, refresh=False)
        if tb is not None:
            for k, v in record.items():
                if k not in ("type", "iter") and isinstance(v, (int, float)):
                    tb.add_scalar(f"train/{k}", v, it_num)

    def _save_model(self, name: str) -> None:
        """Write the bare model to ``out_dir/name`` through ``save_model`` (rank 0; no-op without it)."""
        if self.save_model_fn is not None and self.is_main:
            path = self.save_model_fn(self.model, self.out_dir / name)
            logger.info("saved %s", path)
        du.barrier()

    def _patience_ran_out(self) -> bool:
        patience = int(self.cfg.train.patience)
        return patience > 0 and self.best["value"] is not None and int(self.best["since"]) >= patience

    def _update_best(self, it_num: int, metrics: dict[str, Any]) -> None:
        """Track ``train.best_metric`` over evaluations; a new best writes ``model_best/``."""
        name = self.best["metric"]
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            if self.is_main:
                logger.warning("train.best_metric %r is not among this evaluation's finite values (%s); "
                               "model_best/ and train.patience need it", name, ", ".join(sorted(metrics)) or "none")
            return
        lower = _lower_is_better(name)
        best = self.best["value"]
        if best is None or (value < best if lower else value > best):
            self.best.update(value=float(value), iteration=it_num, since=0)
            self._save_model("model_best")
            if self.is_main:
                logger.info("new best %s %s at iteration %d", name, _fmt(value), it_num)
        else:
            self.best["since"] = int(self.best["since"]) + 1

    def _evaluate(self, it_num: int, tb: Any) -> None:
        # Evaluation must not shift the training RNG streams, or a resumed run would diverge from the original.
        saved = self._rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = self.eval_fn(self.model, it_num) or {}
        finally:
            self._train_model.train()
            self._set_rng_state(saved)
        self.last_eval = dict(metrics)
        self._update_best(it_num, metrics)
        if self.is_main:
            self._metrics.write({"type": "eval", "iter": it_num, **metrics})
            logger.info("eval at iter %d: %s", it_num, json.dumps(metrics, default=_json_default))
            if tb is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        tb.add_scalar(f"eval/{k}", v, it_num)

    def _open_bar(self, start_iter: int) -> Any:
        if not self.is_main:
            return None
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional dependency
        except ImportError:
            return None
        # disable=None: no bar when stderr is not a terminal (logs and metrics.jsonl still record progress).
        return tqdm(total=self.max_iter, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                    disable=None)

    def _open_tensorboard(self) -> Any:
        if not (self.is_main and self.cfg.train.tensorboard):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional dependency
        except ImportError:
            logger.warning("train.tensorboard is set but tensorboard is not installed (pip install tensorboard); "
                           "skipping TensorBoard logging")
            return None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (unparseable lines skipped)."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def plot_loss_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot ``metrics.jsonl`` to a PNG: loss terms (validation losses as markers), evaluation AP, the LR.

    Returns the path, or None without matplotlib or without training records.
    """
    try:
        fig = loss_curves_figure(read_metrics(metrics_path))
    except ImportError:
        logger.info("matplotlib is not installed; skipping %s (pip install matplotlib)", out_path)
        return None
    if fig is None:
        return None
    return atomic_write(out_path, True, lambda f: fig.savefig(f, format="png", dpi=100))


def loss_curves_figure(records: list[dict[str, Any]]) -> Any:
    """A matplotlib Figure of metrics.jsonl records (None without training records); raises ImportError without
    matplotlib. Axes: losses per iteration (training lines, validation markers), AP of each evaluation, LR."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional dependency
    from matplotlib.figure import Figure  # noqa: PLC0415

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train:
        return None
    keys = [k for k in train[0] if k.startswith("loss")] + ["total_loss"]
    iters = [r["iter"] for r in train]
    val_keys = sorted({k for r in evals for k in r if k.startswith("val_") and "loss" in k})
    ap_keys = sorted({k for r in evals for k in r if k.endswith("_AP") and isinstance(r.get(k), (int, float))})
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend.
    rows = 3 if ap_keys else 2
    fig = Figure(figsize=(9, 8 if ap_keys else 6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 1] if ap_keys else [3, 1]})
    ax, ax_lr = axes[0], axes[-1]
    for k in keys:
        ys = [r.get(k, math.nan) for r in train]
        line = ax.plot(iters, ys, label=k, linewidth=2.0 if k == "total_loss" else 1.0)[0]
        if f"val_{k}" in val_keys:
            # Same colour as the training curve of the term, so the two read as a pair.
            ax.plot([r["iter"] for r in evals if f"val_{k}" in r], [r[f"val_{k}"] for r in evals if f"val_{k}" in r],
                    "o--", color=line.get_color(), label=f"val_{k}", markersize=4, linewidth=0.8)
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    if ap_keys:
        ax_ap = axes[1]
        for k in ap_keys:
            pts = [(r["iter"], r[k]) for r in evals if isinstance(r.get(k), (int, float))]
            ax_ap.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
        ax_ap.set_ylabel("AP")
        ax_ap.grid(True, alpha=0.3)
        ax_ap.legend(fontsize="small")
    ax_lr.plot(iters, [r.get("lr", math.nan) for r in train], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
