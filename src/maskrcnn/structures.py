"""Small result containers shared by the model, the predictor, the evaluator and the visualiser."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskrcnn.ops.masks import MaskCrops

__all__ = ["MaskCrops", "Result", "results_to_coco"]


@dataclass
class Result:
    """Detections for one image, in the input image's coordinates.

    boxes: (N, 4) float32 XYXY absolute pixels of the input image; scores: (N,) float32 in [0, 1];
    labels: (N,) int64 contiguous class indices 1..K (0 is background and never appears);
    masks: (N, H, W) bool at the input image's size, or None when the model has no mask head. From the model it
        is a :class:`MaskCrops`: each mask kept over its box's window only, so memory grows with the detections,
        not the image; ``masks.dense()`` (or any tensor use) builds the full (N, H, W) tensor, ``masks[i]`` one mask;
    soft_masks: (N, H, W) float32 probabilities, only when asked for.
    keypoints: (N, K, 3) float32 [x, y, score] in absolute pixels of the input image, or None when the model has
    no keypoint head; the score is the model's (``model.keypoint_head.score_type``: a heatmap logit or a softmax
    probability).
    class_names: names of the K foreground classes (label i -> class_names[i-1]), possibly empty.
    category_ids: dataset category id for each contiguous label (label i -> category_ids[i-1]), possibly empty.
    keypoint_names_table, skeleton_table: the model's keypoint names and its skeleton (pairs of 0-based keypoint
    indices); keypoint_threshold: the score under which drawings skip a joint; keypoint_offset: subtracted from x
    and y in COCO results (0.5 for models that add it to COCO's integer keypoints, as detectron2 does).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | MaskCrops | None = None
    soft_masks: torch.Tensor | None = None
    image_size: tuple[int, int] = (0, 0)
    class_names_table: tuple[str, ...] = field(default=(), repr=False)
    category_ids_table: tuple[int, ...] = field(default=(), repr=False)
    image_path: str | None = None
    keypoints: torch.Tensor | None = None
    keypoint_names_table: tuple[str, ...] = field(default=(), repr=False)
    skeleton_table: tuple[tuple[int, int], ...] = field(default=(), repr=False)
    keypoint_threshold: float = field(default=0.0, repr=False)
    keypoint_offset: float = field(default=0.0, repr=False)

    def __len__(self) -> int:
        """Number of detections N."""
        return int(self.boxes.shape[0])

    @property
    def class_names(self) -> list[str]:
        """Class name of each detection (``"class_<label>"`` when the model has no names)."""
        table = self.class_names_table
        out = []
        for lab in self.labels.tolist():
            out.append(table[lab - 1] if 0 < lab <= len(table) else f"class_{lab}")
        return out

    @property
    def category_ids(self) -> list[int]:
        """Dataset category id of each detection (the contiguous label when no table is known)."""
        table = self.category_ids_table
        return [table[lab - 1] if 0 < lab <= len(table) else int(lab) for lab in self.labels.tolist()]

    def to(self, device: torch.device | str) -> Result:
        """Copy of the result with every tensor on ``device``."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, boxes=mv(self.boxes), scores=mv(self.scores), labels=mv(self.labels),
                       masks=mv(self.masks), soft_masks=mv(self.soft_masks), keypoints=mv(self.keypoints))

    def filter(self, keep: torch.Tensor) -> Result:
        """Subset of detections selected by a bool mask or index tensor over N."""
        def sel(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[keep]

        return replace(self, boxes=sel(self.boxes), scores=sel(self.scores), labels=sel(self.labels),
                       masks=sel(self.masks), soft_masks=sel(self.soft_masks), keypoints=sel(self.keypoints))

    def plot(self, image: Any = None, **kwargs: Any) -> np.ndarray:
        """Overlay of masks, boxes and labels on ``image`` (or the source file): (H, W, 3) uint8 RGB."""
        from maskrcnn.visualize import draw_result  # noqa: PLC0415 - keeps drawing optional

        if image is None:
            if self.image_path is None:
                raise ValueError("Result.plot() needs the image: this result was not made from a file")
            from maskrcnn.io import read_image  # noqa: PLC0415

            image = read_image(self.image_path)
        return draw_result(image, self, **kwargs)

    def save(self, path: str | Path, image: Any = None, **kwargs: Any) -> Path:
        """Write the overlay picture to ``path`` (PNG/JPEG by suffix) and return the path."""
        from PIL import Image  # noqa: PLC0415

        from maskrcnn.atomic import atomic_write  # noqa: PLC0415

        path = Path(path)
        fmt = Image.registered_extensions().get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: unknown picture format {path.suffix!r}; use .png or .jpg")
        picture = self.plot(image, as_image=True, **kwargs)  # straight to PIL: no array copy of the picture
        return atomic_write(path, True, lambda f: picture.save(f, format=fmt))

    def to_coco(self, image_id: int, **extra: Any) -> list[dict[str, Any]]:
        """COCO results records (bbox XYWH, score, category_id, RLE segmentation, keypoints) for this image.

        ``keypoints`` is COCO's keypoint results format: [x1, y1, s1, x2, y2, s2, ...] with x, y in COCO's pixel
        indices (``keypoint_offset`` subtracted) and s the keypoint's score; the record's ``score`` is the box's.
        """
        from maskrcnn.ops.masks import encode_rle  # noqa: PLC0415

        boxes = self.boxes.detach().cpu().tolist()
        scores = self.scores.detach().cpu().tolist()
        cats = self.category_ids
        names = self.class_names
        rles = encode_rle(self.masks) if self.masks is not None else [None] * len(boxes)
        kps: list[Any] = [None] * len(boxes)
        if self.keypoints is not None:
            k = self.keypoints.detach().cpu().to(torch.float64).clone()
            k[..., :2] -= self.keypoint_offset
            kps = k.flatten(1).tolist()
        out = []
        for (x1, y1, x2, y2), s, c, n, rle, kp in zip(boxes, scores, cats, names, rles, kps):
            rec: dict[str, Any] = {"image_id": int(image_id), "category_id": int(c), "category_name": n,
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
            if rle is not None:
                rec["segmentation"] = rle
            if kp is not None:
                rec["keypoints"] = kp
            rec.update(extra)
            out.append(rec)
        return out


# Masks are RLE-encoded this many at a time, so encoding never copies more than a few full-image masks at once.
_ENCODE_CHUNK = 8


def results_to_coco(result: Result, image_id: int, category_ids: Sequence[int] | None = None,
                    chunk_size: int = _ENCODE_CHUNK) -> list[dict[str, Any]]:
    """COCO results records of one image: bbox XYWH pixels, score, category_id, RLE ``segmentation`` (str counts).

    ``category_ids`` maps contiguous label i to ``category_ids[i - 1]``; by default the result's own table is used.
    """
    if category_ids is not None:
        result = replace(result, category_ids_table=tuple(int(c) for c in category_ids))
    n = len(result)
    if result.masks is None or n <= chunk_size:
        return result.to_coco(image_id)
    out: list[dict[str, Any]] = []
    for start in range(0, n, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, n), device=result.boxes.device)
        out.extend(result.filter(idx).to_coco(image_id))
    return out
