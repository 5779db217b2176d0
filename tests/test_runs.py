"""engine/runs.py: whole training runs as the CLI starts them (same seed, same run; run folders kept safe)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn.data.shapes import generate_shapes

TINY = ["--preset", "r18_fpn_demo", "--device", "cpu", "solver.max_iter=2", "solver.ims_per_batch=1",
        "input.min_size_train=[64]", "input.max_size_train=96", "input.min_size_test=64", "input.max_size_test=96",
        "train.num_workers=0"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """4 synthetic 64x64 shapes images; annotations at DIR/annotations.json, images under DIR."""
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, 4, seed=3, image_size=(64, 64))
    return out


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "maskrcnn", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model_final" / "model.safetensors"))


def test_same_seed_same_run_across_processes(shapes: Path, tmp_path: Path) -> None:
    """Two `maskrcnn train` processes from scratch with one config and seed end with identical weights."""
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        proc = _cli("train", "--data", str(shapes / "annotations.json"), "--images", str(shapes), "--out",
                    str(run), *TINY)
        assert proc.returncode == 0, proc.stderr
        runs.append(_weights(run))
    a, b = runs
    assert a.keys() == b.keys() and len(a) > 50
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    # A different seed must give a different run, or the check above proves nothing.
    run = tmp_path / "c"
    proc = _cli("train", "--data", str(shapes / "annotations.json"), "--images", str(shapes), "--out", str(run),
                *TINY, "train.seed=7")
    assert proc.returncode == 0, proc.stderr
    c = _weights(run)
    assert any(not torch.equal(a[k], c[k]) for k in a)
