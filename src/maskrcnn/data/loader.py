"""DataLoaders for training (grouped, sharded, resumable, per-sample seeded) and for evaluation (in order)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from maskrcnn.config import Config
from maskrcnn.data.collate import collate
from maskrcnn.data.samplers import GroupedBatchSampler, dist_rank_world


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is ``dataset.get(index, Generator seeded with seed)``.

    The seed travels with the index from the batch sampler, so a sample's augmentation does not depend on which
    worker loads it or on how many workers there are.
    """

    def __init__(self, dataset: Any) -> None:
        """dataset: has ``get(index, generator)`` (CocoDataset) or, failing that, ``__getitem__(index)``."""
        self.dataset = dataset

    def __len__(self) -> int:
        """Size of the wrapped dataset."""
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int] | int) -> Any:
        """(index, seed) -> the wrapped dataset's sample with transforms drawn from that seed."""
        if isinstance(item, tuple):
            index, seed = item
            if hasattr(self.dataset, "get"):
                return self.dataset.get(int(index), torch.Generator().manual_seed(int(seed)))
            return self.dataset[int(index)]
        return self.dataset[int(item)]


def _aspect_ratios(dataset: Any) -> list[float]:
    if hasattr(dataset, "aspect_ratios"):
        return list(dataset.aspect_ratios())
    return [1.0] * len(dataset)  # unknown shapes: one group


def build_train_loader(
    dataset: Any,
    cfg: Config,
    rank: int | None = None,
    world_size: int | None = None,
    start_iter: int = 0,
    *,
    pin_memory: bool = False,
) -> DataLoader:
    """Infinite training DataLoader of (list[image (3,H,W) uint8], list[target]) batches of this rank's share.

    Per-rank batch size is ``cfg.solver.ims_per_batch // world_size``; the stream starts at global batch
    ``start_iter`` (the trainer's iteration), so a resumed run sees exactly the batches it would have seen.
    rank/world_size default to torch.distributed's when it is initialised, else (0, 1).
    """
    rank, world_size = dist_rank_world(rank, world_size)
    total = cfg.solver.ims_per_batch
    if total % world_size:
        raise ValueError(f"solver.ims_per_batch={total} is not divisible by the world size {world_size}")
    sampler = GroupedBatchSampler(
        _aspect_ratios(dataset), total // world_size, seed=cfg.train.seed,
        group_by_aspect=cfg.train.aspect_ratio_grouping, rank=rank, world_size=world_size,
        infinite=True, start_iter=start_iter, with_seeds=True,
    )
    workers = cfg.train.num_workers
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=workers > 0)


def build_test_loader(dataset: Any, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """DataLoader over ``dataset`` in index order, batches of (list[image], list[target]), no shuffling."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
