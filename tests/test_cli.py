"""The ``maskrcnn`` command line: help texts, exit codes, one-line errors and each command end to end."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.cli import build_parser, main

FIXTURE_MODEL = "torchvision/maskrcnn_r50_fpn_v1"
SHAPE_NAMES = ("square", "circle", "triangle")
TINY_SIZES = ["input.min_size_train=[64]", "input.max_size_train=96", "input.min_size_test=64",
              "input.max_size_test=96"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, parser) of the top level and of every (sub)command."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def _option_help(help_text: str, option: str) -> str:
    """The help entry of ``option`` (from its line to the next option's), whitespace-normalised."""
    lines = help_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith(option))
    chunk = [lines[start]]
    for ln in lines[start + 1:]:
        if ln.lstrip().startswith("-") or not ln.strip():
            break
        chunk.append(ln)
    return " ".join(" ".join(chunk).split())


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """A 4-image synthetic shapes dataset at 64 px (images under DIR/images, COCO JSON at DIR/annotations.json)."""
    out = tmp_path_factory.mktemp("shapes")
    assert main(["data", "shapes", "--out", str(out), "--num-images", "4", "--seed", "3", "--image-size", "64",
                 "64"]) == 0
    return out


@pytest.fixture(scope="module")
def converted_model(fixtures_dir: Path, tmp_path_factory) -> Path:
    """The v1 fixture checkpoint converted to our format with class names and its test sizes."""
    out = tmp_path_factory.mktemp("converted") / "model"
    rc = main(["weights", "convert", str(fixtures_dir / FIXTURE_MODEL / "weights.pth"), str(out),
               "--class-names", ",".join(SHAPE_NAMES), "--min-size", "320", "--max-size", "512"])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# help and errors


def test_every_help_lists_every_default(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "150")
    commands = list(_commands(build_parser()))
    names = {" ".join(c) for c, _ in commands}
    assert {"predict", "train", "eval", "demo", "weights list", "weights download", "weights convert",
            "data shapes", "data from-labelme", "data from-yolo"} <= names
    for argv, parser in commands:
        assert main([*argv, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: maskrcnn")
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            entry = _option_help(text, action.option_strings[-1])
            assert "(default: " in entry or "(required)" in entry, f"maskrcnn {' '.join(argv)}: {entry}"


def test_python_m_maskrcnn() -> None:
    proc = subprocess.run([sys.executable, "-m", "maskrcnn", "predict", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--score-threshold" in proc.stdout and "(default: 0.5)" in proc.stdout


@pytest.mark.parametrize("case", ["no_images", "unknown_weights", "bad_override", "yolo_missing", "download",
                                  "bad_config_file", "cuda"])
def test_errors_are_one_line_and_exit_2(case: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MASKRCNN_HOME", str(tmp_path / "home"))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    bad_yaml = tmp_path / "cfg.yaml"
    bad_yaml.write_text("solver: {max_iter: many}\n")
    argv = {
        "no_images": ["predict", "--weights", "x.pth", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")],
        "unknown_weights": ["eval", "--weights", "no_such_weights", "--data", str(ann), "--images", str(tmp_path),
                            "--out", str(tmp_path / "o")],
        "bad_override": ["train", "--data", str(ann), "--images", str(tmp_path), "--out", str(tmp_path / "r"),
                         "solver.bogus=1"],
        "yolo_missing": ["data", "from-yolo", str(tmp_path / "nodir"), str(tmp_path / "o.json"), "--names",
                         str(tmp_path / "names.txt")],
        "download": ["weights", "download", "not_a_model"],
        "bad_config_file": ["train", "--data", str(ann), "--images", str(tmp_path), "--out", str(tmp_path / "r"),
                            "--config", str(bad_yaml)],
        "cuda": ["predict", "--weights", "x.pth", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"],
    }[case]
    if case == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    expected = {"no_images": "no images found", "unknown_weights": "no_such_weights", "bad_override": "solver.bogus",
                "yolo_missing": "nodir", "download": "not_a_model", "bad_config_file": "max_iter",
                "cuda": "CUDA is not available"}[case]
    assert expected in lines[0]


def test_usage_error_and_debug(capsys) -> None:
    assert main(["predict"]) == 2  # argparse: missing required arguments
    assert "required" in capsys.readouterr().err
    assert main([]) == 2
    from maskrcnn.weights.zoo import UnknownWeightsError

    with pytest.raises(UnknownWeightsError):
        main(["weights", "download", "not_a_model", "--debug"])


# ---------------------------------------------------------------------------------------------------------------
# weights and data


def test_weights_list(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MASKRCNN_HOME", str(tmp_path))
    assert main(["weights", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and rows
    names = {r["name"] for r in rows}
    assert "maskrcnn_resnet50_fpn" in names
    for r in rows:
        assert {"name", "url", "sha256", "format", "preset", "num_classes", "class_names", "box_ap", "mask_ap",
                "cached", "path"} <= set(r)
        assert r["cached"] is False and r["path"].startswith(str(tmp_path))
        assert len(r["class_names"]) in (0, r["num_classes"])
    assert main(["weights", "list"]) == 0
    table = capsys.readouterr().out
    assert all(n in table for n in names) and "mask AP" in table


def test_data_shapes_writes_files(tmp_path: Path, capsys) -> None:
    argv = ["data", "shapes", "--out", str(tmp_path / "a"), "--num-images", "3", "--seed", "7", "--image-size",
            "48", "40"]
    assert main(argv) == 0
    ann = json.loads((tmp_path / "a" / "annotations.json").read_text())
    assert len(ann["images"]) == 3 and ann["annotations"]
    assert {c["name"] for c in ann["categories"]} == set(SHAPE_NAMES)
    for im in ann["images"]:
        assert (im["height"], im["width"]) == (48, 40)
        with Image.open(tmp_path / "a" / im["file_name"]) as f:
            assert f.size == (40, 48)
    argv[3] = str(tmp_path / "b")
    assert main(argv) == 0
    assert (tmp_path / "a" / "annotations.json").read_bytes() == (tmp_path / "b" / "annotations.json").read_bytes()


def test_data_from_labelme(tmp_path: Path, capsys) -> None:
    src = tmp_path / "lm"
    src.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(src / "a.png")
    (src / "a.json").write_text(json.dumps({
        "imagePath": "a.png", "imageHeight": 20, "imageWidth": 30,
        "shapes": [{"label": "cat", "points": [[2, 2], [12, 2], [12, 10]], "shape_type": "polygon",
                    "group_id": None}]}))
    assert main(["data", "from-labelme", str(src), str(tmp_path / "out.json")]) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    assert len(data["annotations"]) == 1 and data["categories"][0]["name"] == "cat"
    assert "1 annotations" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# predict, eval, train, demo


def test_weights_convert(converted_model: Path) -> None:
    from maskrcnn import load_model

    assert (converted_model / "model.safetensors").is_file()
    model = load_model(converted_model)
    assert model.cfg.model.class_names == SHAPE_NAMES
    assert (model.cfg.input.min_size_test, model.cfg.input.max_size_test) == (320, 512)


def test_predict_cli(converted_model: Path, fixtures_dir: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("00.png", "03.png"):
        (src / name).write_bytes((fixtures_dir / FIXTURE_MODEL / "images" / name).read_bytes())
    (src / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["predict", "--weights", str(converted_model), str(src), "--out", str(out), "--classes",
               "square,triangle", "--score-threshold", "0.2", "--device", "cpu", "--save-masks", "--json",
               str(tmp_path / "preds.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "2 images, 1 skipped" in captured.out
    assert "broken.png" in captured.err and "empty" in captured.err
    records = json.loads((tmp_path / "preds.json").read_text())
    assert records and {r["category_name"] for r in records} <= {"square", "triangle"}
    assert all(r["score"] >= 0.2 for r in records)
    assert (out / "00.png").is_file() and (out / "03.png").is_file() and (out / "images.json").is_file()
    assert len(list((out / "masks").glob("*.png"))) == len(records)

    assert main(["predict", "--weights", str(converted_model), str(src), "--out", str(out), "--classes",
                 "zebra"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "zebra" in err and "square, circle, triangle" in err


def _check_metrics(path: Path) -> None:
    metrics = json.loads(path.read_text())
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        for v in metrics[iou_type].values():
            assert v is None or (0.0 <= v <= 1.0 and not math.isnan(v))


def test_eval_cli(converted_model: Path, shapes_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rc = main(["eval", "--weights", str(converted_model), "--data", str(shapes_data / "annotations.json"),
               "--images", str(shapes_data), "--out", str(out), "--min-size", "96", "--max-size", "128",
               "model.box_head.detections_per_img=10"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_metrics(out / "metrics.json")
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list) and len(results) <= 10 * 4
    assert {r["category_id"] for r in results} <= {1, 2, 3}
    assert "AP50" in captured.out and "segm" in captured.out


def test_train_cli(shapes_data: Path, tmp_path: Path, capsys) -> None:
    from maskrcnn import load_config, load_model

    run = tmp_path / "run"
    rc = main(["train", "--data", str(shapes_data / "annotations.json"), "--images", str(shapes_data), "--out",
               str(run), "--preset", "r18_fpn_demo", "--device", "cpu", "solver.max_iter=2",
               "solver.ims_per_batch=1", *TINY_SIZES])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    cfg = load_config(run / "config.yaml")
    assert cfg.solver.max_iter == 2 and cfg.input.min_size_train == (64,)
    assert cfg.model.class_names == SHAPE_NAMES and cfg.model.category_ids == (1, 2, 3)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("iter") == 2 and "total_loss" in r for r in records)
    assert list((run / "checkpoints").glob("*.pt"))
    model = load_model(run / "model_final")
    assert model.cfg.model.class_names == SHAPE_NAMES and model.cfg.input.min_size_test == 64
    res = model.predict(np.zeros((64, 64, 3), np.uint8))[0]
    assert res.image_size == (64, 64)


def test_demo_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--train-images", "2", "--val-images", "1", "--image-size", "64",
               "--max-iter", "1", "solver.ims_per_batch=1", *TINY_SIZES])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_metrics(out / "metrics.json")
    assert (out / "data" / "train" / "annotations.json").is_file() and (out / "data" / "val").is_dir()
    assert (out / "model_final" / "model.safetensors").is_file()
    assert (out / "val_predictions" / "000000.png").is_file()
    assert (out / "loss_curves.png").is_file() or importlib.util.find_spec("matplotlib") is None
    assert "AP50" in captured.out
    # The demo's own overrides (its half-width backbone) come before the user's, which still win.
    from maskrcnn.config import load_config
    from maskrcnn.engine.demo import DEMO

    cfg = load_config(out / "config.yaml")
    assert DEMO.overrides and (cfg.model.backbone.stem_out_channels, cfg.model.backbone.res2_out_channels) == (32, 32)
    assert cfg.solver.max_iter == 1 and cfg.solver.ims_per_batch == 1


def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path: Path) -> None:
    """CPUs allowed by a cgroup quota: v2 cpu.max, v1 CFS quota/period, None when unlimited or absent."""
    from maskrcnn.cli import cpu_quota

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1) is None
    assert cpu_quota(tmp_path / "absent") is None


def test_threads_capped_at_the_quota_unless_omp_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from maskrcnn import cli

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cli, "cpu_quota", lambda: 0.5)  # half a CPU: one thread
        cli._match_threads_to_cpus()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        cli._match_threads_to_cpus()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
