"""Deterministic, resumable, rank-sharded batch sampling with aspect-ratio grouping, and per-sample seeds.

The batches of epoch ``e`` on rank ``r`` are a pure function of (seed, e, r, world_size, the images' aspect
ratios, batch size): a seeded permutation of all indices is split ``perm[r::world_size]`` (disjoint shards that
together cover every index once), walked in order into two buckets (width >= height, width < height), and a batch
is emitted each time a bucket fills. Leftover partial buckets are completed with the group's first members of the
shard, so no image is skipped, and every rank emits the same number of batches per epoch (a rank short of the
largest count repeats its own first batches). A position is therefore just (epoch, batches taken in that epoch),
and any global iteration count maps to one; resuming from it gives exactly the batch that came next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Seeds are folded into 63 bits so torch.Generator.manual_seed takes them on every platform.
_SEED_BITS = 63


def _mix(*words: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(w) % 2**64 for w in words]).generate_state(1, dtype=np.uint64)
    return int(state[0]) % 2**_SEED_BITS


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's random transforms: a pure function of (seed, epoch, index)."""
    return _mix(seed, epoch, index)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU torch.Generator seeded with ``sample_seed(seed, epoch, index)``."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): given values, else torch.distributed's when initialised, else (0, 1)."""
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    return int(rank), int(world_size)


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices, all landscape (w >= h) or all portrait, deterministic from (seed, epoch).

    Infinite mode (default) is a stream for iteration-based training that moves from epoch to epoch by itself;
    finite mode yields the batches of one epoch per ``iter()`` (call ``set_epoch`` between epochs, as with
    DistributedSampler). With ``with_seeds`` each batch item is ``(index, sample_seed(seed, epoch, index))``.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        seed: int = 0,
        *,
        group_by_aspect: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        infinite: bool = True,
        start_iter: int = 0,
        with_seeds: bool = False,
    ) -> None:
        """aspect_ratios: width/height of each sample (len = dataset size); batch_size: images per rank batch."""
        self.num_samples = len(aspect_ratios)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.infinite = infinite
        self.with_seeds = with_seeds
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.num_samples < self.world_size:
            raise ValueError(f"{self.num_samples} samples cannot be shared among {self.world_size} ranks")
        ratios = np.asarray(aspect_ratios, dtype=np.float64)
        self.groups = (ratios < 1.0).astype(np.int64) if group_by_aspect else np.zeros(self.num_samples, np.int64)
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        if start_iter:
            self.load_state_dict({"iteration": start_iter})

    # ------------------------------------------------------------------------------------------------
    # The pure functions of (seed, epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def _shard_batch_count(self, shard: np.ndarray) -> int:
        counts = np.bincount(self.groups[shard], minlength=2)
        return int(sum(-(-int(c) // self.batch_size) for c in counts))

    def batches_per_epoch(self, epoch: int) -> int:
        """Number of batches every rank yields in ``epoch``."""
        perm = self._permutation(epoch).numpy()
        return max(self._shard_batch_count(perm[r::self.world_size]) for r in range(self.world_size))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of dataset indices for ``epoch``, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        perm = self._permutation(epoch).numpy()
        shard = perm[self.rank::self.world_size].tolist()
        buckets: list[list[int]] = [[], []]
        batches: list[list[int]] = []
        for idx in shard:
            bucket = buckets[self.groups[idx]]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                batches.append(list(bucket))
                bucket.clear()
        for g, bucket in enumerate(buckets):
            if bucket:
                members = [i for i in shard if self.groups[i] == g]
                bucket.extend(members[k % len(members)] for k in range(self.batch_size - len(bucket)))
                batches.append(list(bucket))
        target = max(self._shard_batch_count(perm[r::self.world_size]) for r in range(self.world_size))
        batches.extend(batches[k % len(batches)] for k in range(target - len(batches)))
        self._cache = (epoch, batches)
        return batches

    # ------------------------------------------------------------------------------------------------
    # Position

    def set_epoch(self, epoch: int) -> None:
        """Start at the first batch of ``epoch``."""
        self.epoch, self.position = int(epoch), 0

    def locate(self, iteration: int) -> tuple[int, int]:
        """(epoch, position in epoch) of the ``iteration``-th batch (0-based) counted from epoch 0."""
        epoch, remaining = 0, int(iteration)
        while True:
            n = self.batches_per_epoch(epoch)
            if remaining < n:
                return epoch, remaining
            remaining -= n
            epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch to yield: {"seed", "epoch", "position"}.

        A DataLoader's workers fetch batches ahead of the trainer, so a trainer should resume from the number of
        batches it consumed (``{"iteration": n}`` or ``start_iter=n``) rather than from this.
        """
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at {"epoch", "position"} or at a global batch count {"iteration"} (epoch 0 onwards)."""
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has {self.seed}")
        if "iteration" in state:
            self.epoch, self.position = self.locate(int(state["iteration"]))
        else:
            self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ------------------------------------------------------------------------------------------------
    # Iteration

    def _emit(self, batch: list[int], epoch: int) -> list[Any]:
        if not self.with_seeds:
            return list(batch)
        return [(i, sample_seed(self.seed, epoch, i)) for i in batch]

    def __iter__(self) -> Iterator[list[Any]]:
        """Yield batches from the current position (forever in infinite mode, to the epoch's end otherwise)."""
        while True:
            batches = self.epoch_batches(self.epoch)
            while self.position < len(batches):
                batch = batches[self.position]
                self.position += 1
                yield self._emit(batch, self.epoch)
            if not self.infinite:
                self.position = 0  # the next iter() repeats this epoch unless set_epoch moves on
                return
            self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        """Batches per epoch (finite mode only; an infinite stream has no length)."""
        if self.infinite:
            raise TypeError("an infinite GroupedBatchSampler has no length; use batches_per_epoch(epoch)")
        return self.batches_per_epoch(self.epoch)
