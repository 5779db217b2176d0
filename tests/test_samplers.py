"""Tests for maskrcnn.data.samplers, collate and the train loader: grouping, determinism, resume, sharding."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from maskrcnn.config import get_preset
from maskrcnn.data import samplers as samplers_mod
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.collate import collate
from maskrcnn.data.loader import build_test_loader, build_train_loader
from maskrcnn.data.samplers import GroupedBatchSampler, sample_generator, sample_seed
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.data.transforms import build_transforms

# 23 images: 14 landscape or square (w >= h), 9 portrait.
RATIOS = [1.5, 0.5, 1.0, 0.75, 2.0, 1.2, 0.6, 1.33, 0.8, 1.0, 1.7, 0.4, 1.1, 1.25, 0.9, 3.0, 0.7, 1.4, 0.5, 1.6,
          1.05, 0.66, 1.9]


def _take(sampler, n: int) -> list[list]:
    return list(itertools.islice(iter(sampler), n))


def test_batches_are_grouped_and_cover_each_epoch():
    s = GroupedBatchSampler(RATIOS, batch_size=4, seed=3, infinite=False)
    batches = list(s)
    assert len(batches) == len(s) == 7  # ceil(14/4) + ceil(9/4)
    for b in batches:
        assert len(b) == 4
        assert len({RATIOS[i] >= 1 for i in b}) == 1
    assert set(itertools.chain(*batches)) == set(range(len(RATIOS)))
    assert list(s) == batches  # a finite sampler repeats its epoch until set_epoch
    s.set_epoch(1)
    assert list(s) != batches
    ungrouped = GroupedBatchSampler(RATIOS, batch_size=4, seed=3, infinite=False, group_by_aspect=False)
    assert len(ungrouped) == 6 and set(itertools.chain(*ungrouped)) == set(range(len(RATIOS)))


def test_deterministic_from_seed_and_epoch():
    a = _take(GroupedBatchSampler(RATIOS, 3, seed=7), 20)
    b = _take(GroupedBatchSampler(RATIOS, 3, seed=7), 20)
    c = _take(GroupedBatchSampler(RATIOS, 3, seed=8), 20)
    assert a == b and a != c


def test_resume_position_is_exact():
    full = _take(GroupedBatchSampler(RATIOS, 3, seed=1), 40)  # spans several epochs
    per_epoch = GroupedBatchSampler(RATIOS, 3, seed=1).batches_per_epoch(0)
    for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2, 33):
        assert _take(GroupedBatchSampler(RATIOS, 3, seed=1, start_iter=k), 40 - k) == full[k:]
    # state_dict after consuming batches directly from the sampler
    s = GroupedBatchSampler(RATIOS, 3, seed=1)
    it = iter(s)
    for _ in range(per_epoch + 1):
        next(it)
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 1
    t = GroupedBatchSampler(RATIOS, 3, seed=1)
    t.load_state_dict(state)
    assert _take(t, 5) == full[per_epoch + 1:per_epoch + 6]
    t.load_state_dict({"iteration": 10})
    assert _take(t, 3) == full[10:13]
    with pytest.raises(ValueError, match="seed"):
        GroupedBatchSampler(RATIOS, 3, seed=2).load_state_dict(state)
    s.set_epoch(2)
    assert _take(s, 2) == full[2 * per_epoch:2 * per_epoch + 2]


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_rank_shards_disjoint_complete_equal_length(world_size):
    for epoch in range(3):
        per_rank = []
        for rank in range(world_size):
            s = GroupedBatchSampler(RATIOS, 2, seed=4, rank=rank, world_size=world_size, infinite=False)
            s.set_epoch(epoch)
            per_rank.append(list(s))
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1  # every rank steps the same number of times
        shards = [set(itertools.chain(*b)) for b in per_rank]
        for a, b in itertools.combinations(shards, 2):
            assert not a & b
        assert set().union(*shards) == set(range(len(RATIOS)))
        for batches in per_rank:
            assert all(len({RATIOS[i] >= 1 for i in b}) == 1 for b in batches)


def test_infinite_ranks_stay_in_step():
    streams = [_take(GroupedBatchSampler(RATIOS, 2, seed=0, rank=r, world_size=3), 30) for r in range(3)]
    assert all(len(s) == 30 for s in streams)
    # at every iteration, the ranks draw from the same epoch: their batches of the first epoch are disjoint
    n = GroupedBatchSampler(RATIOS, 2, seed=0, rank=0, world_size=3).batches_per_epoch(0)
    sets = [set(itertools.chain(*s[:n])) for s in streams]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2])


def test_torch_distributed_defaults(monkeypatch):
    monkeypatch.setattr(samplers_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(samplers_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(samplers_mod.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(samplers_mod.dist, "get_world_size", lambda: 2)
    s = GroupedBatchSampler(RATIOS, 2)
    assert (s.rank, s.world_size) == (1, 2)
    assert _take(s, 4) == _take(GroupedBatchSampler(RATIOS, 2, rank=1, world_size=2), 4)


def test_bad_arguments():
    with pytest.raises(ValueError):
        GroupedBatchSampler(RATIOS[:2], 2, world_size=3, rank=0)
    with pytest.raises(ValueError):
        GroupedBatchSampler(RATIOS, 0)
    with pytest.raises(ValueError):
        GroupedBatchSampler(RATIOS, 2, rank=3, world_size=2)
    with pytest.raises(TypeError):
        len(GroupedBatchSampler(RATIOS, 2))


def test_tiny_dataset_pads_batches():
    s = GroupedBatchSampler([1.0, 1.0, 0.5], batch_size=4, infinite=False)
    batches = list(s)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    assert set(itertools.chain(*batches)) == {0, 1, 2}


def test_seeds():
    s = GroupedBatchSampler(RATIOS, 2, seed=9, with_seeds=True)
    batch = next(iter(s))
    assert all(seed == sample_seed(9, 0, i) for i, seed in batch)
    assert len({sample_seed(9, e, i) for e in range(3) for i in range(50)}) == 150
    assert 0 <= sample_seed(-1, 0, 0) < 2**63
    assert torch.equal(torch.rand(3, generator=sample_generator(1, 2, 3)),
                       torch.rand(3, generator=sample_generator(1, 2, 3)))


def test_collate():
    a = (torch.zeros(3, 2, 2), {"x": 1})
    b = (torch.ones(3, 4, 5), {"x": 2})
    images, targets = collate([a, b])
    assert images[0] is a[0] and images[1] is b[0] and targets == [{"x": 1}, {"x": 2}]


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    ann = generate_shapes(out, 6, seed=0, image_size=((40, 56), (40, 56)), max_objects=2)
    return ann


def _batches(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    del it
    return out


def _assert_same(a, b):
    for (ia, ta), (ib, tb) in zip(a, b):
        assert len(ia) == len(ib)
        for x, y in zip(ia, ib):
            assert torch.equal(x, y)
        for x, y in zip(ta, tb):
            assert x["image_id"] == y["image_id"]
            assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["masks"], y["masks"])


def test_train_loader_is_worker_independent_and_resumable(shapes_dataset):
    cfg = get_preset("r18_fpn_demo")
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, ims_per_batch=2),
                              input=dataclasses.replace(cfg.input, min_size_train=(32, 48, 64), max_size_train=96))
    ds = CocoDataset(shapes_dataset, shapes_dataset.parent, transforms=build_transforms(cfg, train=True))
    cfg0 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=0))
    cfg2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=2))
    ref = _batches(build_train_loader(ds, cfg0), 6)
    assert len({tuple(im.shape) for images, _ in ref for im in images}) > 1  # multi-scale really happened
    _assert_same(ref, _batches(build_train_loader(ds, cfg2), 6))
    _assert_same(ref[4:], _batches(build_train_loader(ds, cfg0, start_iter=4), 2))
    # two ranks split the batch size
    r0 = _batches(build_train_loader(ds, cfg0, rank=0, world_size=2), 3)
    assert all(len(images) == 1 for images, _ in r0)
    with pytest.raises(ValueError, match="divisible"):
        build_train_loader(ds, cfg0, rank=0, world_size=3)
    images, targets = next(iter(build_test_loader(ds, batch_size=3)))
    assert len(images) == 3 and [t["image_id"] for t in targets] == ds.image_ids[:3]
