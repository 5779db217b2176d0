"""End to end on real COCO annotations: a handful of coco128 images, trained briefly, then evaluated on themselves.

This is the whole user path (COCO JSON -> dataset -> trainer -> predict -> pycocotools) on real polygons; the
mask AP on the training images must rise well above what an untrained model scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import shared_path

from maskrcnn.config import apply_overrides, get_preset
from maskrcnn.data import CocoDataset, build_transforms
from maskrcnn.engine.evaluator import Evaluator
from maskrcnn.engine.trainer import Trainer
from maskrcnn.modeling.mask_rcnn import MaskRCNN

NUM_IMAGES = 4
MAX_OBJECTS = 3
ITERATIONS = 150
MIN_MASK_AP = 0.5


def _subset(coco128: Path, out: Path) -> Path:
    """The first images of coco128 with 1..MAX_OBJECTS non-crowd objects, as a COCO JSON of their own."""
    data = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    chosen = [im for im in data["images"]
              if 1 <= len(by_image.get(im["id"], [])) <= MAX_OBJECTS
              and not any(a["iscrowd"] for a in by_image[im["id"]])][:NUM_IMAGES]
    ids = {im["id"] for im in chosen}
    anns = [a for a in data["annotations"] if a["image_id"] in ids]
    cats = sorted({a["category_id"] for a in anns})
    subset = {"images": chosen, "annotations": anns,
              "categories": [c for c in data["categories"] if c["id"] in cats]}
    path = out / "subset.json"
    path.write_text(json.dumps(subset))
    return path


@pytest.mark.slow
def test_overfit_a_few_coco128_images(tmp_path: Path) -> None:
    coco128 = shared_path("datasets", "coco128")
    ann = _subset(coco128, tmp_path)
    images = coco128 / "train2017"
    cfg = apply_overrides(get_preset("r18_fpn_demo"), {
        "input.min_size_train": [160], "input.max_size_train": 224, "input.min_size_test": 160,
        "input.max_size_test": 224, "input.flip_prob": 0.0,
        "solver.max_iter": ITERATIONS, "solver.steps": [int(ITERATIONS * 0.8)], "solver.warmup_iters": 20,
        "solver.ims_per_batch": NUM_IMAGES, "solver.reference_batch_size": NUM_IMAGES,
        "train.checkpoint_period": ITERATIONS, "train.num_workers": 0, "train.seed": 0,
    })
    ds = CocoDataset(ann, images, transforms=build_transforms(cfg, train=True))
    assert len(ds) == NUM_IMAGES
    cfg = apply_overrides(cfg, {"model.num_classes": ds.num_classes, "model.class_names": list(ds.class_names),
                                "model.category_ids": list(ds.category_ids)})
    torch.manual_seed(0)
    model = MaskRCNN(cfg)
    evaluator = Evaluator.from_dataset(CocoDataset(ann, images), progress=False)
    before = evaluator.evaluate(model)["segm"]["AP"]
    Trainer(model, cfg, ds, tmp_path / "run").train()
    after = evaluator.evaluate(model)
    print(f"coco128 x{NUM_IMAGES} overfit: mask AP {before:.3f} -> {after['segm']['AP']:.3f}, "
          f"box AP {after['bbox']['AP']:.3f}")
    assert after["segm"]["AP"] >= MIN_MASK_AP
    assert after["segm"]["AP"] > before + 0.3
