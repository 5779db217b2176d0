"""Tests for maskrcnn.engine.checkpoint: atomic writes, rotation, the pointer file and RNG state capture."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from maskrcnn.engine import checkpoint as ck
from maskrcnn.engine.checkpoint import (CheckpointManager, atomic_save, atomic_write_text, checkpoint_name,
                                        get_rng_state, load_checkpoint, module_generators, set_rng_state)


def _state(i: int) -> dict:
    return {"iteration": i, "model": {"w": torch.full((3,), float(i))}}


def test_checkpoint_name():
    assert checkpoint_name(0) == "model_0000000.pt"
    assert checkpoint_name(5000) == "model_0005000.pt"


def test_atomic_save_round_trip_and_no_temp_left(tmp_path):
    path = atomic_save(_state(3), tmp_path / "sub" / "a.pt")
    assert path.is_file()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((3,), 3.0))
    assert [p.name for p in path.parent.iterdir()] == ["a.pt"]


def test_atomic_save_failure_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    atomic_save(_state(1), path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save(_state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left behind


def test_atomic_write_text(tmp_path):
    p = atomic_write_text(tmp_path / "x.txt", "hello\n")
    assert p.read_text() == "hello\n"
    atomic_write_text(p, "bye\n")
    assert p.read_text() == "bye\n"
    assert [q.name for q in tmp_path.iterdir()] == ["x.txt"]


def test_manager_rotation_and_pointer(tmp_path):
    m = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert m.latest() is None and m.list_checkpoints() == []
    for i in (2, 4, 6, 8):
        path = m.save(i, _state(i))
        assert path.name == checkpoint_name(i)
        assert (m.directory / "last_checkpoint").read_text().strip() == path.name
        assert m.latest() == path
    assert [i for i, _ in m.list_checkpoints()] == [6, 8]
    assert sorted(p.name for p in m.directory.iterdir()) == ["last_checkpoint", "model_0000006.pt",
                                                              "model_0000008.pt"]


def test_manager_keep_all(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=0)
    for i in range(1, 6):
        m.save(i, _state(i))
    assert [i for i, _ in m.list_checkpoints()] == [1, 2, 3, 4, 5]


def test_manager_latest_falls_back_without_pointer(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(1, _state(1))
    m.save(2, _state(2))
    (tmp_path / "last_checkpoint").unlink()
    assert m.latest().name == "model_0000002.pt"
    (tmp_path / "last_checkpoint").write_text("model_0000099.pt\n")  # dangling pointer
    assert m.latest().name == "model_0000002.pt"


def test_manager_failed_write_keeps_pointer_and_previous(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=1)
    good = m.save(1, _state(1))

    def broken_save(obj, f, *a, **k):
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        m.save(2, _state(2))
    monkeypatch.undo()
    assert m.latest() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pt"):
        load_checkpoint(bad)


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.randn(2)
    state = get_rng_state()
    atomic_save({"rng": state}, tmp_path / "r.pt")
    expected = (random.random(), np.random.randn(3).tolist(), torch.randn(4), random.gauss(0, 1))
    random.seed(100), np.random.seed(100), torch.manual_seed(100)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])  # through weights_only=True
    got = (random.random(), np.random.randn(3).tolist(), torch.randn(4), random.gauss(0, 1))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert got[3] == expected[3]


def test_module_generators_found_by_path():
    class Sampler(nn.Module):
        def __init__(self):
            super().__init__()
            self.gen = torch.Generator().manual_seed(0)

    net = nn.Sequential(nn.Linear(1, 1), Sampler())
    gens = module_generators(net)
    assert list(gens) == ["1.gen"] and gens["1.gen"] is net[1].gen
