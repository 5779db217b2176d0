"""Seeded synthetic instance-segmentation data: squares, circles and triangles on noisy backgrounds, in COCO format.

Every object is rasterised with the same polygon rasteriser the dataset uses to decode annotations
(``maskrcnn.ops.masks.polygons_to_bitmap``) and its pixels are painted from that bitmap, so an annotation decodes
to exactly the pixels the object covers in the image. Later objects occlude earlier ones; an occluded instance is
written as a compressed RLE of its visible pixels (exact), an unoccluded one as its polygon. Placements that would
hide more than ``max_occlusion`` of an earlier object are redrawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.atomic import atomic_write_text
from maskrcnn.ops.masks import encode_rle, polygons_to_bitmap

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
# Polygon vertices are written (and rasterised) with this many decimals, so the JSON holds the exact polygon.
_DECIMALS = 2


def _size_range(image_size: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h_min, h_max), (w_min, w_max)) from (H, W) or ((h_min, h_max), (w_min, w_max))."""
    h, w = image_size
    hr = (int(h), int(h)) if np.isscalar(h) else (int(h[0]), int(h[1]))
    wr = (int(w), int(w)) if np.isscalar(w) else (int(w[0]), int(w[1]))
    if min(hr + wr) < 8 or hr[0] > hr[1] or wr[0] > wr[1]:
        raise ValueError(f"image_size must be (H, W) or ((h_min, h_max), (w_min, w_max)) of >= 8 px, got {image_size}")
    return hr, wr


def _circle_points(radius: float, tolerance: float) -> int:
    """Vertices for a polygon whose edges stay within ``tolerance`` pixels of a circle of ``radius``."""
    if radius <= tolerance:
        return 8
    # The sagitta of a chord spanning angle a is r(1 - cos(a/2)); keep it <= tolerance.
    return max(8, math.ceil(math.pi / math.acos(1.0 - tolerance / radius)))


def _shape_polygon(category: int, cx: float, cy: float, size: float, angle: float, tolerance: float) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] polygon (pixels) of a shape of diameter/side ``size`` centred at (cx, cy)."""
    if category == 1:  # square of side `size`
        radius = size / math.sqrt(2.0)
        angles = angle + math.pi / 4 + np.arange(4) * math.pi / 2
    elif category == 2:  # circle of diameter `size`
        radius = size / 2.0
        n = _circle_points(radius, tolerance)
        angles = angle + np.arange(n) * 2 * math.pi / n
    else:  # equilateral triangle with side `size`
        radius = size / math.sqrt(3.0)
        angles = angle + np.arange(3) * 2 * math.pi / 3
    xs = cx + radius * np.cos(angles)
    ys = cy + radius * np.sin(angles)
    return [round(float(v), _DECIMALS) for xy in zip(xs, ys) for v in xy]


def _background(rng: np.random.Generator, height: int, width: int, noise_std: float) -> np.ndarray:
    """(H, W, 3) float background: a linear gradient between two random colours plus Gaussian noise."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (xx * math.cos(theta) + yy * math.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + (c1 - c0) * t[:, :, None]
    return img + rng.normal(0.0, noise_std, size=img.shape)


def _render_image(rng: np.random.Generator, height: int, width: int, num_objects: int, object_size: tuple[float, float],
                  max_occlusion: float, noise_std: float, min_contrast: float, tolerance: float, max_tries: int,
                  touching: float = 0.0) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (H, W, 3) uint8 and its objects: category, polygon, full mask and visible mask."""
    img = _background(rng, height, width, noise_std)
    objects: list[dict[str, Any]] = []
    short = min(height, width)
    for _ in range(num_objects):
        for _try in range(max_tries):
            cat = int(rng.integers(1, len(CATEGORIES) + 1))
            size = float(rng.uniform(*object_size)) * short
            half = size / 2.0
            cx = float(rng.uniform(half, width - half))
            cy = float(rng.uniform(half, height - half))
            # Draws only when asked for, so that touching=0 keeps every earlier dataset byte for byte.
            if touching > 0 and objects and rng.uniform() < touching:
                # Centre at about the sum of the two radii from an earlier object: the shapes touch or overlap.
                other = objects[int(rng.integers(len(objects)))]
                dist = (half + other["size"] / 2.0) * float(rng.uniform(0.6, 1.0))
                theta = float(rng.uniform(0, 2 * math.pi))
                cx = float(np.clip(other["cx"] + dist * math.cos(theta), half, width - half))
                cy = float(np.clip(other["cy"] + dist * math.sin(theta), half, height - half))
            poly = _shape_polygon(cat, cx, cy, size, float(rng.uniform(0, 2 * math.pi)), tolerance)
            mask = polygons_to_bitmap([poly], height, width).astype(bool)
            if not mask.any():
                continue
            # An earlier object must keep at least (1 - max_occlusion) of its own area visible.
            if any((o["visible"] & ~mask).sum() < (1.0 - max_occlusion) * o["area"] for o in objects):
                continue
            base = img[mask].mean(axis=0)
            colour = rng.uniform(0, 255, size=3)
            for _c in range(max_tries):
                if np.linalg.norm(colour - base) >= min_contrast:
                    break
                colour = rng.uniform(0, 255, size=3)
            break
        else:
            continue  # no acceptable placement: the image gets fewer objects
        for o in objects:
            o["visible"] &= ~mask
        texture = rng.normal(0.0, noise_std / 2, size=(int(mask.sum()), 3))
        img[mask] = colour + texture
        objects.append({"category_id": cat, "polygon": poly, "visible": mask.copy(), "area": int(mask.sum()),
                        "cx": cx, "cy": cy, "size": size})
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def generate_shapes(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    image_size: tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = (256, 256),
    min_objects: int = 1,
    max_objects: int = 4,
    object_size: tuple[float, float] = (0.15, 0.45),
    max_occlusion: float = 0.5,
    noise_std: float = 8.0,
    min_contrast: float = 80.0,
    circle_tolerance: float = 0.25,
    max_tries: int = 50,
    touching: float = 0.0,
) -> Path:
    """Write ``out_dir/images/NNNNNN.png`` and ``out_dir/annotations.json`` (COCO); returns the JSON's path.

    image_size: (H, W) pixels, or ((h_min, h_max), (w_min, w_max)) drawn per image. object_size: (min, max) side or
    diameter as a fraction of the image's short side. max_occlusion: largest hidden fraction of an earlier object
    (0 forbids overlap). noise_std: background noise in 8-bit levels (objects get half). min_contrast: least RGB
    distance between an object's colour and the background under it. circle_tolerance: largest gap in pixels
    between a circle and its polygon. touching: probability that an object is placed against an earlier one
    (centres 0.6 to 1 times the sum of their radii apart: touching or overlapping, within max_occlusion), for
    crowded scenes; 0 places every object independently. Image ``i`` depends only on (seed, i): same seed,
    byte-identical output.
    The COCO ``file_name`` entries are relative to ``out_dir`` (use it as the dataset's image_dir).
    """
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0 <= touching <= 1:
        raise ValueError(f"touching must be a probability in [0, 1], got {touching}")
    if not 0 < object_size[0] <= object_size[1] <= 1:
        raise ValueError(f"object_size must be 0 < min <= max <= 1 (fractions of the short side), got {object_size}")
    (h_lo, h_hi), (w_lo, w_hi) = _size_range(image_size)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        rng = np.random.default_rng([int(seed), i])
        height = int(rng.integers(h_lo, h_hi + 1))
        width = int(rng.integers(w_lo, w_hi + 1))
        n = int(rng.integers(min_objects, max_objects + 1))
        pixels, objects = _render_image(rng, height, width, n, object_size, max_occlusion, noise_std, min_contrast,
                                        circle_tolerance, max_tries, touching)
        file_name = f"images/{i:06d}.png"
        Image.fromarray(pixels).save(out_dir / file_name, format="PNG")
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for o in objects:
            visible = o["visible"]
            rle = encode_rle(visible[None])[0]
            occluded = int(visible.sum()) < o["area"]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": o["category_id"],
                "segmentation": rle if occluded else [o["polygon"]],
                "area": float(visible.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox({**rle, "counts": rle["counts"].encode("ascii")})],
                "iscrowd": 0,
            })
    data = {
        "info": {"description": "maskrcnn synthetic shapes", "seed": int(seed), "num_images": int(num_images)},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    ann_path = out_dir / "annotations.json"
    atomic_write_text(ann_path, json.dumps(data))
    return ann_path
