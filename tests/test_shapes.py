"""Tests for maskrcnn.data.shapes: byte-identical determinism and annotations that match the pixels exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.shapes import CATEGORIES, generate_shapes
from maskrcnn.io import read_image
from maskrcnn.ops.masks import segmentation_to_bitmap


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = generate_shapes(tmp_path / "a", 5, seed=11, image_size=(64, 80))
    b = generate_shapes(tmp_path / "b", 5, seed=11, image_size=(64, 80))
    c = generate_shapes(tmp_path / "c", 5, seed=12, image_size=(64, 80))
    assert a == tmp_path / "a" / "annotations.json"
    fa, fb, fc = _files(a.parent), _files(b.parent), _files(c.parent)
    assert len(fa) == 6 and fa == fb
    assert fa["annotations.json"] != fc["annotations.json"]
    # image i depends only on (seed, i): a longer run starts with the same images
    d = generate_shapes(tmp_path / "d", 7, seed=11, image_size=(64, 80))
    fd = _files(d.parent)
    assert all(fd[k] == v for k, v in fa.items() if k.startswith("images/"))


def test_annotations_match_pixels(tmp_path):
    ann = generate_shapes(tmp_path, 12, seed=3, image_size=((48, 96), (64, 128)), min_objects=2, max_objects=5,
                          max_occlusion=0.6)
    data = json.loads(ann.read_text())
    assert data["categories"] == CATEGORIES
    occluded = 0
    per_image: dict[int, list] = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    for im in data["images"]:
        h, w = im["height"], im["width"]
        assert 48 <= h <= 96 and 64 <= w <= 128
        pixels = read_image(tmp_path / im["file_name"])
        assert pixels.shape == (h, w, 3)
        anns = per_image.get(im["id"], [])
        assert 1 <= len(anns) <= 5
        masks = np.stack([segmentation_to_bitmap(a["segmentation"], h, w) for a in anns])
        # visible masks never overlap: later objects occlude earlier ones exactly
        assert masks.sum(0).max() <= 1
        for a, m in zip(anns, masks):
            assert a["category_id"] in (1, 2, 3) and a["iscrowd"] == 0
            assert a["area"] == m.sum() > 0
            rle = mask_utils.encode(np.asfortranarray(m))
            assert a["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
            occluded += isinstance(a["segmentation"], dict)
            if isinstance(a["segmentation"], list):
                assert len(a["segmentation"][0]) >= 6
            # an object is one colour plus mild noise, and differs from the background around it
            inside = pixels[m.astype(bool)].astype(float)
            assert inside.std(axis=0).max() < 12
    assert occluded > 0  # the setting above makes overlaps happen
    ds = CocoDataset(ann, tmp_path)
    assert ds.class_names == ["square", "circle", "triangle"] and len(ds) == 12


def test_no_overlap_and_bad_arguments(tmp_path):
    ann = generate_shapes(tmp_path, 4, seed=0, image_size=(64, 64), max_objects=4, max_occlusion=0.0)
    data = json.loads(ann.read_text())
    assert all(isinstance(a["segmentation"], list) for a in data["annotations"])
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, 1, seed=0, min_objects=3, max_objects=2)
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, 1, seed=0, object_size=(0.5, 0.2))
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, 1, seed=0, image_size=(4, 64))
