"""DataLoaders for training (grouped, sharded, resumable, per-sample seeded) and for evaluation (in order)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from maskrcnn.config import Config
from maskrcnn.data.coco import BAD_IMAGE_ERRORS, DatasetError
from maskrcnn.data.collate import collate
from maskrcnn.data.samplers import GroupedBatchSampler, dist_rank_world


# Key of a target dict that lists the images skipped in its place: [(file, reason), ...].
SKIPPED_KEY = "skipped_images"
# Readable replacements tried for one unreadable sample before the loader gives up: with 1% bad images the
# chance that 16 random picks are all bad is 1e-32, so reaching it means most of the data is unreadable.
MAX_REPLACEMENT_TRIES = 16


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is ``dataset.get(index, Generator seeded with seed)``.

    The seed travels with the index from the batch sampler, so a sample's augmentation does not depend on which
    worker loads it or on how many workers there are.

    A sample whose image cannot be read (``BAD_IMAGE_ERRORS``: missing, truncated, not an image, of another size
    than the JSON says) is replaced by another sample of the same aspect-ratio group, chosen from (seed, index)
    alone, so a resumed run replaces it exactly as the first run did. The replacement's target lists what it
    stands in for under ``"skipped_images"`` as ``[(file, reason), ...]``; the trainer counts and logs those.
    """

    def __init__(self, dataset: Any, skip_bad_images: bool = True) -> None:
        """dataset: has ``get(index, generator)`` (CocoDataset) or, failing that, ``__getitem__(index)``."""
        self.dataset = dataset
        self.skip_bad_images = skip_bad_images
        self._groups: np.ndarray | None = None

    def __len__(self) -> int:
        """Size of the wrapped dataset."""
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int] | int) -> Any:
        """(index, seed) -> the wrapped dataset's sample with transforms drawn from that seed."""
        if not isinstance(item, tuple):
            return self.dataset[int(item)]
        index, seed = int(item[0]), int(item[1])
        try:
            return self._get(index, seed)
        except BAD_IMAGE_ERRORS as e:
            if not self.skip_bad_images:
                raise
            return self._replacement(index, seed, e)

    def _get(self, index: int, seed: int) -> Any:
        if hasattr(self.dataset, "get"):
            return self.dataset.get(index, torch.Generator().manual_seed(seed))
        return self.dataset[index]

    def _file(self, index: int) -> str:
        info = getattr(self.dataset, "get_image_info", None)
        return str(info(index).get("file_name", index)) if info is not None else f"sample {index}"

    def _replacement(self, index: int, seed: int, error: Exception) -> Any:
        """A readable sample of ``index``'s aspect group, drawn from (seed, index) only; its target lists the skips."""
        skipped = [(self._file(index), " ".join(str(error).split()))]
        if self._groups is None:
            ratios = self.dataset.aspect_ratios() if hasattr(self.dataset, "aspect_ratios") else [1.0] * len(self)
            self._groups = (np.asarray(ratios, dtype=np.float64) < 1.0).astype(np.int64)
        pool = np.flatnonzero(self._groups == self._groups[index])
        if pool.size <= 1:
            pool = np.arange(len(self))
        pool = pool[pool != index]
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        for _ in range(min(MAX_REPLACEMENT_TRIES, pool.size)):
            k = int(rng.integers(pool.size))
            j = int(pool[k])
            pool = np.delete(pool, k)
            try:
                image, target = self._get(j, int(rng.integers(2**63 - 1)))
            except BAD_IMAGE_ERRORS as e:
                skipped.append((self._file(j), " ".join(str(e).split())))
                continue
            target = dict(target)
            target[SKIPPED_KEY] = skipped
            return image, target
        listed = "; ".join(why for _, why in skipped[:3])
        raise DatasetError(f"{len(skipped)} training images in a row could not be read and no readable replacement "
                           f"was found ({listed}); check the data with 'maskrcnn data check'")


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
