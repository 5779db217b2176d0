"""How far bfloat16 inference (``--amp bf16``) moves detections from float32, on the torchvision fixture models.

Usage: ``python bench/amp_agreement.py [FIXTURES_DIR]`` (default: $MASKRCNN_FIXTURES or ../shared/fixtures).
For each float32 detection scoring >= 0.5 it finds the bf16 detection of the same label with the highest box
IoU, and prints the share above IoU 0.5 / 0.75 / 0.9, the mask IoU and score change of the pairs above 0.9.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from maskrcnn import load_model
from maskrcnn.ops.boxes import box_iou


def _weights(root: Path, variant: str, tmp: Path) -> Path:
    """The fixture checkpoint; v2 ships without its backbone body, which it shares with v1 (fixtures README)."""
    path = root / f"maskrcnn_r50_fpn_{variant}" / "weights.pth"
    if variant == "v1":
        return path
    state = torch.load(path, weights_only=True)
    v1 = torch.load(root / "maskrcnn_r50_fpn_v1" / "weights.pth", weights_only=True)
    state.update({k: v for k, v in v1.items() if k.startswith("backbone.body.")})
    out = tmp / "maskrcnn_r50_fpn_v2.pth"
    torch.save(state, out)
    return out


def main() -> None:
    """Print the agreement figures for the v1 and v2 fixture models at their test size (320 / 512)."""
    default = os.environ.get("MASKRCNN_FIXTURES") or str(Path(__file__).resolve().parents[2] / "shared" / "fixtures")
    root = Path(sys.argv[1] if len(sys.argv) > 1 else default) / "torchvision"
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("v1", "v2"):
            weights = _weights(root, variant, Path(tmp))
            images = sorted(str(p) for p in (root / f"maskrcnn_r50_fpn_{variant}" / "images").glob("*.png"))
            ref = load_model(weights, min_size=320, max_size=512).predict(images, score_threshold=0.5)
            out = load_model(weights, min_size=320, max_size=512, amp="bf16").predict(images, score_threshold=0.5)
            best_ious: list[float] = []
            mask_ious: list[float] = []
            score_diffs: list[float] = []
            for a, b in zip(ref, out):
                if len(a) == 0:
                    continue
                if len(b) == 0:
                    best_ious += [0.0] * len(a)
                    continue
                iou = box_iou(a.boxes, b.boxes) * (a.labels[:, None] == b.labels[None, :])
                best = iou.max(1)
                best_ious += best.values.tolist()
                for i in torch.where(best.values > 0.9)[0].tolist():
                    j = int(best.indices[i])
                    union = float((a.masks[i] | b.masks[j]).sum())
                    mask_ious.append(float((a.masks[i] & b.masks[j]).sum()) / max(union, 1.0))
                    score_diffs.append(abs(float(a.scores[i]) - float(b.scores[j])))
            t = torch.tensor(best_ious)
            shares = ", ".join(f"> {q}: {float((t > q).float().mean()):.0%}" for q in (0.5, 0.75, 0.9))
            print(f"{variant}: {len(t)} float32 detections >= 0.5, {sum(len(r) for r in out)} bf16; same-label "
                  f"bf16 box IoU {shares}; pairs above 0.9: mask IoU mean {sum(mask_ious) / len(mask_ious):.3f} "
                  f"min {min(mask_ious):.3f}, |score change| max {max(score_diffs):.3f}")


if __name__ == "__main__":
    main()
