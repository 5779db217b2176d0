"""Shortest-edge resizing: torchvision's size arithmetic, and detectron2's (with Pillow's uint8 bilinear resize)."""

from __future__ import annotations

import math

import numpy as np
import torch


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """Scale factor bringing the short side to ``min_size`` unless the long side would pass ``max_size``.

    Computed with Python floats (double precision), as torchvision does in eager mode, so the resized size
    agrees to the pixel (a float32 division can land just under a whole size and lose a row: 320/400 in float32
    is 0.79999995, and floor(400 * 0.79999995) = 319).
    """
    return min(float(min_size) / min(height, width), float(max_size) / max(height, width))


def resized_size(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """(H, W) after resizing by :func:`resize_scale`, as ``F.interpolate(recompute_scale_factor=True)`` floors it."""
    scale = resize_scale(height, width, min_size, max_size)
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


# ---------------------------------------------------------------------------------------------------
# detectron2's ResizeShortestEdge: its output-size arithmetic and Pillow's bilinear resize of uint8 images


def shortest_edge_size(height: int, width: int, short_edge_length: float, max_size: float) -> tuple[int, int]:
    """(H, W) that detectron2's ``ResizeShortestEdge.get_output_shape`` gives for an image of (height, width) px.

    The short side becomes ``short_edge_length`` and the long side ``scale`` times its length, both as floats;
    if the long side then passes ``max_size`` both are scaled down again, and each is rounded with
    int(x + 0.5). Unlike torchvision's :func:`resized_size` (one scale, floored), the side set to the target
    length is exact, and the other side is rounded to nearest.
    """
    size = float(short_edge_length)
    scale = size / min(height, width)
    if height < width:
        newh, neww = size, scale * width
    else:
        newh, neww = scale * height, size
    if max(newh, neww) > max_size:
        scale = float(max_size) / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


PIL_PRECISION_BITS = 22  # Pillow's fixed-point fraction bits for 8-bit images: 32 - 8 - 2 (sign and overflow)


def _pil_bilinear_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and fixed-point weights, both (out_size, taps) int64, of Pillow's antialiased bilinear filter.

    As Pillow's ``precompute_coeffs`` (filter support 1 px, widened by the scale when shrinking) and
    ``normalize_coeffs_8bpc``: double-precision tent weights around each output pixel's centre, normalised by
    their sum taken in tap order, then rounded half away from zero to ``PIL_PRECISION_BITS`` fraction bits.
    Taps past a pixel's window have weight 0 and a valid index.
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    f64 = torch.float64
    center = (torch.arange(out_size, dtype=f64, device=device) + 0.5) * scale
    # C's (int) cast truncates toward zero.
    xmin = torch.trunc(center - support + 0.5).clamp(min=0)
    xmax = torch.trunc(center + support + 0.5).clamp(max=in_size) - xmin
    x = torch.arange(taps, dtype=f64, device=device)
    t = ((x[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
    w = torch.where(t.abs() < 1.0, 1.0 - t.abs(), torch.zeros_like(t))
    w = torch.where(x[None, :] < xmax[:, None], w, torch.zeros_like(w))
    total = torch.zeros_like(center)
    for i in range(taps):  # a loop over filter taps: the sum is rounded in Pillow's order
        total = total + w[:, i]
    w = torch.where(total[:, None] != 0.0, w / total[:, None], w)
    one = float(1 << PIL_PRECISION_BITS)
    fixed = torch.where(w < 0, torch.trunc(-0.5 + w * one), torch.trunc(0.5 + w * one)).to(torch.int64)
    index = (xmin.to(torch.int64)[:, None] + x.to(torch.int64)[None, :]).clamp(max=in_size - 1)
    return index, fixed


def _pil_resample_axis(image: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One pass of Pillow's 8-bit resample along ``dim`` of an int64 image: int64 values in [0, 255]."""
    index, weight = _pil_bilinear_taps(image.shape[dim], out_size, image.device)
    shape = [1] * image.dim()
    shape[dim] = out_size
    acc = torch.full((), 1 << (PIL_PRECISION_BITS - 1), dtype=torch.int64, device=image.device)
    for i in range(index.shape[1]):  # a loop over filter taps; integer sums are exact in any order
        acc = acc + image.index_select(dim, index[:, i]) * weight[:, i].view(shape)
    # Pillow's clip8: an arithmetic shift (floor), then a clamp to the uint8 range.
    return torch.div(acc, 1 << PIL_PRECISION_BITS, rounding_mode="floor").clamp(0, 255)


def pil_vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether Pillow (13) runs the vertical pass of a two-pass resize first: when the height shrinks by more than
    twice as many pixels as the width does. The order changes the result, since each pass rounds to uint8.

    Read off Pillow 13.0.0's ``ImagingResampleInner`` (the version detectron2's fixtures were made with) and
    checked against it on 366 size pairs; Pillow's C code before it always ran the horizontal pass first.
    """
    shrink_h = in_hw[0] - out_hw[0]
    return shrink_h > 0 and shrink_h > 2 * (in_hw[1] - out_hw[1])


def resize_uint8_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, C) or (H, W) image, C in {1, 3} -> (h, w, C) or (h, w) uint8, ``size`` = (h, w): Pillow's bilinear.

    Byte for byte what ``Image.fromarray(image).resize((w, h), Image.BILINEAR)`` returns (Pillow 13): a separable
    filter whose support grows with the shrink factor (so shrinking is antialiased), fixed-point weights, one pass
    per axis rounded to uint8, the horizontal one first unless :func:`pil_vertical_first`. Four-channel images are
    not accepted, because Pillow premultiplies the alpha of RGBA images around the resize.
    """
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.dim() == 3 and image.shape[2] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {image.shape[2]}")
    if image.dim() not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {tuple(image.shape)}")
    out_h, out_w = size
    work = image.to(torch.int64)
    passes = [(out_w, 1), (out_h, 0)]
    if pil_vertical_first((image.shape[0], image.shape[1]), (out_h, out_w)):
        passes.reverse()
    for out_size, dim in passes:  # a loop over the two axes, in Pillow's order
        if out_size != work.shape[dim]:
            work = _pil_resample_axis(work, out_size, dim)
    return work.to(torch.uint8)


def resize_shortest_edge(image: torch.Tensor, short_edge_length: float, max_size: float) -> torch.Tensor:
    """uint8 (H, W, C) image -> (h, w, C) uint8 resized as detectron2's ``ResizeShortestEdge`` does at test time.

    On the CPU Pillow itself does the resize (~10x faster than :func:`resize_uint8_bilinear`, same bytes); on an
    accelerator the torch implementation keeps the image on the device.
    """
    h, w = shortest_edge_size(image.shape[0], image.shape[1], short_edge_length, max_size)
    if (h, w) == tuple(image.shape[:2]):
        return image
    if image.device.type == "cpu" and image.dim() == 3 and image.shape[2] == 3:
        from PIL import Image  # noqa: PLC0415 - a dependency; only this path needs it

        resized = Image.fromarray(image.contiguous().numpy()).resize((w, h), Image.BILINEAR)
        return torch.from_numpy(np.asarray(resized).copy())
    return resize_uint8_bilinear(image, (h, w))
