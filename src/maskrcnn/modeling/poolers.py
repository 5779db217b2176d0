"""Multi-level RoI pooling: each RoI is pooled from the FPN level that matches its size (FPN paper, Eq. 1).

One feature map gives the C4 layout's single-level pooler. The pooling op is RoIAlign (the paper's), RoIPool
or RoIWarp (``model.roi_pooler.type``, the paper's Table 2c).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from maskrcnn.ops.boxes import box_area
from maskrcnn.ops.roi_align import roi_align, roi_pool, roi_warp

POOLER_TYPES = ("align", "pool", "warp")


class LevelMapper:
    """Maps RoIs to pyramid levels (FPN paper, Eq. 1), clamped to [k_min, k_max].

    torchvision: k = floor(k0 + log2(sqrt(area) / s0) + eps) with eps 1e-6 outside the log (the default);
    detectron2: k = floor(k0 + log2(sqrt(area) / s0 + eps)) with eps 1e-8 inside it (``eps_inside_log``). The two
    differ for boxes just under a level boundary (sqrt(area) = 112, 224, ... and float32 rounding).
    """

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6, eps_inside_log: bool = False) -> None:
        """``canonical_scale`` px RoIs map to ``canonical_level`` (224 -> P4 for ImageNet-sized RoIs)."""
        self.k_min = k_min
        self.k_max = k_max
        self.s0 = canonical_scale
        self.lvl0 = canonical_level
        self.eps = eps
        self.eps_inside_log = eps_inside_log

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        """Per-image (Ki, 4) XYXY boxes -> (sum Ki,) int64 level index counted from k_min."""
        s = torch.sqrt(torch.cat([box_area(b) for b in boxlists]))
        if self.eps_inside_log:
            target = torch.floor(self.lvl0 + torch.log2(s / self.s0 + self.eps))
        else:
            target = torch.floor(self.lvl0 + torch.log2(s / self.s0) + torch.tensor(self.eps, dtype=s.dtype))
        target = torch.clamp(target, min=self.k_min, max=self.k_max)
        return (target.to(torch.int64) - self.k_min).to(torch.int64)


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image (Ki, 4) boxes -> (sum Ki, 5) rois ``[batch_index, x1, y1, x2, y2]``."""
    concat = torch.cat(boxes, dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat], dim=1)


def infer_scale(feature_shape: tuple[int, int], image_size: tuple[int, int]) -> float:
    """Power-of-two scale of a feature map relative to the (unpadded) image size, as torchvision infers it."""
    approx = float(feature_shape[0]) / float(image_size[0])
    return 2 ** float(torch.tensor(approx).log2().round())


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign (or RoIPool, RoIWarp: ``kind``) over named FPN levels, each RoI taken from its mapped level.

    With ``fast`` set the output is channels-last (the layout RoIAlign computes in, and the one the convs of the
    heads run fastest in) when ``channels_last_output`` is, and the levels are written into it in place.
    """

    fast = False

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, aligned: bool = False,
                 canonical_scale: int = 224, canonical_level: int = 4, *, scales: list[float] | None = None,
                 mapper_eps: float = 1e-6, eps_inside_log: bool = False, kind: str = "align") -> None:
        """Pool ``output_size`` x ``output_size`` bins from the levels ``featmap_names``.

        ``scales`` (feature px per image px, e.g. 1/4 .. 1/32) are fixed by the backbone in detectron2; None
        infers them from the map and image sizes as torchvision does. ``mapper_eps`` and ``eps_inside_log`` set
        the :class:`LevelMapper` (torchvision: 1e-6 outside the log; detectron2: 1e-8 inside). ``kind``: "align",
        "pool" (``sampling_ratio`` and ``aligned`` unused) or "warp" (see :func:`maskrcnn.ops.roi_align.roi_warp`).
        """
        super().__init__()
        if kind not in POOLER_TYPES:
            raise ValueError(f"unknown RoI pooler type {kind!r}; expected one of {', '.join(POOLER_TYPES)}")
        self.kind = kind
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        if scales is not None and len(scales) != len(self.featmap_names):
            raise ValueError(f"{len(scales)} scales for {len(self.featmap_names)} feature maps")
        self.scales = None if scales is None else [float(x) for x in scales]
        self.mapper_eps = mapper_eps
        self.eps_inside_log = eps_inside_log
        # Set for heads that start with convs; an MLP head wants NCHW, which it flattens without a copy.
        self.channels_last_output = False

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """Features {name: (N, C, h, w)}, per-image (Ki, 4) XYXY batch-pixel boxes -> (sum Ki, C, out, out).

        ``image_sizes`` (unpadded (H, W) per image) are read only when the scales are inferred.
        """
        feats = [features[k] for k in self.featmap_names]
        if self.scales is None:
            max_size = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
            scales = [infer_scale(tuple(f.shape[-2:]), max_size) for f in feats]
        else:
            scales = self.scales
        rois = boxes_to_rois(boxes)
        cl = self.fast and self.channels_last_output
        if len(feats) == 1:
            return self._pool(feats[0], rois, scales[0], cl)
        k_min = int(-math.log2(scales[0]))
        k_max = int(-math.log2(scales[-1]))
        mapper = LevelMapper(k_min, k_max, self.canonical_scale, self.canonical_level, self.mapper_eps,
                             self.eps_inside_log)
        levels = mapper(boxes)
        c = feats[0].shape[1]
        if self.fast:
            # Each level's rows are written in place (the naive path copies the whole result once per level).
            # Zeros, not empty: a degenerate box whose level is NaN is pooled from no level and must read 0.
            fmt = torch.channels_last if cl else torch.contiguous_format
            result = torch.empty((rois.shape[0], c) + self.output_size, dtype=feats[0].dtype,
                                 device=feats[0].device, memory_format=fmt).zero_()
            for level, (feat, scale) in enumerate(zip(feats, scales)):  # a loop over the 4 levels
                idx = torch.where(levels == level)[0]
                pooled = self._pool(feat, rois[idx], scale, cl)
                result.index_put_((idx,), pooled.to(result.dtype))
            return result
        result = feats[0].new_zeros((rois.shape[0], c) + self.output_size)
        for level, (feat, scale) in enumerate(zip(feats, scales)):  # a loop over the 4 levels
            idx = torch.where(levels == level)[0]
            pooled = self._pool(feat, rois[idx], scale, False)
            result = result.index_put((idx,), pooled.to(result.dtype))
        return result

    def _pool(self, feat: Tensor, rois: Tensor, scale: float, channels_last: bool) -> Tensor:
        """One level (N, C, h, w) and (R, 5) rois in batch pixels -> (R, C, out, out) by this pooler's op."""
        if self.kind == "pool":
            out = roi_pool(feat, rois, self.output_size, scale)
            return out.contiguous(memory_format=torch.channels_last) if channels_last else out
        op = roi_warp if self.kind == "warp" else roi_align
        return op(feat, rois, self.output_size, scale, self.sampling_ratio, self.aligned, channels_last=channels_last)
