"""Tests for maskrcnn.engine.evaluator against hand-computed COCO AP values on tiny in-memory ground truths."""

from __future__ import annotations

import gc
import json
import math
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn.engine import evaluator as ev
from maskrcnn.ops.masks import encode_rle, rle_to_bitmap
from maskrcnn.structures import Result

H, W = 64, 64


def rect_mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y:y + h, x:x + w] = True
    return m


def make_gt(objects: dict[int, list[tuple[int, tuple[int, int, int, int]]]],
            categories: tuple[tuple[int, str], ...] = ((1, "cat"), (2, "dog"))) -> COCO:
    """Ground truth with rectangle objects: {image_id: [(category_id, (x, y, w, h)), ...]}, masks as RLE."""
    images, anns = [], []
    for img_id, objs in objects.items():
        images.append({"id": img_id, "width": W, "height": H, "file_name": f"{img_id}.png"})
        for cat, (x, y, w, h) in objs:
            rle = encode_rle(rect_mask(x, y, w, h)[None])[0]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": [x, y, w, h],
                         "area": float(w * h), "iscrowd": 0, "segmentation": rle})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": n} for c, n in categories]}
    gt.createIndex()
    return gt


def det(image_id: int, cat: int, x: int, y: int, w: int, h: int, score: float) -> dict:
    """One results record with matching bbox and mask."""
    return {"image_id": image_id, "category_id": cat, "bbox": [x, y, w, h], "score": score,
            "segmentation": encode_rle(rect_mask(x, y, w, h)[None])[0]}


def result_from(records: list[dict], category_ids: tuple[int, ...]) -> Result:
    """A Result (contiguous labels) equivalent to some results records of one image."""
    boxes = torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                          for r in records], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([category_ids.index(r["category_id"]) + 1 for r in records], dtype=torch.long)
    masks = torch.from_numpy(np.stack([rle_to_bitmap(r["segmentation"], H, W) for r in records]).astype(bool)
                             if records else np.zeros((0, H, W), bool))
    return Result(boxes, torch.tensor([r["score"] for r in records], dtype=torch.float32), labels, masks,
                  image_size=(H, W))


def test_perfect_predictions_score_one():
    gt = make_gt({1: [(1, (2, 2, 10, 10)), (2, (20, 20, 40, 40))], 2: [(1, (5, 30, 20, 25))]})
    res = [det(a["image_id"], a["category_id"], *a["bbox"], score=0.9) for a in gt.dataset["annotations"]]
    m = ev.evaluate_coco(gt, res)
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(1.0)
        assert m[t]["AP50"] == pytest.approx(1.0) and m[t]["AP75"] == pytest.approx(1.0)
        assert m[t]["APs"] == pytest.approx(1.0)  # 10x10 = 100 px
        assert m[t]["APm"] == pytest.approx(1.0)  # 40x40 = 1600 px, 20x25 = 500 px is small
        assert math.isnan(m[t]["APl"])  # no object above 96^2 px: undefined, not 0
        assert m["per_class"][t] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_iou_between_thresholds(iou_type):
    # GT 10x16 = 160 px; prediction its top 10x10 = 100 px: IoU = 100/160 = 0.625, which passes the
    # thresholds 0.50, 0.55 and 0.60 of the ten 0.50:0.05:0.95, so AP = 3/10 with precision 1 where matched.
    gt = make_gt({1: [(1, (4, 4, 10, 16))]})
    m = ev.evaluate_coco(gt, [det(1, 1, 4, 4, 10, 10, 0.8)], iou_types=(iou_type,))
    assert m[iou_type]["AP50"] == pytest.approx(1.0)
    assert m[iou_type]["AP75"] == pytest.approx(0.0)
    assert m[iou_type]["AP"] == pytest.approx(3 / 10)
    # IoU 90/160 = 0.5625 passes 0.50 and 0.55 only: 2/10.
    m = ev.evaluate_coco(gt, [det(1, 1, 4, 4, 10, 9, 0.8)], iou_types=(iou_type,))
    assert m[iou_type]["AP"] == pytest.approx(2 / 10)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_false_positive_above_true_positive(iou_type):
    # One GT; FP (score 0.9, no overlap) then TP (0.8): recall [0, 1], precision [0, 1/2]. The interpolated
    # precision (max over recall >= r) is 1/2 at all 101 recall points, at every IoU threshold: AP = 0.5.
    gt = make_gt({1: [(1, (4, 4, 10, 10))]})
    res = [det(1, 1, 40, 40, 10, 10, 0.9), det(1, 1, 4, 4, 10, 10, 0.8)]
    m = ev.evaluate_coco(gt, res, iou_types=(iou_type,))
    assert m[iou_type]["AP"] == pytest.approx(0.5)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_101_point_interpolation(iou_type):
    # Three GTs; detections TP 0.9, FP 0.8, TP 0.7, TP 0.6.
    # recall    = [1/3, 1/3, 2/3, 1], precision = [1, 1/2, 2/3, 3/4]
    # envelope  = [1, 3/4, 3/4, 3/4]
    # recall points r = 0.00..1.00: r <= 1/3 (0.00..0.33, 34 points) -> 1; the other 67 -> 3/4.
    # AP = (34 * 1 + 67 * 0.75) / 101 at every IoU threshold.
    gt = make_gt({1: [(1, (2, 2, 10, 10)), (1, (20, 2, 10, 10)), (1, (2, 20, 10, 10))]})
    res = [det(1, 1, 2, 2, 10, 10, 0.9), det(1, 1, 40, 40, 10, 10, 0.8), det(1, 1, 20, 2, 10, 10, 0.7),
           det(1, 1, 2, 20, 10, 10, 0.6)]
    m = ev.evaluate_coco(gt, res, iou_types=(iou_type,))
    expected = (34 * 1.0 + 67 * 0.75) / 101
    assert m[iou_type]["AP"] == pytest.approx(expected)
    assert m[iou_type]["AP50"] == pytest.approx(expected)
    assert m["per_class"][iou_type]["cat"] == pytest.approx(expected)
    assert math.isnan(m["per_class"][iou_type]["dog"])  # no dog in the ground truth


def test_per_class_ap_differs_by_class():
    gt = make_gt({1: [(1, (2, 2, 10, 10)), (2, (20, 20, 10, 10))]})
    res = [det(1, 1, 2, 2, 10, 10, 0.9), det(1, 2, 40, 40, 10, 10, 0.9)]  # cat found, dog missed
    m = ev.evaluate_coco(gt, res, iou_types=("bbox",), class_names={1: "Cat", 2: "Dog"})
    assert m["per_class"]["bbox"] == {"Cat": pytest.approx(1.0), "Dog": pytest.approx(0.0)}
    assert m["bbox"]["AP"] == pytest.approx(0.5)


def test_empty_results():
    gt = make_gt({1: [(1, (2, 2, 10, 10))], 2: [(2, (10, 10, 40, 40))]})
    m = ev.evaluate_coco(gt, [])
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APm"):
            assert m[t][k] == 0.0
        assert math.isnan(m[t]["APl"])
        assert m["per_class"][t] == {"cat": 0.0, "dog": 0.0}
    assert "AP" in ev.format_metrics_table(m)


def test_caller_records_are_not_modified_and_segm_uses_mask_area():
    # Box 40x40 (medium) around a 10x10 mask (small): mask AP must file it under the mask's area.
    gt = make_gt({1: [(1, (2, 2, 10, 10))]})
    rec = {"image_id": 1, "category_id": 1, "bbox": [2, 2, 40, 40], "score": 0.9,
           "segmentation": encode_rle(rect_mask(2, 2, 10, 10)[None])[0]}
    before = json.dumps(rec)
    m = ev.evaluate_coco(gt, [rec])
    assert json.dumps(rec) == before
    assert m["segm"]["APs"] == pytest.approx(1.0)
    assert m["bbox"]["AP50"] == pytest.approx(0.0)  # IoU 100/1600


def test_boxes_only_results_skip_segm():
    gt = make_gt({1: [(1, (2, 2, 10, 10))]})
    m = ev.evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.9}])
    assert "segm" not in m and m["bbox"]["AP"] == pytest.approx(1.0)


def test_unknown_image_id_raises():
    gt = make_gt({1: [(1, (2, 2, 10, 10))]})
    with pytest.raises(ValueError, match="image ids"):
        ev.evaluate_coco(gt, [det(99, 1, 2, 2, 10, 10, 0.9)])


def test_silent_unless_verbose(capsys):
    gt = make_gt({1: [(1, (2, 2, 10, 10))]})
    capsys.readouterr()
    ev.evaluate_coco(gt, [det(1, 1, 2, 2, 10, 10, 0.9)])
    ev.evaluate_coco(gt, [])
    assert capsys.readouterr().out == ""
    ev.evaluate_coco(gt, [det(1, 1, 2, 2, 10, 10, 0.9)], iou_types=("bbox",), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_results_to_coco_maps_labels_and_chunks():
    recs = [det(1, 7, 2, 2, 10, 10, 0.9), det(1, 3, 20, 20, 5, 6, 0.5)] * 6  # 12 > one encoding chunk
    res = result_from(recs, (3, 7))
    out = ev.results_to_coco(res, 1, category_ids=(3, 7))
    assert len(out) == 12
    for o, r in zip(out, recs):
        assert o["category_id"] == r["category_id"] and o["image_id"] == 1
        assert o["bbox"] == pytest.approx(r["bbox"]) and o["score"] == pytest.approx(r["score"])
        assert isinstance(o["segmentation"]["counts"], str)
        np.testing.assert_array_equal(rle_to_bitmap(o["segmentation"], H, W), rle_to_bitmap(r["segmentation"], H, W))


def test_writer_round_trips_through_loadres(tmp_path):
    gt = make_gt({1: [(1, (2, 2, 10, 10))], 2: [(2, (10, 10, 40, 40))]})
    writer = ev.CocoResultWriter(category_ids=(1, 2))
    recs1 = [det(1, 1, 2, 2, 10, 10, 0.9)]
    recs2 = [det(2, 2, 10, 10, 40, 40, 0.7), det(2, 1, 0, 0, 5, 5, 0.3)]
    assert writer.add(result_from(recs1, (1, 2)), 1) == 1
    assert writer.add(result_from(recs2, (1, 2)), 2) == 2
    assert writer.add(result_from([], (1, 2)), 3) == 0
    path = writer.write(tmp_path / "out" / "results.json")
    data = json.loads(path.read_text())
    assert len(data) == 3
    assert set(data[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    dt = gt.loadRes(str(path))
    assert len(dt.getAnnIds()) == 3
    for a, r in zip(data, recs1 + recs2):
        np.testing.assert_array_equal(dt.annToMask(dt.anns[dt.getAnnIds(imgIds=a["image_id"])[0]]).shape, (H, W))
        np.testing.assert_array_equal(rle_to_bitmap(a["segmentation"], H, W), rle_to_bitmap(r["segmentation"], H, W))
    m = ev.evaluate_coco(gt, str(path))
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["segm"]["AP"] == pytest.approx(1.0)


def test_writer_keeps_rle_not_arrays():
    h, w, n = 400, 600, 20
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        masks[i, 10 * i:10 * i + 100, 20 * i:20 * i + 150] = True
    boxes = torch.tensor([[20 * i, 10 * i, 20 * i + 150, 10 * i + 100] for i in range(n)], dtype=torch.float32)
    res = Result(boxes, torch.linspace(0.9, 0.1, n), torch.ones(n, dtype=torch.long), masks, image_size=(h, w))
    ref = weakref.ref(res)
    writer = ev.CocoResultWriter()
    assert writer.add(res, 5) == n
    del res, masks
    gc.collect()
    assert ref() is None  # the writer holds no reference to the result or its masks

    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    assert all(isinstance(v, (int, float, str)) for v in leaves(writer.records))
    assert all(isinstance(r["segmentation"]["counts"], str) for r in writer.records)
    assert len(json.dumps(writer.records)) < n * h * w / 100  # compact: far below the masks' bytes


class FakeModel:
    """Returns the ground truth of each image as its prediction, with contiguous labels; checks its inputs."""

    def __init__(self, gt: COCO, category_ids: tuple[int, ...]):
        self.gt, self.category_ids, self.calls = gt, category_ids, []

    def predict(self, images, score_threshold=None, batch_size=1):
        assert batch_size == len(images)  # the evaluator asks for one forward pass per batch it reads
        self.calls.append((len(images), score_threshold))
        out = []
        for img in images:
            assert isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.shape == (3, H, W)
            img_id = int(img[0, 0, 0])  # the test writes the image id into pixel (0, 0)
            recs = [det(img_id, a["category_id"], *a["bbox"], score=0.9) for a in self.gt.imgToAnns[img_id]]
            out.append(result_from(recs, self.category_ids))
        return out


def test_evaluator_end_to_end(tmp_path):
    cats = ((3, "cat"), (7, "dog"))  # non-contiguous dataset ids: labels 1, 2 -> 3, 7
    gt = make_gt({1: [(3, (2, 2, 10, 10)), (7, (20, 20, 30, 30))], 2: [(7, (5, 5, 20, 20))], 3: []},
                 categories=cats)
    for img_id in (1, 2, 3):
        arr = np.zeros((H, W, 3), np.uint8)
        arr[0, 0] = img_id
        Image.fromarray(arr).save(tmp_path / f"{img_id}.png")
    model = FakeModel(gt, (3, 7))
    metrics = ev.evaluate_model(model, gt, tmp_path, batch_size=2, progress=False, category_ids=(3, 7),
                                out_dir=tmp_path / "eval", score_threshold=0.05)
    assert model.calls == [(2, 0.05), (1, 0.05)]
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["per_class"]["segm"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["bbox"]["AP"] == pytest.approx(1.0) and saved["bbox"]["APl"] is None
    assert saved["info"]["num_images"] == 3 and saved["info"]["num_detections"] == 3
    assert len(json.loads((tmp_path / "eval" / "results.json").read_text())) == 3

    # A subset of images is scored on that subset alone (image 2's dog is not counted as missed).
    sub = ev.Evaluator(gt, tmp_path, image_ids=[1], category_ids=(3, 7), progress=False).evaluate(model)
    assert sub["bbox"]["AP"] == pytest.approx(1.0)

    # Without an explicit table, labels map onto the ground truth's sorted category ids.
    assert ev.Evaluator(gt, tmp_path, progress=True)(model)["segm"]["AP"] == pytest.approx(1.0)


def test_evaluator_from_dataset(tmp_path):
    gt = make_gt({1: [(1, (2, 2, 10, 10))], 2: []})

    class DS:  # the attributes data.coco.CocoDataset exposes
        coco = gt
        image_dir = tmp_path
        image_ids = [1]  # its training list drops the empty image 2; evaluation must not
        category_ids = [2, 1]
        class_names = ["Dog", "Cat"]

    e = ev.Evaluator.from_dataset(DS(), progress=False)
    assert e.image_ids == [1, 2] and e.image_path(1) == tmp_path / "1.png"
    assert e.category_ids == [2, 1] and e.class_names == {2: "Dog", 1: "Cat"}
    assert ev.Evaluator.from_dataset(DS(), image_ids=[1]).image_ids == [1]


def test_category_subset():
    gt = make_gt({1: [(1, (2, 2, 10, 10)), (2, (20, 20, 10, 10))]})
    res = [det(1, 1, 2, 2, 10, 10, 0.9)]  # a cat-only model
    assert ev.evaluate_coco(gt, res, iou_types=("bbox",))["bbox"]["AP"] == pytest.approx(0.5)
    m = ev.evaluate_coco(gt, res, iou_types=("bbox",), category_ids=[1])
    assert m["bbox"]["AP"] == pytest.approx(1.0) and list(m["per_class"]["bbox"]) == ["cat"]


def test_format_tables():
    m = {"bbox": dict(zip(ev.METRIC_NAMES, [0.379, 0.5912, 0.41, 0.2, 0.4, float("nan")])),
         "segm": dict(zip(ev.METRIC_NAMES, [0.345, 0.56, 0.37, 0.15, 0.37, 0.5])),
         "per_class": {"bbox": {"person": 0.5, "traffic light": float("nan")},
                       "segm": {"person": 0.45, "traffic light": 0.1}}}
    table = ev.format_metrics_table(m)
    lines = table.splitlines()
    assert lines[0].split(" | ") == ["type", "  AP", "AP50", "AP75", " APs", " APm", " APl"]
    assert lines[2].split(" | ") == ["bbox", "37.9", "59.1", "41.0", "20.0", "40.0", "   -"]
    assert lines[3].startswith("segm | 34.5")
    pc = ev.format_per_class_table(m, columns=1)
    assert "traffic light" in pc and "45.0" in pc and "-" in pc.splitlines()[-1]
    assert len(ev.format_per_class_table(m, columns=2).splitlines()) == 3


def test_results_json_is_replaced_whole_or_not_at_all(tmp_path):
    writer = ev.CocoResultWriter()
    writer.add_records([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.9}], 1)
    path = writer.write(tmp_path / "results.json")
    before = path.read_text()
    writer.add_records([{"image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 2], "score": object()}], 2)
    with pytest.raises(TypeError):
        writer.write(path)  # fails after part of the list was serialised
    assert path.read_text() == before and json.loads(before)[0]["image_id"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
