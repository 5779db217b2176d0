"""Predictor: files/folders/globs -> overlays, mask PNGs and a COCO results JSON that pycocotools reads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn.config import ModelConfig
from maskrcnn.predict import Predictor, expand_sources, model_class_names

FIXTURE_MODEL = "torchvision/maskrcnn_r50_fpn_v1"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture_model(fixtures_dir: Path):
    """The v1 fixture checkpoint at the test sizes of its config.json."""
    from maskrcnn import load_model

    return load_model(fixtures_dir / FIXTURE_MODEL / "weights.pth", min_size=320, max_size=512)


@pytest.fixture(scope="module")
def fixture_images(fixtures_dir: Path) -> Path:
    """The fixture's images folder (six PNGs of shapes)."""
    return fixtures_dir / FIXTURE_MODEL / "images"


class StubModel:
    """Stands in for MaskRCNN: one square detection per class label, at the image's size."""

    def __init__(self, names: tuple[str, ...] = ("cat", "dog", "bird"), category_ids: tuple[int, ...] = ()) -> None:
        self.cfg = SimpleNamespace(model=ModelConfig(num_classes=len(names), class_names=names,
                                                     category_ids=category_ids))
        self.calls = 0
        self.batch_on_cpu = True  # one detect() call per batch, as a padded accelerator batch

    def detect(self, images: list[torch.Tensor], score_threshold: float | None = None,
               soft_masks: bool = False) -> list[dict[str, torch.Tensor]]:
        """One detection per class, each a small rectangle near the top-left corner of the (3, H, W) image."""
        self.calls += 1
        out = []
        for img in images:
            h, w = img.shape[-2:]
            k = self.cfg.model.num_classes
            masks = torch.zeros(k, h, w, dtype=torch.bool)
            for i in range(k):
                masks[i, i: i + 4, i: i + 5] = True
            out.append({"boxes": torch.tensor([[i, i, i + 5.0, i + 4.0] for i in range(k)]),
                        "scores": torch.linspace(0.9, 0.6, k), "labels": torch.arange(1, k + 1), "masks": masks})
        return out


def _write_png(path: Path, h: int = 24, w: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)
    return path


def test_predict_folder_json_matches_model_predict(fixture_model, fixture_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = Predictor(fixture_model, score_threshold=0.5, save_masks=True, progress=False).run(
        [fixture_images], out)
    paths = sorted(fixture_images.glob("*.png"))
    assert summary.images == len(paths) and summary.skipped == 0
    assert summary.json_path == out / "predictions.json"
    for p in paths:
        assert (out / f"{p.stem}.png").is_file()

    records = json.loads(summary.json_path.read_text())
    assert isinstance(records, list) and len(records) == summary.detections > 0
    index = json.loads((out / "images.json").read_text())
    assert [Path(im["file_name"]).name for im in index["images"]] == [p.name for p in paths]
    assert {c["name"] for c in index["categories"]} == set(model_class_names(fixture_model))

    # images.json is a ground-truth skeleton that loadRes accepts the results against.
    gt = COCO()
    gt.dataset = {**index, "annotations": []}
    gt.createIndex()
    dt = gt.loadRes(str(summary.json_path))
    assert len(dt.getAnnIds()) == len(records)

    expected = fixture_model.predict([str(p) for p in paths], score_threshold=0.5)
    for im, exp in zip(index["images"], expected):
        recs = [r for r in records if r["image_id"] == im["id"]]
        assert (im["height"], im["width"]) == exp.image_size
        assert len(recs) == len(exp) == im["num_detections"]
        assert all(r["file_name"] == im["file_name"] for r in recs)
        assert [r["category_id"] for r in recs] == exp.category_ids
        assert [r["category_name"] for r in recs] == exp.class_names
        np.testing.assert_allclose([r["score"] for r in recs], exp.scores.numpy(), rtol=0, atol=1e-6)
        boxes = np.array([r["bbox"] for r in recs]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        np.testing.assert_allclose(boxes, exp.boxes.numpy(), rtol=0, atol=1e-3)
        for r, m in zip(recs, exp.masks):
            assert isinstance(r["segmentation"]["counts"], str)
            decoded = mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), m.numpy())
        assert len(im["masks"]) == len(exp)
        for f, m in zip(im["masks"], exp.masks):
            np.testing.assert_array_equal(np.asarray(Image.open(f)), m.numpy())


def test_bad_inputs_reported_and_skipped(fixture_model, fixture_images: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    good = src / "good.png"
    good.write_bytes((fixture_images / "00.png").read_bytes())
    (src / "text.png").write_text("this is not a picture")
    (src / "empty.jpg").write_bytes(b"")
    huge = src / "huge.png"
    Image.new("RGB", (6000, 4000), (90, 120, 150)).save(huge, compress_level=1)
    missing = tmp_path / "nope" / "missing.jpg"

    summary = Predictor(fixture_model, score_threshold=0.5, batch_size=2, progress=False).run(
        [src, missing], tmp_path / "out")
    err = capsys.readouterr().err
    assert summary.images == 2 and summary.skipped == 3
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 3
    for name, words in (("text.png", "not a recognised image"), ("empty.jpg", "empty"),
                        ("missing.jpg", "no such file")):
        line = next(ln for ln in lines if name in ln)
        assert words in line
    assert (tmp_path / "out" / "good.png").is_file()
    with Image.open(tmp_path / "out" / "huge.png") as im:
        assert im.size == (6000, 4000)
    names = {Path(im["file_name"]).name for im in json.loads((tmp_path / "out" / "images.json").read_text())["images"]}
    assert names == {"good.png", "huge.png"}


def test_decompression_bomb_is_an_unreadable_file(tmp_path: Path, monkeypatch, capsys) -> None:
    # Pillow refuses images over 2 x MAX_IMAGE_PIXELS; shrink the limit instead of writing a giant file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    bomb = _write_png(tmp_path / "bomb.png", 120, 120)
    ok = _write_png(tmp_path / "ok.png", 8, 8)
    summary = Predictor(StubModel(), progress=False).run([bomb, ok], tmp_path / "out")
    assert summary.images == 1 and summary.skipped == 1
    err = capsys.readouterr().err
    assert "bomb.png" in err and "ok.png" not in err


def test_classes_filter_and_unknown_class(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png")
    summary = Predictor(StubModel(category_ids=(10, 20, 30)), classes="dog, bird", progress=False).run(
        [tmp_path / "a.png"], tmp_path / "out")
    recs = json.loads(summary.json_path.read_text())
    assert [(r["category_name"], r["category_id"]) for r in recs] == [("dog", 20), ("bird", 30)]
    with pytest.raises(ValueError, match=r"unknown class name\(s\) 'zebra'.*cat, dog, bird"):
        Predictor(StubModel(), classes=["cat", "zebra"])


def test_unnamed_classes_are_class_n() -> None:
    model = StubModel(names=())
    model.cfg = SimpleNamespace(model=ModelConfig(num_classes=2))
    assert model_class_names(model) == ["class_1", "class_2"]
    Predictor(model, classes=["class_2"])  # accepted


def test_sources_globs_recursion_and_duplicates(tmp_path: Path) -> None:
    a = _write_png(tmp_path / "d" / "a.png")
    b = _write_png(tmp_path / "d" / "sub" / "b.jpg")
    paths, problems = expand_sources([tmp_path / "d", str(tmp_path / "d" / "*.png"), a])
    assert paths == [a] and problems == []
    paths, problems = expand_sources([tmp_path / "d"], recursive=True)
    assert sorted(paths) == sorted([a, b])
    paths, problems = expand_sources([str(tmp_path / "*.gif"), tmp_path / "x.png"])
    assert paths == [] and [p[0] for p in problems] == [str(tmp_path / "*.gif"), str(tmp_path / "x.png")]


def test_same_stem_in_two_folders_gets_two_overlays(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "img.png")
    _write_png(tmp_path / "b" / "img.png")
    model = StubModel()
    summary = Predictor(model, batch_size=2, progress=False).run([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert summary.images == 2 and model.calls == 1
    assert (tmp_path / "out" / "img.png").is_file() and (tmp_path / "out" / "img_1.png").is_file()


def test_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    img = _write_png(tmp_path / "photo.png")
    with pytest.raises(ValueError, match="overwrite the input"):
        Predictor(StubModel(), progress=False).run([img], tmp_path)
    assert np.asarray(Image.open(img)).mean() == 100


def test_summary_numbers(tmp_path: Path) -> None:
    _write_png(tmp_path / "in" / "a.png")
    summary = Predictor(StubModel(), progress=False).run([tmp_path / "in"], tmp_path / "out",
                                                          json_path=tmp_path / "res" / "r.json")
    assert summary.json_path == tmp_path / "res" / "r.json" and summary.json_path.is_file()
    assert summary.detections == 3 and summary.images_per_second > 0
    assert "1 images, 0 skipped, 3 detections" in summary.format()


def test_cli_fast_math_predicts_like_the_exact_path(fixtures_dir: Path, fixture_images: Path, tmp_path: Path) -> None:
    """``maskrcnn predict --fast-math`` loads the opt-in path and finds the exact path's detections."""
    from maskrcnn.cli import main

    weights = str(fixtures_dir / FIXTURE_MODEL / "weights.pth")
    image = str(fixture_images)
    runs = {}
    for flag in ([], ["--fast-math"]):
        out = tmp_path / ("fm" if flag else "exact")
        assert main(["predict", "--weights", weights, image, "--out", str(out), "--device", "cpu",
                     "--min-size", "320", "--max-size", "512", "--score-threshold", "0.2", *flag]) == 0
        runs[bool(flag)] = json.loads((out / "predictions.json").read_text())
    exact, fast = runs[False], runs[True]
    assert len(exact) == len(fast) > 0
    assert [r["category_id"] for r in exact] == [r["category_id"] for r in fast]
    np.testing.assert_allclose([r["bbox"] for r in fast], [r["bbox"] for r in exact], atol=0.05)


class _InterruptedModel(StubModel):
    """A StubModel whose ``stop_at``-th detect call is interrupted as by Ctrl-C."""

    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.stop_at = stop_at

    def detect(self, images, score_threshold=None, soft_masks=False):
        if self.calls + 1 == self.stop_at:
            raise KeyboardInterrupt
        return super().detect(images, score_threshold, soft_masks)


def _check_interrupted_outputs(out: Path, finished: int) -> None:
    records = json.loads((out / "predictions.json").read_text())
    index = json.loads((out / "images.json").read_text())
    assert index["complete"] is False and len(index["images"]) == finished
    assert sorted({r["image_id"] for r in records}) == [im["id"] for im in index["images"]]
    assert len(records) == sum(im["num_detections"] for im in index["images"])
    assert not list(out.glob("*.partial.jsonl")) and not list(out.glob(".*.tmp"))


def test_interrupted_run_keeps_the_finished_images_as_valid_json(tmp_path: Path) -> None:
    for i in range(6):
        _write_png(tmp_path / "in" / f"{i}.png")
    with pytest.raises(KeyboardInterrupt):
        Predictor(_InterruptedModel(stop_at=4), progress=False).run([tmp_path / "in"], tmp_path / "out")
    _check_interrupted_outputs(tmp_path / "out", finished=3)
    stale = tmp_path / "out" / ".predictions.json.k2j4h5g6.tmp"  # as a SIGKILL mid-write leaves it
    stale.write_text("[{")
    done = Predictor(StubModel(), progress=False).run([tmp_path / "in"], tmp_path / "out")
    assert not stale.exists()
    assert json.loads(done.images_json.read_text())["complete"] is True


SIGINT_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_predict import StubModel
from maskrcnn.predict import Predictor

class Slow(StubModel):
    def detect(self, images, score_threshold=None, soft_masks=False):
        time.sleep(0.3)
        return super().detect(images, score_threshold, soft_masks)

print("started", flush=True)
Predictor(Slow(), progress=False).run([{src!r}], {out!r})
"""


def test_sigint_during_predict_leaves_valid_json(tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT) to a running predict process: the finished images' records survive as JSON."""
    import os
    import signal
    import subprocess
    import sys
    import time

    for i in range(40):
        _write_png(tmp_path / "in" / f"{i:02d}.png")
    out = tmp_path / "out"
    script = SIGINT_SCRIPT.format(tests=str(Path(__file__).parent), src=str(tmp_path / "in"), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.png"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    index = json.loads((out / "images.json").read_text())
    assert 3 <= len(index["images"]) < 40
    _check_interrupted_outputs(out, finished=len(index["images"]))


def test_max_pixels_refuses_large_images_with_a_clear_message(tmp_path: Path, capsys) -> None:
    from maskrcnn.predict import ImageTooLargeError

    _write_png(tmp_path / "in" / "small.png", 20, 30)
    _write_png(tmp_path / "in" / "big.png", 40, 60)
    summary = Predictor(StubModel(), progress=False, max_pixels=1000).run([tmp_path / "in"], tmp_path / "out")
    assert summary.images == 1 and summary.skipped == 1
    err = capsys.readouterr().err
    assert "big.png" in err and "60x40 = 0.0 megapixels, more than max_pixels (--max-pixels)" in err
    with pytest.raises(ImageTooLargeError, match="image is 60x40"):
        Predictor(StubModel(), max_pixels=1000).predict(np.zeros((40, 60, 3), np.uint8))
    assert len(Predictor(StubModel(), max_pixels=1000).predict(np.zeros((20, 30, 3), np.uint8))) == 1
