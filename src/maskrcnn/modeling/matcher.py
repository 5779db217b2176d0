"""IoU matching of predictions to ground truth, and the balanced positive/negative sampler (RPN and RoI heads)."""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """Assigns each prediction (column) the best ground truth (row) of an IoU matrix, or a negative code."""

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False) -> None:
        """IoU >= high: matched; < low: -1 (background); in between: -2 (ignored)."""
        if low_threshold > high_threshold:
            raise ValueError("low_threshold must not exceed high_threshold")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """(G, P) IoU matrix -> (P,) int64: matched GT index, -1 below low, -2 between thresholds."""
        if match_quality_matrix.numel() == 0:
            if match_quality_matrix.shape[0] == 0:
                raise ValueError("no ground-truth boxes available for matching")
            raise ValueError("no proposal boxes available for matching")
        matched_vals, matches = match_quality_matrix.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        below_low = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below_low] = BELOW_LOW_THRESHOLD
        matches[between] = BETWEEN_THRESHOLDS
        if all_matches is not None:
            # Each GT keeps the predictions that overlap it best, even below the threshold, so every GT gets
            # at least one positive (Faster R-CNN, Sec. 3.1.2).
            highest_quality_foreach_gt, _ = match_quality_matrix.max(dim=1)
            pairs = torch.where(match_quality_matrix == highest_quality_foreach_gt[:, None])
            pred_inds = pairs[1]
            matches[pred_inds] = all_matches[pred_inds]
        return matches


class BalancedPositiveNegativeSampler:
    """Samples a fixed-size minibatch per image with at most a given fraction of positives."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        """``batch_size_per_image`` samples, of which at most ``positive_fraction`` are positives."""
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, matched_idxs: list[Tensor], generator: torch.Generator | None = None
                 ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image labels (P,) (>=1 positive, 0 negative, -1 ignore) -> (pos masks, neg masks), each (P,) uint8."""
        pos_idx, neg_idx = [], []
        for labels in matched_idxs:
            positive = torch.where(labels >= 1)[0]
            negative = torch.where(labels == 0)[0]
            num_pos = int(self.batch_size_per_image * self.positive_fraction)
            num_pos = min(positive.numel(), num_pos)
            num_neg = self.batch_size_per_image - num_pos
            num_neg = min(negative.numel(), num_neg)
            perm1 = torch.randperm(positive.numel(), device=positive.device, generator=generator)[:num_pos]
            perm2 = torch.randperm(negative.numel(), device=negative.device, generator=generator)[:num_neg]
            pos_mask = torch.zeros_like(labels, dtype=torch.uint8)
            neg_mask = torch.zeros_like(labels, dtype=torch.uint8)
            pos_mask[positive[perm1]] = 1
            neg_mask[negative[perm2]] = 1
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx
