"""COCO person keypoint files: reading (names, skeleton, visibility, offsets), detectron2's
MIN_KEYPOINTS_PER_IMAGE, clear errors, and the transforms (resize, flip with the left/right map, LSJ crop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.config import COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON, ConfigError, apply_overrides, get_preset
from maskrcnn.data import CocoDataset, build_transforms
from maskrcnn.data.coco import DatasetError
from maskrcnn.data.transforms import (
    LargeScaleJitter,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    keypoint_flip_indices,
)
from maskrcnn.engine.runs import dataset_options, with_dataset_classes

NAMES = ["left_eye", "right_eye", "nose"]


def write_keypoint_dataset(root: Path, anns: list[dict], names: list[str] = NAMES, size: tuple[int, int] = (40, 60),
                           num_images: int = 2) -> Path:
    """A tiny person-keypoints COCO file with ``num_images`` grey images of (H, W) ``size`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    h, w = size
    images = []
    for i in range(1, num_images + 1):
        Image.fromarray(np.full((h, w, 3), 90 + 10 * i, dtype=np.uint8)).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": names, "skeleton": [[1, 3], [2, 3]]}]}
    path = root / "person_keypoints.json"
    path.write_text(json.dumps(data))
    return path


def _ann(i: int, image_id: int, kps: list[float], box: tuple[float, ...] = (5, 5, 30, 20)) -> dict:
    x, y, w, h = box
    return {"id": i, "image_id": image_id, "category_id": 1, "bbox": list(box), "iscrowd": 0, "area": w * h,
            "num_keypoints": sum(1 for v in kps[2::3] if v > 0), "keypoints": kps,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def test_mini_coco_person_keypoints(shared_dir: Path) -> None:
    root = shared_dir / "datasets" / "coco-keypoints-mini"
    ann = root / "annotations" / "person_keypoints_train2017.json"
    ds = CocoDataset(ann, root / "train2017", keypoints=True, masks=False, min_keypoints_per_image=1)
    assert len(ds) == 28 and ds.class_names == ["person"]
    assert ds.keypoint_names == COCO_PERSON_KEYPOINT_NAMES and ds.skeleton == COCO_PERSON_SKELETON
    raw = json.loads(ann.read_text())
    first = raw["images"][0]
    index = ds.image_ids.index(first["id"])
    image, target = ds[index]
    assert "masks" not in target and target["keypoints"].shape == (target["boxes"].shape[0], 17, 3)
    want = [a for a in raw["annotations"] if a["image_id"] == first["id"] and not a["iscrowd"]]
    got = target["keypoints"].numpy()
    for k, a in enumerate(want):
        kp = np.asarray(a["keypoints"], dtype=np.float32).reshape(17, 3)
        np.testing.assert_array_equal(got[k], kp)
    # detectron2's convention: +0.5 px on labelled keypoints only.
    shifted = CocoDataset(ann, root / "train2017", keypoints=True, masks=False, keypoint_offset=0.5)
    kp2 = shifted[shifted.image_ids.index(first["id"])][1]["keypoints"]
    labelled = kp2[..., 2] > 0
    torch.testing.assert_close(kp2[labelled][:, :2], target["keypoints"][labelled][:, :2] + 0.5)
    assert float(kp2[~labelled].abs().sum()) == 0.0


def test_min_keypoints_per_image_and_persons_without_keypoints(tmp_path: Path) -> None:
    anns = [_ann(1, 1, [10, 8, 2, 20, 8, 1, 15, 12, 2]),
            _ann(2, 1, [0, 0, 0] * 3),  # a person without keypoints: a box target, no keypoint loss
            _ann(3, 2, [0, 0, 0] * 3)]
    path = write_keypoint_dataset(tmp_path, anns)
    ds = CocoDataset(path, tmp_path, keypoints=True, min_keypoints_per_image=1)
    assert ds.image_ids == [1]
    assert ds.dropped == {"images with fewer than 1 visible keypoints (skipped)": 1}
    target = ds[0][1]
    assert target["keypoints"].shape == (2, 3, 3) and float(target["keypoints"][1].abs().sum()) == 0.0
    assert target["masks"].shape == (2, 40, 60)
    assert CocoDataset(path, tmp_path, keypoints=True, min_keypoints_per_image=4).image_ids == []
    assert CocoDataset(path, tmp_path, keypoints=True).image_ids == [1, 2]


def test_bad_keypoint_annotations_name_the_file_and_annotation(tmp_path: Path) -> None:
    path = write_keypoint_dataset(tmp_path, [_ann(7, 1, [10, 8, 2, 20, 8])])
    with pytest.raises(DatasetError, match=r"person_keypoints\.json: annotation id 7 'keypoints' must be 9"):
        CocoDataset(path, tmp_path, keypoints=True)
    path = write_keypoint_dataset(tmp_path, [_ann(8, 1, [10, 8, 5, 20, 8, 2, 1, 1, 2])])
    with pytest.raises(DatasetError, match="annotation id 8: keypoint visibility must be 0, 1 or 2"):
        CocoDataset(path, tmp_path, keypoints=True)
    data = json.loads(path.read_text())
    del data["categories"][0]["keypoints"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="no category defines 'keypoints'"):
        CocoDataset(path, tmp_path, keypoints=True)


def test_flip_indices_from_names_and_from_an_explicit_map() -> None:
    flips = keypoint_flip_indices(COCO_PERSON_KEYPOINT_NAMES)
    names = COCO_PERSON_KEYPOINT_NAMES
    assert flips[0] == 0  # the nose is its own mirror image
    for i, n in enumerate(names):
        twin = n.replace("left", "right") if "left" in n else n.replace("right", "left")
        assert names[flips[i]] == twin
    outline = [f"outline_{a:03d}" for a in (0, 90, 180, 270)] + ["centre"]
    flips = keypoint_flip_indices(outline, [("outline_000", "outline_180")])
    assert flips == [2, 1, 0, 3, 4]
    with pytest.raises(ConfigError, match="flip_map names \\['outline_045'\\]"):
        keypoint_flip_indices(outline, [("outline_045", "outline_000")])


def test_flip_resize_and_crop_move_keypoints() -> None:
    image = torch.zeros((3, 40, 60), dtype=torch.uint8)
    kps = torch.tensor([[[10.0, 8.0, 2.0], [20.0, 8.0, 1.0], [0.0, 0.0, 0.0]]])
    target = {"boxes": torch.tensor([[5.0, 5.0, 35.0, 25.0]]), "labels": torch.tensor([1]), "keypoints": kps}
    flip = RandomHorizontalFlip(1.0, keypoint_flip_indices(NAMES))
    _, flipped = flip(image, target, torch.Generator().manual_seed(0))
    # left_eye (10, 8) becomes the right eye at x = 60 - 10, and the right eye the left one at 60 - 20.
    assert flipped["keypoints"].tolist() == [[[40.0, 8.0, 1.0], [50.0, 8.0, 2.0], [0.0, 0.0, 0.0]]]
    resized = ResizeShortestEdge((80,), 200)(image, target)[1]
    assert resized["keypoints"].tolist() == [[[20.0, 16.0, 2.0], [40.0, 16.0, 1.0], [0.0, 0.0, 0.0]]]
    crop = LargeScaleJitter((20, 15), scale_range=(3.0, 3.0))  # 40x60 -> 30x45, then a 20x15 window
    seen = set()
    for seed in range(12):
        out_img, cropped = crop(image, target, torch.Generator().manual_seed(seed))
        assert tuple(out_img.shape[-2:]) == (20, 15)
        if cropped["keypoints"].shape[0] == 0:
            continue  # the person's box fell outside the window: the instance is gone with its keypoints
        # The window's offsets, drawn as LSJ draws them: scale, then y0, then x0.
        gen = torch.Generator().manual_seed(seed)
        torch.rand((), generator=gen)
        y0 = int(float(torch.rand((), generator=gen)) * 11)
        x0 = int(float(torch.rand((), generator=gen)) * 31)
        for k in range(2):
            x, y = 0.75 * float(kps[0, k, 0]) - x0, 0.75 * float(kps[0, k, 1]) - y0
            inside = 0 <= x <= 15 and 0 <= y <= 20
            want = [x, y, float(kps[0, k, 2])] if inside else [0.0, 0.0, 0.0]
            assert cropped["keypoints"][0, k].tolist() == pytest.approx(want), (seed, k)
            seen.add(inside)
        assert cropped["keypoints"][0, 2].tolist() == [0.0, 0.0, 0.0]
    assert seen == {True, False}


def test_train_config_takes_the_dataset_keypoints_and_flips_them(tmp_path: Path) -> None:
    path = write_keypoint_dataset(tmp_path, [_ann(1, 1, [10, 8, 2, 20, 8, 2, 15, 12, 2])])
    cfg = apply_overrides(get_preset("r18_fpn_keypoint_demo"), {"input.flip_prob": 1.0})
    ds = CocoDataset(path, tmp_path, **dataset_options(cfg))
    assert "masks" not in ds[0][1] and ds.keypoint_names == tuple(NAMES)
    cfg = with_dataset_classes(cfg, ds)
    kh = cfg.model.keypoint_head
    assert (kh.num_keypoints, kh.names, kh.skeleton) == (3, tuple(NAMES), ((0, 2), (1, 2)))
    ds.transforms = build_transforms(cfg, train=True)
    image, target = ds[0]
    # Resized to the preset's short side, then flipped: the left eye's keypoint is now the right eye's.
    scale = image.shape[-1] / 60
    torch.testing.assert_close(target["keypoints"][0, 1, :2], torch.tensor([(60 - 10) * scale, 8 * scale]))
