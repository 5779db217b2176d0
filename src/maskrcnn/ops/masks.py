"""Mask operations: COCO polygons/RLE <-> bitmaps, RoI mask targets, and pasting RoI masks into images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def polygons_to_bitmap(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (lists of x,y in pixels) of one instance: (H, W) uint8 in {0, 1}."""
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)


def rle_to_bitmap(rle: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (uncompressed ``counts`` list or compressed string): (H, W) uint8 in {0, 1}."""
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(np.uint8)


def segmentation_to_bitmap(segm: Any, height: int, width: int) -> np.ndarray:
    """Any COCO ``segmentation`` field (polygons, RLE or compressed RLE): (H, W) uint8 in {0, 1}."""
    if isinstance(segm, list):
        return polygons_to_bitmap(segm, height, width)
    if isinstance(segm, dict):
        return rle_to_bitmap(segm, height, width)
    raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")


def encode_rle(masks: torch.Tensor | np.ndarray | MaskCrops) -> list[dict[str, Any]]:
    """Encode (N, H, W) binary masks to compressed COCO RLEs with ``counts`` as a str (JSON-ready).

    :class:`MaskCrops` are encoded from their windows, without an image-sized array.
    """
    if isinstance(masks, MaskCrops):
        return masks.to_rle()
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(arr)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def crop_to_rle(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict[str, Any]:
    """Compressed COCO RLE (str counts) of an HxW mask that is 0 except for the (h, w) bool ``crop`` at (x0, y0).

    Works on the crop alone: COCO runs go down the columns, so each crop column's runs sit at ``x * H + y`` of
    the column-major image, and runs that continue across a column break (crop touching the top and bottom
    borders) are joined.
    """
    h, w = crop.shape
    starts = ends = np.zeros(0, dtype=np.int64)
    if h and w and crop.any():
        padded = np.zeros((w, h + 2), dtype=np.int8)
        padded[:, 1:-1] = crop.T
        step = np.diff(padded, axis=1)
        cs, rs = np.nonzero(step == 1)  # row-major over (column, row): column-major order in the image
        ce, re_ = np.nonzero(step == -1)
        starts = (x0 + cs).astype(np.int64) * height + (y0 + rs)
        ends = (x0 + ce).astype(np.int64) * height + (y0 + re_)
        joined = np.flatnonzero(ends[:-1] == starts[1:])
        if joined.size:
            keep = np.ones(len(starts), dtype=bool)
            keep[joined + 1] = False
            ends_keep = np.ones(len(ends), dtype=bool)
            ends_keep[joined] = False
            starts, ends = starts[keep], ends[ends_keep]
    edges = np.empty(2 * len(starts) + 2, dtype=np.int64)
    edges[0], edges[-1] = 0, height * width
    edges[1:-1:2], edges[2:-1:2] = starts, ends
    counts = np.diff(edges).tolist()
    if len(counts) > 1 and counts[-1] == 0:
        counts.pop()  # a mask that ends in ones has no closing run of zeros (as pycocotools encodes it)
    rle = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class MaskCrops:
    """N bool masks of an (H, W) image, each kept only over its window, compressed: memory follows the detections.

    Mask i is False outside an (h_i, w_i) window whose top-left pixel is ``offsets[i] = (x0, y0)``; the window
    is held as a COCO run-length encoding of its own pixels (a few bytes per boundary pixel), and decoded one
    mask at a time when wanted (:meth:`crop`, :meth:`mask`). :meth:`dense` builds the (N, H, W) tensor on
    request. Used where an (N, H, W) bool tensor is, it turns into one: torch functions, tensor methods and
    numpy conversion densify it (``torch.equal(crops, t)``, ``crops.any(0)``, ``np.asarray(crops)``); indexing
    with an integer gives that mask at full size, with a slice, index or bool tensor a MaskCrops of the selection.
    """

    def __init__(self, rles: list[dict[str, Any] | None], offsets: torch.Tensor, sizes: torch.Tensor,
                 image_size: tuple[int, int]) -> None:
        """rles: pycocotools RLEs of each window (None for an empty one); offsets (N, 2) int64 (x0, y0) and
        sizes (N, 2) int64 (h, w) of the windows, in pixels; image_size: (H, W). See :meth:`from_crops`."""
        if not len(rles) == int(offsets.shape[0]) == int(sizes.shape[0]):
            raise ValueError(f"{len(rles)} windows, {int(offsets.shape[0])} offsets, {int(sizes.shape[0])} sizes")
        self.rles = list(rles)
        self.offsets = offsets.reshape(-1, 2).to(torch.int64).cpu()
        self.sizes = sizes.reshape(-1, 2).to(torch.int64).cpu()
        self.image_size = (int(image_size[0]), int(image_size[1]))

    @classmethod
    def from_crops(cls, crops: list[torch.Tensor], offsets: torch.Tensor, image_size: tuple[int, int]) -> MaskCrops:
        """From N (h_i, w_i) bool windows and their (N, 2) (x0, y0) offsets in an (H, W) image."""
        return cls([encode_window(c) for c in crops], offsets,
                   torch.tensor([list(c.shape) for c in crops], dtype=torch.int64).reshape(-1, 2), image_size)

    def __len__(self) -> int:
        """Number of masks N."""
        return len(self.rles)

    @property
    def shape(self) -> torch.Size:
        """(N, H, W), the shape of :meth:`dense`."""
        return torch.Size((len(self), *self.image_size))

    @property
    def dtype(self) -> torch.dtype:
        """Always ``torch.bool``."""
        return torch.bool

    @property
    def ndim(self) -> int:
        """3, as (N, H, W)."""
        return 3

    @property
    def device(self) -> torch.device:
        """The CPU: the windows are held compressed in host memory."""
        return torch.device("cpu")

    def dim(self) -> int:
        """3, as (N, H, W)."""
        return 3

    def nbytes(self) -> int:
        """Bytes held by the compressed windows (what memory the masks take)."""
        return sum(len(r["counts"]) for r in self.rles if r is not None)

    def crop(self, i: int) -> torch.Tensor:
        """Window ``i``, decoded: (h_i, w_i) bool."""
        rle = self.rles[i]
        h, w = (int(v) for v in self.sizes[i])
        if rle is None:
            return torch.zeros((h, w), dtype=torch.bool)
        return torch.from_numpy(mask_utils.decode(rle).astype(bool))

    @property
    def crops(self) -> list[torch.Tensor]:
        """Every window decoded (N tensors of their box's size)."""
        return [self.crop(i) for i in range(len(self))]

    def mask(self, i: int) -> torch.Tensor:
        """Mask ``i`` at full size: (H, W) bool."""
        out = torch.zeros(self.image_size, dtype=torch.bool)
        crop = self.crop(i)
        x0, y0 = (int(v) for v in self.offsets[i])
        out[y0: y0 + crop.shape[0], x0: x0 + crop.shape[1]] = crop
        return out

    def dense(self) -> torch.Tensor:
        """All masks at full size: (N, H, W) bool (N x H x W bytes: only when really needed)."""
        out = torch.zeros(self.shape, dtype=torch.bool)
        for i in range(len(self)):
            crop = self.crop(i)
            x0, y0 = (int(v) for v in self.offsets[i])
            out[i, y0: y0 + crop.shape[0], x0: x0 + crop.shape[1]] = crop
        return out

    def select(self, index: Any) -> MaskCrops:
        """The masks picked by a slice, a list, an index tensor or a (N,) bool tensor."""
        if isinstance(index, slice):
            picks = list(range(len(self)))[index]
        else:
            t = torch.as_tensor(index)
            picks = (torch.nonzero(t.cpu(), as_tuple=True)[0] if t.dtype == torch.bool else t.cpu().reshape(-1))
            picks = [int(v) for v in picks]
        idx = torch.tensor(picks, dtype=torch.int64)
        return MaskCrops([self.rles[i] for i in picks], self.offsets[idx], self.sizes[idx], self.image_size)

    def __getitem__(self, index: Any) -> Any:
        """An int -> that (H, W) mask; a slice, list, index or bool tensor -> MaskCrops; tuples index dense()."""
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.dim() == 0
                                                     and index.dtype != torch.bool):
            i = int(index)
            return self.mask(i if i >= 0 else i + len(self))
        if isinstance(index, tuple):
            return self.dense()[index]
        return self.select(index)

    def __iter__(self) -> Any:
        """Each mask at full size, one at a time."""
        return (self.mask(i) for i in range(len(self)))

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Itself for a device move (the windows stay compressed on the host); another dtype densifies."""
        dense_dtype = next((a for a in (*args, kwargs.get("dtype")) if isinstance(a, torch.dtype)), None)
        if dense_dtype is not None and dense_dtype != torch.bool:
            return self.dense().to(*args, **kwargs)
        return self

    def cpu(self) -> MaskCrops:
        """Itself: the windows are held on the host."""
        return self

    def detach(self) -> MaskCrops:
        """Itself: bool masks carry no gradient."""
        return self

    def numpy(self) -> np.ndarray:
        """:meth:`dense` as an (N, H, W) bool numpy array."""
        return self.dense().numpy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """numpy's view of :meth:`dense`."""
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def area(self) -> torch.Tensor:
        """Pixels of each mask: (N,) int64."""
        return torch.tensor([0 if r is None else int(mask_utils.area(r)) for r in self.rles], dtype=torch.int64)

    def to_rle(self) -> list[dict[str, Any]]:
        """Compressed COCO RLEs (str counts) of every mask over the whole image, one window decoded at a time."""
        h, w = self.image_size
        return [crop_to_rle(self.crop(i).numpy(), int(x0), int(y0), h, w)
                for i, (x0, y0) in enumerate(self.offsets.tolist())]

    def __repr__(self) -> str:
        """One line: count, image size and the bytes held against the dense tensor's."""
        return (f"MaskCrops({len(self)} masks of {self.image_size[0]}x{self.image_size[1]}, {self.nbytes()} bytes "
                f"held for {len(self) * self.image_size[0] * self.image_size[1]} dense)")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """torch functions see the dense (N, H, W) tensor."""
        def densify(x: Any) -> Any:
            if isinstance(x, MaskCrops):
                return x.dense()
            if isinstance(x, (list, tuple)):
                return type(x)(densify(v) for v in x)
            if isinstance(x, dict):
                return {k: densify(v) for k, v in x.items()}
            return x
        return func(*densify(args), **densify(kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        """Any other tensor attribute or method, of the dense tensor (``any``, ``sum``, ``float``, ...)."""
        if name.startswith("__") or name in ("rles", "offsets", "sizes", "image_size"):
            raise AttributeError(name)
        return getattr(self.dense(), name)

    def __invert__(self) -> torch.Tensor:
        """~dense()."""
        return ~self.dense()

    def __and__(self, other: Any) -> torch.Tensor:
        """dense() & other."""
        return self.dense() & (other.dense() if isinstance(other, MaskCrops) else other)

    def __or__(self, other: Any) -> torch.Tensor:
        """dense() | other."""
        return self.dense() | (other.dense() if isinstance(other, MaskCrops) else other)


def encode_window(crop: torch.Tensor) -> dict[str, Any] | None:
    """pycocotools RLE (bytes counts) of an (h, w) bool window, or None when it holds no pixel at all."""
    if crop.numel() == 0:
        return None
    return mask_utils.encode(np.asfortranarray(crop.detach().cpu().numpy().astype(np.uint8)))


# ---------------------------------------------------------------------------------------------------
# RoI mask targets


def roi_mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor, size: int
                     ) -> torch.Tensor:
    """Crop-and-resize GT masks (G, H, W) to (K, size, size) soft targets for (K, 4) XYXY RoIs.

    ``matched_idxs`` (K,) picks each RoI's GT mask. As torchvision does, the crop is a legacy RoIAlign
    (aligned=False, adaptive sampling) of the binary mask, so targets are fractional at the edges.
    """
    from maskrcnn.ops.roi_align import roi_align  # noqa: PLC0415 - sibling op module

    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0, -1, False)[:, 0]


# ---------------------------------------------------------------------------------------------------
# Pasting RoI masks into the image


def _bilinear_axis(start: torch.Tensor, length: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_out: int,
                   n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-box bilinear source taps along one image axis for pasting an ``n_in`` mask resized to ``length``.

    start, length, lo, hi: (N,) int64 window origin, resized length and the clipped [lo, hi) image range.
    Returns (N, n_out) low index, high index, low weight, high weight and a validity mask. The source
    coordinate follows ``F.interpolate(mode="bilinear", align_corners=False)`` with an explicit output size:
    scale = n_in / length, src = max(scale * (dst + 0.5) - 0.5, 0).
    """
    pix = torch.arange(n_out, device=start.device)
    dst = pix[None, :] - start[:, None]
    valid = (pix[None, :] >= lo[:, None]) & (pix[None, :] < hi[:, None])
    scale = n_in / length.to(torch.float32)
    src = (scale[:, None] * (dst.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.to(torch.int64)
    step = (i0 < n_in - 1).to(torch.int64)
    w1 = src - i0.to(torch.float32)
    w0 = 1.0 - w1
    i0 = torch.where(valid, i0, torch.zeros_like(i0)).clamp(max=n_in - 1)
    i1 = (i0 + step).clamp(max=n_in - 1)
    return i0, i1, w0, w1, valid


def paste_masks_legacy(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int],
                       padding: int = 1) -> torch.Tensor:
    """torchvision's paste: (N, 1, M, M) soft masks into (N, 1, H, W) image-sized masks at (N, 4) XYXY boxes.

    Exactly torchvision's ``paste_masks_in_image``: pad the mask by ``padding`` pixels, grow the box by the same
    ratio, truncate it to integers, resize the mask to the box's (w+1, h+1) pixels bilinearly and copy the part
    inside the image. All boxes are done at once: the resize is separable, so each output pixel needs two row
    taps and two column taps of its own mask, which are gathered for every box together.
    """
    n = masks.shape[0]
    im_h, im_w = image_shape
    if n == 0:
        return masks.new_zeros((0, 1, im_h, im_w))
    m = masks.shape[-1]
    scale = float(m + 2 * padding) / m
    padded = torch.nn.functional.pad(masks, (padding,) * 4)[:, 0]
    mp = padded.shape[-1]
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half = w_half * scale
    h_half = h_half * scale
    exp = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1).to(torch.int64)
    x0, y0, x1, y1 = exp.unbind(1)
    w = (x1 - x0 + 1).clamp(min=1)
    h = (y1 - y0 + 1).clamp(min=1)
    ry0, ry1, wy0, wy1, vy = _bilinear_axis(y0, h, y0.clamp(min=0), (y1 + 1).clamp(max=im_h), im_h, mp)
    cx0, cx1, wx0, wx1, vx = _bilinear_axis(x0, w, x0.clamp(min=0), (x1 + 1).clamp(max=im_w), im_w, mp)
    padded = padded.to(torch.float32) if padded.dtype != masks.dtype else padded
    # Interpolate along x for every mask row first, then along y: the same order of operations as the
    # reference kernel, h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d).
    idx_x0 = cx0[:, None, :].expand(n, mp, im_w)
    idx_x1 = cx1[:, None, :].expand(n, mp, im_w)
    rows = wx0[:, None, :] * padded.gather(2, idx_x0) + wx1[:, None, :] * padded.gather(2, idx_x1)
    idx_y0 = ry0[:, :, None].expand(n, im_h, im_w)
    idx_y1 = ry1[:, :, None].expand(n, im_h, im_w)
    out = wy0[:, :, None] * rows.gather(1, idx_y0) + wy1[:, :, None] * rows.gather(1, idx_y1)
    out = out * (vy[:, :, None] & vx[:, None, :])
    return out[:, None].to(masks.dtype)


def paste_masks_grid_sample(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int],
                            threshold: float | None = None, threshold_inclusive: bool = True,
                            window_margin: int | None = None) -> torch.Tensor:
    """detectron2's paste: (N, 1, M, M) soft masks at (N, 4) XYXY px boxes into (N, 1, H, W), by ``grid_sample``.

    Each pixel centre (x + 0.5, y + 0.5) samples the mask bilinearly (zeros padding, align_corners=False) at
    u = (x + 0.5 - x0) / (x1 - x0) * 2 - 1 (the same in y). The result is soft, or, with ``threshold``, bool:
    value >= threshold (``threshold_inclusive``, detectron2) or > threshold.

    ``window_margin`` m restricts each mask to [max(floor(x0) - m, 0), min(ceil(x1) + m, W)) x (the same in y),
    0 (False) elsewhere, as detectron2's ``paste_masks_in_image`` does on CPU with m = 1; None samples the whole
    image (its ``_do_paste_mask(skip_empty=False)``). For boxes with x0 <= x1 and y0 <= y1 the two give the same
    bool masks: outside a box a sample weighs the border texel by less than 1/2 against the zero padding, so it
    stays below 0.5. They differ for inverted boxes, whose mirrored mask fills the pixels between x1 and x0.
    """
    n = masks.shape[0]
    im_h, im_w = image_shape
    if n == 0:
        return masks.new_zeros((0, 1, im_h, im_w), dtype=torch.bool if threshold is not None else None)
    b = boxes.to(torch.float32)
    x0, y0, x1, y1 = torch.split(b, 1, dim=1)
    img_y = torch.arange(0, im_h, device=masks.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(0, im_w, device=masks.device, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(n, im_h, im_w)
    gy = img_y[:, :, None].expand(n, im_h, im_w)
    grid = torch.stack([gx, gy], dim=3)
    out = torch.nn.functional.grid_sample(masks, grid.to(masks.dtype), align_corners=False)
    if threshold is not None:
        out = out >= threshold if threshold_inclusive else out > threshold
    if window_margin is not None:
        lo = (b[:, :2].floor() - window_margin).clamp(min=0)
        hi = torch.minimum(b[:, 2:].ceil() + window_margin, torch.tensor([im_w, im_h], dtype=b.dtype, device=b.device))
        cols = torch.arange(im_w, device=b.device, dtype=b.dtype)
        rows = torch.arange(im_h, device=b.device, dtype=b.dtype)
        in_x = (cols[None, :] >= lo[:, 0:1]) & (cols[None, :] < hi[:, 0:1])
        in_y = (rows[None, :] >= lo[:, 1:2]) & (rows[None, :] < hi[:, 1:2])
        inside = (in_y[:, :, None] & in_x[:, None, :])[:, None]
        out = torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _legacy_windows(boxes: torch.Tensor, m: int, padding: int) -> torch.Tensor:
    """(N, 4) float boxes -> (N, 4) int64 x0, y0, x1, y1 (inclusive) of the grown, truncated paste boxes."""
    scale = float(m + 2 * padding) / m
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1).to(torch.int64)


def paste_masks_in_windows(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int],
                           mode: str = "legacy", padding: int = 1, threshold: float | None = None,
                           threshold_inclusive: bool = False) -> torch.Tensor:
    """Paste (N, 1, M, M) soft masks at (N, 4) XYXY boxes: (N, H, W) soft masks, or bool ``> threshold``.

    ``threshold_inclusive`` compares with >= instead (detectron2's ``paste_masks_in_image``; torchvision's
    fixtures threshold with >).

    Same values as :func:`paste_masks`, but each mask is resized only over its own box (torchvision's per-box
    ``F.interpolate`` for "legacy", ``grid_sample`` over the box plus its half-texel border for "grid_sample")
    and written into its window, so no (N, H, W) float tensor exists when ``threshold`` is given: pasting 100
    masks into an 800x1216 image touches ~100 box windows instead of 100 full-image float planes.
    """
    n = masks.shape[0]
    im_h, im_w = image_shape
    out_dtype = torch.bool if threshold is not None else masks.dtype
    out = torch.zeros((n, im_h, im_w), dtype=out_dtype, device=masks.device)
    for i, (cx0, cy0, cx1, cy1), win in _paste_windows(masks, boxes, image_shape, mode, padding):
        if threshold is not None:
            out[i, cy0:cy1, cx0:cx1] = win >= threshold if threshold_inclusive else win > threshold
        else:
            out[i, cy0:cy1, cx0:cx1] = win
    return out


def paste_mask_crops(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int], mode: str = "legacy",
                     padding: int = 1, threshold: float = 0.5, threshold_inclusive: bool = False) -> MaskCrops:
    """:func:`paste_masks_in_windows`'s bool masks kept as their compressed windows: memory follows the detections.

    ``MaskCrops.dense()`` equals ``paste_masks_in_windows(..., threshold=threshold)`` bit for bit.
    """
    n = masks.shape[0]
    rles: list[dict[str, Any] | None] = [None] * n
    offsets = torch.zeros((n, 2), dtype=torch.int64)
    sizes = torch.zeros((n, 2), dtype=torch.int64)
    for i, (cx0, cy0, cx1, cy1), win in _paste_windows(masks, boxes, image_shape, mode, padding):
        # Compressed as soon as it is made: only one window of a mask is ever uncompressed.
        rles[i] = encode_window(win >= threshold if threshold_inclusive else win > threshold)
        offsets[i] = torch.tensor([cx0, cy0])
        sizes[i] = torch.tensor([cy1 - cy0, cx1 - cx0])
    return MaskCrops(rles, offsets, sizes, image_shape)


def _paste_windows(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int], mode: str,
                   padding: int) -> Any:
    """Yield (i, (x0, y0, x1, y1) window inside the image, soft values there) for each detection whose window is
    not empty; every pixel outside its window is 0 in the pasted mask."""
    if mode not in ("legacy", "grid_sample"):
        raise ValueError(f"unknown paste mode {mode!r}; expected 'legacy' or 'grid_sample'")
    n = masks.shape[0]
    im_h, im_w = image_shape
    if n == 0:
        return
    m = masks.shape[-1]
    if mode == "legacy":
        src = torch.nn.functional.pad(masks, (padding,) * 4)
        # One host sync for all boxes: window sizes decide the shapes below.
        wins = _legacy_windows(boxes, m, padding).tolist()
    else:
        src = masks
        b = boxes.to(torch.float32)
        # grid_sample reads texels up to half a texel past the box edge, i.e. w / (2M) pixels: widen by that.
        mx = (b[:, 2] - b[:, 0]).abs() / (2 * m) + 2
        my = (b[:, 3] - b[:, 1]).abs() / (2 * m) + 2
        lo = torch.stack([b[:, 0] - mx, b[:, 1] - my], 1).floor()
        hi = torch.stack([b[:, 2] + mx, b[:, 3] + my], 1).ceil()
        finite = torch.isfinite(lo).all(1) & torch.isfinite(hi).all(1)
        full = torch.tensor([0.0, 0.0, float(im_w), float(im_h)], device=b.device)
        wins = torch.where(finite[:, None], torch.cat([lo, hi], 1), full).clamp(-1, max(im_h, im_w) + 1)
        wins = wins.to(torch.int64).tolist()
        b_list = b.tolist()
    for i in range(n):  # a loop over detections: each has its own window shape
        if mode == "legacy":
            x0, y0, x1, y1 = wins[i]
            w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1 + 1, im_w), min(y1 + 1, im_h)
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            # Exactly torchvision's per-box resize, so values match it bit for bit.
            res = torch.nn.functional.interpolate(src[i: i + 1], size=(h, w), mode="bilinear",
                                                  align_corners=False)[0, 0]
            win = res[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0]
        else:
            wx0, wy0, wx1, wy1 = wins[i]
            cx0, cy0, cx1, cy1 = max(wx0, 0), max(wy0, 0), min(wx1, im_w), min(wy1, im_h)
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            bx0, by0, bx1, by1 = (torch.tensor(v, dtype=torch.float32, device=masks.device) for v in b_list[i])
            # The same float operations as paste_masks_grid_sample at the same pixel centres: identical samples.
            img_y = torch.arange(cy0, cy1, device=masks.device, dtype=torch.float32) + 0.5
            img_x = torch.arange(cx0, cx1, device=masks.device, dtype=torch.float32) + 0.5
            img_y = (img_y - by0) / (by1 - by0) * 2 - 1
            img_x = (img_x - bx0) / (bx1 - bx0) * 2 - 1
            grid = torch.stack([img_x[None, :].expand(cy1 - cy0, -1), img_y[:, None].expand(-1, cx1 - cx0)], dim=2)
            win = torch.nn.functional.grid_sample(src[i: i + 1], grid[None].to(src.dtype), align_corners=False)[0, 0]
        yield i, (cx0, cy0, cx1, cy1), win


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int], mode: str = "legacy",
                padding: int = 1) -> torch.Tensor:
    """Paste (N, 1, M, M) soft masks at (N, 4) XYXY boxes into (N, 1, H, W) masks ("legacy" or "grid_sample")."""
    if mode == "legacy":
        return paste_masks_legacy(masks, boxes, image_shape, padding)
    if mode == "grid_sample":
        return paste_masks_grid_sample(masks, boxes, image_shape)
    raise ValueError(f"unknown paste mode {mode!r}; expected 'legacy' or 'grid_sample'")
