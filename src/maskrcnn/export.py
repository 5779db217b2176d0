"""ONNX export of the whole inference pipeline, and the onnxruntime runner that reads it back.

``export_onnx(model, "model.onnx")`` writes one graph: an RGB uint8 image (H, W, 3) of any size goes in;
resizing, normalising, backbone, FPN, RPN (anchors, top-k, NMS), RoI heads (RoiAlign, NMS), the pasting of
masks into the image and the decoding of keypoint heatmaps all run inside it; boxes (N, 4) XYXY input pixels,
scores (N,), labels (N,) int64, masks (N, H, W) uint8 and keypoints (N, K, 3) come out (the last two when the
model has those heads). An optional input ``score_threshold`` (float scalar) replaces the box head's minimum
score for one call; its default is the exported config's.

The convolutional networks (ResNet + FPN + RPN head, box head, mask head, keypoint head; res5 in the C4 layout)
are exported by ``torch.onnx``'s dynamo exporter as one graph with one input per stage. Everything between them
is written here directly in standard ONNX ops (opset 18): ``Resize``, ``TopK``, ``NonMaxSuppression``,
``RoiAlign``, ``MatMul`` or ``GridSample`` for the paste, a ``Loop`` of bicubic ``Resize`` for the keypoints.
That keeps every data-dependent size (detections, proposals after NMS, the resized image) out of the tracer,
which is what breaks other exports at other image sizes or at zero detections, and lets other runtimes run the
file. Both frameworks' conventions (pixel format, torchvision's float resize or detectron2's Pillow resize of
the uint8 image, anchors, RPN ranking and filters, pooler levels, background column, box clipping, paste,
keypoint scores) are read off the config, as the PyTorch stages read them.

``OnnxModel("model.onnx")`` runs the file in onnxruntime and returns the same :class:`~maskrcnn.Result` objects
as the PyTorch model; ``maskrcnn.load_model("model.onnx")`` returns one.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from maskrcnn.config import Config
from maskrcnn.ops.resize import PIL_PRECISION_BITS
from maskrcnn.structures import Result

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "OnnxModel", "export_onnx", "is_onnx_file", "load_onnx"]

# Opset 18 is the dynamo exporter's own; the glue below uses its forms of Split, Reduce* and Resize.
DEFAULT_OPSET = 18
MIN_OPSET = 18
# Metadata keys of the exported file.
META_CONFIG = "maskrcnn.config"
META_CLASS_NAMES = "maskrcnn.class_names"
META_CATEGORY_IDS = "maskrcnn.category_ids"
META_FORMAT = "maskrcnn.format"
META_SOURCE = "maskrcnn.source"
FORMAT_VERSION = "1"
OUTPUT_NAMES = ("boxes", "scores", "labels", "masks", "keypoints")
# Internal value holding the RPN's proposals (P, 4) XYXY resized-image pixels.
PROPOSALS = "rpn_proposals"
# torchvision's and detectron2's pooler: RoIs of sqrt(area) 224 px come from P4, clamped to P2..P5; the 1e-6
# is torchvision's LevelMapper epsilon.
CANONICAL_SCALE = 224.0
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6
POOLER_LEVELS = (2, 3, 4, 5)
# The feature stride of the single-level layouts (C4's res4, DC5's dilated res5).
SINGLE_LEVEL_STRIDE = 16


def _need_onnx() -> tuple[Any, Any, Any]:
    """onnx, onnx.helper, onnx.numpy_helper, or an ImportError saying which extra to install."""
    try:
        import onnx  # noqa: PLC0415
        from onnx import helper, numpy_helper  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'maskrcnn[onnx]'") from e
    return onnx, helper, numpy_helper


def is_onnx_file(path: str | Path) -> bool:
    """True when ``path`` names an ``.onnx`` file (by its suffix)."""
    return str(path).lower().endswith(".onnx")


# ---------------------------------------------------------------------------------------------------------------
# The networks, exported by torch.onnx


class _Networks(nn.Module):
    """The model's learned parts as one module with independent inputs (the export's unit).

    x (1, 3, Hp, Wp) normalised padded image -> the feature maps, RPN logits and deltas of each level;
    box_feats (R, C, S, S) pooled RoIs -> class logits (R, K+1), box deltas (R, 4K or 4(K+1));
    then one input per branch the model has (:meth:`branches`): mask RoIs (D, C, S, S) -> mask logits
    (D, K or K+1, M, M); keypoint RoIs (D, C, S, S) -> heatmap logits (D, K_kp, m, m). In the C4 layout res5
    runs on the box and mask RoIs first, as in :class:`maskrcnn.modeling.roi_heads.RoIHeads`.
    """

    def __init__(self, model: nn.Module) -> None:
        """Shares the submodules of ``model`` (a MaskRCNN on its naive path)."""
        super().__init__()
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        heads = model.roi_heads
        self.res5 = heads.res5
        self.box_head = heads.box_head
        self.box_predictor = heads.box_predictor
        self.mask_head = heads.mask_head
        self.mask_predictor = heads.mask_predictor
        self.keypoint_head = heads.keypoint_head
        self.keypoint_predictor = heads.keypoint_predictor

    def branches(self) -> list[str]:
        """The RoI branches after the box head, in input order: "mask" and/or "keypoint"."""
        return [name for name in ("mask", "keypoint") if getattr(self, f"{name}_head") is not None]

    def forward(self, x: Tensor, box_feats: Tensor, first: Tensor | None = None, second: Tensor | None = None
                ) -> tuple[Tensor, ...]:
        """Outputs: L feature maps, L objectness maps, L delta maps, class logits, deltas, then one per branch.

        ``first`` and ``second`` are the RoIs of the branches in :meth:`branches` order (named parameters, not
        ``*args``: the exporter's dynamic shapes follow the signature).
        """
        branch_feats = [t for t in (first, second) if t is not None]
        feats = list(self.backbone(x).values())
        logits, deltas = self.rpn_head(feats)
        shared = box_feats if self.res5 is None else self.res5(box_feats)
        cls, reg = self.box_predictor(self.box_head(shared))
        out = [*feats, *logits, *deltas, cls, reg]
        for name, rois in zip(self.branches(), branch_feats):
            if name == "mask":
                rois = rois if self.res5 is None else self.res5(rois)
                out.append(self.mask_predictor(self.mask_head(rois)))
            else:
                out.append(self.keypoint_predictor(self.keypoint_head(rois)))
        return tuple(out)


def _export_networks(model: nn.Module, opset: int) -> tuple[Any, list[str]]:
    """ModelProto of :class:`_Networks` with dynamic image size and RoI counts (weights inside), and its branches."""
    nets = _Networks(model).eval()
    c = model.backbone.out_channels
    m = model.cfg.model
    x = torch.zeros(1, 3, 64 * 5, 64 * 7)
    res = m.box_head.pooler_resolution
    args: list[Tensor] = [x, torch.zeros(3, c, res, res)]
    stride = int(model.cfg.input.size_divisible)
    if stride > 0:
        h, w = torch.export.Dim("h32", min=1, max=4096), torch.export.Dim("w32", min=1, max=4096)
        image_dims: dict[int, Any] = {2: stride * h, 3: stride * w}
    else:  # no padding (C4, DC5): any size the stride-16 trunk accepts
        image_dims = {2: torch.export.Dim("height", min=32, max=16384),
                      3: torch.export.Dim("width", min=32, max=16384)}
    shapes: list[dict[int, Any]] = [image_dims, {0: torch.export.Dim("rois", min=1)}]
    names = ["x", "box_feats"]
    for branch in nets.branches():
        res = (m.mask_head if branch == "mask" else m.keypoint_head).pooler_resolution
        args.append(torch.zeros(2, c, res, res))
        shapes.append({0: torch.export.Dim(f"{branch}_rois", min=1)})
        names.append(f"{branch}_feats")
    with torch.no_grad():
        program = torch.onnx.export(nets, tuple(args), dynamo=True, opset_version=opset, input_names=names,
                                    dynamic_shapes=tuple(shapes), optimize=True, verbose=False)
    return program.model_proto, nets.branches()


# ---------------------------------------------------------------------------------------------------------------
# The glue, written in ONNX


class _Builder:
    """Appends ONNX nodes with fresh value names; constants become initializers."""

    def __init__(self, prefix: str = "mrcnn/", initializers: list[Any] | None = None) -> None:
        """Value names start with ``prefix``; ``initializers`` is shared with a parent graph's builder."""
        _, self.helper, self.numpy_helper = _need_onnx()
        self.prefix = prefix
        self.nodes: list[Any] = []
        self.initializers: list[Any] = [] if initializers is None else initializers
        self._count = 0

    def body(self, prefix: str) -> _Builder:
        """A builder for a subgraph (a Loop's body) whose constants live in this graph (outer scope)."""
        return _Builder(self.prefix + prefix, self.initializers)

    def fresh(self, hint: str) -> str:
        """A new value name."""
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs: Any) -> Any:
        """Add one node; returns its output name (or a list of ``n_out`` names)."""
        outs = [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"n_{op_type}"),
                                                **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: Any = np.float32, name: str | None = None) -> str:
        """An initializer holding ``value`` as a numpy array of ``dtype``."""
        name = name or self.fresh("const")
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def i64(self, value: Any) -> str:
        """int64 constant (a scalar or a list)."""
        return self.const(value, np.int64)

    def f32(self, value: Any) -> str:
        """float32 constant."""
        return self.const(value, np.float32)

    # Small compositions used throughout.
    def dim(self, tensor: str, axis: int) -> str:
        """Size of ``tensor`` along ``axis``: a (1,) int64 tensor."""
        return self.op("Shape", tensor, start=axis, end=axis + 1)

    def scalar(self, one: str) -> str:
        """(1,) -> () ."""
        return self.op("Squeeze", one, self.i64([0]))

    def to_float(self, x: str) -> str:
        """Cast to float32."""
        return self.op("Cast", x, to=1)

    def to_double(self, x: str) -> str:
        """Cast to float64."""
        return self.op("Cast", x, to=11)

    def f64(self, value: Any) -> str:
        """float64 constant."""
        return self.const(value, np.float64)

    def finite_rows(self, x: str, ndim: int) -> str:
        """(N,) bool: every value of row i of the float tensor ``x`` of ``ndim`` axes is finite.

        x - x is NaN exactly where x is inf or NaN, and a sum with a NaN term is NaN.
        """
        diff = self.op("Sub", x, x)
        if ndim > 1:
            diff = self.op("ReduceSum", diff, self.i64(list(range(1, ndim))), keepdims=0)
        return self.op("Not", self.op("IsNaN", diff))

    def to_int64(self, x: str) -> str:
        """Cast to int64 (float inputs are truncated toward zero, as torch's ``.to(torch.int64)``)."""
        return self.op("Cast", x, to=7)

    def columns(self, x: str, n: int = 4) -> list[str]:
        """Split the last axis (size n) into n tensors that keep it with size 1."""
        return self.op("Split", x, axis=-1, num_outputs=n, n_out=n)


def _decode(g: _Builder, deltas: str, anchors: str, weights: Sequence[float], clip: float) -> str:
    """ONNX of :meth:`BoxCoder.decode`: (..., 4) deltas applied to broadcastable (..., 4) XYXY boxes.

    The same float operations in the same order, so the boxes agree to rounding with the PyTorch model.
    """
    x1, y1, x2, y2 = g.columns(anchors)
    widths = g.op("Sub", x2, x1)
    heights = g.op("Sub", y2, y1)
    half = g.f32(0.5)
    ctr_x = g.op("Add", x1, g.op("Mul", half, widths))
    ctr_y = g.op("Add", y1, g.op("Mul", half, heights))
    dx, dy, dw, dh = g.columns(deltas)
    wx, wy, ww, wh = (g.f32(float(w)) for w in weights)
    dx = g.op("Div", dx, wx)
    dy = g.op("Div", dy, wy)
    cap = g.f32(clip)
    dw = g.op("Min", g.op("Div", dw, ww), cap)
    dh = g.op("Min", g.op("Div", dh, wh), cap)
    pcx = g.op("Add", g.op("Mul", dx, widths), ctr_x)
    pcy = g.op("Add", g.op("Mul", dy, heights), ctr_y)
    half_w = g.op("Mul", half, g.op("Mul", g.op("Exp", dw), widths))
    half_h = g.op("Mul", half, g.op("Mul", g.op("Exp", dh), heights))
    return g.op("Concat", g.op("Sub", pcx, half_w), g.op("Sub", pcy, half_h), g.op("Add", pcx, half_w),
                g.op("Add", pcy, half_h), axis=-1)


def _clip(g: _Builder, boxes: str, limits: str) -> str:
    """Clamp (..., 4) XYXY boxes to [0, W] x [0, H]; ``limits`` is the float (4,) tensor [W, H, W, H]."""
    return g.op("Min", g.op("Max", boxes, g.f32(0.0)), limits)


def _min_size_keep(g: _Builder, boxes: str, min_size: float, inclusive: bool) -> str:
    """(N,) bool: width and height of (N, 4) boxes both >= ``min_size`` pixels (``inclusive``), or both > it."""
    x1, y1, x2, y2 = g.columns(boxes)
    ms = g.f32(min_size)
    above = "GreaterOrEqual" if inclusive else "Greater"
    keep = g.op("And", g.op(above, g.op("Sub", x2, x1), ms), g.op(above, g.op("Sub", y2, y1), ms))
    return g.op("Squeeze", keep, g.i64([1]))


def _batched_nms(g: _Builder, boxes: str, scores: str, groups: str, iou: float, max_out: int) -> str:
    """Indices (K,) int64 kept by NMS within each group, in decreasing score order, at most ``max_out``.

    Shifts each group's boxes apart by (largest coordinate + 1) and runs one NonMaxSuppression, as the PyTorch
    model's ``batched_nms`` does for small inputs.
    """
    flat = g.op("Reshape", boxes, g.i64([-1]))
    # The appended 0 keeps the maximum defined when no box is left (boxes are clipped to >= 0 anyway).
    biggest = g.op("ReduceMax", g.op("Concat", flat, g.f32([0.0]), axis=0), keepdims=0)
    offsets = g.op("Mul", g.to_float(groups), g.op("Add", biggest, g.f32(1.0)))
    shifted = g.op("Add", boxes, g.op("Unsqueeze", offsets, g.i64([1])))
    selected = g.op("NonMaxSuppression", g.op("Unsqueeze", shifted, g.i64([0])),
                    g.op("Unsqueeze", scores, g.i64([0, 1])), g.i64([max_out]), g.f32([iou]))
    return g.op("Squeeze", g.op("Gather", selected, g.i64([2]), axis=1), g.i64([1]))


def _pool(g: _Builder, feats: list[str], rois: str, output_size: int, sampling_ratio: int, aligned: bool,
          channels: int, level_eps: float, eps_inside_log: bool) -> str:
    """(R, 4) XYXY boxes in padded-image pixels -> (R, C, S, S) features, each RoI pooled from its level.

    ONNX RoiAlign: "output_half_pixel" is torchvision's ``aligned=False``, "half_pixel" its ``aligned=True``;
    sampling ratio 0 is the adaptive grid in both. With FPN's four levels each RoI goes to
    floor(4 + log2(sqrt(area) / 224) + eps) (torchvision) or floor(4 + log2(sqrt(area) / 224 + eps))
    (``eps_inside_log``, detectron2), clamped to P2..P5; the level scales are fixed at 1/4 .. 1/32, which the
    PyTorch pooler infers from the map sizes for every image the resize lets through. One level (C4, DC5) is
    the stride-16 map.
    """
    n = g.dim(rois, 0)
    batch_idx = g.op("ConstantOfShape", n, value=g.numpy_helper.from_array(np.zeros(1, np.int64)))
    mode = "half_pixel" if aligned else "output_half_pixel"

    def align(feat: str, boxes: str, index: str, scale: float) -> str:
        return g.op("RoiAlign", feat, boxes, index, mode="avg", output_height=output_size, output_width=output_size,
                    sampling_ratio=sampling_ratio, spatial_scale=scale, coordinate_transformation_mode=mode)

    if len(feats) == 1:
        return align(feats[0], rois, batch_idx, 1.0 / SINGLE_LEVEL_STRIDE)
    x1, y1, x2, y2 = g.columns(rois)
    area = g.op("Mul", g.op("Sub", x2, x1), g.op("Sub", y2, y1))
    scale = g.op("Div", g.op("Sqrt", area), g.f32(CANONICAL_SCALE))
    if eps_inside_log:
        scale = g.op("Add", scale, g.f32(level_eps))
    log2 = g.op("Div", g.op("Log", scale), g.f32(math.log(2.0)))
    target = g.op("Add", g.f32(float(CANONICAL_LEVEL)), log2)
    if not eps_inside_log:
        target = g.op("Add", target, g.f32(level_eps))
    target = g.op("Clip", g.op("Floor", target), g.f32(float(POOLER_LEVELS[0])), g.f32(float(POOLER_LEVELS[-1])))
    levels = g.op("Squeeze", g.op("Sub", g.to_int64(target), g.i64(POOLER_LEVELS[0])), g.i64([1]))
    picked, pooled = [], []
    for i, (feat, level) in enumerate(zip(feats, POOLER_LEVELS)):  # a loop over the 4 pooled levels
        idx = g.op("Squeeze", g.op("NonZero", g.op("Equal", levels, g.i64(i))), g.i64([0]))
        pooled.append(align(feat, g.op("Gather", rois, idx, axis=0), g.op("Gather", batch_idx, idx, axis=0),
                            float(2.0 ** -level)))
        picked.append(idx)
    shape = g.op("Concat", n, g.i64([channels, output_size, output_size]), axis=0)
    zeros = g.op("ConstantOfShape", shape, value=g.numpy_helper.from_array(np.zeros(1, np.float32)))
    order = g.op("Unsqueeze", g.op("Concat", *picked, axis=0), g.i64([1]))
    return g.op("ScatterND", zeros, order, g.op("Concat", *pooled, axis=0))


def _paste_axis(g: _Builder, start: str, stop: str, size: str, n_in: int) -> str:
    """(D, n_out, n_in) bilinear weights resizing an ``n_in`` mask axis onto image pixels [start, stop].

    start, stop: (D,) int64 first and last pixel of each grown, truncated paste box; size: () int64 image size.
    Follows ``F.interpolate(mode="bilinear", align_corners=False)`` to the box's stop - start + 1 pixels, rows
    outside the image or the box are zero (as :func:`maskrcnn.ops.masks.paste_masks_legacy`).
    """
    length = g.op("Max", g.op("Add", g.op("Sub", stop, start), g.i64(1)), g.i64(1))
    lo = g.op("Max", start, g.i64(0))
    hi = g.op("Min", g.op("Add", stop, g.i64(1)), size)
    pix = g.op("Unsqueeze", g.op("Range", g.i64(0), size, g.i64(1)), g.i64([0]))  # (1, n_out)
    col = g.i64([1])
    dst = g.op("Sub", pix, g.op("Unsqueeze", start, col))
    valid = g.op("And", g.op("GreaterOrEqual", pix, g.op("Unsqueeze", lo, col)),
                 g.op("Less", pix, g.op("Unsqueeze", hi, col)))
    ratio = g.op("Unsqueeze", g.op("Div", g.f32(float(n_in)), g.to_float(length)), col)
    src = g.op("Max", g.op("Sub", g.op("Mul", ratio, g.op("Add", g.to_float(dst), g.f32(0.5))), g.f32(0.5)),
               g.f32(0.0))
    i0 = g.to_int64(src)
    step = g.to_int64(g.op("Less", i0, g.i64(n_in - 1)))
    w1 = g.op("Sub", src, g.to_float(i0))
    w0 = g.op("Sub", g.f32(1.0), w1)
    i1 = g.op("Min", g.op("Add", i0, step), g.i64(n_in - 1))
    i0 = g.op("Min", i0, g.i64(n_in - 1))
    taps = g.op("Range", g.i64(0), g.i64(n_in), g.i64(1))
    last = g.i64([2])
    on0 = g.to_float(g.op("Equal", g.op("Unsqueeze", i0, last), taps))
    on1 = g.to_float(g.op("Equal", g.op("Unsqueeze", i1, last), taps))
    weights = g.op("Add", g.op("Mul", on0, g.op("Unsqueeze", w0, last)), g.op("Mul", on1, g.op("Unsqueeze", w1, last)))
    return g.op("Mul", weights, g.op("Unsqueeze", g.to_float(valid), last))


def _paste_legacy(g: _Builder, probs: str, boxes: str, height: str, width: str, m: int, padding: int,
                  threshold: float, inclusive: bool) -> str:
    """torchvision's paste of (D, 1, M, M) probabilities at (D, 4) input-pixel boxes: (D, H, W) uint8 masks.

    The mask is padded, the box grown by the same ratio and truncated to whole pixels, and the bilinear resize
    is separable, so each mask becomes rows (D, H, M+2p) @ mask (D, M+2p, M+2p) @ columns (D, M+2p, W).
    """
    n_in = m + 2 * padding
    padded = g.op("Pad", g.op("Squeeze", probs, g.i64([1])), g.i64([0, padding, padding, 0, padding, padding]))
    x1, y1, x2, y2 = g.columns(boxes)
    scale = g.f32(float(n_in) / m)
    half = g.f32(0.5)
    w_half = g.op("Mul", g.op("Mul", g.op("Sub", x2, x1), half), scale)
    h_half = g.op("Mul", g.op("Mul", g.op("Sub", y2, y1), half), scale)
    x_c = g.op("Mul", g.op("Add", x2, x1), half)
    y_c = g.op("Mul", g.op("Add", y2, y1), half)
    col = g.i64([1])
    x0i = g.op("Squeeze", g.to_int64(g.op("Sub", x_c, w_half)), col)
    x1i = g.op("Squeeze", g.to_int64(g.op("Add", x_c, w_half)), col)
    y0i = g.op("Squeeze", g.to_int64(g.op("Sub", y_c, h_half)), col)
    y1i = g.op("Squeeze", g.to_int64(g.op("Add", y_c, h_half)), col)
    rows = _paste_axis(g, y0i, y1i, height, n_in)
    cols = _paste_axis(g, x0i, x1i, width, n_in)
    pasted = g.op("MatMul", g.op("MatMul", rows, padded), g.op("Transpose", cols, perm=[0, 2, 1]))
    return g.op("Cast", g.op("GreaterOrEqual" if inclusive else "Greater", pasted, g.f32(threshold)), to=2)


def _paste_grid_sample(g: _Builder, probs: str, boxes: str, height: str, width: str, threshold: float,
                       inclusive: bool, opset: int) -> str:
    """detectron2's paste: ONNX GridSample of (D, 1, M, M) probabilities at pixel centres -> (D, H, W) uint8."""
    x1, y1, x2, y2 = g.columns(boxes)  # (D, 1) each
    half, two, one = g.f32(0.5), g.f32(2.0), g.f32(1.0)
    xs = g.op("Add", g.to_float(g.op("Unsqueeze", g.op("Range", g.i64(0), width, g.i64(1)), g.i64([0]))), half)
    ys = g.op("Add", g.to_float(g.op("Unsqueeze", g.op("Range", g.i64(0), height, g.i64(1)), g.i64([0]))), half)
    gx = g.op("Sub", g.op("Mul", g.op("Div", g.op("Sub", xs, x1), g.op("Sub", x2, x1)), two), one)  # (D, W)
    gy = g.op("Sub", g.op("Mul", g.op("Div", g.op("Sub", ys, y1), g.op("Sub", y2, y1)), two), one)  # (D, H)
    d = g.dim(boxes, 0)
    shape = g.op("Concat", d, g.op("Reshape", height, g.i64([1])), g.op("Reshape", width, g.i64([1])), g.i64([1]),
                 axis=0)
    gx = g.op("Expand", g.op("Unsqueeze", gx, g.i64([1, 3])), shape)
    gy = g.op("Expand", g.op("Unsqueeze", gy, g.i64([2, 3])), shape)
    grid = g.op("Concat", gx, gy, axis=3)
    # Opset 20 renamed the mode.
    mode = "linear" if opset >= 20 else "bilinear"
    sampled = g.op("GridSample", probs, grid, mode=mode, padding_mode="zeros", align_corners=0)
    above = "GreaterOrEqual" if inclusive else "Greater"
    return g.op("Cast", g.op(above, g.op("Squeeze", sampled, g.i64([1])), g.f32(threshold)), to=2)


def _normalize(g: _Builder, pixel_format: str, mean: np.ndarray, std: np.ndarray, image: str) -> str:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 normalised as :meth:`MaskRCNN.normalize`: RGB in [0, 1]
    (``rgb01``) or BGR in [0, 255] (``bgr255``, the uint8 values as they are), minus the (3,) mean, over the std."""
    x = g.op("Unsqueeze", g.op("Transpose", g.to_float(image), perm=[2, 0, 1]), g.i64([0]))
    if pixel_format == "bgr255":
        x = g.op("Gather", x, g.i64([2, 1, 0]), axis=1)
    else:
        x = g.op("Div", x, g.f32(255.0))
    mean_c = g.f32(np.asarray(mean, np.float32).reshape(1, 3, 1, 1))
    std_c = g.f32(np.asarray(std, np.float32).reshape(1, 3, 1, 1))
    return g.op("Div", g.op("Sub", x, mean_c), std_c)


def _bilinear_resize(g: _Builder, x: str, height: str, width: str, min_size: float, max_size: float
                     ) -> tuple[str, str, str]:
    """torchvision's resize of a normalised (1, 3, H, W) image: (1, 3, h, w), h and w () int64.

    The scale in double precision, as :func:`maskrcnn.ops.resize.resize_scale` computes it with Python floats: a
    float32 division can land just under a whole size and lose a row.
    """
    hd, wd = g.to_double(height), g.to_double(width)
    scale = g.op("Min", g.op("Div", g.f64(float(min_size)), g.op("Min", hd, wd)),
                 g.op("Div", g.f64(float(max_size)), g.op("Max", hd, wd)))
    new_h = g.op("Max", g.to_int64(g.op("Floor", g.op("Mul", hd, scale))), g.i64(1))
    new_w = g.op("Max", g.to_int64(g.op("Floor", g.op("Mul", wd, scale))), g.i64(1))
    vec = g.i64([1])
    sizes = g.op("Concat", g.i64([1, 3]), g.op("Reshape", new_h, vec), g.op("Reshape", new_w, vec), axis=0)
    x = g.op("Resize", x, "", "", sizes, mode="linear", coordinate_transformation_mode="half_pixel")
    return x, new_h, new_w


def _pil_taps(g: _Builder, n_in: str, n_out: str) -> tuple[str, str]:
    """Pillow's bilinear filter taps from ``n_in`` to ``n_out`` pixels (() int64 each): source indices (n_out, T)
    int64 and fixed-point weights (n_out, T) int32, T = 2 ceil(support) + 1 taps.

    :func:`maskrcnn.ops.resize._pil_bilinear_taps` step by step in float64: the weights are normalised by their
    sum taken in tap order (CumSum, which runs sequentially), then rounded half away from zero.
    """
    fin, fout = g.to_double(n_in), g.to_double(n_out)
    scale = g.op("Div", fin, fout)
    support = g.op("Max", scale, g.f64(1.0))  # the filter's support is 1 px, widened by the scale when shrinking
    taps = g.op("Add", g.op("Mul", g.to_int64(g.op("Ceil", support)), g.i64(2)), g.i64(1))
    center = g.op("Mul", g.op("Add", g.to_double(g.op("Range", g.i64(0), n_out, g.i64(1))), g.f64(0.5)), scale)
    # C's (int) cast truncates toward zero, as Cast does.
    xmin = g.op("Max", g.to_int64(g.op("Add", g.op("Sub", center, support), g.f64(0.5))), g.i64(0))
    xmax = g.op("Sub", g.op("Min", g.to_int64(g.op("Add", g.op("Add", center, support), g.f64(0.5))), n_in), xmin)
    x = g.op("Range", g.i64(0), taps, g.i64(1))
    col, row = g.i64([1]), g.i64([0])
    xd = g.op("Unsqueeze", g.to_double(x), row)
    t = g.op("Mul", g.op("Add", g.op("Sub", g.op("Add", xd, g.op("Unsqueeze", g.to_double(xmin), col)),
                                     g.op("Unsqueeze", center, col)), g.f64(0.5)),
             g.op("Div", g.f64(1.0), support))
    at = g.op("Abs", t)
    zero = g.f64(0.0)
    w = g.op("Where", g.op("Less", at, g.f64(1.0)), g.op("Sub", g.f64(1.0), at), zero)
    w = g.op("Where", g.op("Less", g.op("Unsqueeze", x, row), g.op("Unsqueeze", xmax, col)), w, zero)
    last = g.op("Sub", taps, g.i64(1))
    total = g.op("Gather", g.op("CumSum", w, g.i64(1)), g.op("Reshape", last, g.i64([1])), axis=1)  # (n_out, 1)
    w = g.op("Where", g.op("Equal", total, zero), w, g.op("Div", w, total))
    one = g.f64(float(1 << PIL_PRECISION_BITS))
    scaled = g.op("Mul", w, one)
    fixed = g.op("Where", g.op("Less", w, zero), g.op("Add", g.f64(-0.5), scaled), g.op("Add", g.f64(0.5), scaled))
    weights = g.op("Cast", g.to_int64(fixed), to=6)
    index = g.op("Min", g.op("Add", g.op("Unsqueeze", xmin, col), g.op("Unsqueeze", x, row)),
                 g.op("Sub", n_in, g.i64(1)))
    return index, weights


def _pil_resample(g: _Builder, image: str, n_in: str, n_out: str, axis: int) -> str:
    """One pass of Pillow's 8-bit resample of an (H, W, 3) int32 image along ``axis`` (0 or 1): int32 in [0, 255].

    int32 holds every sum: 255 x 2^22 (the weights sum to one) plus the rounding half is under 2^31, as in
    Pillow's own accumulator.
    """
    index, weights = _pil_taps(g, n_in, n_out)
    gathered = g.op("Gather", image, g.op("Reshape", index, g.i64([-1])), axis=axis)
    if axis == 1:  # (H, n_out * T, 3) -> (H, n_out, T, 3)
        shape = g.op("Concat", g.dim(image, 0), g.op("Shape", index), g.i64([3]), axis=0)
        w = g.op("Unsqueeze", weights, g.i64([0, 3]))
    else:  # (n_out * T, W, 3) -> (n_out, T, W, 3)
        shape = g.op("Concat", g.op("Shape", index), g.dim(image, 1), g.i64([3]), axis=0)
        w = g.op("Unsqueeze", weights, g.i64([2, 3]))
    acc = g.op("ReduceSum", g.op("Mul", g.op("Reshape", gathered, shape), w), g.i64([axis + 1]), keepdims=0)
    acc = g.op("Add", acc, g.const(1 << (PIL_PRECISION_BITS - 1), np.int32))
    # The sums are positive, so integer division is Pillow's arithmetic shift; then clip8.
    out = g.op("Div", acc, g.const(1 << PIL_PRECISION_BITS, np.int32))
    return g.op("Min", g.op("Max", out, g.const(0, np.int32)), g.const(255, np.int32))


def _pil_resize(g: _Builder, image: str, height: str, width: str, min_size: float, max_size: float
                ) -> tuple[str, str, str]:
    """detectron2's ResizeShortestEdge of the (H, W, 3) uint8 image: (h, w, 3) uint8, h and w () int64.

    The sizes as :func:`maskrcnn.ops.resize.shortest_edge_size` (float64, int(x + 0.5)), then Pillow's bilinear
    resize of the uint8 image (:func:`maskrcnn.ops.resize.resize_uint8_bilinear`): one pass per axis rounded to
    uint8, in Pillow's order (:func:`maskrcnn.ops.resize.pil_vertical_first`), chosen by an ``If``. A pass to the
    same size is the identity, so none is skipped.
    """
    hd, wd = g.to_double(height), g.to_double(width)
    size = g.f64(float(min_size))
    scale = g.op("Div", size, g.op("Min", hd, wd))
    taller = g.op("Less", hd, wd)
    newh = g.op("Where", taller, size, g.op("Mul", scale, hd))
    neww = g.op("Where", taller, g.op("Mul", scale, wd), size)
    longest = g.op("Max", newh, neww)
    shrink = g.op("Div", g.f64(float(max_size)), longest)
    over = g.op("Greater", longest, g.f64(float(max_size)))
    newh = g.op("Where", over, g.op("Mul", newh, shrink), newh)
    neww = g.op("Where", over, g.op("Mul", neww, shrink), neww)
    new_h = g.to_int64(g.op("Add", newh, g.f64(0.5)))
    new_w = g.to_int64(g.op("Add", neww, g.f64(0.5)))
    x = g.op("Cast", image, to=6)
    shrink_h = g.op("Sub", height, new_h)
    vertical_first = g.op("And", g.op("Greater", shrink_h, g.i64(0)),
                          g.op("Greater", shrink_h, g.op("Mul", g.i64(2), g.op("Sub", width, new_w))))
    h, tp = g.helper, _need_onnx()[0].TensorProto
    branches = {}
    for name, order in (("vertical_first", (0, 1)), ("horizontal_first", (1, 0))):
        body = g.body(f"pil_{name}/")
        y = x
        for axis in order:  # the two passes, in this branch's order
            y = _pil_resample(body, y, (height, width)[axis], (new_h, new_w)[axis], axis=axis)
        out = body.op("Cast", y, to=2)
        branches[name] = h.make_graph(body.nodes, f"pil_resize_{name}", [],
                                      [h.make_tensor_value_info(out, tp.UINT8, None)])
    resized = g.op("If", vertical_first, then_branch=branches["vertical_first"],
                   else_branch=branches["horizontal_first"])
    return resized, new_h, new_w


def _decode_keypoints(g: _Builder, maps: str, boxes: str, num_keypoints: int, m: int) -> str:
    """(D, K, m, m) heatmap logits over (D, 4) XYXY boxes -> (D, K, 4): x, y (the boxes' pixels), logit, score.

    :func:`maskrcnn.ops.keypoints.heatmaps_to_keypoints`: each box's maps are resized bicubically to its own
    (ceil(h), ceil(w)) pixels, so a Loop runs one box per iteration (ONNX Resize, cubic, a = -0.75, half-pixel
    centres: ``F.interpolate(mode="bicubic", align_corners=False)``); its first maximum gives the position. One
    dummy box is appended so that the loop runs at least once: a loop with no iterations has no shapes for its
    outputs.
    """
    x1, y1, x2, y2 = g.columns(boxes)
    one = g.f32(1.0)
    wv, hv = g.op("Max", g.op("Sub", x2, x1), one), g.op("Max", g.op("Sub", y2, y1), one)
    wc, hc = g.op("Ceil", wv), g.op("Ceil", hv)
    sizes = g.to_int64(g.op("Concat", hc, wc, axis=1))  # (D, 2)
    sizes_ext = g.op("Concat", sizes, g.i64([[1, 1]]), axis=0)
    maps_ext = g.op("Concat", maps, g.f32(np.zeros((1, num_keypoints, m, m))), axis=0)
    trip = g.scalar(g.dim(sizes_ext, 0))

    body = g.body("kp_loop/")
    it, cond = body.fresh("iter"), body.fresh("cond")
    one_map = body.op("Gather", maps_ext, body.op("Unsqueeze", it, body.i64([0])), axis=0)  # (1, K, m, m)
    target = body.op("Concat", body.i64([1, num_keypoints]), body.op("Gather", sizes_ext, it, axis=0), axis=0)
    resized = body.op("Resize", one_map, "", "", target, mode="cubic", cubic_coeff_a=-0.75,
                      coordinate_transformation_mode="half_pixel")
    flat = body.op("Reshape", resized, body.i64([num_keypoints, -1]))
    pos = body.op("ArgMax", flat, axis=1, keepdims=0)  # the first of tied maxima, as torch's argmax
    peak = body.op("ReduceMax", flat, body.i64([1]), keepdims=0)
    cond_out = body.op("Identity", cond)
    h, tp = g.helper, _need_onnx()[0].TensorProto
    graph = h.make_graph(body.nodes, "keypoint_peaks",
                         [h.make_tensor_value_info(it, tp.INT64, []), h.make_tensor_value_info(cond, tp.BOOL, [])],
                         [h.make_tensor_value_info(cond_out, tp.BOOL, []),
                          h.make_tensor_value_info(pos, tp.INT64, None),
                          h.make_tensor_value_info(peak, tp.FLOAT, None)])
    pos_all, peak_all = g.op("Loop", trip, g.const(True, np.bool_), body=graph, n_out=2)
    d = g.dim(boxes, 0)
    pos = g.op("Slice", pos_all, g.i64([0]), d, g.i64([0]))  # (D, K)
    peak = g.op("Slice", peak_all, g.i64([0]), d, g.i64([0]))
    wci = g.to_int64(wc)
    x_int = g.op("Mod", pos, wci)
    y_int = g.op("Div", g.op("Sub", pos, x_int), wci)
    half = g.f32(0.5)
    x = g.op("Add", g.op("Mul", g.op("Add", g.to_float(x_int), half), g.op("Div", wv, wc)), x1)
    y = g.op("Add", g.op("Mul", g.op("Add", g.to_float(y_int), half), g.op("Div", hv, hc)), y1)
    # detectron2's score: a softmax normalised over the (m, m) heatmap at the resized map's maximum.
    peak4 = g.op("Unsqueeze", peak, g.i64([2, 3]))
    score = g.op("Div", one, g.op("ReduceSum", g.op("Exp", g.op("Sub", maps, peak4)), g.i64([2, 3]), keepdims=0))
    last = g.i64([2])
    return g.op("Concat", *(g.op("Unsqueeze", v, last) for v in (x, y, peak, score)), axis=2)


def _glue(g: _Builder, cfg: Config, nets: dict[str, Any], channels: int, cell_anchors: list[np.ndarray],
          pixel_stats: tuple[np.ndarray, np.ndarray], opset: int) -> dict[str, str]:
    """Write the whole pipeline around the network graph's inputs and outputs; returns the output names.

    ``pixel_stats``: the model's (3,) pixel mean and std buffers. Every framework difference is read off the
    config, as the PyTorch stages read it (no per-preset branch).
    """
    inp, m = cfg.input, cfg.model
    mean, std = pixel_stats
    image = "image"
    # -- preprocessing: uint8 HWC -> normalised, resized, padded (1, 3, Hp, Wp), as MaskRCNN.preprocess.
    height = g.scalar(g.dim(image, 0))
    width = g.scalar(g.dim(image, 1))
    if inp.resize_mode == "pil":  # detectron2 resizes the uint8 image, then normalises
        resized, new_h, new_w = _pil_resize(g, image, height, width, inp.min_size_test, inp.max_size_test)
        x = _normalize(g, inp.pixel_format, mean, std, resized)
    else:
        x, new_h, new_w = _bilinear_resize(g, _normalize(g, inp.pixel_format, mean, std, image), height, width,
                                           inp.min_size_test, inp.max_size_test)
    vec = g.i64([1])
    new_h1, new_w1 = g.op("Reshape", new_h, vec), g.op("Reshape", new_w, vec)
    stride = int(inp.size_divisible)
    pad_h, pad_w = new_h1, new_w1
    if stride > 0:
        pad_h = g.op("Mul", g.op("Div", g.op("Add", new_h1, g.i64(stride - 1)), g.i64(stride)), g.i64(stride))
        pad_w = g.op("Mul", g.op("Div", g.op("Add", new_w1, g.i64(stride - 1)), g.i64(stride)), g.i64(stride))
    pads = g.op("Concat", g.i64([0, 0, 0, 0, 0, 0]), g.op("Sub", pad_h, new_h1), g.op("Sub", pad_w, new_w1), axis=0)
    g.nodes.append(g.helper.make_node("Pad", [x, pads], [nets["x"]], name=g.fresh("n_Pad")))
    limits = g.to_float(g.op("Concat", new_w1, new_h1, new_w1, new_h1, axis=0))

    # -- RPN: anchors, per-level top-k, decode, filters, NMS per level (find_top_rpn_proposals).
    rpn, ac = m.rpn, m.anchors
    num_anchors = len(cell_anchors[0])
    boxes_l, scores_l, levels_l = [], [], []
    for lvl in range(len(nets["features"])):  # a loop over the feature levels (5 with FPN, 1 with C4 or DC5)
        feat, logits, deltas = nets["features"][lvl], nets["logits"][lvl], nets["deltas"][lvl]
        gh, gw = g.dim(feat, 2), g.dim(feat, 3)
        if ac.strides:  # fixed by the backbone (detectron2)
            sh = sw = g.i64([int(ac.strides[lvl])])
        else:  # the padded size integer-divided by the map's (torchvision)
            sh, sw = g.op("Div", pad_h, gh), g.op("Div", pad_w, gw)
        offset = g.f32(float(ac.offset))
        xs = g.op("Mul", g.op("Add", g.to_float(g.op("Range", g.i64(0), g.scalar(gw), g.i64(1))), offset),
                  g.to_float(sw))
        ys = g.op("Mul", g.op("Add", g.to_float(g.op("Range", g.i64(0), g.scalar(gh), g.i64(1))), offset),
                  g.to_float(sh))
        grid = g.op("Concat", gh, gw, axis=0)
        sx = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", xs, g.i64([0])), grid), g.i64([-1, 1]))
        sy = g.op("Reshape", g.op("Expand", g.op("Unsqueeze", ys, g.i64([1])), grid), g.i64([-1, 1]))
        shifts = g.op("Concat", sx, sy, sx, sy, axis=1)
        anchors = g.op("Reshape", g.op("Add", g.op("Unsqueeze", shifts, g.i64([1])),
                                       g.f32(cell_anchors[lvl][None])), g.i64([-1, 4]))
        # Position-major, then anchor: the order of the anchors.
        obj = g.op("Reshape", g.op("Transpose", logits, perm=[0, 2, 3, 1]), g.i64([-1]))
        dl = g.op("Reshape", deltas, g.i64([1, num_anchors, 4, -1]))
        dl = g.op("Reshape", g.op("Transpose", dl, perm=[0, 3, 1, 2]), g.i64([-1, 4]))
        k = g.op("Min", g.dim(obj, 0), g.i64([rpn.pre_nms_top_n_test]))
        top, idx = g.op("TopK", obj, k, axis=0, largest=1, sorted=1, n_out=2)
        boxes_l.append(_decode(g, g.op("Gather", dl, idx, axis=0), g.op("Gather", anchors, idx, axis=0),
                               rpn.bbox_reg_weights, float(np.log(1000.0 / 16))))
        scores_l.append(top)
        levels_l.append(g.op("ConstantOfShape", g.op("Shape", idx),
                             value=g.numpy_helper.from_array(np.full(1, lvl, np.int64))))
    boxes = g.op("Concat", *boxes_l, axis=0)
    probs = g.op("Concat", *scores_l, axis=0)
    if rpn.sigmoid_scores:
        probs = g.op("Sigmoid", probs)
    levels = g.op("Concat", *levels_l, axis=0)
    if rpn.drop_non_finite:
        keep = g.op("And", g.finite_rows(boxes, 2), g.finite_rows(probs, 1))
        boxes, probs, levels = (g.op("Compress", t, keep, axis=0) for t in (boxes, probs, levels))
    boxes = _clip(g, boxes, limits)
    keep = _min_size_keep(g, boxes, rpn.min_box_size, rpn.min_size_inclusive)
    if rpn.score_thresh is not None:
        keep = g.op("And", keep, g.op("GreaterOrEqual", probs, g.f32(rpn.score_thresh)))
    boxes, probs, levels = (g.op("Compress", t, keep, axis=0) for t in (boxes, probs, levels))
    keep = _batched_nms(g, boxes, probs, levels, rpn.nms_thresh, rpn.post_nms_top_n_test)
    proposals = g.op("Gather", boxes, keep, axis=0)
    # A fixed name, so that tools (and the parity test) can expose the proposals as an output.
    g.nodes.append(g.helper.make_node("Identity", [proposals], [PROPOSALS], name=g.fresh("n_Identity")))
    proposals = PROPOSALS

    # -- box head: pool, (networks), softmax, decode per class, filters, NMS per class, top detections.
    bh = m.box_head
    pooled_feats = nets["features"][:len(POOLER_LEVELS)]

    def pool(rois: str, head: Any) -> str:
        return _pool(g, pooled_feats, rois, head.pooler_resolution, head.pooler_sampling_ratio, head.pooler_aligned,
                     channels, bh.pooler_level_eps, bh.pooler_eps_inside_log)

    g.nodes.append(g.helper.make_node("Identity", [pool(proposals, bh)], [nets["box_feats"]],
                                      name=g.fresh("n_Identity")))
    k = m.num_classes
    first = 1 if m.background == "first" else 0  # the column of class 1 among the K+1 class logits
    per_class = k + 1 if m.background == "first" else k  # box deltas and mask logits
    codes = g.op("Reshape", nets["class_deltas"], g.i64([-1, per_class, 4]))
    pred = _decode(g, codes, g.op("Unsqueeze", proposals, g.i64([1])), bh.bbox_reg_weights,
                   float(np.log(1000.0 / 16)))
    scores = g.op("Softmax", nets["class_logits"], axis=-1)
    rows_ok = g.op("And", g.finite_rows(pred, 3), g.finite_rows(scores, 2)) if bh.drop_non_finite else None
    pred = _clip(g, pred, limits)
    if per_class == k + 1:
        pred = g.op("Slice", pred, g.i64([first]), g.i64([first + k]), g.i64([1]))
    pred = g.op("Reshape", pred, g.i64([-1, 4]))
    scores = g.op("Slice", scores, g.i64([first]), g.i64([first + k]), g.i64([1]))
    grid = g.op("Shape", scores)
    labels = g.op("Reshape", g.op("Expand", g.i64(np.arange(1, k + 1)[None]), grid), g.i64([-1]))
    # The NMS categories are the framework's own class indices (they change the rounding of the box offsets).
    groups = g.op("Reshape", g.op("Expand", g.i64(np.arange(first, first + k)[None]), grid), g.i64([-1]))
    scores = g.op("Reshape", scores, g.i64([-1]))
    keep = g.op("Greater", scores, "score_threshold")
    if rows_ok is not None:
        keep = g.op("And", keep, g.op("Reshape", g.op("Expand", g.op("Unsqueeze", rows_ok, g.i64([1])), grid),
                                      g.i64([-1])))
    if bh.min_box_size is not None:
        keep = g.op("And", keep, _min_size_keep(g, pred, bh.min_box_size, True))
    pred, scores, labels, groups = (g.op("Compress", t, keep, axis=0) for t in (pred, scores, labels, groups))
    keep = _batched_nms(g, pred, scores, groups, bh.nms_thresh, bh.detections_per_img)
    det_boxes = g.op("Gather", pred, keep, axis=0)
    det_labels = g.op("Gather", labels, keep, axis=0)
    det_scores = g.op("Gather", scores, keep, axis=0)

    # -- back to input pixels (MaskRCNN.detect)
    if bh.clip_to_input:
        # detector_postprocess: scales in float64 applied in float32, clip to the input, drop the emptied boxes.
        sx = g.to_float(g.op("Div", g.to_double(width), g.to_double(new_w)))
        sy = g.to_float(g.op("Div", g.to_double(height), g.to_double(new_h)))
    else:  # resize_boxes: float32 ratios
        sx = g.op("Div", g.to_float(width), g.to_float(new_w))
        sy = g.op("Div", g.to_float(height), g.to_float(new_h))
    ratios = g.op("Concat", *(g.op("Reshape", r, vec) for r in (sx, sy, sx, sy)), axis=0)
    in_boxes = g.op("Mul", det_boxes, ratios)
    kept = None
    if bh.clip_to_input:
        size = g.to_float(g.op("Concat", *(g.op("Reshape", v, vec) for v in (width, height, width, height)), axis=0))
        in_boxes = _clip(g, in_boxes, size)
        kept = _min_size_keep(g, in_boxes, 0.0, False)
        in_boxes, det_scores, det_labels_out = (g.op("Compress", t, kept, axis=0)
                                                for t in (in_boxes, det_scores, det_labels))
    else:
        det_labels_out = det_labels
    outputs = {"boxes": in_boxes, "scores": det_scores, "labels": det_labels_out}

    # -- mask head: pool at the detections, (networks), the predicted class's channel, sigmoid, paste.
    mh = m.mask_head
    if mh.enabled:
        g.nodes.append(g.helper.make_node("Identity", [pool(det_boxes, mh)], [nets["mask_feats"]],
                                          name=g.fresh("n_Identity")))
        res = mh.pooler_resolution * (1 if m.backbone.layout == "c4" else 2)
        channel = det_labels if first else g.op("Sub", det_labels, g.i64(1))
        index_shape = g.op("Concat", g.op("Shape", det_labels), g.i64([1, res, res]), axis=0)
        index = g.op("Expand", g.op("Reshape", channel, g.i64([-1, 1, 1, 1])), index_shape)
        probs = g.op("Sigmoid", g.op("GatherElements", nets["mask_logits"], index, axis=1))  # (D, 1, M, M)
        if kept is not None:
            probs = g.op("Compress", probs, kept, axis=0)
        if mh.paste_mode == "legacy":
            outputs["masks"] = _paste_legacy(g, probs, in_boxes, height, width, res, mh.paste_padding,
                                             mh.mask_threshold, mh.mask_threshold_inclusive)
        else:
            outputs["masks"] = _paste_grid_sample(g, probs, in_boxes, height, width, mh.mask_threshold,
                                                  mh.mask_threshold_inclusive, opset)

    # -- keypoint head: pool at the detections, (networks), peaks of the bicubic-resized heatmaps.
    kh = m.keypoint_head
    if kh.enabled:
        g.nodes.append(g.helper.make_node("Identity", [pool(det_boxes, kh)], [nets["keypoint_feats"]],
                                          name=g.fresh("n_Identity")))
        side = 2 * kh.pooler_resolution * kh.up_scale
        decoded = _decode_keypoints(g, nets["keypoint_logits"], det_boxes, kh.num_keypoints, side)
        xk, yk, logit, softmax = g.columns(decoded)
        score = logit if kh.score_type == "logit" else softmax
        keypoints = g.op("Concat", g.op("Mul", xk, sx), g.op("Mul", yk, sy), score, axis=-1)
        if kept is not None:
            keypoints = g.op("Compress", keypoints, kept, axis=0)
        outputs["keypoints"] = keypoints
    return outputs


def _subgraph_inputs(node: Any) -> list[str]:
    """Outer-scope values a node's subgraphs (a Loop's body) read: they must be produced before the node."""
    names: list[str] = []
    for attr in node.attribute:
        if attr.g is not None and attr.g.node:
            inner = {i.name for i in attr.g.input} | {o for n in attr.g.node for o in n.output}
            names += [i for n in attr.g.node for i in n.input if i and i not in inner]
    return names


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Nodes in an order where every input is produced before use (ONNX requires it; the parts interleave)."""
    producers: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            producers[out] = i
    inputs = [list(node.input) + _subgraph_inputs(node) for node in nodes]
    order: list[Any] = []
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, iter(inputs[root]))]
        state[root] = 1
        while stack:  # iterative depth-first search: the graphs are thousands of nodes deep
            i, pending = stack[-1]
            for name in pending:
                j = producers.get(name)
                if name and name not in available and j is not None and state[j] == 0:
                    state[j] = 1
                    stack.append((j, iter(inputs[j])))
                    break
            else:
                stack.pop()
                state[i] = 2
                order.append(nodes[i])
    return order


# The paper's ablation switches (Table 2) with the only values the graph implements: RoIAlign and the per-class
# sigmoid FCN mask head. Every other config value (both frameworks' conventions, every layout) is read by the graph.
_GRAPH_SWITCHES: dict[str, Any] = {
    "model.roi_pooler.type": "align", "model.mask_head.type": "fcn", "model.mask_head.loss": "sigmoid",
    "model.mask_head.class_agnostic": False,
}


def _check_switches(cfg: Config) -> None:
    """Raise NotImplementedError naming every ablation switch whose value the exported graph would not reproduce."""
    data = cfg.to_dict()
    bad = []
    for key, want in _GRAPH_SWITCHES.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part, want) if isinstance(node, dict) else want
        if node != want:
            bad.append(f"{key}={node!r}")
    if bad:
        raise NotImplementedError(f"the ONNX export implements RoIAlign and the per-class sigmoid FCN mask head; "
                                  f"this model has {', '.join(bad)} (not exported)")


def export_onnx(model: Any, path: str | Path, opset: int = DEFAULT_OPSET, source: str = "") -> Path:
    """Write ``model`` (a MaskRCNN, in eval mode, its config's test-time settings) as one ONNX graph to ``path``.

    Input ``image``: (H, W, 3) uint8 RGB, any size; optional ``score_threshold``: () float32. Outputs ``boxes``
    (N, 4) float32 XYXY input-image pixels, ``scores`` (N,), ``labels`` (N,) int64 in 1..K, ``masks`` (N, H, W)
    uint8 in {0, 1} with a mask head, ``keypoints`` (N, K, 3) float32 [x, y (input pixels), score] with a keypoint
    head. Every layout (FPN, C4, DC5) and both frameworks' conventions export: the graph reads them off the config.
    The class names, category ids and the full config are in the file's metadata.
    """
    onnx, helper, numpy_helper = _need_onnx()
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the exported graph needs opset {MIN_OPSET} or newer")
    model = getattr(model, "model", model)  # a Predictor facade holds the nn.Module as .model
    cfg: Config = model.cfg
    _check_switches(cfg)
    # The naive path in float32 on the CPU: the fast path's fused kernels, channels-last and autocast are
    # runtime choices of PyTorch, not part of the model.
    work = copy.deepcopy(model).cpu().float().eval()
    work.optimize(False)
    net_proto, branches = _export_networks(work, opset)
    net_graph = net_proto.graph
    ac = cfg.model.anchors
    single = work.backbone.fpn is None  # C4 and DC5: one feature level carries every anchor size
    n_levels = 1 if single else len(ac.sizes)
    outs = [o.name for o in net_graph.output]
    nets: dict[str, Any] = {
        "x": "x", "box_feats": "box_feats", "features": outs[:n_levels], "logits": outs[n_levels:2 * n_levels],
        "deltas": outs[2 * n_levels:3 * n_levels], "class_logits": outs[3 * n_levels],
        "class_deltas": outs[3 * n_levels + 1]}
    for i, branch in enumerate(branches):
        nets[f"{branch}_feats"] = f"{branch}_feats"
        nets[f"{branch}_logits"] = outs[3 * n_levels + 2 + i]
    from maskrcnn.modeling.anchors import cell_anchors  # noqa: PLC0415

    sizes = [tuple(ac.sizes)] if single else list(ac.sizes)
    compute = torch.float64 if ac.cell_dtype == "float64" else None
    bases = [cell_anchors(s, tuple(ac.aspect_ratios), ac.round_base, compute_dtype=compute,
                          size_major=ac.size_major).numpy() for s in sizes]
    g = _Builder()
    # The model's buffers, which are what its normalize() uses (they start as the config's values).
    stats = (work.pixel_mean.numpy(), work.pixel_std.numpy())
    out = _glue(g, cfg, nets, work.backbone.out_channels, bases, stats, opset)
    # The public output names.
    for name in OUTPUT_NAMES:
        if name in out:
            g.nodes.append(helper.make_node("Identity", [out[name]], [name], name=g.fresh(f"n_out_{name}")))
    threshold = numpy_helper.from_array(np.asarray(cfg.model.box_head.score_thresh, np.float32), "score_threshold")
    inputs = [helper.make_tensor_value_info("image", onnx.TensorProto.UINT8, ["height", "width", 3]),
              helper.make_tensor_value_info("score_threshold", onnx.TensorProto.FLOAT, [])]
    outputs = [helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, ["detections", 4]),
               helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["detections"]),
               helper.make_tensor_value_info("labels", onnx.TensorProto.INT64, ["detections"])]
    if "masks" in out:
        outputs.append(helper.make_tensor_value_info("masks", onnx.TensorProto.UINT8,
                                                     ["detections", "height", "width"]))
    if "keypoints" in out:
        outputs.append(helper.make_tensor_value_info("keypoints", onnx.TensorProto.FLOAT,
                                                     ["detections", cfg.model.keypoint_head.num_keypoints, 3]))
    available = {"image", "score_threshold"} | {t.name for t in net_graph.initializer} | {
        t.name for t in g.initializers}
    nodes = _toposort(list(g.nodes) + list(net_graph.node), available)
    graph = helper.make_graph(nodes, "maskrcnn", inputs, outputs,
                              initializer=[threshold, *g.initializers, *net_graph.initializer])
    proto = helper.make_model(graph, opset_imports=list(net_proto.opset_import), producer_name="maskrcnn",
                              producer_version=_version())
    proto.functions.extend(net_proto.functions)
    proto.ir_version = net_proto.ir_version
    meta = {META_FORMAT: FORMAT_VERSION, META_CONFIG: json.dumps(cfg.to_dict()),
            META_CLASS_NAMES: json.dumps(list(cfg.model.class_names)),
            META_CATEGORY_IDS: json.dumps(list(cfg.model.category_ids)), META_SOURCE: str(source)}
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(path)
    return path


def _version() -> str:
    from maskrcnn import __version__  # noqa: PLC0415

    return __version__


# ---------------------------------------------------------------------------------------------------------------
# The onnxruntime runner


def _to_hwc_uint8(image: Any) -> np.ndarray:
    """Any image :func:`maskrcnn.io.to_chw_tensor` accepts (a path, HWC/CHW array or tensor) -> (H, W, 3) uint8 RGB.

    Float images in [0, 1] are scaled by 255 and rounded (exact for images that came from uint8).
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    from maskrcnn.io import to_chw_tensor  # noqa: PLC0415

    chw = to_chw_tensor(image)
    if chw.dtype != torch.uint8:
        chw = (chw.to(torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(chw.permute(1, 2, 0).cpu().numpy())


class OnnxModel:
    """An exported ``.onnx`` file run by onnxruntime, with the PyTorch model's ``predict``/``detect`` interface.

    ``cfg`` is the exported config (from the file's metadata); results carry its class names and category ids.
    """

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None) -> None:
        """Open ``path``; ``threads`` caps onnxruntime's intra-op threads (default: its own choice)."""
        try:
            import onnxruntime as ort  # noqa: PLC0415
        except ImportError as e:
            raise ImportError("running .onnx files needs onnxruntime: pip install 'maskrcnn[onnx]'") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        # The overridable score_threshold input has an initializer as its default, which onnxruntime warns about.
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers or
                                                                                  ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise ValueError(f"{path}: cannot load as an ONNX model ({type(e).__name__}: {e})") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_CONFIG not in meta:
            raise ValueError(f"{path}: not exported by maskrcnn (no {META_CONFIG!r} in its metadata)")
        self.cfg = Config.from_dict(json.loads(meta[META_CONFIG]))
        self.path = path
        self.source = meta.get(META_SOURCE, "")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.training = False

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r})"

    @property
    def device(self) -> torch.device:
        """Results come back on the CPU."""
        return torch.device("cpu")

    def eval(self) -> OnnxModel:
        """No-op (inference only); returns self."""
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        """Only inference exists here; ``train(True)`` raises."""
        if mode:
            raise RuntimeError("an ONNX model cannot be trained; load the PyTorch weights instead")
        return self

    def infer(self, image: np.ndarray, score_threshold: float | None = None) -> dict[str, np.ndarray]:
        """One (H, W, 3) uint8 RGB image -> the graph's outputs as numpy arrays (boxes, scores, labels[, masks]
        [, keypoints])."""
        feeds: dict[str, Any] = {"image": image}
        if score_threshold is not None:
            feeds["score_threshold"] = np.asarray(score_threshold, dtype=np.float32)
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def detect(self, images: list[Tensor], score_threshold: float | None = None, soft_masks: bool = False,
               **_: Any) -> list[dict[str, Any]]:
        """(3, H, W) uint8 or float [0, 1] RGB images -> per image boxes (D, 4) XYXY input pixels, scores, labels,
        masks (D, H, W) bool, keypoints (D, K, 3): the interface :class:`maskrcnn.predict.Predictor` drives."""
        if soft_masks:
            raise ValueError("an exported ONNX model outputs binary masks only; soft_masks needs the PyTorch model")
        out = []
        for img in images:
            arrays = self.infer(_to_hwc_uint8(img), score_threshold)
            det: dict[str, Any] = {"boxes": torch.from_numpy(arrays["boxes"]),
                                   "scores": torch.from_numpy(arrays["scores"]),
                                   "labels": torch.from_numpy(arrays["labels"])}
            if "masks" in arrays:
                det["masks"] = torch.from_numpy(arrays["masks"]).bool()
            if "keypoints" in arrays:
                det["keypoints"] = torch.from_numpy(arrays["keypoints"])
            out.append(det)
        return out

    def predict(self, images: Any, score_threshold: float | None = None, batch_size: int = 1,
                soft_masks: bool = False) -> list[Result]:
        """Paths, arrays or tensors (RGB) -> one Result per image, like ``MaskRCNN.predict`` (one at a time)."""
        single = isinstance(images, (str, Path, np.ndarray, Tensor))
        items = [images] if single else list(images)
        kh = self.cfg.model.keypoint_head
        keypoint_meta = {"keypoint_names_table": tuple(kh.names), "skeleton_table": tuple(kh.skeleton),
                         "keypoint_threshold": kh.draw_threshold, "keypoint_offset": kh.coco_offset}
        results = []
        for src in items:
            if isinstance(src, (str, Path)):
                from maskrcnn.io import read_image  # noqa: PLC0415

                array = read_image(src)
            else:
                array = _to_hwc_uint8(src)
            det = self.detect([array], score_threshold, soft_masks)[0]
            results.append(Result(boxes=det["boxes"], scores=det["scores"], labels=det["labels"],
                                  masks=det.get("masks"), image_size=(int(array.shape[0]), int(array.shape[1])),
                                  class_names_table=tuple(self.cfg.model.class_names),
                                  category_ids_table=tuple(self.cfg.model.category_ids),
                                  image_path=str(src) if isinstance(src, (str, Path)) else None,
                                  keypoints=det.get("keypoints"), **keypoint_meta))
        return results


# Settings fixed inside an exported graph: load_model's overrides of them cannot apply to an .onnx file.
_BAKED = ("min_size", "max_size", "nms_threshold", "detections_per_img")


def load_onnx(path: str | Path, config: Config | None = None, optimize: bool = True, fast_math: bool = False,
              compile: bool = False, amp: str = "none", **overrides: Any) -> Any:
    """``load_model`` for an ``.onnx`` file: a :class:`~maskrcnn.predict.Predictor` over an :class:`OnnxModel`.

    ``score_threshold`` becomes the Predictor's default; ``device`` may only be "cpu" or "auto" (onnxruntime's CPU
    provider). Settings baked into the graph and the PyTorch speed options (``fast_math``, ``compile``, ``amp``)
    raise ValueError naming the file.
    """
    from maskrcnn.predict import Predictor  # noqa: PLC0415

    baked = [k for k in _BAKED if overrides.get(k) is not None]
    if config is not None:
        baked.append("config")
    if baked:
        raise ValueError(f"{path}: {', '.join(baked)} are fixed inside an exported ONNX graph; export again with "
                         f"them (maskrcnn export --help) or load the PyTorch weights")
    if fast_math or compile or amp != "none":
        raise ValueError(f"{path}: fast_math, compile and amp are PyTorch options; an ONNX graph runs as exported")
    device = overrides.pop("device", None)
    if device not in (None, "cpu", "auto") and str(device) != "cpu":
        raise ValueError(f"{path}: device {device!r}: an ONNX model runs on onnxruntime's CPU provider here")
    unknown = sorted(k for k in overrides if k not in (*_BAKED, "score_threshold"))
    if unknown:
        raise ValueError(f"unknown load_model options: {', '.join(unknown)}")
    return Predictor(OnnxModel(path), score_threshold=overrides.get("score_threshold"))
