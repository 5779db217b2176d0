"""Training/test transforms on ``(image (3,H,W), target)`` pairs with all randomness from an explicit generator.

Every transform is a callable ``(image, target, generator) -> (image, target)``. ``target`` holds ``boxes`` (N,4)
float32 XYXY in absolute pixels of the image it goes with, ``labels`` (N,), ``masks`` (N,H,W) uint8, optionally
``keypoints`` (N,K,3) float32 [x, y, visibility] in the same pixels, and metadata that the transforms pass through
unchanged. ``generator`` is a ``torch.Generator`` (seeded per sample by the
loader) or None for torch's global generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from maskrcnn.ops.resize import resized_size
from maskrcnn.config import Config, ConfigError

Target = dict[str, Any]

# Far above float64 kernel noise (~1e-13 grey levels), far below one grey level.
_TIE_NUDGE = 1e-6


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _resize_image(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (3,H,W) to ``size`` as F.interpolate(align_corners=False) does; uint8 in -> uint8 out (rounded)."""
    if image.dtype != torch.uint8:
        return F.interpolate(image[None], size=size, mode=mode, align_corners=False)[0]
    # float64, and ties nudged upwards: torch's CPU kernel splits work by thread count and lands exact .5 ties a
    # few ulps either side, so plain rounding would make a sample depend on the number of threads (workers
    # run single-threaded, the main process not).
    out = F.interpolate(image[None].double(), size=size, mode=mode, align_corners=False)[0]
    return torch.floor(out + (0.5 + _TIE_NUDGE)).clamp_(0, 255).to(torch.uint8)


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N,H,W) masks to ``size`` with nearest-neighbour sampling (torchvision's mask resize)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].to(masks.dtype)


def _resize_target(target: Target, old: tuple[int, int], new: tuple[int, int]) -> Target:
    """Scale boxes by new/old (float32 ratios, as torchvision's resize_boxes) and resize masks to ``new``."""
    target = dict(target)
    ratio_h = torch.tensor(new[0], dtype=torch.float32) / torch.tensor(old[0], dtype=torch.float32)
    ratio_w = torch.tensor(new[1], dtype=torch.float32) / torch.tensor(old[1], dtype=torch.float32)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.stack([ratio_w, ratio_h, ratio_w, ratio_h])
    if "masks" in target:
        target["masks"] = _resize_masks(target["masks"], new)
    if "keypoints" in target:
        kps = target["keypoints"].clone()
        kps[..., 0] *= ratio_w
        kps[..., 1] *= ratio_h
        target["keypoints"] = kps
    return target


def keypoint_flip_indices(names: Sequence[str], flip_map: Sequence[Sequence[str]] = ()) -> list[int]:
    """Index of each keypoint's mirror image under a horizontal flip (itself when it has none).

    ``flip_map`` pairs names explicitly; without it every name containing "left" pairs with the same name
    spelled "right" (COCO's ``left_eye`` / ``right_eye``), and names without a twin map to themselves.
    """
    index = {n: i for i, n in enumerate(names)}
    out = list(range(len(names)))
    pairs: list[tuple[str, str]] = []
    if flip_map:
        for pair in flip_map:
            a, b = pair
            missing = [n for n in (a, b) if n not in index]
            if missing:
                raise ConfigError(f"model.keypoint_head.flip_map names {missing}, which are not keypoint names "
                                  f"({', '.join(names) or 'none'})")
            pairs.append((a, b))
    else:
        pairs = [(n, n.replace("left", "right")) for n in names
                 if "left" in n and n.replace("left", "right") in index]
    for a, b in pairs:
        out[index[a]], out[index[b]] = index[b], index[a]
    return out


def _select(target: Target, keep: torch.Tensor) -> Target:
    """Keep instances where ``keep`` (N,) bool is true in every per-instance field."""
    target = dict(target)
    for key in ("boxes", "labels", "masks", "keypoints"):
        if key in target:
            target[key] = target[key][keep]
    return target


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        """transforms: callables ``(image, target, generator) -> (image, target)``."""
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        """Run every transform on (image (3,H,W), target)."""
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class ResizeShortestEdge:
    """Resize so the short side is ``min_size`` unless the long side would exceed ``max_size`` (torchvision rule).

    With several ``min_sizes`` one is drawn per call from the generator (multi-scale training); with a single one,
    or with no generator given, the last is used, as torchvision does at test time.
    """

    def __init__(self, min_sizes: int | Sequence[int], max_size: int, mode: str = "bilinear") -> None:
        """min_sizes: candidate short-side lengths in pixels; max_size: long-side cap in pixels."""
        self.min_sizes = (int(min_sizes),) if isinstance(min_sizes, int) else tuple(int(s) for s in min_sizes)
        if not self.min_sizes:
            raise ValueError("ResizeShortestEdge needs at least one min size")
        self.max_size = int(max_size)
        self.mode = mode

    def output_size(self, height: int, width: int, min_size: int) -> tuple[int, int]:
        """(H', W') of an (height, width) image for short side ``min_size``, computed as torchvision computes it."""
        return resized_size(height, width, min_size, self.max_size)

    def __call__(self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        """Resize image (bilinear), masks (nearest) and boxes (scaled) to the drawn short-side size."""
        if len(self.min_sizes) > 1 and generator is not None:
            min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), (), generator=generator))]
        else:
            min_size = self.min_sizes[-1]
        old = (int(image.shape[-2]), int(image.shape[-1]))
        new = self.output_size(*old, min_size)
        if new == old:
            return image, target
        return _resize_image(image, new, self.mode), _resize_target(target, old, new)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(min_sizes={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror image, masks and boxes (x1' = W - x2, x2' = W - x1) with probability ``prob``.

    Keypoints get x' = W - x and trade places with their mirror twins (``flip_indices``, see
    :func:`keypoint_flip_indices`): a left wrist becomes the right wrist of the flipped image. Unlabelled ones stay
    (0, 0, 0).
    """

    def __init__(self, prob: float = 0.5, flip_indices: Sequence[int] | None = None) -> None:
        """prob: flip probability in [0, 1]; flip_indices: keypoint k's twin (None: each keypoint is its own)."""
        self.prob = float(prob)
        self.flip_indices = None if flip_indices is None else [int(i) for i in flip_indices]

    def __call__(self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        """Flip (3,H,W) image and target along the width with probability ``prob``."""
        # Always draw, so the generator advances the same way whatever the outcome or probability.
        if not _uniform(generator) < self.prob:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        if "boxes" in target:
            b = target["boxes"]
            target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        if "keypoints" in target:
            kps = target["keypoints"].clone()
            kps[..., 0] = width - kps[..., 0]
            if self.flip_indices is not None:
                if len(self.flip_indices) != kps.shape[1]:
                    raise ValueError(f"RandomHorizontalFlip: {len(self.flip_indices)} flip indices for "
                                     f"{kps.shape[1]} keypoints")
                kps = kps[:, self.flip_indices]
            kps[kps[..., 2] == 0] = 0.0
            target["keypoints"] = kps
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


class LargeScaleJitter:
    """Large-scale jitter (Ghiasi et al. 2021): fit the image into a randomly scaled output box, then crop.

    The image is resized to fit ``scale * output_size`` (scale uniform in ``scale_range``, aspect kept), then a
    random ``output_size`` window is cut when it is larger. No padding: batching pads. Instances whose clipped box
    is at most ``min_box_size`` pixels wide or high, or whose mask is empty after the crop, are removed.
    """

    def __init__(self, output_size: int | tuple[int, int], scale_range: tuple[float, float] = (0.1, 2.0),
                 min_box_size: float = 1e-3, mode: str = "bilinear") -> None:
        """output_size: (H, W) or square side in pixels; scale_range: (min, max) scale of the output size."""
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.min_box_size = float(min_box_size)
        self.mode = mode

    def __call__(self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, Target]:
        """Rescale then crop (3,H,W) image and target; boxes stay XYXY pixels of the returned image."""
        lo, hi = self.scale_range
        s = lo + (hi - lo) * _uniform(generator)
        out_h, out_w = self.output_size
        old = (int(image.shape[-2]), int(image.shape[-1]))
        scale = min(s * out_h / old[0], s * out_w / old[1])
        new = (max(1, round(old[0] * scale)), max(1, round(old[1] * scale)))
        if new != old:
            image, target = _resize_image(image, new, self.mode), _resize_target(target, old, new)
        # Offsets are drawn even when no crop is needed, so the generator advances the same way every call.
        y0 = int(_uniform(generator) * (max(new[0] - out_h, 0) + 1))
        x0 = int(_uniform(generator) * (max(new[1] - out_w, 0) + 1))
        h, w = min(new[0], out_h), min(new[1], out_w)
        if (h, w) == new:
            return image, target
        image = image[:, y0:y0 + h, x0:x0 + w]
        target = dict(target)
        keep = torch.ones(0, dtype=torch.bool)
        if "boxes" in target:
            b = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            target["boxes"] = b
            keep = ((b[:, 2] - b[:, 0]) > self.min_box_size) & ((b[:, 3] - b[:, 1]) > self.min_box_size)
        if "keypoints" in target:
            kps = target["keypoints"].clone()
            kps[..., 0] -= x0
            kps[..., 1] -= y0
            # A keypoint cut off by the crop is no longer labelled (detectron2's rule: inside [0, W] x [0, H]).
            outside = (kps[..., 0] < 0) | (kps[..., 1] < 0) | (kps[..., 0] > w) | (kps[..., 1] > h)
            kps[outside | (kps[..., 2] == 0)] = 0.0
            target["keypoints"] = kps
        if "masks" in target:
            m = target["masks"][:, y0:y0 + h, x0:x0 + w]
            target["masks"] = m
            nonempty = (m.flatten(1) != 0).any(dim=1) if m.shape[0] else torch.ones(0, dtype=torch.bool)
            keep = nonempty if "boxes" not in target else keep & nonempty
        if keep.numel():
            target = _select(target, keep)
        return image, target

    def __repr__(self) -> str:
        return f"LargeScaleJitter(output_size={self.output_size}, scale_range={self.scale_range})"


def build_transforms(cfg: Config, train: bool, resize: bool = True) -> Compose:
    """Transforms from ``cfg.input``: resize (multi-scale or LSJ in training) and flip; resize=False skips resizing.

    With ``cfg.input.lsj`` the LSJ output is a square of side ``max(cfg.input.min_size_train)`` pixels.
    """
    inp = cfg.input
    ts: list[Any] = []
    if train:
        if resize:
            if inp.lsj:
                side = max(inp.min_size_train)
                ts.append(LargeScaleJitter((side, side), inp.lsj_scale, mode=inp.resize_mode))
            else:
                ts.append(ResizeShortestEdge(inp.min_size_train, inp.max_size_train, mode=inp.resize_mode))
        if inp.flip_prob > 0:
            kh = cfg.model.keypoint_head
            flips = keypoint_flip_indices(kh.names, kh.flip_map) if kh.enabled and kh.names else None
            ts.append(RandomHorizontalFlip(inp.flip_prob, flips))
    elif resize:
        ts.append(ResizeShortestEdge((inp.min_size_test,), inp.max_size_test, mode=inp.resize_mode))
    return Compose(ts)
