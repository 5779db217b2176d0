"""End to end on real COCO person keypoints: the user's path (``train_run``, as ``maskrcnn train --preset
r18_fpn_keypoint_demo`` runs it) memorises coco-keypoints-mini images from scratch on a CPU, and the CLI trains a
keypoint model from a person keypoints file with no option but the preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maskrcnn.cli import main
from maskrcnn.config import apply_overrides, get_preset
from maskrcnn.engine.runs import train_run
from maskrcnn.weights import load_model
from test_keypoint_data import _ann, write_keypoint_dataset

# Two images with one large person each (16 and 15 labelled keypoints). 234748 is CC BY (its Flickr record).
IMAGE_IDS = (234748, 535506)
ITERATIONS = 150
MIN_KEYPOINT_AP = 0.8


def _subset(root: Path, out: Path) -> Path:
    data = json.loads((root / "annotations" / "person_keypoints_train2017.json").read_text())
    subset = {"images": [im for im in data["images"] if im["id"] in IMAGE_IDS],
              "annotations": [a for a in data["annotations"] if a["image_id"] in IMAGE_IDS],
              "categories": data["categories"]}
    assert len(subset["images"]) == len(IMAGE_IDS)
    path = out / "person_keypoints_subset.json"
    path.write_text(json.dumps(subset))
    return path


@pytest.mark.slow
def test_keypoint_demo_memorises_coco_person_keypoints(shared_dir: Path, tmp_path: Path, one_thread: None) -> None:
    root = shared_dir / "datasets" / "coco-keypoints-mini"
    ann = _subset(root, tmp_path)
    # The preset as it is, smaller (160 px short side) and without flips, so that memorising is quick.
    cfg = apply_overrides(get_preset("r18_fpn_keypoint_demo"), {
        "input.min_size_train": [160], "input.max_size_train": 224, "input.min_size_test": 160,
        "input.max_size_test": 224, "input.flip_prob": 0.0, "solver.max_iter": ITERATIONS,
        "solver.steps": [int(ITERATIONS * 0.8)], "solver.warmup_iters": 20, "train.checkpoint_period": ITERATIONS,
        "train.num_workers": 0, "train.seed": 0})
    torch.manual_seed(0)
    model, metrics = train_run(cfg, ann, root / "train2017", tmp_path / "run", val_data=ann)
    kp_ap = metrics["keypoints"]["AP"]
    print(f"coco-keypoints-mini x{len(IMAGE_IDS)}, {ITERATIONS} iterations: keypoint AP {kp_ap:.3f}, "
          f"box AP {metrics['bbox']['AP']:.3f}")
    assert kp_ap >= MIN_KEYPOINT_AP
    assert model.cfg.model.keypoint_head.names[5] == "left_shoulder"
    written = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert written["keypoints"]["AP"] == pytest.approx(kp_ap)
    assert load_model(tmp_path / "run" / "model_final").model.cfg.model.keypoint_head.enabled


def test_cli_trains_a_keypoint_model_from_a_person_keypoints_file(tmp_path: Path) -> None:
    anns = [_ann(1, 1, [10, 8, 2, 20, 8, 2, 15, 12, 2]), _ann(2, 2, [40, 20, 2, 50, 20, 1, 45, 30, 2], (35, 15, 20, 20))]
    data = write_keypoint_dataset(tmp_path / "data", anns)
    out = tmp_path / "run"
    assert main(["train", "--preset", "r18_fpn_keypoint_demo", "--data", str(data), "--images",
                 str(tmp_path / "data"), "--out", str(out), "--device", "cpu", "solver.max_iter=2",
                 "train.checkpoint_period=2"]) == 0
    model = load_model(out / "model_final").model
    kh = model.cfg.model.keypoint_head
    assert kh.enabled and (kh.num_keypoints, kh.names) == (3, ("left_eye", "right_eye", "nose"))
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any("loss_keypoint" in r for r in records)
