"""detectron2's ops against ``../shared/fixtures/detectron2/ops.pt``: one test per key, one id per case.

Limits are the fixture README's: float64 ops 1e-10, float32 ops 1e-5, NMS keep lists and the resized uint8
image identical. Where the implementation performs detectron2's float operations in the same order the
results are bitwise equal, and the tests say so with ``torch.equal``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import _fixtures_root, _missing

from maskrcnn.config import AnchorConfig
from maskrcnn.modeling.anchors import AnchorGenerator
from maskrcnn.modeling.poolers import LevelMapper, MultiScaleRoIAlign
from maskrcnn.ops.boxes import BoxCoder, batched_nms, nms
from maskrcnn.ops.keypoints import heatmaps_to_keypoints
from maskrcnn.ops.masks import paste_masks_grid_sample, paste_masks_in_windows
from maskrcnn.ops.postprocess import detector_postprocess, fast_rcnn_inference_single_image, find_top_rpn_proposals
from maskrcnn.ops.resize import resize_uint8_bilinear, shortest_edge_size
from maskrcnn.ops.roi_align import roi_align

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# detectron2's test-time constants, as its configs and code set them.
SCALE_CLAMP = math.log(1000.0 / 16)
D2_LEVEL_EPS = 1e-8  # assign_boxes_to_levels: floor(4 + log2(sqrt(area) / 224 + 1e-8))
D2_PASTE_WINDOW = 1  # paste_masks_in_image (CPU): samples only floor(x0) - 1 .. ceil(x1) + 1

OPS_PATH: Path = _fixtures_root() / "detectron2" / "ops.pt"
TV_OPS_PATH: Path = _fixtures_root() / "torchvision" / "ops.pt"
OPS: dict[str, Any] | None = torch.load(OPS_PATH, weights_only=True) if OPS_PATH.is_file() else None


def _params(key: str, describe: Any = None) -> list[Any]:
    """pytest params for every case of ``key``, or one placeholder that skips/fails when ops.pt is absent."""
    if OPS is None:
        return [pytest.param(None, id="fixtures-missing")]
    cases = OPS[key]
    return [pytest.param(c, id=f"{i}" + (f"-{describe(c)}" if describe else "")) for i, c in enumerate(cases)]


def _need(case: Any) -> Any:
    if case is None:
        _missing(f"detectron2 op fixtures not found at {OPS_PATH} (set MASKRCNN_FIXTURES)")
    return case


def _max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().double() - expected.double()).abs().max())


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # NaN where detectron2 gives NaN (the log of a negative size in get_deltas), and nowhere else.
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN in other places"
    actual, expected = actual[~nan], expected[~nan]
    err = _max_err(actual, expected)
    assert err <= TOL[expected.dtype], f"{what}: max error {err:.3g} > {TOL[expected.dtype]}"


# ---------------------------------------------------------------------------------------------------------------
# roi_align


def _roi_align_params() -> list[Any]:
    """detectron2's cases; while ops.pt holds none, torchvision's cases of the settings detectron2 uses.

    The README promises ten ``roi_align`` cases, but this ops.pt holds an empty list. detectron2's ``ROIAlign``
    is torchvision's ``roi_align`` called with the same arguments, so torchvision's ops.pt cases with
    sampling_ratio 0 or 2 (every combination of aligned, output 7/14 and scale 1/0.25, float64 with gradients
    and float32) check the same function on the same settings.
    """
    if OPS is None:
        return [pytest.param(None, id="fixtures-missing")]
    def describe(c: dict[str, Any]) -> str:
        size = c["output_size"][0] if isinstance(c["output_size"], (list, tuple)) else c["output_size"]
        mode = "v2" if c["aligned"] else "legacy"
        return f"{str(c['features'].dtype)[6:]}-s{size}-x{c['spatial_scale']}-r{c['sampling_ratio']}-{mode}"

    if OPS["roi_align"]:
        return [pytest.param(c, id=f"{i}-{describe(c)}") for i, c in enumerate(OPS["roi_align"])]
    if not TV_OPS_PATH.is_file():
        return [pytest.param(None, id="fixtures-missing")]
    tv = torch.load(TV_OPS_PATH, weights_only=True)["roi_align"]
    return [pytest.param(c, id=f"torchvision-{i}-{describe(c)}") for i, c in enumerate(tv)
            if c["sampling_ratio"] in (0, 2)]


@pytest.mark.parametrize("case", _roi_align_params())
def test_roi_align(case: dict[str, Any]) -> None:
    c = _need(case)
    feats = c["features"].clone().requires_grad_("grad_output" in c)
    out = roi_align(feats, c["rois"], c["output_size"], c["spatial_scale"], c["sampling_ratio"], c["aligned"])
    _assert_within(out, c["output"], "output")
    if "grad_output" in c:
        out.backward(c["grad_output"])
        _assert_within(feats.grad, c["grad_features"], "grad_features")


# ---------------------------------------------------------------------------------------------------------------
# roi_pooler


@pytest.mark.parametrize("case", _params("roi_pooler", lambda c: f"{c['layout']}-s{c['output_size']}"))
def test_roi_pooler(case: dict[str, Any]) -> None:
    c = _need(case)
    strides = c["strides"]
    names = [f"l{i}" for i in range(len(strides))]
    pooler = MultiScaleRoIAlign(names, c["output_size"], c["sampling_ratio"], aligned=True,
                                canonical_scale=c["canonical_box_size"], canonical_level=c["canonical_level"],
                                scales=[1.0 / s for s in strides], mapper_eps=D2_LEVEL_EPS, eps_inside_log=True)
    k_min, k_max = int(math.log2(strides[0])), int(math.log2(strides[-1]))
    mapper = LevelMapper(k_min, k_max, c["canonical_box_size"], c["canonical_level"], D2_LEVEL_EPS,
                         eps_inside_log=True)
    assert torch.equal(mapper(c["boxes"]), c["levels"])
    # image_sizes are not read when the scales are given.
    out = pooler(dict(zip(names, c["features"])), c["boxes"], [])
    # Not bitwise: RoIAlign sums its samples in another order than torchvision's kernel (see ops/roi_align.py).
    _assert_within(out, c["output"], "output")


def test_level_mapper_eps_placement() -> None:
    # A 111.99998 px square: sqrt(area) / 224 is 1e-7 under 1/2. torchvision's 1e-6 added outside the log lifts
    # floor(4 + log2(.)) back to level 3; detectron2's 1e-8 inside the log is lost in float32 rounding, so it
    # stays on level 2. Exactly 112 px maps to level 3 in both.
    boxes = [torch.tensor([[0.0, 0.0, 111.99998, 111.99998], [0.0, 0.0, 112.0, 112.0]])]
    assert LevelMapper(2, 5)(boxes).tolist() == [1, 1]
    assert LevelMapper(2, 5, eps=D2_LEVEL_EPS, eps_inside_log=True)(boxes).tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# anchors


@pytest.mark.parametrize("case", _params("anchors", lambda c: f"{c['layout']}-{c['feature_sizes'][0][0]}x"
                                                               f"{c['feature_sizes'][0][1]}"))
def test_anchors(case: dict[str, Any]) -> None:
    c = _need(case)
    cfg = AnchorConfig(sizes=tuple(tuple(s) for s in c["sizes"]), aspect_ratios=tuple(c["aspect_ratios"]),
                       round_base=False)
    gen = AnchorGenerator(cfg, strides=c["strides"], offset=c["offset"], compute_dtype=torch.float64,
                          size_major=True)
    assert gen.num_anchors_per_location == len(c["sizes"][0]) * len(c["aspect_ratios"])
    for got, want in zip(gen.cell_anchors(torch.float32), c["cell_anchors"], strict=True):
        assert torch.equal(got, want)
    feats = [tuple(s) for s in c["feature_sizes"]]
    # With explicit strides the batch shape is not read.
    anchors = gen((0, 0), feats, torch.float32, torch.device("cpu"))
    assert [h * w * gen.num_anchors_per_location for h, w in feats] == c["num_anchors_per_level"]
    assert torch.equal(anchors, c["anchors"])


def test_cell_anchors_float64_equal_detectron2_formula() -> None:
    # detectron2 builds cell anchors in Python floats as w = sqrt(size**2 / ratio), h = ratio * w; computing
    # size / sqrt(ratio) in float64 and rounding once to float32 gives the same float32 values on a grid of sizes
    # and ratios wider than the fixture's, while float32 arithmetic is off by an ulp on some of them.
    sizes = (16, 24, 32, 45.25, 48, 64, 90.5, 96, 128, 181.02, 192, 256, 384, 512, 800)
    ratios = (0.2, 0.25, 1 / 3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
    want = []
    for s in sizes:
        for r in ratios:
            w = math.sqrt(s**2.0 / r)
            h = r * w
            want.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    cfg = AnchorConfig(sizes=(sizes,), aspect_ratios=ratios, round_base=False)
    gen = AnchorGenerator(cfg, strides=(16,), compute_dtype=torch.float64, size_major=True)
    assert torch.equal(gen.cell_anchors(torch.float32)[0], torch.tensor(want, dtype=torch.float32))
    f32 = AnchorGenerator(cfg, strides=(16,), size_major=True).cell_anchors(torch.float32)[0]
    assert not torch.equal(f32, torch.tensor(want, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# box2box


@pytest.mark.parametrize("case", _params("box2box", lambda c: f"w{'-'.join(f'{w:g}' for w in c['weights'])}"
                                                               f"-C{c['rel_codes'].shape[1] // 4}"))
def test_box2box(case: dict[str, Any]) -> None:
    c = _need(case)
    coder = BoxCoder(tuple(c["weights"]), c["scale_clamp"])
    assert c["scale_clamp"] == SCALE_CLAMP
    _assert_within(coder.encode(c["target_boxes"], c["src_boxes"]), c["deltas"], "deltas")
    decoded = coder.decode(c["rel_codes"], c["boxes"]).reshape(c["rel_codes"].shape)
    _assert_within(decoded, c["decoded"], "decoded")


# ---------------------------------------------------------------------------------------------------------------
# batched_nms


@pytest.mark.parametrize("case", _params("batched_nms", lambda c: f"n{c['boxes'].shape[0]}"))
def test_batched_nms(case: dict[str, Any]) -> None:
    c = _need(case)
    keep = batched_nms(c["boxes"], c["scores"], c["idxs"], c["iou_threshold"])
    assert keep.tolist() == c["keep"].tolist()
    assert nms(c["boxes"], c["scores"], c["iou_threshold"]).tolist() == c["keep_nms"].tolist()


# ---------------------------------------------------------------------------------------------------------------
# paste_masks


@pytest.mark.parametrize("case", _params("paste_masks", lambda c: f"M{c['masks'].shape[-1]}-{c['image_shape'][0]}x"
                                                                   f"{c['image_shape'][1]}"))
def test_paste_masks(case: dict[str, Any]) -> None:
    c = _need(case)
    masks, boxes, shape = c["masks"][:, None], c["boxes"], tuple(c["image_shape"])
    soft = paste_masks_grid_sample(masks, boxes, shape)[:, 0]
    _assert_within(soft, c["soft"], "soft")
    hard = paste_masks_grid_sample(masks, boxes, shape, threshold=c["threshold"], window_margin=D2_PASTE_WINDOW)
    assert torch.equal(hard[:, 0], c["output"])
    windows = paste_masks_in_windows(masks, boxes, shape, "grid_sample", threshold=c["threshold"],
                                     threshold_inclusive=True)
    assert torch.equal(windows, c["output"])
    if bool((c["soft"] == c["threshold"]).any()):
        # Pixels exactly at the threshold (the constant 0.5 mask) are in detectron2's masks; ">" would drop them.
        strict = paste_masks_grid_sample(masks, boxes, shape, threshold=c["threshold"], threshold_inclusive=False)
        assert not torch.equal(strict[:, 0], c["output"])


# ---------------------------------------------------------------------------------------------------------------
# heatmaps_to_keypoints


@pytest.mark.parametrize("case", _params("heatmaps_to_keypoints",
                                         lambda c: f"R{c['maps'].shape[0]}-K{c['maps'].shape[1]}"))
def test_heatmaps_to_keypoints(case: dict[str, Any]) -> None:
    c = _need(case)
    out = heatmaps_to_keypoints(c["maps"], c["rois"])
    _assert_within(out, c["output"], "keypoints")
    assert torch.equal(out, c["output"])


# ---------------------------------------------------------------------------------------------------------------
# resize_shortest_edge


def _resize_params() -> list[Any]:
    if OPS is None:
        return [pytest.param(None, id="fixtures-missing")]
    d = OPS["resize_shortest_edge"]
    image = [pytest.param(c, id=f"image-{i}-{c['input_shape'][0]}x{c['input_shape'][1]}-to-"
                                f"{c['output_shape'][0]}x{c['output_shape'][1]}") for i, c in enumerate(d["cases"])]
    shape = [pytest.param(c, id=f"shape-{i}-{c['input_shape'][0]}x{c['input_shape'][1]}-s{c['short_edge_length']}")
             for i, c in enumerate(d["shape_cases"])]
    return image + shape


@pytest.mark.parametrize("case", _resize_params())
def test_resize_shortest_edge(case: dict[str, Any]) -> None:
    c = _need(case)
    h, w = c["input_shape"][:2]
    size = shortest_edge_size(h, w, c["short_edge_length"], c["max_size"])
    assert list(size) == list(c["output_shape"])
    if "image" in c:
        assert torch.equal(resize_uint8_bilinear(c["image"], size), c["image_resized"])


@pytest.mark.parametrize(("in_hw", "out_hw", "channels"), [
    ((37, 53), (80, 114), 3), ((240, 320), (64, 85), 3), ((61, 300), (33, 160), 1), ((45, 45), (45, 17), 3),
    ((33, 70), (101, 70), 0), ((9, 500), (3, 121), 3),
    # Pillow runs the vertical pass first when the height shrinks by more than twice the width's pixels.
    ((1000, 37), (512, 19), 3), ((480, 640), (240, 600), 3), ((573, 234), (319, 552), 1),
])
def test_resize_uint8_bilinear_equals_pillow(in_hw: tuple[int, int], out_hw: tuple[int, int], channels: int) -> None:
    # Pillow itself on random images beyond the fixture's sizes: up and down, one axis only, strong shrinks
    # (wide filter support), grayscale (channels 0: an (H, W) array), either pass first.
    from PIL import Image  # noqa: PLC0415 - only this test needs Pillow directly

    gen = torch.Generator().manual_seed(in_hw[0] * 1000 + out_hw[1])
    shape = in_hw + ((channels,) if channels else ())
    image = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    pil_in = image.numpy()[..., 0] if channels == 1 else image.numpy()
    want = np.asarray(Image.fromarray(pil_in).resize((out_hw[1], out_hw[0]), Image.BILINEAR))
    got = resize_uint8_bilinear(image, out_hw)
    assert np.array_equal(got.numpy().reshape(want.shape), want)


# ---------------------------------------------------------------------------------------------------------------
# find_top_rpn_proposals


@pytest.mark.parametrize("case", _params("find_top_rpn_proposals", lambda c: f"L{len(c['logits'])}"
                                         f"-pre{c['pre_nms_topk']}-post{c['post_nms_topk']}"))
def test_find_top_rpn_proposals(case: dict[str, Any]) -> None:
    c = _need(case)
    boxes, logits = find_top_rpn_proposals([p[None] for p in c["proposals"]], [x[None] for x in c["logits"]],
                                           [tuple(c["image_size"])], c["nms_thresh"], c["pre_nms_topk"],
                                           c["post_nms_topk"], c["min_box_size"])
    assert torch.equal(boxes[0], c["boxes"])
    assert torch.equal(logits[0], c["objectness_logits"])


# ---------------------------------------------------------------------------------------------------------------
# fast_rcnn_inference


@pytest.mark.parametrize("case", _params("fast_rcnn_inference",
                                         lambda c: f"R{c['scores'].shape[0]}-K{c['scores'].shape[1] - 1}"
                                                   f"-C{c['boxes'].shape[1] // 4}-top{c['topk']}"))
def test_fast_rcnn_inference(case: dict[str, Any]) -> None:
    c = _need(case)
    boxes, scores, classes, kept = fast_rcnn_inference_single_image(
        c["boxes"], c["scores"], tuple(c["image_shape"]), c["score_thresh"], c["nms_thresh"], c["topk"])
    assert torch.equal(boxes, c["out_boxes"])
    assert torch.equal(scores, c["out_scores"])
    assert torch.equal(classes, c["out_classes"])
    assert torch.equal(kept, c["kept"])


# ---------------------------------------------------------------------------------------------------------------
# detector_postprocess


@pytest.mark.parametrize("case", _params("detector_postprocess",
                                         lambda c: f"{c['resized_size'][0]}x{c['resized_size'][1]}-to-"
                                                   f"{c['output_size'][0]}x{c['output_size'][1]}"))
def test_detector_postprocess(case: dict[str, Any]) -> None:
    c = _need(case)
    boxes, keep, _ = detector_postprocess(c["boxes_resized"], tuple(c["resized_size"]), tuple(c["output_size"]))
    assert torch.equal(keep, c["keep"])
    _assert_within(boxes, c["boxes"], "boxes")
    assert torch.equal(boxes, c["boxes"])
