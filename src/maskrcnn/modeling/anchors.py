"""Anchor generator: one anchor size per FPN level, several aspect ratios, tiled over each feature map."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.config import AnchorConfig


def cell_anchors(size: float, aspect_ratios: tuple[float, ...], round_base: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """Base anchors (A, 4) XYXY centred on (0, 0) for one size and the aspect ratios (height / width)."""
    scales = torch.as_tensor([size], dtype=dtype, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
    # torchvision rounds base anchors to whole pixels; detectron2 keeps them fractional.
    return base.round() if round_base else base


class AnchorGenerator(nn.Module):
    """Anchors for every position of every feature level, in padded-batch pixels."""

    def __init__(self, cfg: AnchorConfig) -> None:
        """One size per level from ``cfg.sizes``; every level uses all ``cfg.aspect_ratios``."""
        super().__init__()
        self.sizes = tuple(cfg.sizes)
        self.aspect_ratios = tuple(cfg.aspect_ratios)
        self.round_base = cfg.round_base

    @property
    def num_anchors_per_location(self) -> int:
        """A: anchors at each feature-map position."""
        return len(self.aspect_ratios)

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]],
                     dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Per level, (H*W*A, 4) XYXY anchors ordered by position (row-major) then anchor."""
        out = []
        for size, (gh, gw), (sh, sw) in zip(self.sizes, grid_sizes, strides):
            base = cell_anchors(size, self.aspect_ratios, self.round_base, dtype, device)
            shifts_x = torch.arange(0, gw, dtype=torch.int32, device=device) * sw
            shifts_y = torch.arange(0, gh, dtype=torch.int32, device=device) * sh
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x = shift_x.reshape(-1)
            shift_y = shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return out

    def forward(self, batch_shape: tuple[int, int], feature_shapes: list[tuple[int, int]],
                dtype: torch.dtype, device: torch.device) -> Tensor:
        """All anchors (sum_l H_l*W_l*A, 4), level-major, for a padded batch of (H, W) pixels.

        The stride of a level is the padded size integer-divided by the feature size, as in torchvision (so a
        13-row P6 map of an 800-row batch has a stride of 61, not 64).
        """
        if len(feature_shapes) != len(self.sizes):
            raise ValueError(f"{len(feature_shapes)} feature levels but {len(self.sizes)} anchor sizes")
        strides = [(batch_shape[0] // gh, batch_shape[1] // gw) for gh, gw in feature_shapes]
        return torch.cat(self.grid_anchors(feature_shapes, strides, dtype, device), dim=0)
