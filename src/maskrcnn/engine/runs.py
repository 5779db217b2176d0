"""Whole runs that the CLI starts and Python users can call: a training run and an evaluation run.

``train_run`` reads a COCO dataset, builds the model, trains it into a run folder and saves ``model_final/``;
``evaluate_run`` scores a model on a COCO dataset and writes ``metrics.json`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("maskrcnn.engine.runs")

__all__ = ["RUN_FILES", "RunExistsError", "apply_model_overrides", "dataset_options", "evaluate_run",
           "flat_metrics", "holds_run", "init_from", "label_category_ids", "train_run", "validation_losses",
           "with_dataset_classes"]

# What a training run writes into its folder; --overwrite deletes exactly these (and nothing else of the folder).
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "model_final", "model_best", "eval", "loss_curves.png",
             "skipped_images.txt", "tensorboard")


class RunExistsError(ValueError):
    """``train_run`` into a folder that holds an earlier run, without ``resume`` or ``overwrite``."""


def holds_run(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds files of a training run (its config, metrics, checkpoints or final model)."""
    out_dir = Path(out_dir)
    ckpts = out_dir / "checkpoints"
    return (any((out_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "model_final"))
            or (ckpts.is_dir() and any(ckpts.iterdir())))


def _prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into an earlier run unless resuming; with ``overwrite`` delete that run's files first."""
    import shutil  # noqa: PLC0415

    from maskrcnn.engine import dist as du  # noqa: PLC0415

    if resume and overwrite:
        raise RunExistsError("resume and overwrite exclude each other: --resume continues the run in the folder, "
                             "--overwrite deletes it")
    if resume or not holds_run(out_dir):
        return
    if not overwrite:
        raise RunExistsError(f"{out_dir} holds an earlier training run; pass --resume to continue it or "
                             f"--overwrite to delete it and start afresh (or choose another --out)")
    if du.get_rank() == 0:
        logger.warning("--overwrite: deleting the earlier run in %s", out_dir)
        for name in RUN_FILES:
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    du.barrier()


def with_dataset_classes(cfg: Any, dataset: Any) -> Any:
    """``cfg`` with model.num_classes / class_names / category_ids taken from ``dataset``, and with a keypoint head
    its keypoint count, names and skeleton."""
    model = dataclasses.replace(cfg.model, num_classes=dataset.num_classes, class_names=tuple(dataset.class_names),
                                category_ids=tuple(int(c) for c in dataset.category_ids))
    kh = model.keypoint_head
    names = tuple(getattr(dataset, "keypoint_names", ()) or ())
    if kh.enabled and names:
        kh = dataclasses.replace(kh, num_keypoints=len(names), names=names, skeleton=tuple(dataset.skeleton))
        model = dataclasses.replace(model, keypoint_head=kh)
    return dataclasses.replace(cfg, model=model)


def dataset_options(cfg: Any) -> dict[str, Any]:
    """The :class:`~maskrcnn.data.CocoDataset` options a model config needs: keypoints, masks and their rules."""
    kh = cfg.model.keypoint_head
    return {"keypoints": kh.enabled, "masks": cfg.model.mask_head.enabled,
            "min_keypoints_per_image": kh.min_keypoints_per_image if kh.enabled else 0,
            "keypoint_offset": kh.coco_offset}


def init_from(model: Any, source: str) -> None:
    """Copy every tensor of checkpoint ``source`` whose name and shape match ``model``'s.

    ``source`` is a whole model (any format :func:`maskrcnn.load_model` reads) or ImageNet weights of a ResNet
    body (torchvision's, or detectron2's R-50.pkl / R-101.pkl / X-101-32x8d.pkl), as the paper starts training.
    In the C4 layout the ImageNet res5 initialises the RoI head's res5.
    """
    from maskrcnn.weights import WeightsError, read_init_state  # noqa: PLC0415

    cfg, src_state, path = read_init_state(source)
    own = model.state_dict()
    if cfg is not None:
        have, want = cfg.model.backbone, model.cfg.model.backbone
        if (have.depth, have.layout, have.groups) != (want.depth, want.layout, want.groups):
            # Same-shaped tensors of a different network would load "successfully" and mean nothing.
            raise WeightsError(f"{source}: its backbone (depth {have.depth}, {have.layout}, groups {have.groups}) "
                               f"differs from the config's (depth {want.depth}, {want.layout}, groups {want.groups}); "
                               f"choose a --preset or model.backbone.* overrides that match the checkpoint")
    else:
        if model.cfg.model.backbone.layout == "c4":
            src_state = {(k.replace("backbone.body.layer4.", "roi_heads.res5.", 1)): v for k, v in src_state.items()}
        body = [k for k in own if k.startswith(("backbone.body.", "roi_heads.res5."))
                and not k.endswith("num_batches_tracked")]
        misfit = [k for k in body if k not in src_state or tuple(src_state[k].shape) != tuple(own[k].shape)]
        if misfit:
            raise WeightsError(f"{path}: these ImageNet weights do not fit the config's backbone ({len(misfit)} of "
                               f"{len(body)} tensors missing or of another shape, e.g. {misfit[0]}); choose the "
                               f"--preset of the same depth and groups")
    matched = {k: v.to(own[k].dtype) for k, v in src_state.items()
               if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise WeightsError(f"{source}: none of its tensors fit this model (different architecture?)")
    skipped = sorted(k for k in own if k not in matched and not k.endswith("num_batches_tracked"))
    model.load_state_dict(matched, strict=False)
    logger.info("initialised %d of %d tensors from %s%s", len(matched), len(own), source,
                f"; fresh: {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}" if skipped else "")


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """{"bbox": {"AP": x}} -> {"bbox_AP": x} for every IoU type; nan -> None so metrics.jsonl stays strict JSON."""
    out: dict[str, float | None] = {}
    for t, table in metrics.items():
        if t in ("per_class", "info") or not isinstance(table, dict):
            continue
        for k, v in table.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{t}_{k}"] = None if isinstance(v, float) and math.isnan(v) else v
    return out


def validation_losses(model: Any, dataset: Any, batch_size: int = 1) -> dict[str, float]:
    """Mean training losses of ``model`` over ``dataset`` (this process's share), as ``{"val_<term>": value}``.

    The model runs in training mode (losses need it) without gradients, with its BatchNorm layers kept in eval
    mode so that validation images do not move their running statistics. Proposal sampling draws from the
    global RNG: the trainer saves and restores it around evaluations.
    """
    import torch  # noqa: PLC0415

    from maskrcnn.data import build_test_loader  # noqa: PLC0415
    from maskrcnn.engine import dist as du  # noqa: PLC0415

    rank, world = du.get_rank(), du.get_world_size()
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    sums: dict[str, float] = {}
    count = 0
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for images, targets in build_test_loader(shard, batch_size=batch_size):
                targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                           for t in targets]
                losses = model([im.to(device) for im in images], targets)
                total = 0.0
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(images)
                    total += float(v)
                sums["total_loss"] = sums.get("total_loss", 0.0) + total * len(images)
                count += len(images)
    finally:
        model.train(was_training)
    parts = du.all_gather_object((sums, count))
    n = sum(c for _, c in parts)
    keys = sorted({k for s, _ in parts for k in s})
    return {f"val_{k}": sum(s.get(k, 0.0) for s, _ in parts) / n for k in keys} if n else {}


def train_run(cfg: Any, data: str | Path, images: str | Path, out_dir: str | Path,
                 val_data: str | Path | None = None, val_images: str | Path | None = None,
                 init_weights: str | None = None, resume: bool = False, overwrite: bool = False,
                 allow_outside_images: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """Train ``cfg`` (classes taken from the dataset) into ``out_dir``; returns (model, last eval metrics or None).

    A folder that holds an earlier run is refused (:class:`RunExistsError`) unless ``resume`` continues it or
    ``overwrite`` deletes it first. Writes config.yaml, metrics.jsonl, checkpoints/, loss_curves.png, model_final/ and, with validation data,
    eval/metrics.json and eval/results.json.
    """
    from maskrcnn.data import CocoDataset, build_transforms  # noqa: PLC0415
    from maskrcnn.data.coco import DatasetError  # noqa: PLC0415
    from maskrcnn.engine.evaluator import Evaluator, iou_types_for  # noqa: PLC0415
    from maskrcnn.engine.trainer import Trainer, seed_all  # noqa: PLC0415
    from maskrcnn.modeling.mask_rcnn import MaskRCNN  # noqa: PLC0415

    for path, what in ((data, "training annotations"), (images, "training image folder"),
                       (val_data, "validation annotations"), (val_images, "validation image folder")):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{path}: {what} not found")
    out_dir = Path(out_dir)
    _prepare_run_dir(out_dir, resume, overwrite)
    train_ds = CocoDataset(data, images, filter_empty=cfg.train.filter_empty, seed=cfg.train.seed,
                           allow_outside_images=allow_outside_images, **dataset_options(cfg))
    if len(train_ds) == 0:
        raise DatasetError(f"{data}: no training images with usable annotations")
    cfg = with_dataset_classes(cfg, train_ds)
    # After the classes: a keypoint flip needs the dataset's keypoint names.
    train_ds.transforms = build_transforms(cfg, train=True)
    # The initial weights are drawn from the global RNG: seeded here, the same seed gives the same run. Every
    # rank draws the same weights (DDP would broadcast rank 0's anyway).
    seed_all(cfg.train.seed)
    model = MaskRCNN(cfg)
    if init_weights is not None:
        init_from(model, init_weights)

    eval_fn = None
    last: dict[str, Any] = {}
    if val_data is not None:
        # The validation labels must mean what the training labels mean.
        val_ds = CocoDataset(val_data, val_images or images, filter_empty=False, category_ids=train_ds.category_ids,
                             masks=cfg.model.mask_head.enabled, allow_outside_images=allow_outside_images)
        # The same images with targets at the test-time size, for the validation losses.
        loss_ds = CocoDataset(val_data, val_images or images, transforms=build_transforms(cfg, train=False),
                              filter_empty=cfg.train.filter_empty, category_ids=train_ds.category_ids,
                              allow_outside_images=allow_outside_images, **dataset_options(cfg))

        def eval_fn(m: Any, iteration: int) -> dict[str, Any]:
            """Validation losses and COCO AP, flattened for metrics.jsonl; also writes out_dir/eval/."""
            losses = validation_losses(m, loss_ds) if len(loss_ds) else {}
            m.eval()
            ev = Evaluator.from_dataset(val_ds, progress=False, out_dir=out_dir / "eval",
                                        iou_types=iou_types_for(cfg.model),
                                        kpt_oks_sigmas=cfg.model.keypoint_head.oks_sigmas)
            last["metrics"] = ev.evaluate(m)
            return {**losses, **flat_metrics(last["metrics"])}

    from maskrcnn.weights.native import save_model  # noqa: PLC0415

    trainer = Trainer(model, cfg, train_ds, out_dir, eval_fn=eval_fn, save_model=save_model)
    result = trainer.train(resume=resume)
    if trainer.rank != 0:
        return trainer.model, last.get("metrics")
    losses = result.get("losses") or {}
    logger.info("finished at iteration %d, total_loss %s; model saved to %s", result.get("iteration", 0),
                f"{losses['total_loss']:.4f}" if "total_loss" in losses else "-", out_dir / "model_final")
    return trainer.model, last.get("metrics")


def apply_model_overrides(model: Any, overrides: Sequence[str]) -> Any:
    """``model`` rebuilt with config overrides (test-time keys); its weights are kept."""
    from maskrcnn.config import ConfigError, apply_overrides  # noqa: PLC0415
    from maskrcnn.modeling.mask_rcnn import MaskRCNN  # noqa: PLC0415

    if not overrides:
        return model
    cfg = apply_overrides(model.cfg, list(overrides))
    new = MaskRCNN(cfg)
    try:
        new.load_state_dict(model.state_dict())
    except RuntimeError as e:
        raise ConfigError(f"the overrides {' '.join(overrides)} change the network's shape, so the checkpoint "
                          f"no longer fits: {str(e).splitlines()[0]}") from e
    return new.to(model.device).eval()


def label_category_ids(model: Any, dataset: Any) -> list[int]:
    """Dataset category id of each model label: the model's own table, else positional, else identity."""
    m = model.cfg.model
    if m.category_ids:
        return [int(c) for c in m.category_ids]
    if int(m.num_classes) == dataset.num_classes:
        return [int(c) for c in dataset.category_ids]
    # e.g. torchvision's COCO checkpoints: 90 classes whose label is the COCO category id.
    return list(range(1, int(m.num_classes) + 1))


def evaluate_run(model: Any, data: str | Path, images: str | Path, out_dir: str | Path, batch_size: int = 1,
                progress: bool | None = None, allow_outside_images: bool = False,
                max_pixels: int | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on a COCO dataset; writes out_dir/metrics.json and results.json; returns the metrics.

    ``progress`` None shows a bar only when stderr is a terminal. ``max_pixels`` refuses, before any work, a
    dataset with an image of more pixels (height x width, as the JSON gives them).
    """
    from maskrcnn.data import CocoDataset  # noqa: PLC0415
    from maskrcnn.engine.evaluator import Evaluator, iou_types_for  # noqa: PLC0415

    for path, what in ((data, "annotations"), (images, "image folder")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: {what} not found")
    from maskrcnn.atomic import remove_stale_temp  # noqa: PLC0415

    remove_stale_temp(out_dir)  # left by an evaluation killed while writing its JSON
    # Read before the model is touched: --max-pixels refuses a dataset before any work.
    mask_head = getattr(getattr(getattr(model, "cfg", None), "model", None), "mask_head", None)
    dataset = CocoDataset(data, images, filter_empty=False, masks=True if mask_head is None else mask_head.enabled,
                          allow_outside_images=allow_outside_images)
    if max_pixels is not None:
        big = [dataset.get_image_info(i) for i in range(len(dataset))]
        big = [im for im in big if int(im["width"]) * int(im["height"]) > max_pixels]
        if big:
            from maskrcnn.data.coco import DatasetError  # noqa: PLC0415

            listed = ", ".join(f"id {im['id']} ({im['file_name']}, {im['width']}x{im['height']})" for im in big[:3])
            raise DatasetError(f"{data}: {len(big)} images have more than --max-pixels {max_pixels} pixels: "
                               f"{listed}{' ...' if len(big) > 3 else ''}; raise the limit or leave them out")
    if progress is None:
        progress = sys.stderr.isatty()  # a bar redrawn into a log file is noise
    m = model.cfg.model
    ev = Evaluator.from_dataset(dataset, category_ids=label_category_ids(model, dataset), batch_size=batch_size,
                                progress=progress, out_dir=out_dir, iou_types=iou_types_for(m),
                                kpt_oks_sigmas=m.keypoint_head.oks_sigmas)
    return ev.evaluate(model)
