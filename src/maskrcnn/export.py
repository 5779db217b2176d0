"""ONNX export of the whole inference pipeline, and the onnxruntime runner that reads it back.

``export_onnx(model, "model.onnx")`` writes one graph: an RGB uint8 image (H, W, 3) of any size goes in;
resizing, normalising, backbone, FPN, RPN (anchors, top-k, NMS), RoI heads (RoiAlign, NMS) and the pasting of
masks into the image all run inside it; boxes (N, 4) XYXY input pixels, scores (N,), labels (N,) int64 and masks
(N, H, W) uint8 come out. An optional input ``score_threshold`` (float scalar) replaces the box head's minimum
score for one call; its default is the exported config's.

The convolutional networks (ResNet + FPN + RPN head, box head, mask head) are exported by ``torch.onnx``'s
dynamo exporter as one graph with three inputs. Everything between them is written here directly in standard
ONNX ops (opset 18): ``Resize``, ``TopK``, ``NonMaxSuppression``, ``RoiAlign``, ``MatMul`` for the paste. That
keeps every data-dependent size (detections, proposals after NMS, the resized image) out of the tracer, which
is what breaks other exports at other image sizes or at zero detections, and lets other runtimes run the file.

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
OUTPUT_NAMES = ("boxes", "scores", "labels", "masks")
# Internal value holding the RPN's proposals (P, 4) XYXY resized-image pixels.
PROPOSALS = "rpn_proposals"
# torchvision's and detectron2's pooler: RoIs of sqrt(area) 224 px come from P4, clamped to P2..P5; the 1e-6
# is torchvision's LevelMapper epsilon.
CANONICAL_SCALE = 224.0
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6
POOLER_LEVELS = (2, 3, 4, 5)


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
    """The model's learned parts as one module with three independent inputs (the export's unit).

    x (1, 3, Hp, Wp) normalised padded image -> P2..P6, RPN logits and deltas per level;
    box_feats (R, C, 7, 7) -> class logits (R, K+1), box deltas (R, 4(K+1));
    mask_feats (D, C, 14, 14) -> mask logits (D, K+1, 28, 28).
    """

    def __init__(self, model: nn.Module) -> None:
        """Shares the submodules of ``model`` (a MaskRCNN on its naive path)."""
        super().__init__()
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        heads = model.roi_heads
        self.box_head = heads.box_head
        self.box_predictor = heads.box_predictor
        self.mask_head = heads.mask_head
        self.mask_predictor = heads.mask_predictor

    def forward(self, x: Tensor, box_feats: Tensor, mask_feats: Tensor | None = None) -> tuple[Tensor, ...]:
        """Outputs: 5 feature maps, 5 objectness maps, 5 delta maps, class logits, deltas[, mask logits]."""
        feats = list(self.backbone(x).values())
        logits, deltas = self.rpn_head(feats)
        cls, reg = self.box_predictor(self.box_head(box_feats))
        out = [*feats, *logits, *deltas, cls, reg]
        if self.mask_head is not None and mask_feats is not None:
            out.append(self.mask_predictor(self.mask_head(mask_feats)))
        return tuple(out)


def _export_networks(model: nn.Module, opset: int) -> Any:
    """ModelProto of :class:`_Networks` with dynamic image size and RoI counts (weights inside)."""
    nets = _Networks(model).eval()
    c = model.backbone.out_channels
    bh, mh = model.cfg.model.box_head, model.cfg.model.mask_head
    x = torch.zeros(1, 3, 64 * 5, 64 * 7)
    box_feats = torch.zeros(3, c, bh.pooler_resolution, bh.pooler_resolution)
    args: tuple[Tensor, ...] = (x, box_feats)
    h, w = torch.export.Dim("h32", min=1, max=4096), torch.export.Dim("w32", min=1, max=4096)
    stride = int(model.cfg.input.size_divisible)
    shapes: list[dict[int, Any]] = [{2: stride * h, 3: stride * w}, {0: torch.export.Dim("rois", min=1)}]
    names = ["x", "box_feats"]
    if nets.mask_head is not None:
        args = args + (torch.zeros(2, c, mh.pooler_resolution, mh.pooler_resolution),)
        shapes.append({0: torch.export.Dim("dets", min=1)})
        names.append("mask_feats")
    with torch.no_grad():
        program = torch.onnx.export(nets, args, dynamo=True, opset_version=opset, input_names=names,
                                    dynamic_shapes=tuple(shapes), optimize=True, verbose=False)
    return program.model_proto


# ---------------------------------------------------------------------------------------------------------------
# The glue, written in ONNX


class _Builder:
    """Appends ONNX nodes with fresh value names; constants become initializers."""

    def __init__(self, prefix: str = "mrcnn/") -> None:
        _, self.helper, self.numpy_helper = _need_onnx()
        self.prefix = prefix
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

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


def _min_size_keep(g: _Builder, boxes: str, min_size: float) -> str:
    """(N,) bool: width and height of (N, 4) boxes both >= ``min_size`` pixels."""
    x1, y1, x2, y2 = g.columns(boxes)
    ms = g.f32(min_size)
    keep = g.op("And", g.op("GreaterOrEqual", g.op("Sub", x2, x1), ms), g.op("GreaterOrEqual", g.op("Sub", y2, y1), ms))
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


def _multiscale_roi_align(g: _Builder, feats: list[str], rois: str, output_size: int, sampling_ratio: int,
                          aligned: bool, channels: int) -> str:
    """(R, 4) XYXY boxes in padded-image pixels -> (R, C, S, S) features, each RoI pooled from its FPN level.

    ONNX RoiAlign: "output_half_pixel" is torchvision's ``aligned=False``, "half_pixel" its ``aligned=True``.
    The level scales are fixed at 1/4 .. 1/32: the PyTorch pooler infers the same powers of two from the map
    sizes for every image the resize lets through.
    """
    x1, y1, x2, y2 = g.columns(rois)
    area = g.op("Mul", g.op("Sub", x2, x1), g.op("Sub", y2, y1))
    scale = g.op("Div", g.op("Sqrt", area), g.f32(CANONICAL_SCALE))
    log2 = g.op("Div", g.op("Log", scale), g.f32(math.log(2.0)))
    target = g.op("Floor", g.op("Add", g.op("Add", g.f32(float(CANONICAL_LEVEL)), log2), g.f32(LEVEL_EPS)))
    target = g.op("Clip", target, g.f32(float(POOLER_LEVELS[0])), g.f32(float(POOLER_LEVELS[-1])))
    levels = g.op("Squeeze", g.op("Sub", g.to_int64(target), g.i64(POOLER_LEVELS[0])), g.i64([1]))
    n = g.dim(rois, 0)
    batch_idx = g.op("ConstantOfShape", n, value=g.numpy_helper.from_array(np.zeros(1, np.int64)))
    mode = "half_pixel" if aligned else "output_half_pixel"
    picked, pooled = [], []
    for i, (feat, level) in enumerate(zip(feats, POOLER_LEVELS)):  # a loop over the 4 pooled levels
        idx = g.op("Squeeze", g.op("NonZero", g.op("Equal", levels, g.i64(i))), g.i64([0]))
        pooled.append(g.op("RoiAlign", feat, g.op("Gather", rois, idx, axis=0), g.op("Gather", batch_idx, idx, axis=0),
                           mode="avg", output_height=output_size, output_width=output_size,
                           sampling_ratio=sampling_ratio, spatial_scale=float(2.0 ** -level),
                           coordinate_transformation_mode=mode))
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
                  threshold: float) -> str:
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
    return g.op("Cast", g.op("Greater", pasted, g.f32(threshold)), to=2)


def _paste_grid_sample(g: _Builder, probs: str, boxes: str, height: str, width: str, threshold: float,
                       opset: int) -> str:
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
    return g.op("Cast", g.op("Greater", g.op("Squeeze", sampled, g.i64([1])), g.f32(threshold)), to=2)


def _glue(g: _Builder, cfg: Config, nets: dict[str, Any], channels: int, num_anchors: int,
          cell_anchors: list[np.ndarray], opset: int) -> dict[str, str]:
    """Write the whole pipeline around the network graph's inputs and outputs; returns the output names."""
    inp, m = cfg.input, cfg.model
    image = "image"
    # -- preprocessing: uint8 HWC -> normalised, resized, padded (1, 3, Hp, Wp), as MaskRCNN.preprocess.
    height = g.scalar(g.dim(image, 0))
    width = g.scalar(g.dim(image, 1))
    x = g.op("Unsqueeze", g.op("Transpose", g.to_float(image), perm=[2, 0, 1]), g.i64([0]))
    x = g.op("Div", x, g.f32(255.0))
    if inp.pixel_format == "bgr255":
        x = g.op("Mul", g.op("Gather", x, g.i64([2, 1, 0]), axis=1), g.f32(255.0))
    mean = g.f32(np.asarray(inp.pixel_mean, np.float32).reshape(1, 3, 1, 1))
    std = g.f32(np.asarray(inp.pixel_std, np.float32).reshape(1, 3, 1, 1))
    x = g.op("Div", g.op("Sub", x, mean), std)
    # The scale in double precision, as resize_scale computes it with Python floats: a float32 division can land
    # just under a whole size and lose a row.
    hd, wd = g.op("Cast", height, to=11), g.op("Cast", width, to=11)
    scale = g.op("Min", g.op("Div", g.const(float(inp.min_size_test), np.float64), g.op("Min", hd, wd)),
                 g.op("Div", g.const(float(inp.max_size_test), np.float64), g.op("Max", hd, wd)))
    new_h = g.op("Max", g.to_int64(g.op("Floor", g.op("Mul", hd, scale))), g.i64(1))
    new_w = g.op("Max", g.to_int64(g.op("Floor", g.op("Mul", wd, scale))), g.i64(1))
    vec = g.i64([1])
    new_h1, new_w1 = g.op("Reshape", new_h, vec), g.op("Reshape", new_w, vec)
    sizes = g.op("Concat", g.i64([1, 3]), new_h1, new_w1, axis=0)
    x = g.op("Resize", x, "", "", sizes, mode="linear", coordinate_transformation_mode="half_pixel")
    stride = int(inp.size_divisible)
    pad_h = g.op("Mul", g.op("Div", g.op("Add", new_h1, g.i64(stride - 1)), g.i64(stride)), g.i64(stride))
    pad_w = g.op("Mul", g.op("Div", g.op("Add", new_w1, g.i64(stride - 1)), g.i64(stride)), g.i64(stride))
    pads = g.op("Concat", g.i64([0, 0, 0, 0, 0, 0]), g.op("Sub", pad_h, new_h1), g.op("Sub", pad_w, new_w1), axis=0)
    g.nodes.append(g.helper.make_node("Pad", [x, pads], [nets["x"]], name=g.fresh("n_Pad")))
    limits = g.to_float(g.op("Concat", new_w1, new_h1, new_w1, new_h1, axis=0))

    # -- RPN: anchors, per-level top-k, decode, clip, small-box and score filters, NMS per level.
    rpn = m.rpn
    boxes_l, scores_l, levels_l = [], [], []
    for lvl in range(len(nets["features"])):  # a loop over the 5 FPN levels
        feat, logits, deltas = nets["features"][lvl], nets["logits"][lvl], nets["deltas"][lvl]
        gh, gw = g.dim(feat, 2), g.dim(feat, 3)
        sh = g.op("Div", pad_h, gh)
        sw = g.op("Div", pad_w, gw)
        xs = g.to_float(g.op("Mul", g.op("Range", g.i64(0), g.scalar(gw), g.i64(1)), sw))
        ys = g.to_float(g.op("Mul", g.op("Range", g.i64(0), g.scalar(gh), g.i64(1)), sh))
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
    boxes = _clip(g, g.op("Concat", *boxes_l, axis=0), limits)
    probs = g.op("Sigmoid", g.op("Concat", *scores_l, axis=0))
    levels = g.op("Concat", *levels_l, axis=0)
    keep = g.op("And", _min_size_keep(g, boxes, rpn.min_box_size),
                g.op("GreaterOrEqual", probs, g.f32(rpn.score_thresh)))
    boxes, probs, levels = (g.op("Compress", t, keep, axis=0) for t in (boxes, probs, levels))
    keep = _batched_nms(g, boxes, probs, levels, rpn.nms_thresh, rpn.post_nms_top_n_test)
    proposals = g.op("Gather", boxes, keep, axis=0)
    # A fixed name, so that tools (and the parity test) can expose the proposals as an output.
    g.nodes.append(g.helper.make_node("Identity", [proposals], [PROPOSALS], name=g.fresh("n_Identity")))
    proposals = PROPOSALS

    # -- box head: pool, (networks), softmax, decode per class, filters, NMS per class, top detections.
    bh = m.box_head
    pooled = _multiscale_roi_align(g, nets["features"][:4], proposals, bh.pooler_resolution,
                                   bh.pooler_sampling_ratio, bh.pooler_aligned, channels)
    g.nodes.append(g.helper.make_node("Identity", [pooled], [nets["box_feats"]], name=g.fresh("n_Identity")))
    k1 = m.num_classes + 1
    codes = g.op("Reshape", nets["class_deltas"], g.i64([-1, k1, 4]))
    pred = _decode(g, codes, g.op("Unsqueeze", proposals, g.i64([1])), bh.bbox_reg_weights,
                   float(np.log(1000.0 / 16)))
    pred = _clip(g, pred, limits)
    scores = g.op("Softmax", nets["class_logits"], axis=-1)
    # Column 0 is background.
    pred = g.op("Reshape", g.op("Slice", pred, g.i64([1]), g.i64([k1]), g.i64([1])), g.i64([-1, 4]))
    scores = g.op("Slice", scores, g.i64([1]), g.i64([k1]), g.i64([1]))
    labels = g.op("Reshape", g.op("Expand", g.i64(np.arange(1, k1)[None]), g.op("Shape", scores)), g.i64([-1]))
    scores = g.op("Reshape", scores, g.i64([-1]))
    keep = g.op("And", g.op("Greater", scores, "score_threshold"), _min_size_keep(g, pred, bh.min_box_size))
    pred, scores, labels = (g.op("Compress", t, keep, axis=0) for t in (pred, scores, labels))
    keep = _batched_nms(g, pred, scores, labels, bh.nms_thresh, bh.detections_per_img)
    det_boxes = g.op("Gather", pred, keep, axis=0)
    det_labels = g.op("Gather", labels, keep, axis=0)
    outputs = {"scores": g.op("Gather", scores, keep, axis=0), "labels": det_labels}
    # Back to input pixels, as resize_boxes does (float32 ratios).
    rw = g.op("Div", g.to_float(width), g.to_float(new_w))
    rh = g.op("Div", g.to_float(height), g.to_float(new_h))
    ratios = g.op("Concat", *(g.op("Reshape", r, vec) for r in (rw, rh, rw, rh)), axis=0)
    in_boxes = g.op("Mul", det_boxes, ratios)
    outputs["boxes"] = in_boxes

    # -- mask head: pool at the detections, (networks), the predicted class's channel, sigmoid, paste.
    mh = m.mask_head
    if mh.enabled:
        pooled = _multiscale_roi_align(g, nets["features"][:4], det_boxes, mh.pooler_resolution,
                                       mh.pooler_sampling_ratio, mh.pooler_aligned, channels)
        g.nodes.append(g.helper.make_node("Identity", [pooled], [nets["mask_feats"]], name=g.fresh("n_Identity")))
        logits = nets["mask_logits"]
        res = 2 * mh.pooler_resolution
        index_shape = g.op("Concat", g.op("Shape", det_labels), g.i64([1, res, res]), axis=0)
        index = g.op("Expand", g.op("Reshape", det_labels, g.i64([-1, 1, 1, 1])), index_shape)
        probs = g.op("Sigmoid", g.op("GatherElements", logits, index, axis=1))  # (D, 1, M, M)
        if mh.paste_mode == "legacy":
            outputs["masks"] = _paste_legacy(g, probs, in_boxes, height, width, res, mh.paste_padding,
                                             mh.mask_threshold)
        else:
            outputs["masks"] = _paste_grid_sample(g, probs, in_boxes, height, width, mh.mask_threshold, opset)
    return outputs


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Nodes in an order where every input is produced before use (ONNX requires it; the parts interleave)."""
    producers: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            producers[out] = i
    order: list[Any] = []
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, iter(nodes[root].input))]
        state[root] = 1
        while stack:  # iterative depth-first search: the graphs are thousands of nodes deep
            i, pending = stack[-1]
            for name in pending:
                j = producers.get(name)
                if name and name not in available and j is not None and state[j] == 0:
                    state[j] = 1
                    stack.append((j, iter(nodes[j].input)))
                    break
            else:
                stack.pop()
                state[i] = 2
                order.append(nodes[i])
    return order


# Config values whose behaviour the ONNX glue implements only in torchvision's form (the value given here).
# detectron2's conventions (Pillow resize, anchor offsets, logit ranking, C4 layout, ...) are not exported yet.
_GRAPH_CONVENTIONS: dict[str, Any] = {
    "input.resize_mode": "bilinear", "model.background": "first", "model.backbone.layout": "fpn",
    "model.anchors.offset": 0.0, "model.anchors.cell_dtype": "float32", "model.anchors.size_major": False,
    "model.rpn.sigmoid_scores": True, "model.rpn.min_size_inclusive": True, "model.rpn.drop_non_finite": False,
    "model.box_head.pooler_level_eps": LEVEL_EPS, "model.box_head.pooler_eps_inside_log": False,
    "model.box_head.drop_non_finite": False, "model.box_head.clip_to_input": False,
    "model.mask_head.mask_threshold_inclusive": False,
    # The paper's ablation switches (Table 2): the graph has RoIAlign and the per-class sigmoid FCN mask head only.
    "model.roi_pooler.type": "align", "model.mask_head.type": "fcn", "model.mask_head.loss": "sigmoid",
    "model.mask_head.class_agnostic": False,
    # The graph has no keypoint branch yet: a Keypoint R-CNN would export without its keypoints.
    "model.keypoint_head.enabled": False,
}


def _check_conventions(cfg: Config) -> None:
    """Raise NotImplementedError naming every config value the exported graph would not reproduce."""
    data = cfg.to_dict()
    bad = []
    for key, want in _GRAPH_CONVENTIONS.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part, want) if isinstance(node, dict) else want
        if node != want:
            bad.append(f"{key}={node!r}")
    if data["model"]["box_head"].get("min_box_size", 0.0) is None:
        bad.append("model.box_head.min_box_size=None")
    if bad:
        raise NotImplementedError(f"the ONNX export implements torchvision's conventions; this model has "
                                  f"{', '.join(bad)} (not exported yet)")


def export_onnx(model: Any, path: str | Path, opset: int = DEFAULT_OPSET, source: str = "") -> Path:
    """Write ``model`` (a MaskRCNN, in eval mode, its config's test-time settings) as one ONNX graph to ``path``.

    Input ``image``: (H, W, 3) uint8 RGB, any size; optional ``score_threshold``: () float32. Outputs ``boxes``
    (N, 4) float32 XYXY input-image pixels, ``scores`` (N,), ``labels`` (N,) int64 in 1..K, ``masks`` (N, H, W)
    uint8 in {0, 1}. The class names, category ids and the full config are in the file's metadata.
    """
    onnx, helper, numpy_helper = _need_onnx()
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the exported graph needs opset {MIN_OPSET} or newer")
    model = getattr(model, "model", model)  # a Predictor facade holds the nn.Module as .model
    cfg: Config = model.cfg
    _check_conventions(cfg)
    # The naive path in float32 on the CPU: the fast path's fused kernels, channels-last and autocast are
    # runtime choices of PyTorch, not part of the model.
    work = copy.deepcopy(model).cpu().float().eval()
    work.optimize(False)
    net_proto = _export_networks(work, opset)
    net_graph = net_proto.graph
    n_levels = len(cfg.model.anchors.sizes)
    outs = [o.name for o in net_graph.output]
    nets: dict[str, Any] = {
        "x": "x", "box_feats": "box_feats", "mask_feats": "mask_feats",
        "features": outs[:n_levels], "logits": outs[n_levels:2 * n_levels],
        "deltas": outs[2 * n_levels:3 * n_levels], "class_logits": outs[3 * n_levels],
        "class_deltas": outs[3 * n_levels + 1],
        "mask_logits": outs[3 * n_levels + 2] if cfg.model.mask_head.enabled else None,
    }
    from maskrcnn.modeling.anchors import cell_anchors  # noqa: PLC0415

    ac = cfg.model.anchors
    bases = [cell_anchors(s, tuple(ac.aspect_ratios), ac.round_base).numpy() for s in ac.sizes]
    g = _Builder()
    out = _glue(g, cfg, nets, work.backbone.out_channels, len(ac.aspect_ratios), bases, opset)
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
        """One (H, W, 3) uint8 RGB image -> the graph's outputs as numpy arrays (boxes, scores, labels, masks)."""
        feeds: dict[str, Any] = {"image": image}
        if score_threshold is not None:
            feeds["score_threshold"] = np.asarray(score_threshold, dtype=np.float32)
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def detect(self, images: list[Tensor], score_threshold: float | None = None, soft_masks: bool = False,
               **_: Any) -> list[dict[str, Any]]:
        """(3, H, W) uint8 or float [0, 1] RGB images -> per image boxes (D, 4) XYXY input pixels, scores, labels,
        masks (D, H, W) bool: the interface :class:`maskrcnn.predict.Predictor` drives."""
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
            out.append(det)
        return out

    def predict(self, images: Any, score_threshold: float | None = None, batch_size: int = 1,
                soft_masks: bool = False) -> list[Result]:
        """Paths, arrays or tensors (RGB) -> one Result per image, like ``MaskRCNN.predict`` (one at a time)."""
        single = isinstance(images, (str, Path, np.ndarray, Tensor))
        items = [images] if single else list(images)
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
                                  image_path=str(src) if isinstance(src, (str, Path)) else None))
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
