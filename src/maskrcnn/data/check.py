"""Checking a COCO dataset before training: every image decodes at the size the JSON gives, every annotation is
usable. ``maskrcnn data check`` prints the report and exits non-zero when it holds errors.

Errors are what would stop or silently weaken training: unreadable images, sizes that differ from the JSON,
duplicate ids, unknown categories or images, boxes wholly outside their image, polygons with NaN, infinite or
absurd coordinates, RLE masks of another size, malformed entries, and file names that leave the image folder.
Warnings are what training drops or clips by itself and reports: short polygons, degenerate boxes, boxes that
reach past the border, annotations without a segmentation, file names used twice.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskrcnn.data.coco import escapes_folder, load_coco_json, polygon_problem
from maskrcnn.io import ImageReadError, read_image

__all__ = ["CheckReport", "check_dataset"]

# Examples listed per kind of problem in the printed report (the count covers all of them).
REPORT_EXAMPLES = 5


@dataclass
class CheckReport:
    """What :func:`check_dataset` found: counts of the file's entries and problems by kind, with examples."""

    ann_file: Path
    image_dir: Path
    images: int = 0
    annotations: int = 0
    categories: int = 0
    # kind of problem -> every instance of it ("image id 3 (a.jpg): why"), in file order.
    errors: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    @property
    def num_errors(self) -> int:
        """Number of problems classed as errors."""
        return sum(len(v) for v in self.errors.values())

    @property
    def num_warnings(self) -> int:
        """Number of problems classed as warnings."""
        return sum(len(v) for v in self.warnings.values())

    def error(self, kind: str, where: str) -> None:
        """Record one error of ``kind`` at ``where``."""
        self.errors.setdefault(kind, []).append(where)

    def warn(self, kind: str, where: str) -> None:
        """Record one warning of ``kind`` at ``where``."""
        self.warnings.setdefault(kind, []).append(where)

    def format(self, examples: int = REPORT_EXAMPLES) -> str:
        """The report as the CLI prints it: a header, each kind with its count and first examples, a verdict."""
        lines = [f"{self.ann_file}: {self.images} images, {self.annotations} annotations, {self.categories} "
                 f"categories (image folder {self.image_dir})"]
        for title, table in (("errors", self.errors), ("warnings", self.warnings)):
            if not table:
                continue
            lines.append(f"{title}:")
            for kind, where in table.items():
                shown = "; ".join(where[:examples]) + ("; ..." if len(where) > examples else "")
                lines.append(f"  {len(where)} {kind}: {shown}")
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {self.num_errors} errors, {self.num_warnings} warnings")
        return "\n".join(lines)


def check_dataset(ann_file: str | Path, image_dir: str | Path, workers: int | None = None,
                  progress: bool | None = None, allow_outside_images: bool = False) -> CheckReport:
    """Check every image (decoded in ``workers`` threads, default one per CPU) and annotation of a COCO file.

    Raises :class:`~maskrcnn.data.DatasetError` when the file itself is unreadable or not COCO-shaped; every
    other problem goes into the returned report. ``progress`` None shows a bar only when stderr is a terminal.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = load_coco_json(ann_file)
    report = CheckReport(ann_file, image_dir, images=len(data["images"]), annotations=len(data["annotations"]),
                         categories=len(data["categories"]))
    _check_ids(report, data)
    cats = {int(c["id"]) for c in data["categories"]}
    images: dict[int, dict[str, Any]] = {}
    seen_names: dict[str, int] = {}
    to_read: list[dict[str, Any]] = []
    for im in data["images"]:
        where = f"image id {im['id']} ({im['file_name']})"
        images.setdefault(int(im["id"]), im)
        name = str(im["file_name"])
        if name in seen_names:
            report.warn("file names used by several image ids", f"{where}, also image id {seen_names[name]}")
        seen_names.setdefault(name, int(im["id"]))
        if int(im["width"]) < 1 or int(im["height"]) < 1:
            report.error("images with a width or height below 1", f"{where}: {im['width']}x{im['height']}")
            continue
        if escapes_folder(name) and not allow_outside_images:
            report.error("file names that leave the image folder (allow with --allow-outside-images)", where)
            continue
        to_read.append(im)
    for ann in data["annotations"]:
        _check_annotation(report, ann, images, cats)
    _check_images(report, image_dir, to_read, workers, progress)
    return report


def _check_ids(report: CheckReport, data: dict[str, Any]) -> None:
    for kind in ("images", "annotations", "categories"):
        seen: set[int] = set()
        for entry in data[kind]:
            if int(entry["id"]) in seen:
                report.error(f"duplicate {kind[:-1]} ids", f"{kind[:-1]} id {entry['id']}")
            seen.add(int(entry["id"]))


def _check_annotation(report: CheckReport, ann: dict[str, Any], images: dict[int, dict[str, Any]],
                      cats: set[int]) -> None:
    where = f"annotation id {ann['id']}"
    if int(ann["category_id"]) not in cats:
        report.error("annotations of an unknown category", f"{where}: category_id {ann['category_id']}")
    im = images.get(int(ann["image_id"]))
    if im is None:
        report.error("annotations of an unknown image", f"{where}: image_id {ann['image_id']}")
        return
    height, width = int(im["height"]), int(im["width"])
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        report.error("annotations without a valid bbox [x, y, w, h]", f"{where}: {str(bbox)[:60]}")
        x = y = w = h = math.nan
    else:
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            report.error("boxes with NaN or infinite values", f"{where}: {bbox}")
        elif w <= 0 or h <= 0:
            report.warn("degenerate boxes (width or height <= 0; dropped in training)", f"{where}: {bbox}")
        elif x >= width or y >= height or x + w <= 0 or y + h <= 0:
            report.error("boxes wholly outside their image", f"{where}: {bbox} in {width}x{height}")
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            report.warn("boxes reaching past the image border (clipped in training)",
                        f"{where}: {bbox} in {width}x{height}")
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        for part in segm:
            try:
                why = polygon_problem(part, height, width)
            except ValueError as e:
                report.error("malformed polygons", f"{where}: {e}")
                continue
            if why is None:
                continue
            if "fewer than 3 points" in why:
                report.warn(f"{why} (dropped in training)", where)
            else:
                report.error(why, where)
        if not segm:
            report.warn("annotations with an empty segmentation (dropped in training)", where)
    elif isinstance(segm, dict):
        size = segm.get("size")
        if "counts" not in segm or not isinstance(size, (list, tuple)) or len(size) != 2:
            report.error("malformed RLE segmentations", where)
        elif [int(v) for v in size] != [height, width]:
            report.error("RLE masks whose size differs from their image",
                         f"{where}: size {list(size)}, image {height}x{width}")
    else:
        report.warn("annotations without a segmentation (dropped in training)", where)


def _check_images(report: CheckReport, image_dir: Path, entries: list[dict[str, Any]], workers: int | None,
                  progress: bool | None) -> None:
    """Decode every image in threads (the decoders release the GIL) and compare its size with the JSON."""
    def one(im: dict[str, Any]) -> tuple[dict[str, Any], str | None, tuple[int, int] | None]:
        try:
            array = read_image(image_dir / im["file_name"])
        except ImageReadError as e:
            return im, " ".join(str(e).split()), None
        except MemoryError:
            return im, "too large to decode in memory", None
        return im, None, (int(array.shape[0]), int(array.shape[1]))

    n = workers if workers is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                              else os.cpu_count() or 1)
    bar = _bar(len(entries), progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
            for im, problem, size in pool.map(one, entries):
                where = f"image id {im['id']} ({im['file_name']})"
                if problem is not None:
                    report.error("images that cannot be read", f"{where}: {problem}")
                elif size != (int(im["height"]), int(im["width"])):
                    report.error("images whose size differs from the JSON",
                                 f"{where}: file {size[1]}x{size[0]}, JSON {im['width']}x{im['height']}")
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _bar(total: int, progress: bool | None) -> Any:
    if progress is False:
        return None
    try:
        from tqdm import tqdm  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    # disable=None: no bar when stderr is not a terminal.
    return tqdm(total=total, desc="check images", unit="img", file=sys.stderr, disable=None if progress is None
                else False)

