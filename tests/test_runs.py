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


def _tiny_cfg(*overrides: str):
    from maskrcnn.config import apply_overrides, get_preset

    return apply_overrides(get_preset("r18_fpn_demo"), [o for o in TINY if "=" in o] + list(overrides))


@pytest.fixture()
def corrupt_shapes(tmp_path: Path) -> tuple[Path, str]:
    """A 4-image shapes dataset whose second image is a truncated PNG; returns (folder, that file_name)."""
    import json

    out = tmp_path / "data"
    generate_shapes(out, 4, seed=3, image_size=(64, 64))
    name = json.loads((out / "annotations.json").read_text())["images"][1]["file_name"]
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: len(data) // 3])
    return out, name


def _final_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_corrupt_image_is_skipped_listed_and_resume_stays_exact(corrupt_shapes, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A truncated training image is replaced, logged and listed; a run killed after a checkpoint and resumed
    ends bit-identical to the uninterrupted one."""
    import maskrcnn.engine.trainer as trainer_mod
    from maskrcnn.engine.runs import train_run

    data, bad = corrupt_shapes
    torch.set_num_threads(1)
    # Two epochs of 4 batches, a checkpoint between them: the bad image comes up before and after the kill.
    cfg = _tiny_cfg("solver.max_iter=8", "train.checkpoint_period=4", "train.max_bad_image_fraction=0.5",
                    "train.aspect_ratio_grouping=false")
    with caplog.at_level("WARNING", logger="maskrcnn"):
        whole, _ = train_run(cfg, data / "annotations.json", data, tmp_path / "whole")
    assert any(bad in r.getMessage() and "skipped training image" in r.getMessage() for r in caplog.records)
    listed = (tmp_path / "whole" / "skipped_images.txt").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in listed if not ln.startswith("#")] == [bad]
    assert (tmp_path / "whole" / "model_final" / "model.safetensors").is_file()

    calls = {"n": 0}
    real = trainer_mod._to_device

    def killed_at_iteration_6(batch, device):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # as a kill after the checkpoint of iteration 4
        return real(batch, device)

    monkeypatch.setattr(trainer_mod, "_to_device", killed_at_iteration_6)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, data / "annotations.json", data, tmp_path / "resumed")
    monkeypatch.setattr(trainer_mod, "_to_device", real)
    resumed, _ = train_run(cfg, data / "annotations.json", data, tmp_path / "resumed", resume=True)
    a, b = _final_state(whole), _final_state(resumed)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert (tmp_path / "resumed" / "skipped_images.txt").read_text() == "\n".join(listed) + "\n"


def test_too_many_bad_images_stop_with_a_clear_error(corrupt_shapes, tmp_path: Path) -> None:
    from maskrcnn.engine.runs import train_run
    from maskrcnn.engine.trainer import TooManyBadImagesError

    data, bad = corrupt_shapes
    torch.set_num_threads(1)
    cfg = _tiny_cfg("solver.max_iter=8", "train.aspect_ratio_grouping=false")  # default fraction: 1% of 4 images
    with pytest.raises(TooManyBadImagesError, match=r"1 of the 4 training images .*max_bad_image_fraction=0.01"):
        train_run(cfg, data / "annotations.json", data, tmp_path / "run")
    assert bad in (tmp_path / "run" / "skipped_images.txt").read_text()


def test_an_earlier_run_is_never_overwritten_silently(shapes: Path, tmp_path: Path) -> None:
    from maskrcnn.engine.runs import RunExistsError, train_run

    torch.set_num_threads(1)
    cfg = _tiny_cfg("solver.max_iter=1")
    run = tmp_path / "run"
    train_run(cfg, shapes / "annotations.json", shapes, run)
    metrics = (run / "metrics.jsonl").read_text()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match=r"--resume .* --overwrite"):
        train_run(cfg, shapes / "annotations.json", shapes, run)
    assert (run / "metrics.jsonl").read_text() == metrics  # untouched
    with pytest.raises(RunExistsError, match="exclude each other"):
        train_run(cfg, shapes / "annotations.json", shapes, run, resume=True, overwrite=True)
    train_run(cfg, shapes / "annotations.json", shapes, run, resume=True)  # nothing left to do: fine
    stale = run / "checkpoints" / "model_0000099.pt"
    stale.write_bytes(b"an old run's checkpoint")
    train_run(cfg, shapes / "annotations.json", shapes, run, overwrite=True)
    assert not stale.exists() and (run / "notes.txt").read_text() == "mine"  # the run's files only
    assert (run / "model_final" / "model.safetensors").is_file()


def test_cli_names_resume_and_overwrite(shapes: Path, tmp_path: Path, capsys) -> None:
    from maskrcnn.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "train", "iter": 5}\n')
    rc = main(["train", "--data", str(shapes / "annotations.json"), "--images", str(shapes), "--out", str(run),
               *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == '{"type": "train", "iter": 5}\n'


def test_validation_losses_best_model_and_final_model_before_final_eval(shapes: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from maskrcnn import load_model
    from maskrcnn.engine.evaluator import Evaluator
    from maskrcnn.engine.runs import train_run

    torch.set_num_threads(1)
    ann = shapes / "annotations.json"
    cfg = _tiny_cfg("solver.max_iter=2", "train.eval_period=1")
    run = tmp_path / "run"
    train_run(cfg, ann, shapes, run, val_data=ann, val_images=shapes)
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert [r["iter"] for r in evals] == [1, 2]
    for r in evals:
        assert r["val_total_loss"] > 0 and r["val_loss_mask"] > 0 and "segm_AP" in r
        assert r["val_total_loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("val_loss")))
    assert load_model(run / "model_best").cfg.model.class_names == ("square", "circle", "triangle")

    def broken(self, model):
        raise ValueError("val.jpg: not a recognised image format")

    monkeypatch.setattr(Evaluator, "evaluate", broken)
    with pytest.raises(ValueError, match="val.jpg"):
        train_run(_tiny_cfg("solver.max_iter=2"), ann, shapes, tmp_path / "failing", val_data=ann,
                  val_images=shapes)  # evaluates only at the end
    assert (tmp_path / "failing" / "model_final" / "model.safetensors").is_file()


def test_eval_refuses_images_beyond_max_pixels_before_any_work(shapes: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from maskrcnn.config import get_preset
    from maskrcnn.data.coco import DatasetError
    from maskrcnn.engine.runs import evaluate_run

    with pytest.raises(DatasetError, match=r"4 images have more than --max-pixels 4000 pixels: id 1 \(images/000000\.png, 64x64\)"):
        # A model that cannot predict: the refusal must come before any prediction.
        evaluate_run(SimpleNamespace(cfg=get_preset("r18_fpn_demo")), shapes / "annotations.json", shapes,
                     tmp_path / "eval", max_pixels=4000)
    assert not (tmp_path / "eval").exists()
