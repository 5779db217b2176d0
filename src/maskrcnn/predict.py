"""The Predictor, the library's facade: paths, arrays and folders in; Results, overlays and COCO JSON out.

``maskrcnn.load_model(...)`` returns a Predictor; ``Predictor(model)`` wraps any :class:`~maskrcnn.MaskRCNN`.
``predictor.predict(images)`` gives one :class:`~maskrcnn.Result` per image, and
``predictor.run(["photos/", "more/*.jpg"], "out/")`` writes

- ``out/<stem>.png``: the image with masks, boxes and labels drawn on it;
- ``out/masks/<stem>_<i>_<class>.png``: one 1-bit PNG per instance (with ``save_masks``);
- ``out/predictions.json`` (or ``json_path``): a COCO *results* list that ``pycocotools`` ``COCO.loadRes`` reads:
  ``image_id``, ``file_name``, ``category_id``, ``category_name``, ``bbox`` (XYWH pixels), ``score`` and
  ``segmentation`` (RLE with str counts);
- ``out/images.json``: ``{"images": [{"id", "file_name", "width", "height", "overlay"}], "categories": [...]}``,
  which joins ``image_id`` to the file and is itself a ground-truth skeleton for ``COCO`` + ``loadRes``.

A file that cannot be read (missing, empty, not an image, a decompression bomb) is reported on stderr with one
line naming it and skipped; the run goes on. Records stream to ``predictions.json.partial.jsonl`` as each image
finishes; both JSON files are written atomically at the end, and also when the run is interrupted (Ctrl-C), then
with the finished images only and ``"complete": false`` in ``images.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from maskrcnn.atomic import atomic_write, atomic_write_json, remove_stale_temp
from maskrcnn.io import ImageReadError, list_images, prefetch, read_image, read_image_size, to_chw_tensor
from maskrcnn.modeling.timing import stage
from maskrcnn.structures import Result, results_to_coco

__all__ = ["ImageInput", "ImageTooLargeError", "PredictSummary", "Predictor", "expand_sources",
           "model_class_names"]

# What ``Predictor.predict`` accepts for one image: a path, or an HWC/CHW uint8/float RGB array or tensor.
ImageInput = Union[str, Path, np.ndarray, torch.Tensor]

IMAGES_JSON = "images.json"
PREDICTIONS_JSON = "predictions.json"
# predictions.json + this: the JSON Lines file the records stream to while a run goes on.
PARTIAL_SUFFIX = ".partial.jsonl"
MASKS_DIR = "masks"
# torch.cuda.OutOfMemoryError is also what torch>=2.5 exposes as torch.OutOfMemoryError.
_OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)


class ImageTooLargeError(ValueError):
    """An image with more pixels than the Predictor's ``max_pixels``; the message names it and both sizes."""


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
    """The facade over a :class:`~maskrcnn.MaskRCNN`: images in any form -> Results, pictures and COCO JSON.

    ``model`` is the nn.Module (tensors in, dicts out), or any runner with its ``cfg`` and
    ``detect(images, score_threshold, soft_masks)`` (an exported graph's, for example). Attributes the Predictor does not define are the model's
    (``predictor.cfg``, ``predictor.state_dict()``, ``predictor.detect(...)``), so a Predictor stands in for its
    model wherever a model is read.
    """

    def __init__(self, model: Any, score_threshold: float | None = None, classes: str | Sequence[str] | None = None,
                 batch_size: int = 1, save_masks: bool = False, progress: bool = True,
                 max_pixels: int | None = None) -> None:
        """``classes``: names to keep (a list or "a,b"); ``score_threshold`` None keeps the model's own.

        ``max_pixels``: images with more pixels (height x width) are refused (:meth:`run` skips them with a
        message, :meth:`predict` raises); None leaves only Pillow's decompression-bomb limit.
        """
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
        self.max_pixels = max_pixels
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if score_threshold is not None and not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if isinstance(model, Predictor):
            model = model.model
        if not (hasattr(model, "detect") and hasattr(model, "cfg")):
            raise TypeError(f"Predictor wraps a maskrcnn.MaskRCNN (or an object with its cfg and detect), got "
                            f"{type(model).__name__}")
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

    def __getattr__(self, name: str) -> Any:
        """The wrapped model's attribute (``cfg``, ``detect``, ``state_dict``, ``optimize`` ...)."""
        model = self.__dict__.get("model")
        if model is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(model, name)

    def __repr__(self) -> str:
        """One line: the model's layout, class count and device."""
        m = self.model.cfg.model
        return f"Predictor({type(self.model).__name__}, {m.num_classes} classes)"

    def optimize(self, *args: Any, **kwargs: Any) -> Predictor:
        """:meth:`MaskRCNN.optimize` on the wrapped model; returns this Predictor."""
        self.model.optimize(*args, **kwargs)
        return self

    def to(self, device: str | torch.device) -> Predictor:
        """Move the wrapped model to ``device``; returns this Predictor."""
        self.model.to(device)
        return self

    def save(self, path: str | Path) -> Path:
        """Write the model in this library's format (safetensors weights + config JSON) to directory ``path``."""
        from maskrcnn.weights.native import save_model  # noqa: PLC0415 - weights imports this module

        return save_model(self.model, path)

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput], score_threshold: float | None = None,
                batch_size: int = 1, soft_masks: bool = False) -> list[Result]:
        """Detect objects in images (paths, HWC/CHW uint8/float arrays or tensors, RGB): one Result per image.

        Boxes are XYXY in the input image's pixels, masks (N, H, W) bool at the input image's size.
        ``score_threshold`` replaces the configured minimum score (0.05) for this call (default: the Predictor's
        ``score_threshold``, or the model's own when that is None). Up to ``batch_size``
        images share one zero-padded forward pass on an accelerator; on the CPU each image runs alone unless
        ``model.batch_on_cpu`` is set, because there a batch only multiplies the working set (R50-FPN at 800x1216
        on 2 cores: 0.37 images/s in batches of 8 against 0.50 one at a time, `maskrcnn bench`) and padding to
        the largest image costs work.
        """
        model = self.model
        if score_threshold is None:
            score_threshold = self.score_threshold
        single = isinstance(images, (str, Path, np.ndarray, torch.Tensor))
        items = [images] if single else list(images)
        on_cpu = torch.device(getattr(model, "device", "cpu")).type == "cpu"
        step = max(batch_size, 1) if getattr(model, "batch_on_cpu", False) or not on_cpu else 1
        names = tuple(model.cfg.model.class_names)
        cat_ids = tuple(model.cfg.model.category_ids)
        kh = model.cfg.model.keypoint_head
        keypoint_meta = {"keypoint_names_table": tuple(kh.names), "skeleton_table": tuple(kh.skeleton),
                         "keypoint_threshold": kh.draw_threshold, "keypoint_offset": kh.coco_offset}
        module = model if isinstance(model, torch.nn.Module) else None
        was_training = module is not None and module.training
        if module is not None:
            module.eval()
        try:
            results: list[Result] = []
            for start in range(0, len(items), step):
                chunk = items[start: start + step]
                with stage("transform"):
                    tensors = [to_chw_tensor(x) for x in chunk]
                for src, t in zip(chunk, tensors):
                    why = self._too_large(int(t.shape[-2]), int(t.shape[-1]))
                    if why:
                        raise ImageTooLargeError(f"{src if isinstance(src, (str, Path)) else 'image'}: {why}")
                for src, t, det in zip(chunk, tensors, model.detect(tensors, score_threshold, soft_masks)):
                    results.append(Result(
                        boxes=det["boxes"], scores=det["scores"], labels=det["labels"], masks=det.get("masks"),
                        soft_masks=det.get("soft_masks"), image_size=(int(t.shape[-2]), int(t.shape[-1])),
                        class_names_table=names, category_ids_table=cat_ids,
                        image_path=str(src) if isinstance(src, (str, Path)) else None,
                        keypoints=det.get("keypoints"), **keypoint_meta))
            return results
        finally:
            if module is not None:
                module.train(was_training)

    __call__ = predict

    # -- running over files ---------------------------------------------------------------------------

    def predict_image(self, image: np.ndarray, path: str | None = None) -> Result:
        """Detections for one (H, W, 3) uint8 RGB image, after the score and class filters."""
        return self._predict_batch([image], [path])[0]

    def _predict_batch(self, images: list[np.ndarray], paths: list[str | None]) -> list[Result]:
        results = self.predict(images, score_threshold=self.score_threshold, batch_size=len(images))
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
        for folder in {out_dir, json_path.parent, out_dir / MASKS_DIR}:
            remove_stale_temp(folder)  # left by a run killed while writing

        image_infos: list[dict[str, Any]] = []
        n_records = 0
        # Records are streamed to a JSON Lines file as each image finishes, and predictions.json is made from it
        # at the end, also when the run is interrupted: Ctrl-C keeps every finished image, as valid JSON.
        lines_path = json_path.with_name(json_path.name + PARTIAL_SUFFIX)
        lines = lines_path.open("w", encoding="utf-8")
        bar = self._open_bar(len(paths))
        complete = False
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
                    recs = results_to_coco(res, image_id, self.category_ids)
                    for rec in recs:
                        rec["file_name"] = str(path)
                    # The image counts as finished once its records and its entry are both written.
                    lines.write("".join(json.dumps(rec) + "\n" for rec in recs))
                    lines.flush()
                    n_records += len(recs)
                    image_infos.append(info)
                    if bar is not None:
                        bar.update(1)
                del arrays, results  # full-size masks go as soon as they are written
            complete = True
        finally:
            if bar is not None:
                bar.close()
            lines.close()
            images_json = self._finish_json(lines_path, json_path, out_dir, image_infos, complete)
        return PredictSummary(images=len(image_infos), skipped=len(problems), detections=n_records,
                              seconds=time.perf_counter() - t0, out_dir=out_dir, json_path=json_path,
                              images_json=images_json, problems=problems)

    def _finish_json(self, lines_path: Path, json_path: Path, out_dir: Path, image_infos: list[dict[str, Any]],
                     complete: bool) -> Path:
        """Write predictions.json (from the streamed lines) and images.json atomically; returns images.json."""
        finished = {int(info["id"]) for info in image_infos}

        def write_records(f: Any) -> None:
            f.write("[")
            first = True
            with lines_path.open(encoding="utf-8") as src:
                for line in src:
                    if not line.endswith("\n"):
                        break  # cut short by the interruption; its image is not in images.json either
                    if int(json.loads(line)["image_id"]) not in finished:
                        continue
                    f.write(("" if first else ",\n") + line[:-1])
                    first = False
            f.write("]\n")

        atomic_write(json_path, False, write_records)
        lines_path.unlink(missing_ok=True)
        images_json = out_dir / IMAGES_JSON
        categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
        atomic_write_json(images_json, {"images": image_infos, "categories": categories, "complete": complete},
                          indent=1)
        if not complete:
            print(f"interrupted: {json_path} and {images_json} hold the {len(image_infos)} images finished so far",
                  file=sys.stderr, flush=True)
        return images_json

    def _read_batches(self, paths: list[Path], problems: list[tuple[str, str]], bar: Any
                      ) -> Iterator[list[tuple[Path, np.ndarray]]]:
        """Decoded images in batches of ``batch_size``; unreadable files are reported, counted and left out."""
        batch: list[tuple[Path, np.ndarray]] = []
        for path in paths:
            try:
                if self.max_pixels is not None:
                    # From the header: a refused image is never decoded.
                    why = self._too_large(*read_image_size(path))
                    if why:
                        problems.append((str(path), why))
                        self._report(str(path), why, bar)
                        if bar is not None:
                            bar.update(1)
                        continue
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

    def _too_large(self, height: int, width: int) -> str | None:
        """Why an image of this size is refused, or None."""
        if self.max_pixels is None or height * width <= self.max_pixels:
            return None
        return (f"image is {width}x{height} = {height * width / 1e6:.1f} megapixels, more than max_pixels "
                f"(--max-pixels) {self.max_pixels / 1e6:.1f}; downscale it or raise the limit")

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
