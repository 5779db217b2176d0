"""COCO-format instance segmentation dataset: images plus boxes, contiguous labels and bitmap masks, and the
person keypoints of ``person_keypoints_*.json`` files."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import posixpath
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
import torch

from maskrcnn.data.samplers import sample_generator
from maskrcnn.io import ImageReadError, read_image
from maskrcnn.ops.masks import segmentation_to_bitmap

# A transform takes (image (3,H,W) uint8, target dict, generator or None) and returns (image, target).
Transform = Callable[[torch.Tensor, dict[str, Any], "torch.Generator | None"], tuple[torch.Tensor, dict[str, Any]]]

# Fewer than this many numbers cannot describe a polygon (3 points of x, y).
_MIN_POLYGON_NUMBERS = 6
# A polygon vertex farther outside the image than this many image sizes is not a labelling slip (those are
# clipped) but corrupt data, e.g. coordinates written in another unit or garbage bytes.
ABSURD_COORDINATE_FACTOR = 1.0


class DatasetError(ValueError):
    """An annotation file or entry that cannot be used; the message names the file and the entry."""


class ImageSizeError(DatasetError):
    """An image whose decoded size differs from the size its annotation file gives; the message names both."""


# A training sample whose image raises one of these is skipped and replaced (data.loader.SeededSamples).
BAD_IMAGE_ERRORS: tuple[type[Exception], ...] = (ImageReadError, ImageSizeError)


def escapes_folder(file_name: str) -> bool:
    """True when ``file_name`` (as a COCO ``file_name``) is absolute or climbs out of its folder with ``..``."""
    text = str(file_name).replace("\\", "/")
    if text.startswith("/") or PureWindowsPath(str(file_name)).drive:
        return True
    return posixpath.normpath(text).split("/")[0] == ".."


def polygon_problem(poly: Any, height: int, width: int) -> str | None:
    """Why a COCO polygon ``[x0, y0, x1, y1, ...]`` (pixels of an HxW image) is unusable, or None when it is fine.

    Raises ValueError for a part that is not a flat list of numbers: a malformed file rather than bad values.
    """
    if not isinstance(poly, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
        raise ValueError(f"a polygon must be a flat list of numbers, got {str(poly)[:80]}")
    if len(poly) < _MIN_POLYGON_NUMBERS:
        return "polygon parts with fewer than 3 points"
    values = np.asarray(poly, dtype=np.float64)
    if not np.isfinite(values).all():
        return "polygon parts with NaN or infinite coordinates"
    xs, ys = values[0:len(values) // 2 * 2:2], values[1:len(values) // 2 * 2:2]
    fx, fy = ABSURD_COORDINATE_FACTOR * width, ABSURD_COORDINATE_FACTOR * height
    if xs.min() < -fx or xs.max() > width + fx or ys.min() < -fy or ys.max() > height + fy:
        return (f"polygon parts with absurd coordinates (more than {ABSURD_COORDINATE_FACTOR:g} image size "
                f"outside the image)")
    return None


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read and check the top-level structure of a COCO annotation file; raises DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    text = path.read_bytes()
    if not text.strip():
        raise DatasetError(f"{path}: annotation file is empty")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO annotation file must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or malformed {key!r} list (is this a COCO instances file?)")
    # Test-set files (image_info_test) carry no annotations at all.
    if not isinstance(data.setdefault("annotations", []), list):
        raise DatasetError(f"{path}: malformed 'annotations': expected a list")
    for kind, keys in (("images", ("id", "file_name", "width", "height")), ("categories", ("id", "name")),
                       ("annotations", ("id", "image_id", "category_id"))):
        for i, entry in enumerate(data[kind]):
            if not isinstance(entry, dict) or any(k not in entry for k in keys):
                raise DatasetError(f"{path}: {kind}[{i}] must be an object with keys {', '.join(keys)}; "
                                   f"got {str(entry)[:200]}")
            ints = [k for k in keys if k in ("id", "image_id", "category_id", "width", "height")]
            bad = [k for k in ints if isinstance(entry[k], bool) or not isinstance(entry[k], int)]
            if bad:
                raise DatasetError(f"{path}: {kind}[{i}] field {bad[0]!r} must be an integer, got {entry[bad[0]]!r}")
    return data


class CocoDataset(torch.utils.data.Dataset):
    """COCO instances dataset yielding ``(image (3,H,W) uint8 RGB, target)`` with contiguous labels 1..K.

    The target holds ``boxes`` (N,4) float32 XYXY absolute pixels of the returned image, ``labels`` (N,) int64 in
    1..K, ``masks`` (N,H,W) uint8 in {0,1}, ``image_id`` int, ``orig_size`` (H0, W0) of the file and ``file_name``.
    Crowd annotations are never targets. Degenerate boxes and polygons are dropped with one summary warning.

    With ``keypoints`` the target also holds ``keypoints`` (N, K, 3) float32 [x, y, visibility] in pixels of the
    returned image (visibility 0 = not labelled, 1 = labelled but hidden, 2 = visible; instances without keypoints
    are all zeros), and the dataset exposes ``keypoint_names`` and ``skeleton`` (0-based index pairs) from its
    categories. With ``masks=False`` no segmentation is needed or decoded and targets have no ``masks``.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transforms: Transform | None = None,
        filter_empty: bool = True,
        category_ids: Sequence[int] | None = None,
        *,
        min_box_size: float = 1e-3,
        seed: int = 0,
        keypoints: bool = False,
        masks: bool = True,
        min_keypoints_per_image: int = 0,
        keypoint_offset: float = 0.0,
        allow_outside_images: bool = False,
    ) -> None:
        """Parse ``ann_file``; ``category_ids`` (default: all, sorted) fixes label i -> category_ids[i-1].

        Annotations of categories left out of ``category_ids`` are not targets.

        min_box_size: boxes whose width or height after clipping to the image is at most this many pixels are
        dropped. seed: seeds the per-sample generator of ``dataset[i]`` (the loaders pass their own instead).
        keypoints: read each annotation's ``keypoints``; images whose instances have fewer than
        ``min_keypoints_per_image`` visible keypoints in all are left out (detectron2's MIN_KEYPOINTS_PER_IMAGE);
        ``keypoint_offset`` is added to x and y (0.5 makes COCO's integer pixel indices continuous coordinates, as
        detectron2 does). masks: read the segmentations (False: boxes, labels and keypoints only).
        allow_outside_images: accept ``file_name`` entries that are absolute or lead out of ``image_dir`` with
        ``..`` (refused by default: an annotation file should not make training read arbitrary files).
        """
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.filter_empty = filter_empty
        self.min_box_size = float(min_box_size)
        self.seed = int(seed)
        self.keypoints = bool(keypoints)
        self.masks = bool(masks)
        self.keypoint_offset = float(keypoint_offset)
        self._data = load_coco_json(self.ann_file)
        self._coco: Any = None

        cats = {int(c["id"]): c for c in self._data["categories"]}
        if category_ids is None:
            ids = sorted(cats)
        else:
            ids = [int(c) for c in category_ids]
            unknown = [c for c in ids if c not in cats]
            if unknown:
                raise DatasetError(f"{self.ann_file}: category_ids {unknown} are not among the file's categories "
                                   f"{sorted(cats)}")
            if len(set(ids)) != len(ids):
                raise DatasetError(f"category_ids has duplicates: {ids}")
        self.category_ids: list[int] = ids
        self.class_names: list[str] = [str(cats[c]["name"]) for c in ids]
        self._cat_to_label = {c: i + 1 for i, c in enumerate(ids)}
        self.keypoint_names: tuple[str, ...] = ()
        self.skeleton: tuple[tuple[int, int], ...] = ()
        if self.keypoints:
            self.keypoint_names, self.skeleton = self._keypoint_definition([cats[c] for c in ids])

        images = {int(im["id"]): im for im in self._data["images"]}
        if not allow_outside_images:
            for im in self._data["images"]:
                if escapes_folder(im["file_name"]):
                    raise DatasetError(
                        f"{self.ann_file}: image id {im['id']} has file_name {im['file_name']!r}, which lies outside "
                        f"the image folder {self.image_dir}; pass --allow-outside-images "
                        f"(allow_outside_images=True) if the file is meant to be read from there")
        per_image: dict[int, list[tuple[np.ndarray, int, Any]]] = {i: [] for i in images}
        per_image_kps: dict[int, list[np.ndarray]] = {i: [] for i in images}
        dropped: Counter[str] = Counter()
        for ann in self._data["annotations"]:
            ann_id, img_id, cat_id = ann["id"], int(ann["image_id"]), int(ann["category_id"])
            if cat_id not in cats:
                raise DatasetError(f"{self.ann_file}: annotation id {ann_id} has category_id {cat_id}, which is not "
                                   f"in 'categories' (known ids: {sorted(cats)})")
            if img_id not in images:
                raise DatasetError(f"{self.ann_file}: annotation id {ann_id} refers to image_id {img_id}, which is "
                                   f"not in 'images'")
            if ann.get("iscrowd", 0) or cat_id not in self._cat_to_label:
                continue  # crowd regions are only used by evaluation; unselected categories are not targets
            im = images[img_id]
            try:
                entry = self._check_annotation(ann, int(im["height"]), int(im["width"]), dropped)
            except (TypeError, ValueError) as e:
                raise DatasetError(f"{self.ann_file}: annotation id {ann_id} is malformed: {e}") from e
            if entry is None:
                continue
            box, segm = entry
            if self.keypoints:
                per_image_kps[img_id].append(self._read_keypoints(ann))
            per_image[img_id].append((box, self._cat_to_label[cat_id], segm))
        if dropped:
            details = "; ".join(f"{n} {why}" for why, n in sorted(dropped.items()))
            warnings.warn(f"{self.ann_file}: dropped invalid annotation data: {details}", stacklevel=2)
        self.dropped: dict[str, int] = dict(dropped)

        self._images: list[dict[str, Any]] = [
            im for im in self._data["images"] if not filter_empty or per_image[int(im["id"])]
        ]
        if self.keypoints and min_keypoints_per_image > 0:
            def visible(image_id: int) -> int:
                return sum(int((k[:, 2] > 0).sum()) for k in per_image_kps[image_id])

            kept = [im for im in self._images if visible(int(im["id"])) >= min_keypoints_per_image]
            if len(kept) < len(self._images):
                self.dropped[f"images with fewer than {min_keypoints_per_image} visible keypoints (skipped)"] = (
                    len(self._images) - len(kept))
            self._images = kept
        self._anns: list[list[tuple[np.ndarray, int, Any]]] = [per_image[int(im["id"])] for im in self._images]
        self._kps: list[list[np.ndarray]] = [per_image_kps[int(im["id"])] for im in self._images]
        self.image_ids: list[int] = [int(im["id"]) for im in self._images]

    def _keypoint_definition(self, categories: list[dict[str, Any]]
                             ) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
        """Keypoint names and 0-based skeleton of the selected categories (all that define them must agree)."""
        defined = [c for c in categories if c.get("keypoints")]
        if not defined:
            raise DatasetError(f"{self.ann_file}: no category defines 'keypoints' (a COCO person keypoints file, "
                               f"person_keypoints_*.json, names them in its categories)")
        names = defined[0]["keypoints"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{self.ann_file}: category {defined[0]['id']} 'keypoints' must be a list of names")
        other = next((c for c in defined if c["keypoints"] != names), None)
        if other is not None:
            raise DatasetError(f"{self.ann_file}: categories {defined[0]['id']} and {other['id']} define different "
                               f"keypoints; select categories of one kind with category_ids")
        skeleton = []
        for pair in defined[0].get("skeleton") or []:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(i, int) and 1 <= i <= len(names) for i in pair)):
                raise DatasetError(f"{self.ann_file}: category {defined[0]['id']} skeleton entry {pair!r} must be "
                                   f"two keypoint numbers in 1..{len(names)} (COCO counts from 1)")
            skeleton.append((pair[0] - 1, pair[1] - 1))
        return tuple(names), tuple(skeleton)

    def _read_keypoints(self, ann: dict[str, Any]) -> np.ndarray:
        """(K, 3) float32 [x, y, visibility] of one annotation (zeros without keypoints), offset where labelled."""
        k = len(self.keypoint_names)
        raw = ann.get("keypoints")
        if raw is None:
            return np.zeros((k, 3), dtype=np.float32)
        try:
            kps = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            kps = np.zeros(0)
        if kps.shape != (3 * k,) or not np.isfinite(kps).all():
            raise DatasetError(f"{self.ann_file}: annotation id {ann['id']} 'keypoints' must be {3 * k} finite numbers "
                               f"(x, y, visibility for each of the {k} keypoints), got {str(raw)[:120]}")
        kps = kps.reshape(k, 3)
        if not np.isin(kps[:, 2], (0, 1, 2)).all():
            raise DatasetError(f"{self.ann_file}: annotation id {ann['id']}: keypoint visibility must be 0, 1 or 2")
        labelled = kps[:, 2] > 0
        kps[labelled, :2] += self.keypoint_offset
        kps[~labelled, :2] = 0.0
        return kps.astype(np.float32)

    def _check_annotation(self, ann: dict[str, Any], height: int, width: int, dropped: Counter[str]
                          ) -> tuple[np.ndarray, Any] | None:
        """Clipped XYXY box and cleaned segmentation, or None (reason counted in ``dropped``) when unusable."""
        bbox = ann.get("bbox")
        try:
            x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            dropped["annotations without a valid bbox"] += 1
            return None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            dropped["annotations with a non-finite bbox"] += 1
            return None
        box = np.array([min(max(x, 0.0), width), min(max(y, 0.0), height),
                        min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)], dtype=np.float32)
        if box[2] - box[0] <= self.min_box_size or box[3] - box[1] <= self.min_box_size:
            dropped[f"annotations with a degenerate box (width or height <= {self.min_box_size:g} px "
                    f"after clipping)"] += 1
            return None
        if not self.masks:
            return box, None
        segm = ann.get("segmentation")
        if isinstance(segm, list):
            problems = [polygon_problem(p, height, width) for p in segm]
            polys = [p for p, why in zip(segm, problems) if why is None]
            if not polys:
                worst = next((w for w in problems if w and "fewer" not in w), None)
                dropped[f"annotations whose polygons are all unusable ({worst})" if worst else
                        "annotations whose polygons all have fewer than 3 points"] += 1
                return None
            for why in problems:
                # Such parts have no area (or no meaning); the instance keeps its other parts.
                if why is not None:
                    dropped[f"{why} (instance kept)"] += 1
            segm = [[float(v) for v in p[: len(p) // 2 * 2]] for p in polys]
        elif isinstance(segm, dict):
            if "counts" not in segm or "size" not in segm:
                dropped["annotations with a malformed RLE segmentation"] += 1
                return None
            if [int(v) for v in segm["size"]] != [height, width]:
                dropped["annotations whose RLE size differs from the image size"] += 1
                return None
        else:
            dropped["annotations without a segmentation"] += 1
            return None
        return box, segm

    # ------------------------------------------------------------------------------------------------
    # Label mapping and metadata

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K."""
        return len(self.category_ids)

    def label_to_category(self, label: int) -> int:
        """Dataset category id of contiguous label ``label`` (1..K)."""
        if not 1 <= int(label) <= len(self.category_ids):
            raise KeyError(f"label {label} is outside 1..{len(self.category_ids)}")
        return self.category_ids[int(label) - 1]

    def category_to_label(self, cat_id: int) -> int:
        """Contiguous label (1..K) of dataset category id ``cat_id``."""
        if int(cat_id) not in self._cat_to_label:
            raise KeyError(f"category id {cat_id} is not one of this dataset's categories {self.category_ids}")
        return self._cat_to_label[int(cat_id)]

    def get_image_info(self, index: int) -> dict[str, Any]:
        """The COCO ``images`` entry (id, file_name, width, height, ...) of sample ``index``."""
        return dict(self._images[index])

    def aspect_ratios(self) -> list[float]:
        """Width / height of every sample, from the JSON (no image decoding); for aspect-ratio grouping."""
        return [float(im["width"]) / float(im["height"]) for im in self._images]

    @property
    def coco(self) -> Any:
        """A pycocotools COCO object over the whole annotation file (crowd regions included), for evaluation."""
        if self._coco is None:
            from pycocotools.coco import COCO  # noqa: PLC0415 - only evaluation needs it

            coco = COCO()
            coco.dataset = copy.deepcopy(self._data)
            with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __len__(self) -> int:
        """Number of samples (images kept after filtering)."""
        return len(self._images)

    # ------------------------------------------------------------------------------------------------
    # Samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sample ``index``: image (3,H,W) uint8 RGB and target; transforms draw from sample_seed(seed, 0, index)."""
        return self.get(int(index), sample_generator(self.seed, 0, int(index)))

    def get(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sample ``index`` with the transforms' randomness drawn from ``generator``."""
        info = self._images[index]
        path = self.image_dir / info["file_name"]
        array = read_image(path)
        height, width = array.shape[:2]
        if (height, width) != (int(info["height"]), int(info["width"])):
            raise ImageSizeError(f"{path}: image is {width}x{height} (after EXIF orientation) but {self.ann_file} "
                               f"says {info['width']}x{info['height']}; the masks would not line up")
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        anns = self._anns[index]
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(np.stack([a[0] for a in anns])) if anns else torch.zeros((0, 4)),
            "labels": torch.tensor([a[1] for a in anns], dtype=torch.int64),
            "image_id": int(info["id"]),
            "orig_size": (height, width),
            "file_name": str(info["file_name"]),
        }
        if self.masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for k, (_, _, segm) in enumerate(anns):
                masks[k] = segmentation_to_bitmap(segm, height, width)
            target["masks"] = torch.from_numpy(masks)
        if self.keypoints:
            kps = self._kps[index]
            target["keypoints"] = (torch.from_numpy(np.stack(kps)) if kps
                                   else torch.zeros((0, len(self.keypoint_names), 3)))
        if self.transforms is not None:
            image, target = self.transforms(image, target, generator)
        return image, target
