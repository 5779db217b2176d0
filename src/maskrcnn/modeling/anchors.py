"""Anchor generator: anchor sizes per feature level, several aspect ratios, tiled over each feature map.

The defaults reproduce torchvision's ``AnchorGenerator``; the keyword parameters reproduce detectron2's
``DefaultAnchorGenerator`` (unrounded cell anchors computed in double precision, (size, ratio) order, fixed
strides and a cell offset).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.config import AnchorConfig


def _as_size_tuple(size: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(s) for s in size) if isinstance(size, Sequence) else (float(size),)


def cell_anchors(size: float | Sequence[float], aspect_ratios: tuple[float, ...], round_base: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None, *,
                 compute_dtype: torch.dtype | None = None, size_major: bool = False) -> Tensor:
    """Base anchors (S*A, 4) XYXY pixels centred on (0, 0) for S sizes (px) and A aspect ratios (height / width).

    Each anchor has width size/sqrt(ratio) and height size*sqrt(ratio), so its area is size².
    - ``round_base``: round to whole pixels (torchvision) or keep fractional (detectron2).
    - ``compute_dtype``: precision of the arithmetic before the cast to ``dtype``. None computes in ``dtype``
      (torchvision); float64 matches detectron2, which computes in Python floats and then stores float32 (the
      float32 formula is 1 ulp off for about a third of (size, ratio) pairs).
    - ``size_major``: order the S*A anchors size-major, then ratio (detectron2) instead of ratio-major
      (torchvision). The two orders agree when there is one size per level.
    """
    work = dtype if compute_dtype is None else compute_dtype
    scales = torch.as_tensor(_as_size_tuple(size), dtype=work, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=work, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    if size_major:
        ws = (scales[:, None] * w_ratios[None, :]).view(-1)
        hs = (scales[:, None] * h_ratios[None, :]).view(-1)
    else:
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
    # torchvision rounds base anchors to whole pixels; detectron2 keeps them fractional.
    base = base.round() if round_base else base
    return base.to(dtype)


def grid_anchors(cell: Sequence[Tensor], grid_sizes: Sequence[tuple[int, int]],
                 strides: Sequence[tuple[float, float]], offset: float = 0.0) -> list[Tensor]:
    """Per level, (H*W*A, 4) XYXY anchors in batch pixels: ``cell`` (A, 4) shifted to every position.

    Positions are row-major; the shift of cell (i, j) is ((j + offset) * stride_w, (i + offset) * stride_h), so
    offset 0 puts anchor centres on the cells' top-left corners (both frameworks' default) and 0.5 on their
    centres.
    """
    out = []
    for base, (gh, gw), (sh, sw) in zip(cell, grid_sizes, strides):
        # Whole-pixel shifts are exact in any float dtype, so shifting in the anchors' dtype equals torchvision's
        # int32 shifts and detectron2's float32 arange.
        shifts_x = (torch.arange(0, gw, dtype=base.dtype, device=base.device) + offset) * sw
        shifts_y = (torch.arange(0, gh, dtype=base.dtype, device=base.device) + offset) * sh
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x = shift_x.reshape(-1)
        shift_y = shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
    return out


class AnchorGenerator(nn.Module):
    """Anchors for every position of every feature level, in padded-batch pixels.

    ``cfg.sizes`` holds one entry per level: a size, or a tuple of sizes (the C4 layout's single level has 5).
    Keyword parameters (torchvision's behaviour by default):
    - ``strides``: one stride (px) per level, fixed by the backbone (detectron2); None derives them from the
      batch and feature-map sizes (torchvision);
    - ``offset``: cell offset of the anchor centres, in strides (0.0 in both frameworks' defaults);
    - ``compute_dtype`` and ``size_major``: see :func:`cell_anchors`.
    """

    def __init__(self, cfg: AnchorConfig, *, strides: Sequence[int] | None = None, offset: float = 0.0,
                 compute_dtype: torch.dtype | None = None, size_major: bool = False) -> None:
        """Every level uses all ``cfg.aspect_ratios`` with its own sizes from ``cfg.sizes``."""
        super().__init__()
        self.sizes = tuple(_as_size_tuple(s) for s in cfg.sizes)
        if len({len(s) for s in self.sizes}) > 1:
            raise ValueError(f"every level needs the same number of anchor sizes, got {cfg.sizes}")
        self.aspect_ratios = tuple(cfg.aspect_ratios)
        self.round_base = cfg.round_base
        if strides is not None and len(strides) != len(self.sizes):
            raise ValueError(f"{len(strides)} strides but {len(self.sizes)} anchor levels")
        self.strides = None if strides is None else tuple(strides)
        self.offset = float(offset)
        self.compute_dtype = compute_dtype
        self.size_major = size_major

    @property
    def num_anchors_per_location(self) -> int:
        """A: anchors at each feature-map position (sizes per level x aspect ratios)."""
        return len(self.sizes[0]) * len(self.aspect_ratios)

    def cell_anchors(self, dtype: torch.dtype, device: torch.device | None = None) -> list[Tensor]:
        """Per level, the (A, 4) XYXY base anchors centred on (0, 0)."""
        return [cell_anchors(s, self.aspect_ratios, self.round_base, dtype, device,
                             compute_dtype=self.compute_dtype, size_major=self.size_major) for s in self.sizes]

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]],
                     dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Per level, (H*W*A, 4) XYXY anchors ordered by position (row-major) then anchor."""
        return grid_anchors(self.cell_anchors(dtype, device), grid_sizes, strides, self.offset)

    def forward(self, batch_shape: tuple[int, int], feature_shapes: list[tuple[int, int]],
                dtype: torch.dtype, device: torch.device) -> Tensor:
        """All anchors (sum_l H_l*W_l*A, 4), level-major, XYXY pixels of a padded batch of (H, W) pixels.

        Without explicit strides, a level's stride is the padded size integer-divided by the feature size, as in
        torchvision (so a 13-row P6 map of an 800-row batch has a stride of 61, not 64).
        """
        if len(feature_shapes) != len(self.sizes):
            raise ValueError(f"{len(feature_shapes)} feature levels but {len(self.sizes)} anchor sizes")
        if self.strides is None:
            strides = [(batch_shape[0] // gh, batch_shape[1] // gw) for gh, gw in feature_shapes]
        else:
            strides = [(s, s) for s in self.strides]
        return torch.cat(self.grid_anchors(feature_shapes, strides, dtype, device), dim=0)
