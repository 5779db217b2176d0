"""COCO evaluation through pycocotools: streaming results writer, metrics, text tables and a model evaluator.

Metrics are fractions in [0, 1]. pycocotools reports -1 for a metric the ground truth leaves undefined (APl when
there is no large object, a class with no instance); those come back as ``float('nan')`` here, and as ``null`` in
``metrics.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.atomic import atomic_write_json
from maskrcnn.engine import dist as du
from maskrcnn.io import prefetch, read_image
from maskrcnn.structures import Result, results_to_coco

__all__ = [
    "METRIC_NAMES",
    "KEYPOINT_METRIC_NAMES",
    "iou_types_for",
    "results_to_coco",
    "CocoResultWriter",
    "evaluate_coco",
    "format_metrics_table",
    "format_per_class_table",
    "Evaluator",
    "evaluate_model",
]

# The first six numbers of COCOeval.stats, in order.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The first five of COCOeval.stats for keypoints (OKS): COCO's keypoint AP has no small-object bucket.
KEYPOINT_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APm", "APl")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm", "keypoints")


def iou_types_for(model_cfg: Any) -> tuple[str, ...]:
    """The COCO metrics a model config can be scored on: bbox, plus segm with a mask head, keypoints with a
    keypoint head."""
    types = ["bbox"]
    if model_cfg.mask_head.enabled:
        types.append("segm")
    if model_cfg.keypoint_head.enabled:
        types.append("keypoints")
    return tuple(types)



class CocoResultWriter:
    """Accumulates COCO results as images are evaluated, keeping only compact RLE records (never full masks).

    ``add`` encodes a ``Result`` (or takes ready records) straight away, so memory grows with the number of
    detections times their RLE length, not with image size. ``write`` produces the standard results JSON read by
    ``COCO.loadRes``.
    """

    def __init__(self, category_ids: Sequence[int] | None = None, keep_names: bool = False) -> None:
        """``category_ids``: label i -> dataset id ``category_ids[i - 1]``; ``keep_names`` keeps "category_name"."""
        self.category_ids = None if category_ids is None else tuple(int(c) for c in category_ids)
        self.keep_names = keep_names
        self.records: list[dict[str, Any]] = []
        self.image_ids: list[int] = []

    def __len__(self) -> int:
        """Number of detection records held."""
        return len(self.records)

    def add(self, result: Result, image_id: int) -> int:
        """Encode one image's detections and keep their records; returns how many were added."""
        recs = results_to_coco(result, image_id, self.category_ids)
        return self.add_records(recs, image_id)

    def add_records(self, records: Iterable[dict[str, Any]], image_id: int | None = None) -> int:
        """Keep ready COCO results records (copied); ``image_id`` marks an image as evaluated even with none."""
        n0 = len(self.records)
        for rec in records:
            rec = dict(rec)
            if not self.keep_names:
                rec.pop("category_name", None)
            self.records.append(rec)
        if image_id is not None:
            self.image_ids.append(int(image_id))
        return len(self.records) - n0

    def write(self, path: str | Path) -> Path:
        """Write the records as a COCO results JSON list to ``path``; returns the path."""
        return atomic_write_json(path, self.records, default=_json_default)


def _json_default(obj: Any) -> Any:
    """JSON encoding of numpy / torch scalars and arrays that can sneak into records."""
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Swallow pycocotools' prints unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _nan_if_undefined(x: float) -> float:
    """pycocotools' -1 ("undefined") as nan; anything else as a float."""
    x = float(x)
    return float("nan") if x < 0 else x


def _category_names(coco_gt: COCO, cat_ids: Sequence[int],
                    class_names: Sequence[str] | Mapping[int, str] | None) -> list[str]:
    """Display name of each category id: from ``class_names`` (list aligned with ``cat_ids``, or id -> name)."""
    if class_names is None:
        return [str(coco_gt.cats.get(c, {}).get("name", c)) for c in cat_ids]
    if isinstance(class_names, Mapping):
        return [str(class_names.get(c, coco_gt.cats.get(c, {}).get("name", c))) for c in cat_ids]
    if len(class_names) != len(cat_ids):
        raise ValueError(f"{len(class_names)} class names for {len(cat_ids)} categories")
    return [str(n) for n in class_names]


def _empty_detections(coco_gt: COCO) -> COCO:
    """A detections COCO with no annotations (``loadRes`` asserts on an empty list)."""
    dt = COCO()
    dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                  "categories": list(coco_gt.dataset.get("categories", [])), "annotations": []}
    with _quiet(False):
        dt.createIndex()
    return dt


def evaluate_coco(
    coco_gt: COCO,
    results: Sequence[dict[str, Any]] | str | Path,
    iou_types: Sequence[str] = ("bbox", "segm"),
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
    verbose: bool = False,
    kpt_oks_sigmas: Sequence[float] | None = None,
) -> dict[str, Any]:
    """COCO AP of ``results`` (records or a results JSON path) against ``coco_gt``; fractions in [0, 1].

    Returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "per_class": {iou_type: {name: AP}}}``
    ("keypoints", the OKS AP, has no "APs"). Undefined metrics (pycocotools' -1) are nan. An empty result list
    scores 0.0 wherever the ground truth has objects. "segm" is skipped when no record has a ``segmentation``,
    "keypoints" when no record has ``keypoints``. ``image_ids`` restricts evaluation to those images (needed when
    only a subset was predicted, or the others would count as misses); ``category_ids`` to those categories (a
    model trained on a subset of classes). ``kpt_oks_sigmas`` (one per keypoint) replace pycocotools' COCO person
    sigmas, which fit 17 keypoints only.
    """
    if isinstance(results, (str, Path)):
        with open(results) as f:
            results = json.load(f)
    results = list(results)
    known = set(coco_gt.getImgIds())
    stray = {int(r["image_id"]) for r in results} - known
    if stray:
        raise ValueError(f"results name {len(stray)} image ids absent from the ground truth, e.g. {min(stray)}")
    cat_ids = sorted(coco_gt.getCatIds()) if category_ids is None else sorted({int(c) for c in category_ids})
    names = _category_names(coco_gt, cat_ids, class_names)
    metrics: dict[str, Any] = {}
    per_class: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unsupported iou type {iou_type!r} ({', '.join(IOU_TYPES)})")
        if iou_type == "segm" and results and not all("segmentation" in r for r in results):
            # loadRes would fill in box-shaped polygons and report box AP as mask AP.
            continue
        if iou_type == "keypoints":
            if results and not all("keypoints" in r for r in results):
                continue
            sigmas = _oks_sigmas(coco_gt, cat_ids, kpt_oks_sigmas)
        dets = []
        for r in results:
            d = dict(r)  # loadRes writes area/id/iscrowd into the records: keep the caller's intact
            if iou_type == "segm":
                # With a bbox present loadRes takes the box area as the instance area, which would put objects in
                # the wrong small/medium/large bucket for mask AP (detectron2 does the same).
                d.pop("bbox", None)
            dets.append(d)
        with _quiet(verbose):
            coco_dt = coco_gt.loadRes(dets) if dets else _empty_detections(coco_gt)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if iou_type == "keypoints" and sigmas is not None:
                ev.params.kpt_oks_sigmas = sigmas
            if image_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.params.catIds = list(cat_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stat_names = KEYPOINT_METRIC_NAMES if iou_type == "keypoints" else METRIC_NAMES
        metrics[iou_type] = {k: _nan_if_undefined(v) for k, v in zip(stat_names, ev.stats[:len(stat_names)])}
        per_class[iou_type] = _per_class_ap(ev, cat_ids, names)
    metrics["per_class"] = per_class
    return metrics


def _oks_sigmas(coco_gt: COCO, cat_ids: Sequence[int], sigmas: Sequence[float] | None) -> np.ndarray | None:
    """The OKS sigmas to score keypoints with (None: pycocotools' own); a clear error when they cannot fit."""
    anns = [a for a in coco_gt.dataset.get("annotations", []) if int(a["category_id"]) in set(cat_ids)]
    with_kps = [a for a in anns if a.get("keypoints")]
    if not with_kps:
        raise ValueError("keypoint AP needs ground truth with 'keypoints' (a COCO person_keypoints_*.json file); "
                         "this annotation file has none")
    k = len(with_kps[0]["keypoints"]) // 3
    if sigmas:
        if len(sigmas) != k:
            raise ValueError(f"{len(sigmas)} OKS sigmas (model.keypoint_head.oks_sigmas) for {k} keypoints")
        return np.asarray(sigmas, dtype=np.float64)
    if k != 17:
        raise ValueError(f"the ground truth has {k} keypoints per instance; pycocotools' OKS sigmas are COCO's 17 "
                         f"person keypoints': set model.keypoint_head.oks_sigmas (one per keypoint)")
    return None


def _per_class_ap(ev: COCOeval, cat_ids: Sequence[int], names: Sequence[str]) -> dict[str, float]:
    """AP over IoU 0.50:0.95 of each category (area "all", 100 detections), nan where it has no ground truth."""
    precision = ev.eval["precision"]  # (T iou thresholds, R recall points, K classes, A areas, M max dets)
    order = {c: k for k, c in enumerate(ev.params.catIds)}
    out: dict[str, float] = {}
    for cat, name in zip(cat_ids, names):
        p = precision[:, :, order[cat], 0, -1]
        p = p[p > -1]
        out[name] = float(p.mean()) if p.size else float("nan")
    return out


def _pct(x: Any) -> str:
    """A fraction as a percentage with one decimal, "-" when undefined."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100.0 * float(x):.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    """Plain-text table: columns in ``left`` left-aligned (names), the others right-aligned (numbers)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        cells = [str(c).ljust(widths[i]) if i in left else str(c).rjust(widths[i]) for i, c in enumerate(r)]
        return " | ".join(cells).rstrip()

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Text table of AP, AP50, AP75, APs, APm, APl (percent, one decimal; "-" = undefined) for each IoU type."""
    rows = [[t, *(_pct(metrics[t].get(k)) for k in METRIC_NAMES)]
            for t in IOU_TYPES if isinstance(metrics.get(t), Mapping)]
    return _table(["type", *METRIC_NAMES], rows)


def format_per_class_table(metrics: Mapping[str, Any], columns: int = 2) -> str:
    """Text table of per-class AP (percent; "-" = class has no ground truth), ``columns`` classes per row.

    ``metrics`` is ``evaluate_coco``'s output (its "per_class" entry is used) or that entry itself.
    """
    per_class = metrics.get("per_class", metrics)
    types = [t for t in IOU_TYPES if t in per_class]
    if not types:
        return ""
    names = list(per_class[types[0]].keys())
    cells = [[n, *(_pct(per_class[t].get(n)) for t in types)] for n in names]
    columns = max(1, int(columns))
    header: list[str] = []
    for _ in range(min(columns, max(len(cells), 1))):
        header += ["category", *(f"{t} AP" for t in types)]
    rows = []
    for start in range(0, len(cells), columns):
        row: list[str] = []
        for c in cells[start:start + columns]:
            row += c
        row += [""] * (len(header) - len(row))
        rows.append(row)
    return _table(header, rows, left=[i for i, h in enumerate(header) if h == "category"])


class _Predicts(Protocol):
    def predict(self, images: list[Any], score_threshold: float | None = None, batch_size: int = 1
                ) -> list[Result]: ...


def _progress(iterable: Iterable[Any], total: int, enabled: bool, desc: str) -> Iterable[Any]:
    """``tqdm`` progress bar over ``iterable`` when enabled and installed, else the iterable itself."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415 - optional dependency
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="img")


def _batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive chunks of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _json_metrics(obj: Any) -> Any:
    """Metrics with nan as None, since strict JSON has no NaN."""
    if isinstance(obj, Mapping):
        return {k: _json_metrics(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


class Evaluator:
    """Runs a model over COCO-annotated images and scores it with pycocotools.

    The model needs only ``predict(list_of_images, score_threshold=None) -> list[Result]``; it is given (3, H, W)
    uint8 RGB tensors. Its contiguous label i is reported as dataset category ``category_ids[i - 1]`` (default:
    the explicit argument, else the Result's own table, else the ground truth's sorted category ids).

    Distributed: when a process group is initialised (and ``distributed``), every rank predicts batches
    ``rank, rank + world_size, ...`` of the single-process batching, rank 0 gathers the records back into
    single-process order and computes the metrics once, and every rank returns them. Each image thus goes through
    the same batch as in one process, so the metrics are identical to single-process evaluation. Only rank 0
    shows progress and writes files.
    """

    def __init__(
        self,
        coco_gt: COCO,
        image_dir: str | Path,
        image_ids: Sequence[int] | None = None,
        category_ids: Sequence[int] | None = None,
        iou_types: Sequence[str] = ("bbox", "segm"),
        class_names: Sequence[str] | Mapping[int, str] | None = None,
        batch_size: int = 1,
        score_threshold: float | None = None,
        progress: bool = True,
        out_dir: str | Path | None = None,
        verbose: bool = False,
        distributed: bool = True,
        kpt_oks_sigmas: Sequence[float] | None = None,
    ) -> None:
        """Evaluate on ``image_ids`` (default: all of ``coco_gt``) read from ``image_dir``/file_name.

        ``iou_types`` may add "keypoints" (OKS AP, with ``kpt_oks_sigmas`` or COCO's person sigmas).
        """
        self.coco_gt = coco_gt
        self.image_dir = Path(image_dir)
        self.image_ids = [int(i) for i in (image_ids if image_ids is not None else sorted(coco_gt.getImgIds()))]
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        self.iou_types = tuple(iou_types)
        self.class_names = class_names
        self.batch_size = max(1, int(batch_size))
        self.score_threshold = score_threshold
        self.progress = progress
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.verbose = verbose
        self.distributed = distributed
        self.kpt_oks_sigmas = None if not kpt_oks_sigmas else [float(x) for x in kpt_oks_sigmas]

    @classmethod
    def from_dataset(cls, dataset: Any, **kwargs: Any) -> Evaluator:
        """Evaluator for a dataset exposing ``coco`` and ``image_dir`` (or ``root``), e.g. ``data.coco.CocoDataset``.

        Its ``category_ids`` / ``class_names`` give the label mapping and names. Images default to every image of
        ``dataset.coco``, not the dataset's training list: images without objects still count false positives.
        ``kwargs`` override any of these.
        """
        kw: dict[str, Any] = {}
        for a in ("image_dir", "img_dir", "root"):
            if getattr(dataset, a, None) is not None:
                kw["image_dir"] = getattr(dataset, a)
                break
        cat_ids = getattr(dataset, "category_ids", None)
        if cat_ids is not None:
            kw["category_ids"] = list(cat_ids)
            names = getattr(dataset, "class_names", None)
            if names is not None and len(names) == len(cat_ids):
                kw["class_names"] = dict(zip((int(c) for c in cat_ids), names))
        kw.update(kwargs)
        if "image_dir" not in kw:
            raise ValueError("the dataset exposes no image_dir/root: pass image_dir=...")
        return cls(dataset.coco, **kw)

    def image_path(self, image_id: int) -> Path:
        """File of ``image_id``: ``image_dir`` / its ``file_name`` in the ground truth."""
        return self.image_dir / self.coco_gt.imgs[int(image_id)]["file_name"]

    def _category_ids_for(self, result: Result) -> Sequence[int]:
        """The label -> dataset category id table to apply to ``result``."""
        if self.category_ids is not None:
            return self.category_ids
        if result.category_ids_table:
            return result.category_ids_table
        return sorted(self.coco_gt.getCatIds())

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world size) this evaluator shards over; (0, 1) when not distributed."""
        return (du.get_rank(), du.get_world_size()) if self.distributed else (0, 1)

    def run(self, model: _Predicts) -> CocoResultWriter:
        """Predict every image and return the writer holding their RLE-encoded records.

        Distributed, rank 0's writer holds every image's records in single-process order, and each other rank's
        only those of its own shard.
        """
        if not hasattr(model, "predict"):
            from maskrcnn.predict import Predictor  # noqa: PLC0415 - the facade builds Results from the model's dicts

            model = Predictor(model)
        rank, world = self._rank_world()
        # Whole batches are dealt out, so an image is padded together with the same images as in one process.
        mine = [(k, ids) for k, ids in enumerate(_batches(self.image_ids, self.batch_size)) if k % world == rank]
        shard: list[tuple[int, list[tuple[int, list[dict[str, Any]]]]]] = []
        def read(batches: list[tuple[int, list[int]]]) -> Iterator[tuple[int, list[int], list[torch.Tensor]]]:
            for k, ids in batches:
                yield k, ids, [torch.from_numpy(np.ascontiguousarray(read_image(self.image_path(i)))
                                                ).permute(2, 0, 1) for i in ids]

        # Decoding the next batch overlaps the model's work on this one.
        for k, ids, images in _progress(prefetch(read(mine)), len(mine), self.progress and rank == 0, "eval"):
            with torch.no_grad():
                preds = model.predict(images, score_threshold=self.score_threshold, batch_size=len(images))
            if len(preds) != len(ids):
                raise RuntimeError(f"model returned {len(preds)} results for {len(ids)} images")
            shard.append((k, [(image_id, results_to_coco(res, image_id, self._category_ids_for(res)))
                              for image_id, res in zip(ids, preds)]))
            del images, preds  # full-image masks go as soon as they are encoded
        if world > 1:
            gathered = du.gather_object(shard, dst=0)
            if gathered is not None:
                shard = sorted((item for part in gathered for item in part), key=lambda kv: kv[0])
        writer = CocoResultWriter()
        for _, per_image in shard:
            for image_id, records in per_image:
                writer.add_records(records, image_id)
        return writer

    def evaluate(self, model: _Predicts) -> dict[str, Any]:
        """Predict, score and (with ``out_dir``) write results.json and metrics.json; returns the metrics dict."""
        t0 = time.perf_counter()
        writer = self.run(model)
        seconds = time.perf_counter() - t0
        rank, world = self._rank_world()
        if rank != 0:
            # The metrics are computed once, on rank 0; the others wait for them (or for its error) here.
            status, payload = du.broadcast_object(None)
            if status == "error":
                raise RuntimeError(f"COCO evaluation failed on rank 0: {payload}")
            return payload
        try:
            metrics = evaluate_coco(self.coco_gt, writer.records, self.iou_types, self.class_names,
                                    image_ids=self.image_ids, category_ids=self.category_ids, verbose=self.verbose,
                                    kpt_oks_sigmas=self.kpt_oks_sigmas)
        except Exception as e:
            if world > 1:
                du.broadcast_object(("error", f"{type(e).__name__}: {e}"))
            raise
        if world > 1:
            du.broadcast_object(("ok", metrics))
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            writer.write(self.out_dir / "results.json")
            info = {"num_images": len(self.image_ids), "num_detections": len(writer), "predict_seconds": seconds}
            atomic_write_json(self.out_dir / "metrics.json", {**_json_metrics(metrics), "info": info}, indent=2)
        return metrics

    __call__ = evaluate


def evaluate_model(
    model: _Predicts,
    coco_gt: COCO,
    image_dir: str | Path,
    image_ids: Sequence[int] | None = None,
    batch_size: int = 1,
    progress: bool = True,
    category_ids: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    iou_types: Sequence[str] = ("bbox", "segm"),
    score_threshold: float | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """One-call ``Evaluator(...).evaluate(model)``: COCO metrics dict (fractions in [0, 1], nan = undefined)."""
    return Evaluator(coco_gt, image_dir, image_ids=image_ids, category_ids=category_ids, iou_types=iou_types,
                     batch_size=batch_size, score_threshold=score_threshold, progress=progress, out_dir=out_dir,
                     verbose=verbose).evaluate(model)
