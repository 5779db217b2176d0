"""Keypoint results and their evaluation: COCO keypoint records, OKS AP through pycocotools, the metrics table,
skeleton overlays, and the CLI's eval (metrics.json keypoints block) and predict (keypoints in its JSON)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from maskrcnn.cli import main
from maskrcnn.config import apply_overrides, get_preset
from maskrcnn.engine.evaluator import evaluate_coco, format_metrics_table, iou_types_for
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.predict import Predictor
from maskrcnn.structures import Result
from maskrcnn.visualize import draw_keypoints, draw_result, joint_color
from maskrcnn.weights import save_model
from test_keypoint_data import _ann, write_keypoint_dataset

KPS = [[10, 8, 2, 20, 8, 2, 15, 14, 2], [40, 20, 2, 50, 20, 1, 45, 30, 2]]


def _gt(tmp_path: Path, names: list[str] | None = None) -> tuple[Path, COCO]:
    anns = [_ann(1, 1, KPS[0], (5, 3, 20, 15)), _ann(2, 1, KPS[1], (35, 15, 20, 20)), _ann(3, 2, [0] * 9)]
    path = write_keypoint_dataset(tmp_path, anns, **({"names": names} if names else {}))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    return path, coco


def _records(shift: float) -> list[dict]:
    out = []
    for box, kps in (((5, 3, 20, 15), KPS[0]), ((35, 15, 20, 20), KPS[1])):
        moved = [v + shift if i % 3 != 2 else 0.9 for i, v in enumerate(kps)]
        out.append({"image_id": 1, "category_id": 1, "bbox": list(box), "score": 0.9, "keypoints": moved})
    return out


def test_oks_ap_through_pycocotools(tmp_path: Path) -> None:
    _, coco = _gt(tmp_path)
    sigmas = [0.05, 0.05, 0.05]
    perfect = evaluate_coco(coco, _records(0.0), ("bbox", "keypoints"), kpt_oks_sigmas=sigmas)
    # Image 2's person has no keypoints: OKS ignores it, box AP counts it as missed.
    assert perfect["keypoints"]["AP"] == pytest.approx(1.0) and perfect["bbox"]["AP"] < 1.0
    assert set(perfect["keypoints"]) == {"AP", "AP50", "AP75", "APm", "APl"}
    assert perfect["per_class"]["keypoints"] == {"person": pytest.approx(1.0)}
    off = evaluate_coco(coco, _records(3.0), ("keypoints",), kpt_oks_sigmas=sigmas)["keypoints"]["AP"]
    assert 0.0 <= off < 0.5
    table = format_metrics_table(perfect)
    assert table.splitlines()[-1].split("|")[0].strip() == "keypoints" and "-" in table.splitlines()[-1]
    # Records without keypoints (a mask model's) are not scored as keypoints.
    plain = [{k: v for k, v in r.items() if k != "keypoints"} for r in _records(0.0)]
    assert "keypoints" not in evaluate_coco(coco, plain, ("bbox", "keypoints"), kpt_oks_sigmas=sigmas)
    # pycocotools' own sigmas are COCO's 17 person keypoints: 3 keypoints need their own.
    with pytest.raises(ValueError, match="3 keypoints per instance.*oks_sigmas"):
        evaluate_coco(coco, _records(0.0), ("keypoints",))
    with pytest.raises(ValueError, match="2 OKS sigmas .* for 3 keypoints"):
        evaluate_coco(coco, _records(0.0), ("keypoints",), kpt_oks_sigmas=[0.1, 0.1])


def test_result_keypoint_records_and_offset() -> None:
    kps = torch.tensor([[[10.5, 8.5, 3.0], [20.5, 8.5, -1.0]]])
    res = Result(boxes=torch.tensor([[5.0, 3.0, 25.0, 18.0]]), scores=torch.tensor([0.8]), labels=torch.tensor([1]),
                 keypoints=kps, keypoint_offset=0.5)
    (rec,) = res.to_coco(image_id=4)
    assert rec["keypoints"] == [10.0, 8.0, 3.0, 20.0, 8.0, -1.0] and rec["score"] == pytest.approx(0.8)
    sub = res.filter(torch.tensor([False]))
    assert sub.keypoints is not None and sub.keypoints.shape == (0, 2, 3) and sub.to_coco(4) == []


def test_skeleton_overlay_skips_low_scoring_joints() -> None:
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    kps = np.array([[[10.0, 10.0, 5.0], [60.0, 10.0, 5.0], [35.0, 50.0, 0.5]]])
    out = draw_keypoints(image, kps, [(0, 1), (1, 2)], threshold=1.0, radius=3, line_width=1)
    assert tuple(out[10, 10]) == joint_color(0, 3) and tuple(out[10, 60]) == joint_color(1, 3)
    assert tuple(out[10, 35]) == joint_color(0, 3)  # the limb 0-1 in its first joint's colour
    assert not out[45:56, 30:41].any()  # joint 2 scores under the threshold: neither it nor limb 1-2 is drawn
    res = Result(boxes=torch.tensor([[5.0, 5.0, 70.0, 55.0]]), scores=torch.tensor([0.9]), labels=torch.tensor([1]),
                 keypoints=torch.from_numpy(kps).float(), skeleton_table=((0, 1), (1, 2)), keypoint_threshold=0.1)
    drawn = draw_result(image, res, show_boxes=False, show_labels=False)
    assert drawn[48:53, 33:38].any()  # the result's own threshold (0.1) keeps joint 2
    assert not draw_result(image, res, show_boxes=False, show_labels=False, keypoint_threshold=1.0)[48:53, 33:38].any()
    with pytest.raises(ValueError, match="skeleton pairs"):
        draw_keypoints(image, kps, [(0, 3)])


def _tiny_keypoint_model(out: Path) -> Path:
    cfg = apply_overrides(get_preset("r18_fpn_keypoint_demo"), {
        "model.fpn.out_channels": 32, "model.box_head.conv_dim": 32, "model.box_head.fc_dim": 32,
        "model.keypoint_head.conv_dims": [16], "model.keypoint_head.num_keypoints": 3,
        "model.keypoint_head.names": ["left_eye", "right_eye", "nose"], "model.keypoint_head.skeleton": [[0, 2]],
        "model.keypoint_head.oks_sigmas": [0.05, 0.05, 0.05], "model.box_head.score_thresh": 0.0,
        "model.box_head.detections_per_img": 5, "input.min_size_test": 40, "input.max_size_test": 60})
    torch.manual_seed(0)
    model = MaskRCNN(cfg).eval()
    assert iou_types_for(cfg.model) == ("bbox", "keypoints")
    return save_model(model, out)


def test_cli_eval_writes_a_keypoints_block_and_predict_writes_keypoints(tmp_path: Path) -> None:
    ann, _ = _gt(tmp_path / "data")
    weights = _tiny_keypoint_model(tmp_path / "model")
    assert main(["eval", "--weights", str(weights), "--data", str(ann), "--images", str(tmp_path / "data"),
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"bbox", "keypoints"} <= set(metrics) and "segm" not in metrics
    assert 0.0 <= metrics["keypoints"]["AP"] <= 1.0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results and all(len(r["keypoints"]) == 9 for r in results)
    assert main(["predict", "--weights", str(weights), str(tmp_path / "data" / "1.png"), "--out",
                 str(tmp_path / "pred"), "--score-threshold", "0", "--device", "cpu"]) == 0
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert preds and all(len(r["keypoints"]) == 9 for r in preds)
    assert (tmp_path / "pred" / "1.png").is_file()


def test_predictor_on_a_keypoint_model_returns_results_with_keypoints(tmp_path: Path) -> None:
    weights = _tiny_keypoint_model(tmp_path / "model")
    from maskrcnn import load_model

    predictor = load_model(weights)
    assert isinstance(predictor, Predictor)
    image = np.full((40, 60, 3), 120, dtype=np.uint8)
    res = predictor.predict([image])[0]
    assert res.keypoints is not None and res.keypoints.shape == (len(res), 3, 3) and res.masks is None
    assert res.keypoint_names_table == ("left_eye", "right_eye", "nose") and res.skeleton_table == ((0, 2),)
    assert res.plot(image).shape == (40, 60, 3)
