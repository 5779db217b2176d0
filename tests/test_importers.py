"""Tests for maskrcnn.data.importers: labelme against labelme's own COCO output, YOLO-seg folders, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.importers import AnnotationImportError, labelme_to_coco, yolo_to_coco
from maskrcnn.ops.masks import segmentation_to_bitmap


@pytest.fixture(scope="module")
def labelme_example() -> Path:
    """../shared/datasets/labelme-example (skips, or fails under MASKRCNN_REQUIRE_FIXTURES, when absent)."""
    return shared_path("datasets", "labelme-example")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_labelme_matches_labelme_coco(tmp_path, labelme_example):
    out = tmp_path / "coco.json"
    counts = labelme_to_coco(labelme_example / "data_annotated", out, labelme_example / "labels.txt")
    assert counts["images"] == 3 and counts["annotations"] == 12 and counts["categories"] == 20
    assert counts["skipped"] == {"__ignore__ shapes": 2}
    ours = json.loads(out.read_text())
    ref = json.loads((labelme_example / "data_dataset_coco" / "annotations.json").read_text())

    ref_cats = {c["name"]: c["id"] for c in ref["categories"] if c["name"] != "_background_"}
    assert {c["name"]: c["id"] for c in ours["categories"]} == ref_cats

    def by_image(data):
        names = {im["id"]: Path(im["file_name"]).name for im in data["images"]}
        sizes = {Path(im["file_name"]).name: (im["height"], im["width"]) for im in data["images"]}
        anns: dict[str, list] = {n: [] for n in names.values()}
        for a in data["annotations"]:
            anns[names[a["image_id"]]].append(a)
        return anns, sizes

    our_anns, our_sizes = by_image(ours)
    ref_anns, ref_sizes = by_image(ref)
    assert our_sizes == ref_sizes
    for name, refs in ref_anns.items():
        h, w = ref_sizes[name]
        mine = our_anns[name]
        assert sorted(a["category_id"] for a in mine) == sorted(a["category_id"] for a in refs)
        unmatched = list(mine)
        for r in refs:
            rm = segmentation_to_bitmap(r["segmentation"], h, w).astype(bool)
            scored = [(_iou(rm, segmentation_to_bitmap(m["segmentation"], h, w).astype(bool)), m)
                      for m in unmatched if m["category_id"] == r["category_id"]]
            iou, best = max(scored, key=lambda t: t[0])
            assert iou > 0.95, (name, r["id"], iou)
            unmatched.remove(best)
            # labelme rasterises with PIL, we with pycocotools: areas and boxes agree closely
            assert best["area"] == pytest.approx(r["area"], rel=0.1)
            assert np.allclose(best["bbox"], r["bbox"], atol=2.5)
        assert not unmatched
    ds = CocoDataset(out, labelme_example / "data_annotated")
    assert len(ds) == 3 and ds.class_names[14] == "person"
    image, target = ds[0]
    assert image.shape == (3, 338, 500) and len(target["labels"]) == 3


def _labelme_file(folder: Path, stem: str, shapes: list[dict], h: int = 40, w: int = 60) -> Path:
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(folder / f"{stem}.png")
    data = {"version": "5.0.1", "flags": {}, "shapes": shapes, "imagePath": f"{stem}.png", "imageData": None,
            "imageHeight": h, "imageWidth": w}
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(data))
    return path


def _shape(label, points, kind="polygon", group=None):
    return {"label": label, "points": points, "group_id": group, "shape_type": kind, "flags": {}}


def test_labelme_shapes_groups_and_categories(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _labelme_file(src, "b", [
        _shape("dog", [[5, 5], [25, 5], [25, 20], [5, 20]]),
        _shape("cat", [[30, 10], [50, 30]], "rectangle"),
        _shape("cat", [[10, 30], [14, 30]], "circle"),
        _shape("dog", [[40, 2], [45, 2], [45, 6]], group=1),
        _shape("dog", [[50, 2], [55, 2], [55, 6]], group=1),
        _shape("dog", [[1, 1], [3, 3]], "line"),
        _shape("dog", [[1, 1], [3, 3]]),  # 2-point polygon
        _shape("__ignore__", [[0, 0], [5, 0], [5, 5]]),
    ])
    _labelme_file(src, "a", [_shape("bird", [[2, 2], [8, 2], [8, 8]])])
    out = tmp_path / "out.json"
    counts = labelme_to_coco(src, out)
    assert counts["skipped"] == {"line shapes (unsupported type)": 1, "polygons with fewer than 3 points": 1,
                                 "__ignore__ shapes": 1}
    data = json.loads(out.read_text())
    # no labels.txt: categories in order of first appearance over the sorted files
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "bird"), (2, "dog"), (3, "cat")]
    assert [im["file_name"] for im in data["images"]] == ["a.png", "b.png"]
    anns = [a for a in data["annotations"] if a["image_id"] == 2]
    assert len(anns) == 4  # dog, cat rectangle, cat circle, the two-part dog group
    rect = next(a for a in anns if a["category_id"] == 3 and len(a["segmentation"][0]) == 8)
    assert rect["bbox"] == [30.0, 10.0, 20.0, 20.0] and rect["area"] == 400.0
    circle = next(a for a in anns if a["category_id"] == 3 and a is not rect)
    assert len(circle["segmentation"][0]) >= 24  # at least 12 vertices
    assert circle["area"] == pytest.approx(np.pi * 16, rel=0.15)
    group = next(a for a in anns if len(a["segmentation"]) == 2)
    assert group["category_id"] == 2
    bitmap = segmentation_to_bitmap(group["segmentation"], 40, 60)
    assert bitmap[:, 38:47].sum() > 0 and bitmap[:, 48:57].sum() > 0

    # a labels.txt in the folder fixes the ids; an unknown label is an error naming file and shape
    (src / "labels.txt").write_text("__ignore__\n_background_\ncat\ndog\n")
    with pytest.raises(AnnotationImportError, match=r"a\.json: shapes\[0\]: label 'bird'"):
        labelme_to_coco(src, out)
    (src / "labels.txt").write_text("__ignore__\n_background_\ncat\ndog\nbird\n")
    labelme_to_coco(src, out)
    assert [(c["id"], c["name"]) for c in json.loads(out.read_text())["categories"]] == [
        (1, "cat"), (2, "dog"), (3, "bird")]


def test_labelme_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(AnnotationImportError, match="broken.json: not valid JSON"):
        labelme_to_coco(tmp_path, tmp_path / "o.json")
    (tmp_path / "broken.json").write_text(json.dumps({"shapes": [], "imagePath": "nothere.jpg"}))
    with pytest.raises(AnnotationImportError, match="broken.json: image not found"):
        labelme_to_coco(tmp_path, tmp_path / "o.json")
    with pytest.raises(AnnotationImportError, match="not found"):
        labelme_to_coco(tmp_path / "absent", tmp_path / "o.json")


def _png(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def test_yolo_to_coco(tmp_path):
    src = tmp_path / "yolo"
    _png(src / "images" / "train" / "a.png", 40, 80)
    (src / "labels" / "train").mkdir(parents=True)
    (src / "labels" / "train" / "a.txt").write_text(
        "1 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n\n0 0.5 0.5 0.25 0.5\n")  # a polygon, then a YOLO box
    _png(src / "flat" / "b.png", 20, 20)
    (src / "flat" / "b.txt").write_text("0 0 0 1 0 1 1.2\n")  # triangle; y=1.2 is clipped to the image
    _png(src / "flat" / "c.png", 20, 20)  # no label file: an image without objects
    names = tmp_path / "classes.txt"
    names.write_text("ball\nbat\n")
    out = tmp_path / "coco.json"
    counts = yolo_to_coco(src, out, names)
    assert counts["images"] == 3 and counts["annotations"] == 3 and counts["categories"] == 2
    assert counts["skipped"] == {"images without a label file": 1}
    data = json.loads(out.read_text())
    assert [im["file_name"] for im in data["images"]] == ["flat/b.png", "flat/c.png", "images/train/a.png"]
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "ball"), (2, "bat")]
    a_id = data["images"][2]["id"]
    poly, box = [a for a in data["annotations"] if a["image_id"] == a_id]
    assert poly["category_id"] == 2 and poly["segmentation"] == [[8.0, 4.0, 40.0, 4.0, 40.0, 20.0, 8.0, 20.0]]
    assert poly["bbox"] == [8.0, 4.0, 32.0, 16.0]
    assert box["category_id"] == 1 and box["segmentation"] == [[30.0, 10.0, 50.0, 10.0, 50.0, 30.0, 30.0, 30.0]]
    tri = next(a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"])
    assert tri["segmentation"] == [[0.0, 0.0, 20.0, 0.0, 20.0, 20.0]]
    ds = CocoDataset(out, src, filter_empty=False)
    assert len(ds) == 3 and ds.class_names == ["ball", "bat"]

    # an ultralytics data.yaml works as the names file
    pytest.importorskip("yaml")
    yaml_names = tmp_path / "data.yaml"
    yaml_names.write_text("path: .\nnames:\n  0: ball\n  1: bat\n")
    yolo_to_coco(src, out, yaml_names)
    assert [c["name"] for c in json.loads(out.read_text())["categories"]] == ["ball", "bat"]


@pytest.mark.parametrize("line, words", [
    ("2 0.1 0.1 0.5 0.1 0.5 0.5", "class 2 is outside 0..1"),
    ("0 0.1 0.1 0.5 0.1 0.5", "even number of coordinates"),
    ("0 0.1 0.1 0.5", "even number of coordinates"),
    ("zero 0.1 0.1 0.5 0.1 0.5 0.5", "expected 'class x1 y1"),
    ("0 0.1 nan 0.5 0.1 0.5 0.5", "non-finite"),
])
def test_yolo_errors_name_file_and_line(tmp_path, line, words):
    _png(tmp_path / "a.png", 10, 10)
    (tmp_path / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n" + line + "\n")
    names = tmp_path / "names.txt"
    names.write_text("x\ny\n")
    with pytest.raises(AnnotationImportError, match=words) as info:
        yolo_to_coco(tmp_path, tmp_path / "out.json", names)
    assert f"{tmp_path / 'a.txt'}:2" in str(info.value)
