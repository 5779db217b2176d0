"""Drawing detections: translucent masks with contours, box outlines and score labels, keypoint skeletons, and
per-instance mask PNGs.

Everything is numpy (masks, contours) plus PIL (boxes, text); work per instance is vectorised and cropped to the
instance's bounding box, so cost grows with the instances' size rather than N x H x W.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from maskrcnn.atomic import atomic_write
from maskrcnn.structures import MaskCrops, Result

__all__ = [
    "PALETTE",
    "color_for",
    "text_color_for",
    "to_hwc_uint8",
    "default_line_width",
    "default_font_size",
    "draw_instances",
    "draw_keypoints",
    "draw_result",
    "joint_color",
    "save_mask_pngs",
]

# Sasha Trubetskoy's "20 distinct colours", ordered most-distinct first, without grey and beige: both vanish on
# grey or light photographs. Neighbouring indices (which are neighbouring scores) get the most different hues.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
)

RGB = tuple[int, int, int]

# Rows blended per float pass: 512 rows of a 12000-pixel-wide picture are 74 MB of float32.
_BLEND_BAND_ROWS = 512


def color_for(index: int) -> RGB:
    """Palette colour (R, G, B) in 0..255 for instance ``index``; cycles through ``PALETTE``."""
    return PALETTE[int(index) % len(PALETTE)]


def _relative_luminance(rgb: Sequence[float]) -> float:
    """WCAG relative luminance in [0, 1] of an sRGB colour given in 0..255."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ np.array([0.2126, 0.7152, 0.0722]))


def text_color_for(background: Sequence[float]) -> RGB:
    """Black or white (R, G, B), whichever has the higher WCAG contrast ratio on ``background`` (0..255)."""
    lum = _relative_luminance(background)
    # Contrast ratio is (L_light + 0.05) / (L_dark + 0.05); compare black's against white's.
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


def to_hwc_uint8(image: Any) -> np.ndarray:
    """Any RGB image (HWC/CHW numpy or tensor, uint8 or float in [0, 1], or a path) as a new (H, W, 3) uint8 array."""
    if isinstance(image, (str, Path)):
        return _read_image(image)
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3):  # tensors follow the package's (3, H, W) convention
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] not in (1, 3) and arr.shape[0] in (1, 3):
            arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {tuple(np.shape(image))}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr).copy()
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    is_float = np.issubdtype(arr.dtype, np.floating)
    arr = arr.astype(np.float32)
    if is_float and arr.size and float(np.nanmax(arr)) <= 1.0:  # floats in [0, 1]; larger ones are taken as 0..255
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _read_image(path: str | Path) -> np.ndarray:
    """Image file as (H, W, 3) uint8 RGB, through ``maskrcnn.io`` when it exists."""
    try:
        from maskrcnn.io import read_image  # noqa: PLC0415 - optional sibling module
    except ImportError:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    return np.asarray(read_image(path))


def default_line_width(height: int, width: int) -> int:
    """Box/contour line width in pixels for an image of this size: about 1/320 of its geometric-mean side."""
    return max(1, int(round(np.sqrt(height * width) / 320.0)))


def default_font_size(height: int, width: int) -> int:
    """Label font size in pixels for an image of this size: about 1/40 of its geometric-mean side, at least 9."""
    return max(9, int(round(np.sqrt(height * width) / 40.0)))


def _load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font at ``size`` pixels; the fixed-size bitmap font on Pillow < 10.1 or without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Tensor or array-like as a numpy array (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)


def _bbox_of_mask(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (y0, y1, x0, x1) half-open bounds of the True pixels of an (H, W) mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """4-neighbour binary erosion of an (h, w) bool array; outside the array counts as background."""
    out = mask
    for _ in range(iterations):
        p = np.pad(out, 1, constant_values=False)
        out = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


def _label_rect(text_size: tuple[int, int], pad: int, box: Sequence[float], height: int,
                width: int) -> tuple[int, int, int, int]:
    """Where a label of ``text_size`` (w, h) goes for ``box`` XYXY: (x0, y0, x1, y1) pixels, inside the image.

    Above the box's top-left corner when there is room, else just inside the box's top edge; shifted left or up so
    that it never leaves the image.
    """
    tw, th = text_size
    w, h = tw + 2 * pad, th + 2 * pad
    bx0, by0 = int(round(float(box[0]))), int(round(float(box[1])))
    x0 = min(max(bx0, 0), max(width - w, 0))
    y0 = by0 - h if by0 - h >= 0 else max(by0, 0)
    y0 = min(y0, max(height - h, 0))
    return x0, y0, min(x0 + w, width) - 1, min(y0 + h, height) - 1


def _text_extent(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) ink bounds of ``text`` drawn at the origin, in pixels."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(left), int(top), int(right), int(bottom)


def draw_instances(
    image: Any,
    boxes: Any | None,
    masks: Any | None,
    labels_text: Sequence[str] | None,
    colors: Sequence[Sequence[int]] | None = None,
    alpha: float = 0.5,
    line_width: int | None = None,
    font_size: int | None = None,
    show_masks: bool = True,
    show_boxes: bool = True,
    show_labels: bool = True,
    draw_contours: bool = True,
    as_image: bool = False,
) -> np.ndarray | Image.Image:
    """Draw N instances on ``image``: boxes (N, 4) XYXY px, masks (N, H, W) bool, N label strings -> (H, W, 3) uint8.

    ``colors`` gives one (R, G, B) 0..255 per instance (default: ``color_for(i)``). Instance 0 is drawn last, so
    with score-sorted input the best detection ends on top. Any of boxes / masks / labels_text may be None.
    ``masks`` may be :class:`MaskCrops`, drawn from their windows. ``as_image`` returns the PIL image instead of
    an array (one copy of a large picture fewer, for saving it).
    """
    out = to_hwc_uint8(image)
    height, width = out.shape[:2]
    box_arr = None if boxes is None else _as_numpy(boxes, np.float64).reshape(-1, 4)
    # MaskCrops stay crops: drawing never needs an (N, H, W) array.
    mask_arr = None if masks is None else masks if isinstance(masks, MaskCrops) else _as_numpy(masks)
    n = next((len(x) for x in (box_arr, mask_arr, labels_text) if x is not None), 0)
    for name, x in (("boxes", box_arr), ("masks", mask_arr), ("labels_text", labels_text)):
        if x is not None and len(x) != n:
            raise ValueError(f"{name} has {len(x)} entries, expected {n}")
    if n == 0:
        return Image.fromarray(out) if as_image else out
    if mask_arr is not None and tuple(mask_arr.shape[1:]) != (height, width):
        raise ValueError(f"masks are {tuple(mask_arr.shape[1:])}, the image is {(height, width)}")
    cols = [tuple(int(v) for v in c) for c in colors] if colors is not None else [color_for(i) for i in range(n)]
    if len(cols) != n:
        raise ValueError(f"{len(cols)} colours for {n} instances")
    lw = int(line_width) if line_width is not None else default_line_width(height, width)
    fs = int(font_size) if font_size is not None else default_font_size(height, width)
    order = range(n - 1, -1, -1)

    if show_masks and mask_arr is not None:
        contour_iters = max(1, (lw + 1) // 2)
        shapes = []  # per instance: (y0, x0, tight crop, contour pixels) or None
        for i in range(n):
            found = _instance_crop(mask_arr, i)
            if found is None:
                shapes.append(None)
                continue
            y0, x0, crop = found
            # Inner boundary only, so the contour never paints outside the mask it outlines.
            edge = crop & ~_erode(crop, contour_iters) if draw_contours else None
            shapes.append((y0, x0, crop, edge))
        # Blended in float one band of rows at a time, so the float copy never spans the whole picture;
        # each pixel gets the same operations in the same order as a whole-image pass.
        for b0 in range(0, height, _BLEND_BAND_ROWS):
            b1 = min(b0 + _BLEND_BAND_ROWS, height)
            band = out[b0:b1].astype(np.float32)
            for i in order:
                if shapes[i] is None:
                    continue
                y0, x0, crop, edge = shapes[i]
                r0, r1 = max(y0, b0), min(y0 + crop.shape[0], b1)
                if r1 <= r0:
                    continue
                region = band[r0 - b0: r1 - b0, x0: x0 + crop.shape[1]]
                sub = crop[r0 - y0: r1 - y0]
                color = np.asarray(cols[i], dtype=np.float32)
                region[sub] = region[sub] * (1.0 - alpha) + color * alpha
                if edge is not None:
                    region[edge[r0 - y0: r1 - y0]] = color
            out[b0:b1] = np.clip(np.rint(band), 0, 255).astype(np.uint8)

    if not ((show_boxes and box_arr is not None) or (show_labels and labels_text is not None)):
        return Image.fromarray(out) if as_image else out
    pil = Image.fromarray(out)
    del out  # PIL holds its own copy now; a 12000x9000 picture is 0.3 GB
    draw = ImageDraw.Draw(pil)
    if show_boxes and box_arr is not None:
        for i in order:
            x0, y0, x1, y1 = (float(v) for v in box_arr[i])
            if not np.isfinite([x0, y0, x1, y1]).all() or x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
                continue
            x0, x1 = np.clip([round(x0), round(x1)], 0, width - 1)
            y0, y1 = np.clip([round(y0), round(y1)], 0, height - 1)
            if x1 < x0 or y1 < y0:
                continue
            draw.rectangle([int(x0), int(y0), int(x1), int(y1)], outline=cols[i], width=lw)
    if show_labels and labels_text is not None:
        font = _load_font(fs)
        pad = max(1, fs // 6)
        for i in order:
            text = str(labels_text[i])
            if not text:
                continue
            left, top, right, bottom = _text_extent(draw, text, font)
            ref = box_arr[i] if box_arr is not None else _mask_corner(mask_arr, i)
            rect = _label_rect((right - left, bottom - top), pad, ref, height, width)
            draw.rectangle(rect, fill=cols[i])
            draw.text((rect[0] + pad - left, rect[1] + pad - top), text, fill=text_color_for(cols[i]), font=font)
    return pil if as_image else np.array(pil)


def _instance_crop(masks: np.ndarray | MaskCrops, i: int) -> tuple[int, int, np.ndarray] | None:
    """(y0, x0, tight (h, w) bool crop) of mask ``i``'s True pixels, or None when it has none."""
    if isinstance(masks, MaskCrops):
        m = _as_numpy(masks.crop(i))
        oy, ox = int(masks.offsets[i, 1]), int(masks.offsets[i, 0])
    else:
        m, oy, ox = masks[i], 0, 0
    m = m if m.dtype == np.bool_ else m > 0.5
    bounds = _bbox_of_mask(m) if m.size else None
    if bounds is None:
        return None
    y0, y1, x0, x1 = bounds
    return oy + y0, ox + x0, m[y0:y1, x0:x1]


def _mask_corner(masks: np.ndarray | MaskCrops | None, i: int) -> tuple[float, float, float, float]:
    """Box XYXY of mask ``i`` (the image origin when there is no mask), to anchor a label without boxes."""
    found = None if masks is None else _instance_crop(masks, i)
    if found is None:
        return 0.0, 0.0, 0.0, 0.0
    y0, x0, crop = found
    return float(x0), float(y0), float(x0 + crop.shape[1]), float(y0 + crop.shape[0])


def joint_color(index: int, num_keypoints: int) -> RGB:
    """Colour (R, G, B) 0..255 of keypoint ``index`` of ``num_keypoints``: a rainbow, the same joint alike in
    every instance (Detectron's keypoint drawings)."""
    r, g, b = colorsys.hsv_to_rgb(index / max(num_keypoints, 1), 0.85, 1.0)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def draw_keypoints(
    image: Any,
    keypoints: Any,
    skeleton: Sequence[Sequence[int]] = (),
    threshold: float = 0.0,
    radius: int | None = None,
    line_width: int | None = None,
) -> np.ndarray:
    """Draw (N, K, 3) keypoints [x, y, score] (px of ``image``) and their skeleton: (H, W, 3) uint8 RGB.

    Joints scoring under ``threshold`` are skipped, and so is every limb (a ``skeleton`` pair of 0-based keypoint
    indices) that touches one. Limbs take the colour of their first joint; joints are dots in their own colour
    (:func:`joint_color`) with a dark rim, drawn over the limbs.
    """
    out = to_hwc_uint8(image)
    kps = _as_numpy(keypoints, np.float64)
    if kps.size == 0:
        return out
    if kps.ndim != 3 or kps.shape[2] < 3:
        raise ValueError(f"keypoints must be (N, K, 3) [x, y, score], got shape {kps.shape}")
    height, width = out.shape[:2]
    num_kp = kps.shape[1]
    bad = [pair for pair in skeleton if not all(0 <= int(i) < num_kp for i in pair)]
    if bad:
        raise ValueError(f"skeleton pairs {bad[:3]} name keypoints outside 0..{num_kp - 1}")
    lw = int(line_width) if line_width is not None else default_line_width(height, width)
    rad = int(radius) if radius is not None else max(2, lw + 1)
    shown = (kps[..., 2] >= threshold) & np.isfinite(kps).all(axis=2)
    colors = [joint_color(k, num_kp) for k in range(num_kp)]
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for n in range(kps.shape[0] - 1, -1, -1):  # the first (best) instance ends on top
        for a, b in skeleton:
            a, b = int(a), int(b)
            if shown[n, a] and shown[n, b]:
                draw.line([(kps[n, a, 0], kps[n, a, 1]), (kps[n, b, 0], kps[n, b, 1])], fill=colors[a], width=lw)
        for k in np.flatnonzero(shown[n]):
            x, y = kps[n, k, 0], kps[n, k, 1]
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=colors[k], outline=(0, 0, 0))
    return np.asarray(pil).copy()


def draw_result(
    image: Any,
    result: Result,
    score_threshold: float = 0.0,
    show_masks: bool = True,
    show_boxes: bool = True,
    show_labels: bool = True,
    alpha: float = 0.5,
    line_width: int | None = None,
    font_size: int | None = None,
    show_keypoints: bool = True,
    keypoint_threshold: float | None = None,
    as_image: bool = False,
) -> np.ndarray | Image.Image:
    """Overlay of ``result``'s detections with score >= ``score_threshold`` on ``image``: (H, W, 3) uint8 RGB
    (a PIL image with ``as_image``).

    ``image`` is (H, W, 3) uint8 numpy, a (3, H, W) uint8 or [0, 1] float tensor, or a path. Labels read
    "name 0.93". Colours follow each detection's index in the unfiltered result, so they stay put when the
    threshold changes. Keypoints (when the result has them) are drawn with their skeleton; joints scoring under
    ``keypoint_threshold`` (default: the result's ``keypoint_threshold``, the model's) are left out.
    """
    scores = _as_numpy(result.scores, np.float64).reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)
    names = result.class_names
    texts = [f"{names[i]} {scores[i]:.2f}" for i in keep]
    masks = None
    if show_masks and result.masks is not None:
        if isinstance(result.masks, MaskCrops):
            masks = result.masks.select(torch.as_tensor(keep, dtype=torch.long))
        else:
            masks = _as_numpy(result.masks[torch.as_tensor(keep, dtype=torch.long)]
                              if isinstance(result.masks, torch.Tensor) else np.asarray(result.masks)[keep])
    boxes = _as_numpy(result.boxes, np.float64).reshape(-1, 4)[keep]
    out = draw_instances(image, boxes, masks, texts, colors=[color_for(i) for i in keep], alpha=alpha,
                         line_width=line_width, font_size=font_size, show_masks=show_masks,
                         show_boxes=show_boxes, show_labels=show_labels)
    if show_keypoints and result.keypoints is not None and len(keep):
        kps = _as_numpy(result.keypoints, np.float64)[keep]
        thresh = result.keypoint_threshold if keypoint_threshold is None else keypoint_threshold
        out = draw_keypoints(out, kps, result.skeleton_table, thresh, line_width=line_width)
    return Image.fromarray(out) if as_image else out


def _safe_name(name: str) -> str:
    """``name`` reduced to characters safe in a file name on every OS."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "object"


def save_mask_pngs(result: Result, out_dir: str | Path, stem: str) -> list[Path]:
    """Write each instance's (H, W) mask as a 1-bit PNG ``<stem>_<i:03d>_<class>.png`` in ``out_dir``; return paths."""
    if result.masks is None:
        raise ValueError("this result has no masks (the model has no mask head)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = result.class_names
    paths = []
    for i in range(len(result)):
        # One mask at a time: never hold a second copy of all N full-image masks.
        m = _as_numpy(result.masks[i])
        m = m if m.dtype == np.bool_ else m > 0.5
        path = out_dir / f"{stem}_{i:03d}_{_safe_name(names[i])}.png"
        atomic_write(path, True, lambda f, m=m: Image.fromarray(np.ascontiguousarray(m)).save(f, format="PNG"))
        paths.append(path)
    return paths
