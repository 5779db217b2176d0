"""The whole Mask R-CNN: preprocess (normalise, resize, pad) -> backbone+FPN -> RPN -> RoI heads -> results.

Inputs are RGB images in the user's pixel grid; results come back in that same grid (boxes in input-image
pixels, masks pasted at the input image's size).
"""

from __future__ import annotations

import math
import os
import shutil
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.config import Config
from maskrcnn.modeling.box_head import ConvFCHead
from maskrcnn.modeling.fpn import BackboneWithFPN
from maskrcnn.modeling.roi_heads import RoIHeads
from maskrcnn.modeling.rpn import RegionProposalNetwork
from maskrcnn.modeling.timing import stage
from maskrcnn.ops.fused import set_fast_path
from maskrcnn.ops.masks import paste_mask_crops, paste_masks, paste_masks_in_windows
from maskrcnn.ops.postprocess import detector_postprocess
from maskrcnn.ops.resize import resize_scale, resize_shortest_edge

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


# Inference precisions of ``MaskRCNN.optimize(amp=...)``: the autocast dtype of each (None: no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpp_compiler() -> str | None:
    """Path of the C++ compiler inductor would use on the CPU, or None."""
    cxx = os.environ.get("CXX")
    return shutil.which(cxx) if cxx else (shutil.which("g++") or shutil.which("clang++") or shutil.which("c++"))


def check_image(image: Tensor, index: int = 0) -> Tensor:
    """A (3, H, W) uint8 or floating-point RGB tensor, returned as is; anything else raises a clear error."""
    if not isinstance(image, Tensor):
        raise TypeError(f"image {index}: expected a (3, H, W) tensor, got {type(image).__name__} (the Predictor "
                        f"reads paths and arrays: maskrcnn.Predictor(model).predict(...))")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image {index}: expected shape (3, H, W), got {tuple(image.shape)}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"image {index}: unsupported dtype {image.dtype}; expected uint8 or floating point")
    return image


def as_uint8(image: Tensor) -> Tensor:
    """(3, H, W) uint8, or float RGB in [0, 1] rounded to uint8 (for resizes defined on 8-bit images)."""
    if image.dtype == torch.uint8:
        return image
    return image.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def resize_image(image: Tensor, min_size: float, max_size: float) -> Tensor:
    """Bilinear resize of a (C, H, W) float image by :func:`resize_scale` (torchvision's rounding)."""
    scale = resize_scale(image.shape[-2], image.shape[-1], min_size, max_size)
    return F.interpolate(image[None], size=None, scale_factor=scale, mode="bilinear",
                         recompute_scale_factor=True, align_corners=False)[0]


def resize_boxes(boxes: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale (N, 4) XYXY boxes from an image of ``original_size`` (H, W) to one of ``new_size``."""
    ratios = [torch.tensor(s, dtype=torch.float32, device=boxes.device)
              / torch.tensor(s_orig, dtype=torch.float32, device=boxes.device)
              for s, s_orig in zip(new_size, original_size)]
    ratio_h, ratio_w = ratios
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    return torch.stack((xmin * ratio_w, ymin * ratio_h, xmax * ratio_w, ymax * ratio_h), dim=1)


def resize_keypoints(keypoints: Tensor, original_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale x, y of (N, K, C>=2) keypoints from an image of ``original_size`` (H, W) to one of ``new_size``.

    The ratios are float32 quotients, as for :func:`resize_boxes` (torchvision's ``resize_keypoints``).
    """
    ratio_h, ratio_w = (torch.tensor(s, dtype=torch.float32, device=keypoints.device)
                        / torch.tensor(s_orig, dtype=torch.float32, device=keypoints.device)
                        for s, s_orig in zip(new_size, original_size))
    out = keypoints.clone()
    out[..., 0] *= ratio_w
    out[..., 1] *= ratio_h
    return out


class MaskRCNN(nn.Module):
    """Mask R-CNN (He et al. 2017): ResNet/ResNeXt with FPN, C4 or DC5 layout, in torchvision's module names.

    Tensors in, dicts of tensors out: ``forward(images, targets)`` returns the five losses in training mode and
    :meth:`detect`'s dicts in eval mode. Paths, arrays and :class:`~maskrcnn.Result` objects are the
    :class:`~maskrcnn.Predictor`'s business. Submodule names equal torchvision's, so its state dicts load unchanged.
    """

    def __init__(self, cfg: Config) -> None:
        """Build every stage from ``cfg.model``; preprocessing follows ``cfg.input``."""
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.backbone = BackboneWithFPN(m.backbone, m.fpn)
        self.rpn = RegionProposalNetwork(m.rpn, m.anchors, self.backbone.out_channels,
                                         num_levels=1 if self.backbone.fpn is None else len(m.anchors.sizes))
        self.roi_heads = RoIHeads(m, self.backbone.out_channels, self.backbone.pooled_levels)
        inp = cfg.input
        self.register_buffer("pixel_mean", torch.tensor(inp.pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(inp.pixel_std, dtype=torch.float32), persistent=False)
        # Test-time sizes are attributes so a loaded model can be retargeted without rebuilding it.
        self.min_size_test = inp.min_size_test
        self.max_size_test = inp.max_size_test
        self.fast = False
        self.fast_math = False
        self.channels_last = False
        # predict() batches images on accelerators only; see its docstring for the CPU measurement.
        self.batch_on_cpu = False
        self.amp = "none"
        # On by default; ``optimize(False)`` gives the naive path (same features and proposals, last-bit heads).
        self.optimize(True)

    def optimize(self, enabled: bool = True, fast_math: bool = False, compile: bool = False,
                 amp: str = "none") -> MaskRCNN:
        """Switch the fast path on (``load_model``'s default) or off (``enabled=False``: the naive path); returns self.

        The fast path keeps torchvision's arithmetic up to the RoI heads, so features and proposals stay bit
        for bit those of the naive path: norms, residual adds and ReLUs run in place on each conv's output, RoI
        features are written in place. In the RoI heads it takes the liberties whose effect stays far inside
        the parity tolerances (last-bit differences in scores and boxes): fully connected layers run on
        oneDNN's matmul instead of MKL's, conv towers (v2 box head, mask head) run channels-last with their
        norms folded, the mask head computes only the predicted class's logits, and masks are pasted per box
        window. In training, ``train.channels_last`` (off by default) runs the fast path's activations
        channels-last.

        ``fast_math`` (opt-in) also folds every norm into its conv, fuses bias + residual + ReLU into the oneDNN
        conv and runs the whole model channels-last: faster, but features then differ from torchvision's by
        ~1e-6 relative, which can move a box across a pixel boundary of the paste or reorder proposals with
        near-equal scores. Parameters and state-dict keys are unchanged by any of these switches.

        ``amp`` (opt-in) runs inference under autocast: "bf16" (CPUs with AVX512-BF16 or AMX run its convs
        ~2x faster than float32; also on GPUs) or "fp16" (GPUs only); it implies ``fast_math``. Heads' outputs
        are cast back to float32 before decoding, ranking and pasting; scores move by ~1e-2 (bench/README.md).

        ``compile`` (opt-in) runs the ResNet body and the FPN of inference (no autograd) through
        ``torch.compile`` (inductor), which fuses the norms and ReLUs around the convs: ~1e-5 relative
        differences in features, 5-15 s of compilation per new input shape (cached on disk), and 5-10% faster
        end to end on the CPU (bench/README.md has the figures).
        """
        if compile and self.device.type == "cpu" and not _cpp_compiler():
            raise RuntimeError("compile=True on the CPU needs a C++ compiler for torch.compile's inductor backend "
                               "(none of $CXX, g++, clang++, c++ found): install one, e.g. 'apt install g++', or "
                               "leave compile off")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        if amp != "none" and not enabled:
            raise ValueError(f"amp={amp!r} needs the fast path (enabled=True)")
        if amp == "fp16" and self.device.type == "cpu":
            raise ValueError("amp='fp16' on the CPU runs emulated half-precision convs (~100x slower than float32); "
                             "use amp='bf16' on the CPU, or fp16 on a GPU")
        self.amp = amp
        fast_math = fast_math or amp != "none"
        self.backbone.set_compiled(compile)
        self.fast = enabled
        self.fast_math = enabled and fast_math
        self.channels_last = self.fast_math
        set_fast_path(self, enabled, fold=self.fast_math)
        self.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        heads = self.roi_heads
        fmt = torch.channels_last if enabled else torch.contiguous_format
        if heads.mask_head is not None and heads.mask_roi_pool is not None and heads.mask_predictor is not None:
            set_fast_path(heads.mask_head, enabled, fold=enabled)
            heads.mask_head.to(memory_format=fmt)
            heads.mask_predictor.to(memory_format=fmt)
            # An MLP mask head flattens its input in NCHW order (as the MLP box head below).
            heads.mask_roi_pool.channels_last_output = enabled and self.cfg.model.mask_head.type == "fcn"
        # An MLP box head flattens its input in NCHW order; a conv head runs channels-last with folded norms
        # like the mask head.
        conv_box_head = isinstance(heads.box_head, ConvFCHead)
        if conv_box_head:
            set_fast_path(heads.box_head, enabled, fold=enabled)
            heads.box_head.to(memory_format=fmt)
        heads.box_roi_pool.channels_last_output = enabled and conv_box_head
        return self

    @property
    def compiled(self) -> bool:
        """Whether inference runs the backbone through ``torch.compile`` (see :meth:`optimize`)."""
        return self.backbone.compiled

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.parameters()).device

    # -- preprocessing ----------------------------------------------------------------------------------

    def to_float(self, image: Tensor) -> Tensor:
        """(3, H, W) uint8 or float RGB -> float [0, 1] RGB in the model's dtype (uint8 is divided by 255)."""
        dtype = self.pixel_mean.dtype
        if image.dtype == torch.uint8:
            return image.to(dtype).div(255)
        return image.to(dtype)

    def normalize(self, image: Tensor, channel: int | None = None) -> Tensor:
        """(3, H, W) uint8, or float RGB in [0, 1] -> normalised input in the configured pixel format.

        "bgr255" takes uint8 values as they are (no round trip through [0, 1], which would move them off the
        integers that detectron2 normalises). ``channel`` c gives only output channel c, (1, H, W), with the
        same values as ``normalize(image)[c:c + 1]``.
        """
        bgr = self.cfg.input.pixel_format == "bgr255"
        if channel is not None:
            # One plane, normalised in place on its own float copy: the same operations as below, element by
            # element, with one full-resolution float plane alive instead of three.
            src = image.shape[0] - 1 - channel if bgr else channel
            plane = image[src: src + 1].to(self.pixel_mean.dtype, copy=True)
            if image.dtype == torch.uint8 and not bgr:
                plane.div_(255)
            elif image.dtype != torch.uint8 and bgr:
                plane.mul_(255.0)
            mean = self.pixel_mean[channel: channel + 1].to(plane.dtype)
            std = self.pixel_std[channel: channel + 1].to(plane.dtype)
            return plane.sub_(mean[:, None, None]).div_(std[:, None, None])
        if bgr:
            dtype = self.pixel_mean.dtype
            image = image.to(dtype) if image.dtype == torch.uint8 else image.to(dtype) * 255.0
            if channel is None:
                image = image.flip(0)
        else:
            image = self.to_float(image)
        mean = self.pixel_mean.to(image.dtype)
        std = self.pixel_std.to(image.dtype)
        return (image - mean[:, None, None]) / std[:, None, None]

    def batch_images(self, images: list[Tensor]) -> Tensor:
        """Zero-pad (3, Hi, Wi) images into one (N, 3, H, W) batch, H and W rounded up to ``size_divisible`` (if > 0)."""
        stride = float(self.cfg.input.size_divisible)
        max_h = max(int(img.shape[-2]) for img in images)
        max_w = max(int(img.shape[-1]) for img in images)
        if stride > 0:  # 0: no rounding (detectron2's C4 and DC5 models)
            max_h = int(math.ceil(float(max_h) / stride) * stride)
            max_w = int(math.ceil(float(max_w) / stride) * stride)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        batch = torch.empty((len(images), images[0].shape[0], max_h, max_w), dtype=images[0].dtype,
                            device=images[0].device, memory_format=fmt).zero_()
        for i, img in enumerate(images):  # a loop over the images of a batch
            batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch

    def preprocess(self, images: list[Tensor], resize: bool) -> tuple[Tensor, list[tuple[int, int]]]:
        """(3, H, W) uint8 or float [0, 1] RGB images -> padded normalised batch and each image's (H, W) after resizing."""
        out = []
        for img in images:
            if resize and self.cfg.input.resize_mode == "pil":
                # detectron2 resizes the uint8 image (Pillow's antialiased bilinear filter), then normalises.
                img = resize_shortest_edge(as_uint8(img).permute(1, 2, 0), self.min_size_test,
                                           self.max_size_test).permute(2, 0, 1)
                out.append(self.normalize(img))
                continue
            if resize:
                # One channel at a time: the same values as normalising and resizing all three together (each
                # plane is interpolated on its own), with one full-resolution float plane in memory instead
                # of three (a 12000x9000 photo: 0.43 GB rather than 1.3 GB, twice over while normalising).
                img = torch.cat([resize_image(self.normalize(img, channel=c), self.min_size_test,
                                              self.max_size_test) for c in range(img.shape[0])])
            else:
                img = self.normalize(img)
            out.append(img)
        return self.batch_images(out), [(int(i.shape[-2]), int(i.shape[-1])) for i in out]

    # -- core ---------------------------------------------------------------------------------------------

    def run(self, batch: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None,
            generator: torch.Generator | None = None, score_thresh: float | None = None) -> dict[str, Any]:
        """Backbone, RPN and heads on a padded batch; returns features, proposals, detections and losses.

        Detections are in resized-image pixels (before mapping back to the input image).
        """
        if self.channels_last or (self.fast and self.training and torch.is_grad_enabled()
                                  and self.cfg.train.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self.backbone(batch)
        feats = list(features.values())
        with stage("rpn"):
            proposals, rpn_losses = self.rpn(feats, tuple(batch.shape[-2:]), image_sizes, targets, generator)
        pooled_from = features
        if self.fast and not self.channels_last and not torch.is_grad_enabled():
            # RoIAlign reads each pixel's C-vector, so it makes a channels-last copy of every level it pools from;
            # making it once here saves the mask pooler a second copy (a layout change: values are unchanged).
            with stage("box_head"), stage("box_head.roi_align"):
                pooled_from = OrderedDict((k, v.contiguous(memory_format=torch.channels_last)) if k != "pool"
                                          else (k, v) for k, v in features.items())
        detections, head_losses = self.roi_heads(pooled_from, proposals, image_sizes, targets, generator,
                                                 score_thresh)
        del pooled_from
        return {"features": features, "proposals": proposals, "detections": detections,
                "losses": {**rpn_losses, **head_losses}}

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor] | list[dict[str, Any]]:
        """Training: images already resized by the data pipeline, targets with boxes/labels/masks -> losses.

        images: (3, H, W) uint8 or float [0, 1] RGB tensors; targets: "boxes" (N, 4) XYXY pixels of that image,
        "labels" (N,) int64 in 1..K, "masks" (N, H, W) uint8 (with a mask head), "keypoints" (N, K, 3) float
        [x, y, visibility] in pixels of that image (with a keypoint head). In eval mode this is ``detect(images)``.
        """
        if not self.training:
            return self.detect(images)
        if targets is None:
            raise ValueError("training needs targets: a dict with boxes, labels and masks per image")
        dev = self.device
        imgs = [check_image(img, i).to(dev) for i, img in enumerate(images)]
        m = self.cfg.model
        tgts = []
        for i, t in enumerate(targets):
            boxes = t["boxes"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"target {i}: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
            tgt = {"boxes": boxes.to(dev, torch.float32), "labels": t["labels"].to(dev, torch.int64)}
            if m.mask_head.enabled:
                if "masks" not in t:
                    raise ValueError(f"target {i}: this model has a mask head and trains on 'masks' (N, H, W)")
                tgt["masks"] = t["masks"].to(dev)
            if m.keypoint_head.enabled:
                kps = t.get("keypoints")
                k = m.keypoint_head.num_keypoints
                if kps is None or kps.dim() != 3 or tuple(kps.shape[1:]) != (k, 3) or kps.shape[0] != boxes.shape[0]:
                    got = "none" if kps is None else tuple(kps.shape)
                    raise ValueError(f"target {i}: this model has a keypoint head and trains on 'keypoints' of shape "
                                     f"({boxes.shape[0]}, {k}, 3), got {got}")
                tgt["keypoints"] = kps.to(dev, torch.float32)
            tgts.append(tgt)
        with stage("transform"):
            batch, sizes = self.preprocess(imgs, resize=False)
        return self.run(batch, sizes, tgts, generator)["losses"]

    @torch.no_grad()
    def detect(self, images: list[Tensor], score_threshold: float | None = None, soft_masks: bool = False,
               keep_intermediates: bool = False) -> list[dict[str, Any]]:
        """(3, H, W) uint8 or float [0, 1] RGB images -> per image detections mapped to the input image.

        Each dict: boxes (D, 4) XYXY input pixels, scores (D,), labels (D,), masks (D, H, W) bool,
        optionally soft_masks (D, H, W) float; with a keypoint head keypoints (D, K, 3) [x, y, score] in input
        pixels (the score per ``model.keypoint_head.score_type``); with ``keep_intermediates`` also proposals
        (P, 4) and resized_boxes (D, 4) in resized-image pixels, mask_logits (D, M, M), keypoint_logits
        (D, K, m, m), features of the padded batch, and the resized sizes.
        """
        dev = self.device
        with stage("transform"):
            imgs = [check_image(img, i).to(dev) for i, img in enumerate(images)]
            batch, sizes = self.preprocess(imgs, resize=True)
        with torch.autocast(dev.type, dtype=AMP_DTYPES[self.amp] or torch.float32, enabled=self.amp != "none"):
            out = self.run(batch, sizes, score_thresh=score_threshold)
        if not keep_intermediates:
            del batch, out["features"]  # the feature maps are the largest tensors; free them before pasting
        mh = self.cfg.model.mask_head
        results = []
        for i, (det, img) in enumerate(zip(out["detections"], imgs)):
            orig = (int(img.shape[-2]), int(img.shape[-1]))
            kps = det.get("keypoints")
            if self.cfg.model.box_head.clip_to_input:
                # detectron2's detector_postprocess: scale, clip to the input, drop the boxes left empty.
                boxes, keep, kps = detector_postprocess(det["boxes"], sizes[i], orig, kps)
                det = {k: v[keep] for k, v in det.items()}
            else:
                boxes = resize_boxes(det["boxes"], sizes[i], orig)
                if kps is not None:
                    kps = resize_keypoints(kps, sizes[i], orig)
            r: dict[str, Any] = {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
            if kps is not None:
                # Columns 2 and 3 are the logit and the softmax score (see ops.keypoints.heatmaps_to_keypoints).
                col = 2 if self.cfg.model.keypoint_head.score_type == "logit" else 3
                r["keypoints"] = torch.stack([kps[..., 0], kps[..., 1], kps[..., col]], dim=-1)
            if "masks" in det:
                with stage("paste"):
                    if self.fast and not soft_masks:
                        # Binarised per box window and kept as windows: no (D, H, W) tensor at all, so memory
                        # grows with the detections rather than with the image (MaskCrops.dense() on request).
                        r["masks"] = paste_mask_crops(det["masks"], boxes, orig, mh.paste_mode, mh.paste_padding,
                                                      threshold=mh.mask_threshold,
                                                      threshold_inclusive=mh.mask_threshold_inclusive)
                    else:
                        if self.fast:
                            pasted = paste_masks_in_windows(det["masks"], boxes, orig, mh.paste_mode,
                                                            mh.paste_padding)
                        else:
                            pasted = paste_masks(det["masks"], boxes, orig, mh.paste_mode, mh.paste_padding)[:, 0]
                        r["masks"] = (pasted >= mh.mask_threshold if mh.mask_threshold_inclusive
                                      else pasted > mh.mask_threshold)
                        if soft_masks:
                            r["soft_masks"] = pasted
            if keep_intermediates:
                r.update(proposals=out["proposals"][i], resized_boxes=det["boxes"],
                         mask_logits=det.get("mask_logits"), keypoint_logits=det.get("keypoint_logits"),
                         resized_size=sizes[i],
                         batch_shape=tuple(batch.shape[-2:]), features=out["features"])
            results.append(r)
        return results
