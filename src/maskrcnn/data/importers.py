"""Converters from labelme and YOLO-segmentation annotation folders to COCO instances JSON.

Both write ``file_name`` entries relative to the source folder (pass it as the dataset's image_dir), number images
and annotations from 1, compute ``bbox`` and ``area`` from the rasterised instance mask, and return counts.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn.atomic import atomic_write_text
from maskrcnn.data.coco import DatasetError
from maskrcnn.io import IMAGE_EXTENSIONS, read_image_size

# labels.txt entries that name no object class (labelme's convention).
LABELME_SPECIAL_LABELS = ("__ignore__", "_background_")
# Fewest polygon vertices that enclose an area.
_MIN_POLYGON_POINTS = 3


class AnnotationImportError(DatasetError):
    """An annotation source file that cannot be converted; the message names the file (and line)."""


def _instance_record(polygons: list[list[float]], height: int, width: int) -> tuple[list[float], float]:
    """COCO bbox [x, y, w, h] and area (pixels) of the union of ``polygons`` rasterised at (height, width)."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return [float(v) for v in mask_utils.toBbox(rle)], float(mask_utils.area(rle))


def _write_coco(out_json: str | Path, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
                categories: list[dict[str, Any]], description: str) -> None:
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    data = {"info": {"description": description}, "images": images, "annotations": annotations,
            "categories": categories}
    atomic_write_text(out_json, json.dumps(data))


def _read_names(path: Path) -> list[str]:
    """Class names, one per line (blank lines skipped), or the ``names`` of an ultralytics data YAML."""
    if not path.is_file():
        raise AnnotationImportError(f"{path}: names file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # noqa: PLC0415 - optional dependency
        except ImportError as e:
            raise AnnotationImportError(f"{path}: reading a YAML names file needs PyYAML (pip install pyyaml)") from e
        data = yaml.safe_load(text)
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            keys = sorted(int(k) for k in names)
            if keys != list(range(len(keys))):
                raise AnnotationImportError(f"{path}: 'names' keys must be 0..N-1, got {keys}")
            return [str(names[k]) for k in keys]
        if not isinstance(names, list):
            raise AnnotationImportError(f"{path}: expected a 'names' list or mapping")
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# labelme


def _circle_polygon(center: list[float], edge: list[float], tolerance: float, min_points: int) -> list[float]:
    """Polygon approximating a labelme circle (centre, point on the rim) within ``tolerance`` pixels."""
    (x1, y1), (x2, y2) = center, edge
    r = math.hypot(x2 - x1, y2 - y1)
    # The sagitta r(1 - cos(pi/n)) of each edge stays <= tolerance (labelme's own rule, with tolerance 1 px).
    n = max(int(math.pi / math.acos(1 - tolerance / r)) if r > tolerance else min_points, min_points)
    i = np.arange(n)
    xs = x1 + r * np.sin(2 * np.pi / n * i)
    ys = y1 + r * np.cos(2 * np.pi / n * i)
    return np.stack([xs, ys], axis=1).flatten().tolist()


def _labelme_image(json_path: Path, data: dict[str, Any]) -> Path:
    """The image file of a labelme JSON: its imagePath (relative to the JSON), else a same-stem image beside it."""
    image_path = data.get("imagePath")
    if image_path:
        candidate = (json_path.parent / str(image_path).replace("\\", "/")).resolve()
        if candidate.is_file():
            return candidate
    for ext in IMAGE_EXTENSIONS:
        for suffix in (ext, ext.upper()):
            candidate = json_path.with_suffix(suffix)
            if candidate.is_file():
                return candidate.resolve()
    raise AnnotationImportError(f"{json_path}: image not found (imagePath={image_path!r}, and no image named "
                            f"{json_path.stem}.* beside it)")


def _load_labels_file(path: Path) -> list[str]:
    return [n for n in _read_names(path) if n not in LABELME_SPECIAL_LABELS]


def labelme_to_coco(
    src_dir: str | Path,
    out_json: str | Path,
    labels_file: str | Path | None = None,
    *,
    recursive: bool = True,
    circle_tolerance: float = 1.0,
    circle_min_points: int = 12,
) -> dict[str, Any]:
    """Convert a folder of labelme JSON files to a COCO instances file; returns counts.

    Shapes with the same (label, group_id) form one instance (group_id None: a shape of its own). Polygons,
    rectangles and circles are kept (as polygons); other shape types and the labels ``__ignore__`` and
    ``_background_`` are skipped and counted. Categories come from ``labels_file`` (default ``src_dir/labels.txt``
    when present; its ``__ignore__``/``_background_`` lines are left out and the other names get ids 1..K in file
    order, which is labelme's numbering for its standard labels.txt) or else from the labels in order of first
    appearance (files sorted by path). A label missing from the labels file is an error naming the file and shape.
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise AnnotationImportError(f"{src_dir}: labelme folder not found")
    if labels_file is None and (src_dir / "labels.txt").is_file():
        labels_file = src_dir / "labels.txt"
    names: list[str] = _load_labels_file(Path(labels_file)) if labels_file is not None else []
    fixed_names = labels_file is not None
    json_files = sorted(src_dir.glob("**/*.json" if recursive else "*.json"))
    if not json_files:
        raise AnnotationImportError(f"{src_dir}: no labelme .json files found")

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for json_path in json_files:
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AnnotationImportError(f"{json_path}: not valid JSON: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            raise AnnotationImportError(f"{json_path}: not a labelme file (no 'shapes' list)")
        image_path = _labelme_image(json_path, data)
        if "imageHeight" in data and "imageWidth" in data:
            height, width = int(data["imageHeight"]), int(data["imageWidth"])
        else:
            height, width = read_image_size(image_path)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": Path(os.path.relpath(image_path, src_dir.resolve())).as_posix(),
                       "height": height, "width": width})

        instances: dict[tuple[str, Any], list[list[float]]] = {}
        for k, shape in enumerate(data["shapes"]):
            where = f"{json_path}: shapes[{k}]"
            label = shape.get("label")
            if not isinstance(label, str):
                raise AnnotationImportError(f"{where}: missing 'label'")
            if label in LABELME_SPECIAL_LABELS:
                skipped[f"{label} shapes"] += 1
                continue
            kind = shape.get("shape_type") or "polygon"
            try:
                points = [[float(p[0]), float(p[1])] for p in shape["points"]]
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise AnnotationImportError(f"{where}: malformed 'points': {e}") from e
            if kind == "polygon":
                if len(points) < _MIN_POLYGON_POINTS:
                    skipped["polygons with fewer than 3 points"] += 1
                    continue
                poly = [v for p in points for v in p]
            elif kind == "rectangle":
                if len(points) != 2:
                    raise AnnotationImportError(f"{where}: a rectangle needs 2 points, got {len(points)}")
                (x1, x2), (y1, y2) = sorted([points[0][0], points[1][0]]), sorted([points[0][1], points[1][1]])
                poly = [x1, y1, x2, y1, x2, y2, x1, y2]
            elif kind == "circle":
                if len(points) != 2:
                    raise AnnotationImportError(f"{where}: a circle needs 2 points (centre, rim), got {len(points)}")
                if points[0] == points[1]:
                    skipped["circles of radius 0"] += 1
                    continue
                poly = _circle_polygon(points[0], points[1], circle_tolerance, circle_min_points)
            else:
                skipped[f"{kind} shapes (unsupported type)"] += 1
                continue
            if label not in names:
                if fixed_names:
                    raise AnnotationImportError(f"{where}: label {label!r} is not in {labels_file} "
                                            f"(known: {', '.join(names)})")
                names.append(label)
            group = shape.get("group_id")
            key = (label, ("shape", k) if group is None else ("group", group))
            instances.setdefault(key, []).append(poly)

        for (label, _), polygons in instances.items():
            bbox, area = _instance_record(polygons, height, width)
            if area <= 0:
                skipped["instances with no pixels"] += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": names.index(label) + 1, "segmentation": polygons,
                                "area": area, "bbox": bbox, "iscrowd": 0})

    categories = [{"id": i + 1, "name": n, "supercategory": None} for i, n in enumerate(names)]
    _write_coco(out_json, images, annotations, categories, f"converted from labelme folder {src_dir}")
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories),
            "skipped": dict(skipped), "image_dir": str(src_dir)}


# ---------------------------------------------------------------------------------------------------------------
# YOLO segmentation

# A YOLO line: class id then either a box (cx cy w h) or a polygon (x1 y1 x2 y2 x3 y3 ...), all normalised.
_YOLO_BOX_TOKENS = 5
_YOLO_MIN_POLYGON_TOKENS = 1 + 2 * _MIN_POLYGON_POINTS


def _yolo_label_path(image: Path, src_dir: Path) -> Path | None:
    """The label .txt of an image: in the parallel labels/ tree (…/images/… -> …/labels/…), else beside it."""
    rel = image.relative_to(src_dir)
    parts = list(rel.parts)
    if "images" in parts[:-1]:
        i = len(parts) - 2 - parts[:-1][::-1].index("images")  # the last 'images' folder in the path
        parts[i] = "labels"
        candidate = (src_dir / Path(*parts)).with_suffix(".txt")
        if candidate.is_file():
            return candidate
    candidate = image.with_suffix(".txt")
    return candidate if candidate.is_file() else None


def yolo_to_coco(
    src_dir: str | Path,
    out_json: str | Path,
    names_file: str | Path,
) -> dict[str, Any]:
    """Convert a YOLO-segmentation folder (``class x1 y1 x2 y2 ...`` normalised polygons) to COCO; returns counts.

    Images are found under ``src_dir`` (recursively); each image's labels come from the parallel ``labels/`` tree
    (``images/a/b.jpg`` -> ``labels/a/b.txt``) or a ``.txt`` beside it; an image without one has no objects.
    ``names_file`` lists the class names (one per line, or an ultralytics data YAML with ``names``); class c becomes
    category id c + 1. Five-token lines are YOLO boxes (cx cy w h) and become rectangles. Coordinates are clipped
    to [0, 1]. Malformed lines raise an error naming the file and line number.
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise AnnotationImportError(f"{src_dir}: YOLO folder not found")
    names = _read_names(Path(names_file))
    if not names:
        raise AnnotationImportError(f"{names_file}: no class names")
    image_files = sorted(p for p in src_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not image_files:
        raise AnnotationImportError(f"{src_dir}: no images found")

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for image_path in image_files:
        height, width = read_image_size(image_path)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": image_path.relative_to(src_dir).as_posix(),
                       "height": height, "width": width})
        label_path = _yolo_label_path(image_path, src_dir)
        if label_path is None:
            skipped["images without a label file"] += 1
            continue
        for lineno, line in enumerate(label_path.read_text(encoding="utf-8").splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            where = f"{label_path}:{lineno}"
            try:
                cls = int(tokens[0])
                values = [float(t) for t in tokens[1:]]
            except ValueError:
                raise AnnotationImportError(
                    f"{where}: expected 'class x1 y1 x2 y2 ...' numbers, got {line.strip()!r}") from None
            if not 0 <= cls < len(names):
                raise AnnotationImportError(f"{where}: class {cls} is outside 0..{len(names) - 1} "
                                        f"({len(names)} names in {names_file})")
            if not all(math.isfinite(v) for v in values):
                raise AnnotationImportError(f"{where}: non-finite coordinate in {line.strip()!r}")
            values = [min(max(v, 0.0), 1.0) for v in values]
            if len(tokens) == _YOLO_BOX_TOKENS:
                cx, cy, bw, bh = values
                x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
                norm = [x1, y1, x2, y1, x2, y2, x1, y2]
            elif len(tokens) >= _YOLO_MIN_POLYGON_TOKENS and len(values) % 2 == 0:
                norm = values
            else:
                raise AnnotationImportError(f"{where}: a polygon needs an even number of coordinates for at least 3 "
                                        f"points (or 4 numbers for a box), got {len(values)} numbers")
            poly = [v * (width if j % 2 == 0 else height) for j, v in enumerate(norm)]
            bbox, area = _instance_record([poly], height, width)
            if area <= 0:
                skipped["objects with no pixels"] += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "segmentation": [poly], "area": area, "bbox": bbox, "iscrowd": 0})

    categories = [{"id": i + 1, "name": n, "supercategory": None} for i, n in enumerate(names)]
    _write_coco(out_json, images, annotations, categories, f"converted from YOLO folder {src_dir}")
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories),
            "skipped": dict(skipped), "image_dir": str(src_dir)}
