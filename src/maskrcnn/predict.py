"""Predictor: image files, folders and globs -> overlay pictures, mask PNGs and one COCO results JSON.

``Predictor(model).run(["photos/", "more/*.jpg"], "out/")`` writes

- ``out/<stem>.png``: the image with masks, boxes and labels drawn on it;
- ``out/masks/<stem>_<i>_<class>.png``: one 1-bit PNG per instance (with ``save_masks``);
- ``out/predictions.json`` (or ``json_path``): a COCO *results* list that ``pycocotools`` ``COCO.loadRes`` reads:
  ``image_id``, ``file_name``, ``category_id``, ``category_name``, ``bbox`` (XYWH pixels), ``score`` and
  ``segmentation`` (RLE with str counts);
- ``out/images.json``: ``{"images": [{"id", "file_name", "width", "height", "overlay"}], "categories": [...]}``,
  which joins ``image_id`` to the file and is itself a ground-truth skeleton for ``COCO`` + ``loadRes``.

A file that cannot be read (missing, empty, not an image, a decompression bomb) is reported on stderr with one
line naming it and skipped; the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskrcnn.engine.evaluator import results_to_coco
from maskrcnn.io import ImageReadError, list_images, prefetch, read_image
from maskrcnn.structures import Result

__all__ = ["PredictSummary", "Predictor", "expand_sources", "model_class_names"]

IMAGES_JSON = "images.json"
PREDICTIONS_JSON = "predictions.json"
MASKS_DIR = "masks"
# torch.cuda.OutOfMemoryError is also what torch>=2.5 exposes as torch.OutOfMemoryError.
_OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)


@dataclass
class PredictSummary:
    """What a :meth:`Predictor.run` did: counts, timing and where the outputs are."""

    images: int
    skipped: int
    detections: int
    seconds: float
    out_dir: Path
    json_path: Path
    images_json: Path
    # (source or file, problem) of every skipped entry, in the order they were met.
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Processed images per second of wall time (0 when nothing was processed)."""
        return self.images / self.seconds if self.seconds > 0 and self.images else 0.0

    def format(self) -> str:
        """Short human-readable report, as the CLI prints it."""
        return (f"{self.images} images, {self.skipped} skipped, {self.detections} detections in "
                f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s)\n"
                f"overlays: {self.out_dir}\nresults:  {self.json_path}\nimages:   {self.images_json}")


def model_class_names(model: Any) -> list[str]:
    """The K foreground class names of ``model`` as results report them (``class_<label>`` where unnamed)."""
    m = model.cfg.model
    names = list(m.class_names)
    return [names[i] if i < len(names) else f"class_{i + 1}" for i in range(int(m.num_classes))]


def _model_category_ids(model: Any) -> list[int]:
    """Dataset category id of each contiguous label 1..K (the label itself when the model has no table)."""
    m = model.cfg.model
    ids = list(m.category_ids)
    return [int(ids[i]) if i < len(ids) else i + 1 for i in range(int(m.num_classes))]


def expand_sources(sources: Sequence[str | Path], recursive: bool = False
                   ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image paths named by files, folders and globs (unique, in order), and (source, problem) for bad sources."""
    paths: list[Path] = []
    seen: set[Path] = set()
    problems: list[tuple[str, str]] = []
    for source in sources:
        try:
            found = list_images([source], recursive=recursive)
        except FileNotFoundError:
            problems.append((str(source), "no such file or folder"))
            continue
        except OSError as e:  # an unreadable folder must not end the run either
            problems.append((str(source), f"cannot list ({e.strerror or e})"))
            continue
        if not found:
            what = "folder" if Path(source).is_dir() else "pattern"
            hint = "" if recursive or what == "pattern" else " (use recursive to search sub-folders)"
            problems.append((str(source), f"{what} holds no image files{hint}"))
            continue
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    return paths, problems


class Predictor:
    """Runs a :class:`~maskrcnn.MaskRCNN` over image files and writes overlays, masks and COCO results."""

    def __init__(self, model: Any, score_threshold: float | None = None, classes: str | Sequence[str] | None = None,
                 batch_size: int = 1, save_masks: bool = False, progress: bool = True) -> None:
        """``classes``: names to keep (a list or "a,b"); ``score_threshold`` None keeps the model's own."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if score_threshold is not None and not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.model = model
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self.batch_size = int(batch_size)
        self.save_masks = bool(save_masks)
        self.progress = bool(progress)
        self.class_names = model_class_names(model)
        self.category_ids = _model_category_ids(model)
        self.keep_labels = self._parse_classes(classes)

    def _parse_classes(self, classes: str | Sequence[str] | None) -> set[int] | None:
        """Contiguous labels of the named classes, or None for all; unknown names raise ValueError."""
        if classes is None:
            return None
        items = classes.split(",") if isinstance(classes, str) else list(classes)
        wanted = [str(c).strip() for c in items if str(c).strip()]
        if not wanted:
            return None
        index = {n: i + 1 for i, n in enumerate(self.class_names)}
        unknown = [c for c in wanted if c not in index]
        if unknown:
            raise ValueError(f"unknown class name(s) {', '.join(repr(c) for c in unknown)}; this model's classes "
                             f"are: {', '.join(self.class_names)}")
        return {index[c] for c in wanted}

    # -- running --------------------------------------------------------------------------------------

    def predict_image(self, image: np.ndarray, path: str | None = None) -> Result:
        """Detections for one (H, W, 3) uint8 RGB image, after the score and class filters."""
        return self._predict_batch([image], [path])[0]

    def _predict_batch(self, images: list[np.ndarray], paths: list[str | None]) -> list[Result]:
        results = self.model.predict(images, score_threshold=self.score_threshold, batch_size=len(images))
        out = []
        for res, path in zip(results, paths):
            if self.keep_labels is not None:
                keep = torch.tensor([int(lab) in self.keep_labels for lab in res.labels.tolist()], dtype=torch.bool)
                res = res.filter(keep.to(res.labels.device))
            out.append(dataclasses.replace(res, image_path=path))
        return out

    def run(self, sources: Sequence[str | Path], out_dir: str | Path, json_path: str | Path | None = None,
            recursive: bool = False) -> PredictSummary:
        """Predict every image named by ``sources`` and write the outputs under ``out_dir``; see the module doc."""
        t0 = time.perf_counter()
        out_dir = Path(out_dir)
        json_path = Path(json_path) if json_path is not None else out_dir / PREDICTIONS_JSON
        paths, problems = expand_sources(sources, recursive)
        for src, why in problems:
            self._report(src, why, None)
        stems = self._overlay_stems(paths, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path.parent.mkdir(parents=True, exist_ok=True)

        records: list[dict[str, Any]] = []
        image_infos: list[dict[str, Any]] = []
        bar = self._open_bar(len(paths))
        try:
            # Decoding the next batch overlaps the model's work on this one.
            for batch in prefetch(self._read_batches(paths, problems, bar)):
                arrays = [a for _, a in batch]
                names = [str(p) for p, _ in batch]
                try:
                    results = self._predict_batch(arrays, names)
                except _OUT_OF_MEMORY as e:
                    # One oversized batch must not end a long run; its images are reported like unreadable ones.
                    for p, _ in batch:
                        problems.append((str(p), f"out of memory while predicting ({type(e).__name__})"))
                        self._report(str(p), problems[-1][1], bar)
                    if bar is not None:
                        bar.update(len(batch))
                    continue
                for (path, array), res in zip(batch, results):
                    image_id = len(image_infos) + 1
                    stem = stems[path]
                    overlay = res.save(out_dir / f"{stem}.png", image=array)
                    info: dict[str, Any] = {"id": image_id, "file_name": str(path), "width": int(array.shape[1]),
                                            "height": int(array.shape[0]), "overlay": str(overlay),
                                            "num_detections": len(res)}
                    if self.save_masks:
                        info["masks"] = [str(m) for m in self._save_masks(res, out_dir / MASKS_DIR, stem)]
                    image_infos.append(info)
                    for rec in results_to_coco(res, image_id, self.category_ids):
                        rec["file_name"] = str(path)
                        records.append(rec)
                    if bar is not None:
                        bar.update(1)
                del arrays, results  # full-size masks go as soon as they are written
        finally:
            if bar is not None:
                bar.close()

        with json_path.open("w") as f:
            json.dump(records, f)
        images_json = out_dir / IMAGES_JSON
        categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
        images_json.write_text(json.dumps({"images": image_infos, "categories": categories}, indent=1))
        return PredictSummary(images=len(image_infos), skipped=len(problems), detections=len(records),
                              seconds=time.perf_counter() - t0, out_dir=out_dir, json_path=json_path,
                              images_json=images_json, problems=problems)

    def _read_batches(self, paths: list[Path], problems: list[tuple[str, str]], bar: Any
                      ) -> Iterator[list[tuple[Path, np.ndarray]]]:
        """Decoded images in batches of ``batch_size``; unreadable files are reported, counted and left out."""
        batch: list[tuple[Path, np.ndarray]] = []
        for path in paths:
            try:
                array = read_image(path)
            except ImageReadError as e:
                problems.append((str(path), _problem_text(str(e), path)))
                self._report(str(path), problems[-1][1], bar)
                if bar is not None:
                    bar.update(1)
                continue
            except MemoryError:
                problems.append((str(path), "image too large to decode in memory"))
                self._report(str(path), problems[-1][1], bar)
                if bar is not None:
                    bar.update(1)
                continue
            batch.append((path, array))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    @staticmethod
    def _save_masks(res: Result, folder: Path, stem: str) -> list[Path]:
        from maskrcnn.visualize import save_mask_pngs  # noqa: PLC0415 - drawing only when masks are wanted

        if res.masks is None:
            return []
        return save_mask_pngs(res, folder, stem)

    @staticmethod
    def _overlay_stems(paths: list[Path], out_dir: Path) -> dict[Path, str]:
        """A distinct overlay name per image (``a/x.jpg`` and ``b/x.png`` both have stem ``x``)."""
        stems: dict[Path, str] = {}
        used: set[str] = set()
        for p in paths:
            stem = p.stem
            k = 1
            while stem.lower() in used:  # case-insensitive file systems would merge "A" and "a"
                stem = f"{p.stem}_{k}"
                k += 1
            used.add(stem.lower())
            stems[p] = stem
            target = out_dir / f"{stem}.png"
            if target.exists() and target.resolve() == p.resolve():
                raise ValueError(f"{p}: its overlay would overwrite the input image itself; choose an output "
                                 f"folder other than {out_dir}")
        return stems

    def _open_bar(self, total: int) -> Any:
        if not self.progress:
            return None
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415 - optional dependency
        except ImportError:
            return None
        # disable=None: no bar when stderr is not a terminal (logs stay clean).
        return tqdm(total=total, desc="predict", unit="img", file=sys.stderr, disable=None)

    @staticmethod
    def _report(source: str, problem: str, bar: Any) -> None:
        line = f"skipped {source}: {problem}"
        if bar is not None and not getattr(bar, "disable", True):
            bar.write(line, file=sys.stderr)  # keeps the bar from being torn by the message
        else:
            print(line, file=sys.stderr, flush=True)


def _problem_text(message: str, path: Path) -> str:
    """An ImageReadError's message without the leading path, which the report line already names."""
    prefix = f"{path}: "
    text = message[len(prefix):] if message.startswith(prefix) else message
    return " ".join(text.split())  # one line, whatever the decoder's message held
