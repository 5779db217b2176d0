"""data/check.py and `maskrcnn data check`: every image and annotation checked up front, a report, an exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.data.check import check_dataset
from maskrcnn.data.coco import CocoDataset, DatasetError

H, W = 12, 16


def _ann(ann_id: int, image_id: int = 1, **kw) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [2, 2, 8, 6], "iscrowd": 0,
            "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]], **kw}


def _dataset(tmp_path: Path, images: list[dict], anns: list[dict]) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _image(tmp_path: Path, name: str, h: int = H, w: int = W) -> dict:
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / name)
    return {"id": int(name.split(".")[0][3:]), "file_name": name, "height": H, "width": W}


@pytest.fixture()
def bad_dataset(tmp_path: Path) -> Path:
    """One image and annotation of every kind of problem the check knows, and good ones around them."""
    images = [_image(tmp_path, "img1.png"), _image(tmp_path, "img2.png"), _image(tmp_path, "img3.png", h=H + 4)]
    (tmp_path / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # undecodable
    images.append({"id": 4, "file_name": "../outside.png", "height": H, "width": W})
    images.append({"id": 4, "file_name": "img1.png", "height": H, "width": W})  # duplicate id, reused file name
    nan = float("nan")
    anns = [
        _ann(1),
        _ann(2, segmentation=[[1, 1, nan, 1, 5, 5]]),
        _ann(3, segmentation=[[1, 1, 1e9, 1, 5, 5]]),
        _ann(4, segmentation=[[1, 1, 5, 5]]),  # 2 points: a warning
        _ann(5, segmentation={"size": [H + 1, W], "counts": "abc"}),
        _ann(6, category_id=9),
        _ann(7, image_id=99),
        _ann(8, bbox=[W + 5, 1, 3, 3]),
        _ann(9, bbox=[-2, 1, 6, 3]),  # past the border: a warning
        _ann(9),  # duplicate annotation id
        _ann(10, segmentation=[[1, 2, "x", 4, 5, 6]]),
    ]
    return _dataset(tmp_path, images, anns)


def test_check_reports_every_kind_of_problem(bad_dataset: Path, tmp_path: Path) -> None:
    report = check_dataset(bad_dataset, tmp_path, workers=2, progress=False)
    assert not report.ok
    errors = {kind: where for kind, where in report.errors.items()}
    expect = {
        "images that cannot be read": "image id 2 (img2.png)",
        "images whose size differs from the JSON": "image id 3 (img3.png): file 16x16, JSON 16x12",
        "file names that leave the image folder (allow with --allow-outside-images)": "image id 4 (../outside.png)",
        "duplicate image ids": "image id 4",
        "duplicate annotation ids": "annotation id 9",
        "polygon parts with NaN or infinite coordinates": "annotation id 2",
        "annotations of an unknown category": "annotation id 6: category_id 9",
        "annotations of an unknown image": "annotation id 7: image_id 99",
        "boxes wholly outside their image": "annotation id 8",
        "RLE masks whose size differs from their image": "annotation id 5",
        "malformed polygons": "annotation id 10",
    }
    for kind, where in expect.items():
        assert kind in errors, (kind, sorted(errors))
        assert any(w.startswith(where) for w in errors[kind]), (kind, errors[kind])
    assert any("absurd" in k and any(w == "annotation id 3" for w in v) for k, v in errors.items())
    warnings = report.warnings
    assert warnings["polygon parts with fewer than 3 points (dropped in training)"] == ["annotation id 4"]
    assert any(w.startswith("annotation id 9") for w in warnings["boxes reaching past the image border (clipped in "
                                                                 "training)"])
    assert "file names used by several image ids" in warnings
    text = report.format()
    assert text.startswith(f"{bad_dataset}: 5 images, 11 annotations, 1 categories")
    assert text.splitlines()[-1] == f"FAILED: {report.num_errors} errors, {report.num_warnings} warnings"
    allowed = check_dataset(bad_dataset, tmp_path, workers=1, progress=False, allow_outside_images=True)
    assert "file names that leave the image folder (allow with --allow-outside-images)" not in allowed.errors
    assert any("outside.png" in w for w in allowed.errors["images that cannot be read"])


def test_cli_exit_status(bad_dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(["data", "check", "--data", str(bad_dataset), "--images", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "images that cannot be read" in out and "FAILED" in out
    good = tmp_path / "good"
    good.mkdir()
    path = _dataset(good, [_image(good, "img1.png")], [_ann(1)])
    assert main(["data", "check", "--data", str(path), "--images", str(good), "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK: 0 errors, 0 warnings"
    assert main(["data", "check", "--data", str(tmp_path / "absent.json"), "--images", str(good)]) == 2
    assert "absent.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../x.png", "../../etc/passwd", "/etc/passwd", "a/../../x.png", "..\\x.png"])
def test_file_name_must_stay_inside_the_image_folder(tmp_path: Path, name: str) -> None:
    path = _dataset(tmp_path, [{"id": 7, "file_name": name, "height": H, "width": W}], [_ann(1, image_id=7)])
    with pytest.raises(DatasetError, match=r"ann\.json: image id 7 has file_name .* outside the image folder .*"
                                           r"--allow-outside-images"):
        CocoDataset(path, tmp_path)
    assert len(CocoDataset(path, tmp_path, allow_outside_images=True)) == 1


def test_outside_file_name_refused_by_train_cli(tmp_path: Path, capsys) -> None:
    sub = tmp_path / "images"
    sub.mkdir()
    image = _image(tmp_path, "img1.png")
    path = _dataset(tmp_path, [{**image, "file_name": "../img1.png"}], [_ann(1)])
    rc = main(["train", "--data", str(path), "--images", str(sub), "--out", str(tmp_path / "run"), "--preset",
               "r18_fpn_demo", "solver.max_iter=1"])
    assert rc == 2 and "--allow-outside-images" in capsys.readouterr().err
    assert CocoDataset(path, sub, allow_outside_images=True).get(0)[0].shape == (3, H, W)
