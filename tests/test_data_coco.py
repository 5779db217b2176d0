"""Tests for maskrcnn.data.coco: coco128 and the labelme example, label mapping, targets, bad inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path, uncompressed_rle
from PIL import Image

from maskrcnn.data.coco import CocoDataset, DatasetError
from maskrcnn.data.transforms import Compose, RandomHorizontalFlip
from maskrcnn.io import ImageReadError
from maskrcnn.ops.masks import encode_rle



@pytest.fixture(scope="module")
def coco128_dir() -> Path:
    """../shared/datasets/coco128 (skips, or fails under MASKRCNN_REQUIRE_FIXTURES, when absent)."""
    return shared_path("datasets", "coco128")


@pytest.fixture(scope="module")
def coco128(coco128_dir: Path) -> CocoDataset:
    return CocoDataset(coco128_dir / "annotations" / "instances_train2017.json", coco128_dir / "train2017")


def test_coco128_index(coco128, coco128_dir):
    ds = coco128
    assert len(ds) == 126  # 2 of the 128 images have no annotation
    assert ds.num_classes == 80 and ds.category_ids == sorted(ds.category_ids)
    assert ds.class_names[0] == "person" and ds.category_ids[-1] == 90
    used = {lab for anns in ds._anns for _, lab, _ in anns}
    assert len(used) == 71 and min(used) >= 1 and max(used) <= 80
    assert sum(len(a) for a in ds._anns) == 929  # all non-crowd annotations; the 10 crowd RLEs are not targets
    assert ds.dropped == {}
    for label in range(1, ds.num_classes + 1):
        assert ds.category_to_label(ds.label_to_category(label)) == label
    assert ds.label_to_category(1) == 1 and ds.category_to_label(90) == 80
    with pytest.raises(KeyError):
        ds.category_to_label(12)  # an id COCO never assigned
    with pytest.raises(KeyError):
        ds.label_to_category(0)
    ratios = ds.aspect_ratios()
    assert len(ratios) == len(ds)
    info = ds.get_image_info(0)
    assert ratios[0] == pytest.approx(info["width"] / info["height"])
    assert ds.image_ids[0] == info["id"]
    # The pycocotools object for evaluation keeps everything, crowd regions included.
    assert len(ds.coco.getAnnIds()) == 939 and len(ds.coco.getAnnIds(iscrowd=True)) == 10
    assert len(CocoDataset(coco128_dir / "annotations" / "instances_train2017.json", coco128_dir / "train2017",
                           filter_empty=False)) == 128


def test_coco128_sample(coco128):
    ds = coco128
    crowd_img = next(i for i in range(len(ds))
                     if ds.coco.getAnnIds(imgIds=[ds.image_ids[i]], iscrowd=True))
    image, target = ds[crowd_img]
    info = ds.get_image_info(crowd_img)
    h, w = info["height"], info["width"]
    assert image.dtype == torch.uint8 and image.shape == (3, h, w)
    n = len(ds.coco.getAnnIds(imgIds=[info["id"]], iscrowd=False))
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (n,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (n, h, w) and target["masks"].dtype == torch.uint8
    assert target["image_id"] == info["id"] and target["orig_size"] == (h, w)
    assert target["file_name"] == info["file_name"]
    boxes = target["boxes"]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()
    # Each mask lies within its box (COCO boxes enclose the polygons; allow the rasteriser 1 px).
    for m, b in zip(target["masks"], boxes):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert len(xs) > 0
        assert xs.min() >= b[0] - 1 and xs.max() <= b[2] + 1 and ys.min() >= b[1] - 1 and ys.max() <= b[3] + 1
    # Reading is deterministic.
    image2, target2 = ds[crowd_img]
    assert torch.equal(image, image2) and torch.equal(target["masks"], target2["masks"])


def test_category_subset(coco128_dir):
    ds = CocoDataset(coco128_dir / "annotations" / "instances_train2017.json", coco128_dir / "train2017",
                     category_ids=[3, 1])
    assert ds.category_ids == [3, 1] and ds.class_names == ["car", "person"]
    assert ds.category_to_label(3) == 1 and ds.label_to_category(2) == 1
    labels = {lab for anns in ds._anns for _, lab, _ in anns}
    assert labels == {1, 2}
    assert sum(lab == 2 for anns in ds._anns for _, lab, _ in anns) == 259 - sum(  # persons minus crowd ones
        1 for a in ds.coco.dataset["annotations"] if a["category_id"] == 1 and a["iscrowd"])
    with pytest.raises(DatasetError, match="999"):
        CocoDataset(coco128_dir / "annotations" / "instances_train2017.json", coco128_dir / "train2017",
                    category_ids=[1, 999])


def test_labelme_coco_multi_polygon_instances():
    root = shared_path("datasets", "labelme-example", "data_dataset_coco")
    ds = CocoDataset(root / "annotations.json", root)
    assert len(ds) == 3 and sum(len(a) for a in ds._anns) == 12
    assert ds.class_names[:2] == ["_background_", "aeroplane"]  # labelme writes a background category (id 0)
    idx = next(i for i in range(len(ds)) if ds.get_image_info(i)["file_name"].endswith("2011_000006.jpg"))
    image, target = ds[idx]
    assert image.shape == (3, 375, 500)
    sofa = ds.category_to_label(18)
    assert (target["labels"] == sofa).sum() == 1  # four polygons joined by group_id: one instance
    assert target["masks"][target["labels"] == sofa].sum() > 10000


def test_transforms_are_applied(tmp_path):
    ann = _write_dataset(tmp_path, [_poly_ann(1, 1, [2, 2, 10, 2, 10, 8, 2, 8], bbox=[2, 2, 8, 6])])
    ds = CocoDataset(ann, tmp_path)
    flipped = CocoDataset(ann, tmp_path, transforms=Compose([RandomHorizontalFlip(1.0)]))
    (im, t), (fim, ft) = ds[0], flipped[0]
    assert torch.equal(fim, im.flip(-1)) and torch.equal(ft["masks"], t["masks"].flip(-1))
    assert ft["boxes"].tolist() == [[W - 10, 2, W - 2, 8]]
    assert t["boxes"].tolist() == [[2, 2, 10, 8]]


# ---------------------------------------------------------------------------------------------------------
# Bad inputs

H, W = 12, 16


def _poly_ann(ann_id: int, cat: int, poly: list[float], bbox: list[float], **kw) -> dict:
    return {"id": ann_id, "image_id": 1, "category_id": cat, "segmentation": [poly], "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": 0, **kw}


def _write_dataset(tmp_path: Path, anns: list[dict], image: bool = True) -> Path:
    if image:
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(tmp_path / "img.png")
    data = {"images": [{"id": 1, "file_name": "img.png", "height": H, "width": W}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}, {"id": 5, "name": "other"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


GOOD = _poly_ann(1, 1, [2, 2, 10, 2, 10, 8, 2, 8], bbox=[2, 2, 8, 6])


def test_rle_segmentations(tmp_path):
    mask = np.zeros((1, H, W), np.uint8)
    mask[0, 3:7, 4:9] = 1
    compressed = encode_rle(mask)[0]
    # Uncompressed RLE: column-major run lengths starting with zeros.
    runs = uncompressed_rle(mask[0])
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "segmentation": compressed, "bbox": [4, 3, 5, 4], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": {"size": [H, W], "counts": runs},
         "bbox": [4, 3, 5, 4], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": compressed, "bbox": [4, 3, 5, 4], "iscrowd": 1},
    ]
    ds = CocoDataset(_write_dataset(tmp_path, anns), tmp_path)
    _, t = ds[0]
    assert t["labels"].tolist() == [2, 1]
    assert torch.equal(t["masks"][0], torch.from_numpy(mask[0])) and torch.equal(t["masks"][1], t["masks"][0])


def test_degenerate_annotations_dropped_with_one_warning(tmp_path):
    anns = [
        GOOD,
        _poly_ann(2, 1, [1, 1, 5, 5], bbox=[1, 1, 4, 4]),  # 2 points
        _poly_ann(3, 1, [1, 1, 5, 1, 5, 5], bbox=[1, 1, 0, 4]),  # zero width
        _poly_ann(4, 1, [1, 1, 5, 1, 5, 5], bbox=[W + 3, 1, 4, 4]),  # outside the image: zero width after clipping
        {**_poly_ann(5, 1, [1, 1, 5, 1, 5, 5], bbox=[1, 1, 4, 4]),
         "segmentation": [[1, 1, 5, 1, 5, 5], [3, 3, 4, 4]]},  # one good part, one 2-point part: kept
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDataset(_write_dataset(tmp_path, anns), tmp_path)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "ann.json" in msg and "1 annotations whose polygons all have fewer than 3 points" in msg
    assert "2 annotations with a degenerate box" in msg and "1 polygon parts" in msg
    _, t = ds[0]
    assert len(t["labels"]) == 2
    assert ds.dropped["annotations whose polygons all have fewer than 3 points"] == 1


def test_image_without_valid_annotations_is_filtered(tmp_path):
    anns = [_poly_ann(2, 1, [1, 1, 5, 5], bbox=[1, 1, 4, 4])]
    with pytest.warns(UserWarning):
        assert len(CocoDataset(_write_dataset(tmp_path, anns), tmp_path)) == 0
    with pytest.warns(UserWarning):
        ds = CocoDataset(_write_dataset(tmp_path, anns), tmp_path, filter_empty=False)
    _, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, H, W) and t["labels"].shape == (0,)


@pytest.mark.parametrize("case", ["empty_json", "bad_json", "json_list", "no_images", "bad_image_entry",
                                  "string_id", "bad_polygon", "unknown_category", "unknown_image", "missing_json"])
def test_bad_annotation_files(tmp_path, case):
    path = _write_dataset(tmp_path, [GOOD])
    data = json.loads(path.read_text())
    match = "ann.json"
    if case == "empty_json":
        path.write_text("")
        match = "ann.json: annotation file is empty"
    elif case == "bad_json":
        path.write_text('{"images": [')
        match = "ann.json: not valid JSON"
    elif case == "json_list":
        path.write_text("[]")
    elif case == "no_images":
        del data["images"]
        path.write_text(json.dumps(data))
        match = "'images'"
    elif case == "bad_image_entry":
        del data["images"][0]["file_name"]
        path.write_text(json.dumps(data))
        match = r"images\[0\]"
    elif case == "string_id":
        data["images"][0]["id"] = "one"
        path.write_text(json.dumps(data))
        match = r"images\[0\] field 'id' must be an integer"
    elif case == "bad_polygon":
        data["annotations"][0]["segmentation"] = [[1, 2, "x", 4, 5, 6]]
        path.write_text(json.dumps(data))
        match = "annotation id 1 is malformed"
    elif case == "unknown_category":
        data["annotations"][0]["category_id"] = 77
        data["annotations"][0]["id"] = 4242
        path.write_text(json.dumps(data))
        match = "ann.json: annotation id 4242 has category_id 77"
    elif case == "unknown_image":
        data["annotations"][0]["image_id"] = 9
        path.write_text(json.dumps(data))
        match = "image_id 9"
    elif case == "missing_json":
        path = tmp_path / "absent.json"
        match = "absent.json: annotation file not found"
    with pytest.raises(DatasetError, match=match):
        CocoDataset(path, tmp_path)


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong_size"])
def test_bad_images(tmp_path, case):
    ann = _write_dataset(tmp_path, [GOOD], image=case != "missing")
    if case == "corrupt":
        (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    if case == "wrong_size":
        Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(tmp_path / "img.png")
    ds = CocoDataset(ann, tmp_path)  # images are only read on access
    with pytest.raises((ImageReadError, DatasetError)) as info:
        ds[0]
    assert str(tmp_path / "img.png") in str(info.value)


def test_non_finite_and_absurd_polygons_dropped_with_a_counted_warning(tmp_path):
    nan, inf = float("nan"), float("inf")
    anns = [
        GOOD,
        _poly_ann(2, 1, [1, 1, nan, 1, 5, 5], bbox=[1, 1, 4, 4]),  # NaN: the whole instance goes
        _poly_ann(3, 1, [1, 1, inf, 1, 5, 5], bbox=[1, 1, 4, 4]),  # infinite
        _poly_ann(4, 1, [1, 1, 5e9, 1, 5, 5], bbox=[1, 1, 4, 4]),  # far outside a 16x12 image
        {**_poly_ann(5, 1, [1, 1, 5, 1, 5, 5], bbox=[1, 1, 4, 4]),
         "segmentation": [[1, 1, 5, 1, 5, 5], [1, nan, 4, 4, 5, 5]]},  # one good part: kept without the bad one
        _poly_ann(6, 1, [-3, 1, W + 3, 1, 5, H + 2], bbox=[0, 1, W, H - 1]),  # a little outside: clipped, kept
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDataset(_write_dataset(tmp_path, anns), tmp_path)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "NaN or infinite" in msg and "absurd" in msg
    assert ds.dropped["annotations whose polygons are all unusable (polygon parts with NaN or infinite "
                      "coordinates)"] == 2
    assert sum(n for why, n in ds.dropped.items() if "absurd" in why) == 1
    assert ds.dropped["polygon parts with NaN or infinite coordinates (instance kept)"] == 1
    _, t = ds[0]
    assert len(t["labels"]) == 3 and int(t["masks"].sum()) > 0
