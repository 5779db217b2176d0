"""``maskrcnn ablate``: every variant trains and is evaluated, the table is complete, finished runs are kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maskrcnn import cli
from maskrcnn.engine import ablate
from maskrcnn.engine.ablate import PAPER, VARIANTS, format_table, run_ablation, summarize


def test_ablate_smoke_writes_a_complete_table_and_skips_finished_runs(tmp_path: Path, one_thread: None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "abl"
    # One seed keeps it quick; test_verdicts_... covers the statistics over several.
    assert cli.main(["ablate", "--out", str(out), "--seeds", "1", "--budget", "smoke", "--threads", "1"]) == 0
    table = (out / "ablations.md").read_text()
    assert "maskrcnn ablate --out" in table and "--budget smoke" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and " ± " in line]
    # Every variant has its row in both tables: AP, AP50, AP75 as mean ± std, the paper's numbers, the verdict.
    for v in VARIANTS:
        row = next(line for line in rows if line.startswith(f"| {v.name} |") and "paper" not in line
                   and ("R50-" in line))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 9 and all(cells), row
        assert all(" ± " in c for c in cells[1:4])
        assert f"{PAPER[v.name].ap[0]:.1f}" in cells[5]
    assert (out / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "ablations.json").read_text())
    assert set(summary["variants"]) == {v.name for v in VARIANTS} and summary["seeds"] == 1
    for v in VARIANTS:
        run = out / "runs" / v.name / "seed1"
        assert (run / "ablation_metrics.json").is_file() and (run / "model_final").is_dir()
        assert not (run / "checkpoints").exists()
    # A rerun trains nothing: every (variant, seed) finished and its metrics were kept.
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("maskrcnn.engine.runs.train_run", no_training)
    again = run_ablation(out, seeds=1, budget="smoke")
    assert again["variants"] == summary["variants"]
    # Another budget in the same folder is refused rather than mixed in.
    with pytest.raises(ValueError, match="other settings"):
        run_ablation(out, seeds=1, budget="demo")


def test_verdicts_and_table_from_made_up_metrics() -> None:
    aps = {"baseline": [0.50, 0.52, 0.51], "roipool": [0.40, 0.42, 0.41], "roiwarp": [0.51, 0.50, 0.52],
           "softmax": [0.55, 0.57, 0.56], "agnostic": [0.49, 0.53, 0.50], "mlp": [0.45, 0.47, 0.46]}
    records = {(n, s + 1): {"segm": {"AP": ap, "AP50": ap + 0.2, "AP75": ap}, "bbox": {"AP": ap}, "total_seconds": 60}
               for n, vals in aps.items() for s, ap in enumerate(vals)}
    summary = {**summarize(records, list(aps), 3), "seeds": 3}
    assert summary["variants"]["roipool"]["dAP"][0] == pytest.approx(-10.0)
    table = format_table(summary)
    verdicts = {line.split("|")[1].strip(): line.split("|")[8].strip() for line in table.splitlines()
                if line.startswith("| ") and "R50-" in line}
    assert verdicts["roipool"] == "yes" and verdicts["mlp"] == "yes"
    assert verdicts["softmax"] == "no: opposite sign"
    assert verdicts["roiwarp"].startswith("within noise")


def test_unknown_budget_and_variant_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown ablation budget"):
        run_ablation(tmp_path, budget="huge")
    with pytest.raises(ValueError, match="unknown ablation variants roialign"):
        run_ablation(tmp_path, budget="smoke", variants=["roialign"])


def test_crowded_shapes_touch(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    from maskrcnn.data.shapes import generate_shapes

    b = ablate.BUDGETS["demo"]
    ann = generate_shapes(tmp_path, 6, seed=3, image_size=(b.image_size, b.image_size), min_objects=b.min_objects,
                          max_objects=b.max_objects, object_size=b.object_size, max_occlusion=b.max_occlusion,
                          touching=b.touching)
    coco = COCO(str(ann))
    touching = 0
    for img in coco.dataset["images"]:
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))]
        assert len(masks) >= 3
        grown = [np.pad(m, 1)[:-2, 1:-1] | np.pad(m, 1)[2:, 1:-1] | np.pad(m, 1)[1:-1, :-2] | np.pad(m, 1)[1:-1, 2:]
                 | m for m in masks]
        touching += sum(bool((grown[i] & masks[j]).any()) for i in range(len(masks)) for j in range(i))
    assert touching >= 6  # pairs of visible masks that share an edge or overlap
    with pytest.raises(ValueError, match="touching"):
        generate_shapes(tmp_path, 1, touching=1.5)
