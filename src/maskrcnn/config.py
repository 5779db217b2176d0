"""Every hyperparameter of the model, its input pipeline and its training, in one place.

The defaults are those of the Mask R-CNN paper and of torchvision's ``maskrcnn_resnet50_fpn``. Presets
(:func:`get_preset`) bundle compatibility modes; nothing else in the package hides a number.

Configs are frozen dataclasses. Change them with :func:`apply_overrides` (``"a.b=value"`` strings) or
:func:`dataclasses.replace`; serialise them with :func:`Config.to_dict` / :func:`Config.from_dict`,
:func:`save_config` and :func:`load_config` (JSON or YAML).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from maskrcnn.atomic import atomic_write_text

IMAGENET_MEAN_RGB01 = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB01 = (0.229, 0.224, 0.225)
# log(1000/16): the largest box-size change a regression delta may express (Detectron).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
# Groups of every GroupNorm outside the backbone (FPN and heads), and the backbone's default: Wu & He's 32, as
# detectron2's "GN" norm.
HEAD_GN_GROUPS = 32

# COCO's person keypoints (the ``keypoints`` list of the person category in person_keypoints_*.json), and its
# skeleton with 0-based indices (COCO's file counts from 1).
COCO_PERSON_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
COCO_PERSON_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)


class ConfigError(ValueError):
    """A config value, key or file that cannot be used; the message names it."""


@dataclass(frozen=True)
class InputConfig:
    """Image preprocessing: colour layout, normalisation, resizing and padding."""

    # "rgb01": RGB scaled to [0, 1] (torchvision); "bgr255": BGR in [0, 255] (detectron2).
    pixel_format: Literal["rgb01", "bgr255"] = "rgb01"
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN_RGB01
    pixel_std: tuple[float, ...] = IMAGENET_STD_RGB01
    # Shorter-edge sizes for training; one is drawn per image (multi-scale when several).
    min_size_train: tuple[int, ...] = (800,)
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    size_divisible: int = 32
    # Test-time resize. "bilinear": torchvision's (float image, normalised first, F.interpolate with
    # recompute_scale_factor). "pil": detectron2's ResizeShortestEdge (output size int(side * scale + 0.5), then
    # Pillow's antialiased bilinear resize of the uint8 image, before normalising).
    resize_mode: Literal["bilinear", "pil"] = "bilinear"
    flip_prob: float = 0.5
    # Large-scale jitter (Ghiasi et al.): random scale in [min, max] of the target size, then crop.
    lsj: bool = False
    lsj_scale: tuple[float, float] = (0.1, 2.0)


@dataclass(frozen=True)
class BackboneConfig:
    """ResNet / ResNeXt body: torchvision's layout by default, MSRA/detectron2's with ``stride_in_1x1``."""

    depth: int = 50  # 18, 34, 50, 101 or 152
    groups: int = 1  # 32 for ResNeXt-101 32x8d
    # Bottleneck width of res2 is groups * width_per_group, doubling at each later stage.
    width_per_group: int = 64  # 8 for ResNeXt-101 32x8d
    # The stride of a bottleneck's first block sits on its 1x1 conv (MSRA ResNets: detectron2's R50/R101) or on
    # its 3x3 conv (False: torchvision, and detectron2's X101).
    stride_in_1x1: bool = False
    stem_out_channels: int = 64
    # Output channels of res2, doubling at each later stage; 0 takes torchvision's rule (64 x block expansion).
    res2_out_channels: int = 0
    # Dilation of res5 (2 gives the DC5 layout: res5 keeps stride 16).
    res5_dilation: int = 1
    norm: Literal["frozen_bn", "bn", "syncbn", "gn"] = "frozen_bn"
    # torchvision's FrozenBatchNorm2d default; the published v1 COCO weights were trained with eps=0.
    norm_eps: float = 1e-5
    gn_groups: int = HEAD_GN_GROUPS
    # Stages trained (0..5), counted from the top as torchvision's ``trainable_backbone_layers``.
    trainable_layers: int = 3
    # "fpn": C2..C5 into an FPN (P2..P6). "c4": res2-res4 as a stride-16 trunk, res5 as the RoI head shared by
    # the box and mask branches. "dc5": the whole ResNet with res5 dilated (stride 16), one feature level.
    layout: Literal["fpn", "c4", "dc5"] = "fpn"


@dataclass(frozen=True)
class FPNConfig:
    """Feature Pyramid Network over C2..C5 with an extra max-pool level (P6)."""

    out_channels: int = 256
    norm: Literal["none", "bn", "gn"] = "none"
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class AnchorConfig:
    """Anchors: one size per FPN level, three aspect ratios (height/width)."""

    sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # torchvision rounds the base anchors to integers; detectron2 does not.
    round_base: bool = True
    # Stride (px) of each level; empty: the padded batch size // the feature map size (torchvision, which gives
    # 61 rather than 64 for a 13-row P6 of an 800-row batch); detectron2 fixes them by the backbone (4..64; 16).
    strides: tuple[int, ...] = ()
    # Anchor centres sit at (position + offset) * stride: 0.0 in both frameworks.
    offset: float = 0.0
    # Precision of the cell-anchor arithmetic: detectron2 computes them in Python floats ("float64").
    cell_dtype: Literal["float32", "float64"] = "float32"
    # Cell anchors of a level with several sizes (C4, DC5) in (size, ratio) order (detectron2) rather than
    # (ratio, size) (torchvision's order).
    size_major: bool = False


@dataclass(frozen=True)
class RPNConfig:
    """Region Proposal Network: head, proposal selection and training targets."""

    num_convs: int = 1  # 2 in torchvision's v2 model
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    # Minimum proposal score (None: no test). torchvision ranks and thresholds sigmoid probabilities;
    # detectron2 ranks the logits themselves (``sigmoid_scores`` False), whose order has no float32 ties.
    score_thresh: float | None = 0.0
    sigmoid_scores: bool = True
    # Proposals with a side under this (px) are dropped: >= it kept (torchvision), or > it (detectron2).
    min_box_size: float = 1e-3
    min_size_inclusive: bool = True
    # Drop proposals with non-finite boxes or logits before selection (detectron2 at test time).
    drop_non_finite: bool = False
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    allow_low_quality_matches: bool = True
    bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    smooth_l1_beta: float = 1.0 / 9


@dataclass(frozen=True)
class BoxHeadConfig:
    """RoI box head: pooling, head shape, training sampling and test-time post-processing."""

    pooler_resolution: int = 7
    pooler_sampling_ratio: int = 2
    # torchvision: aligned=False (legacy, no half-pixel shift); detectron2: True.
    pooler_aligned: bool = False
    # FPN level of a RoI: floor(4 + log2(sqrt(area) / 224) + eps) (torchvision, eps 1e-6), or
    # floor(4 + log2(sqrt(area) / 224 + eps)) (detectron2, eps 1e-8): both poolers use these.
    pooler_level_eps: float = 1e-6
    pooler_eps_inside_log: bool = False
    # "two_mlp": TwoMLPHead (v1). "conv_fc": num_convs x conv3x3 (+norm) then one FC (v2).
    head: Literal["two_mlp", "conv_fc"] = "two_mlp"
    num_convs: int = 4
    conv_dim: int = 256
    fc_dim: int = 1024
    norm: Literal["none", "bn", "gn"] = "none"
    norm_eps: float = 1e-5
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    # torchvision uses smooth-L1 with beta 1/9 (and sums over the sampled RoIs).
    smooth_l1_beta: float = 1.0 / 9
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # Detections with a side under this (px) are dropped (torchvision); None keeps them (detectron2).
    min_box_size: float | None = 1e-2
    # Drop RoIs with non-finite boxes or scores before selection (detectron2).
    drop_non_finite: bool = False
    # Boxes mapped back to the input image are clipped to it, and those left empty dropped (detectron2's
    # detector_postprocess); torchvision only rescales them.
    clip_to_input: bool = False
    # At inference the box branch runs on at most this many RoIs at a time (0: all of them at once): it bounds
    # the memory of the C4 layout, whose res5 head would otherwise hold 1000 RoIs x 2048 x 7 x 7 at once.
    inference_chunk: int = 256


@dataclass(frozen=True)
class RoIPoolerConfig:
    """How every RoI head (box, mask, keypoint) turns a box into a fixed-size feature (paper, Table 2c)."""

    # "align": RoIAlign (the paper's): bilinear samples at unquantised positions, averaged per bin; its
    # alignment and sampling are each head's pooler_aligned / pooler_sampling_ratio. "pool": RoIPool (Fast
    # R-CNN): the box and the bins are quantised to feature pixels and each bin max-pooled (sampling and
    # alignment unused). "warp": RoIWarp (MNC): the box is quantised to feature pixels, then sampled as RoIAlign.
    type: Literal["align", "pool", "warp"] = "align"


@dataclass(frozen=True)
class MaskHeadConfig:
    """Mask head: 4 x conv3x3, 2x2 deconvolution, 1x1 predictor; per-class sigmoid masks."""

    enabled: bool = True
    # "fcn": the convs, deconvolution and 1x1 predictor (the paper's). "mlp": flatten the pooled RoI, then
    # fully connected layers of mlp_dims, then one to channels x m x m (paper, Table 2e); num_convs, conv_dim,
    # dilation and norm are then unused.
    type: Literal["fcn", "mlp"] = "fcn"
    mlp_dims: tuple[int, ...] = (1024, 1024)
    # "sigmoid": per-class sigmoid, binary cross-entropy on the ground-truth class's channel (the paper's).
    # "softmax": a per-pixel softmax over the K classes and background, multinomial cross-entropy against the
    # (soft) target, split between the RoI's class (inside its mask) and background; at inference the predicted
    # class's probability is the mask (paper, Table 2b). It needs K+1 channels whatever model.background is.
    loss: Literal["sigmoid", "softmax"] = "sigmoid"
    # One mask channel for every class (paper, Table 2b) rather than one per class; sigmoid loss only.
    class_agnostic: bool = False
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 2
    pooler_aligned: bool = False
    num_convs: int = 4
    conv_dim: int = 256
    dilation: int = 1
    norm: Literal["none", "bn", "gn"] = "none"
    norm_eps: float = 1e-5
    # "legacy": torchvision's integer-box paste with 1 px padding; "grid_sample": detectron2's.
    paste_mode: Literal["legacy", "grid_sample"] = "legacy"
    paste_padding: int = 1
    mask_threshold: float = 0.5
    # A pixel is in the mask when its probability is >= the threshold (detectron2) or > it (torchvision).
    mask_threshold_inclusive: bool = False


@dataclass(frozen=True)
class KeypointHeadConfig:
    """Keypoint head (paper, Sec. 5): conv3x3 tower, 4x4 stride-2 deconvolution to K heatmaps, x2 bilinear upsampling.

    Each keypoint is a one-hot m x m mask (m = 2 x 2 x pooler_resolution = 56), learned with a softmax
    cross-entropy over the m^2 positions. The defaults are torchvision's ``keypointrcnn_resnet50_fpn``.
    """

    enabled: bool = False
    num_keypoints: int = 17
    # Keypoint names (index k -> names[k]); they give the flip map and the results' labels. Empty: unnamed.
    names: tuple[str, ...] = COCO_PERSON_KEYPOINT_NAMES
    # Pairs of keypoint indices (0-based) joined in drawings.
    skeleton: tuple[tuple[int, int], ...] = COCO_PERSON_SKELETON
    # Name pairs swapped by a horizontal flip; empty: every "left..." name pairs with its "right..." twin.
    flip_map: tuple[tuple[str, str], ...] = ()
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 2
    pooler_aligned: bool = False
    # Output channels of each conv3x3 + ReLU of the tower (8 x 512 in both frameworks).
    conv_dims: tuple[int, ...] = (512,) * 8
    # The transposed conv (stride 2, padding kernel // 2 - 1) doubles the pooled side; bilinear upsampling by
    # ``up_scale`` follows (torchvision and detectron2: 4 and 2, 14 -> 28 -> 56).
    deconv_kernel: int = 4
    up_scale: int = 2
    loss_weight: float = 1.0
    # The summed cross-entropy is divided by the number of visible keypoints in the batch (both frameworks'
    # default), or by images x box batch_size_per_image x positive_fraction x K (detectron2's other option).
    normalize_by_visible: bool = True
    # Training images with fewer visible keypoints (over all their instances) are skipped: torchvision's
    # reference scripts use 10, detectron2's MIN_KEYPOINTS_PER_IMAGE 1. Instances without visible keypoints are
    # kept as box targets.
    min_keypoints_per_image: int = 10
    # Keypoint score: "logit", the upsampled heatmap's value at its maximum (torchvision, Detectron), or
    # "softmax", that maximum's probability under a softmax over the m x m heatmap (detectron2).
    score_type: Literal["logit", "softmax"] = "logit"
    # Overlays skip joints scoring under this: Detectron's visualiser draws logits above 2; detectron2's, softmax
    # probabilities above 0.05.
    draw_threshold: float = 2.0
    # COCO keypoints are integer pixel indices: detectron2 adds 0.5 to them when loading (continuous coordinates)
    # and subtracts it from its predictions when writing COCO results; torchvision uses them as they are (0.0).
    coco_offset: float = 0.0
    # Per-keypoint OKS sigmas for evaluation; empty takes pycocotools' COCO person sigmas (K must then be 17).
    oks_sigmas: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """The whole network."""

    # Foreground classes, K. The classifier has K+1 outputs.
    num_classes: int = 90
    # Where the classifier's background logit sits: "first" (index 0, torchvision: box deltas and mask logits
    # for all K+1 classes) or "last" (index K, detectron2: box deltas and mask logits for the K foreground
    # classes only). Labels in targets and results are 1..K either way.
    background: Literal["first", "last"] = "first"
    # Names of the K foreground classes (index i -> label i+1).
    class_names: tuple[str, ...] = ()
    # Dataset category id of each foreground class (label i -> category_ids[i-1]); empty means id == label.
    category_ids: tuple[int, ...] = ()
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    roi_pooler: RoIPoolerConfig = field(default_factory=RoIPoolerConfig)
    # Off by default; a keypoint model may keep its mask head too (the paper's Table 4 trains both).
    keypoint_head: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)


@dataclass(frozen=True)
class SolverConfig:
    """SGD with momentum, linear warmup, then multi-step or cosine decay (paper defaults)."""

    # "sgd" is the paper's; "adamw" converges faster when training from scratch on small data (the demo).
    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.02
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    # Weight decay on norm weights and all biases; 0.0 turns it off for them (None keeps weight_decay).
    weight_decay_norm: float | None = None
    weight_decay_bias: float | None = None
    ims_per_batch: int = 16
    # Batch size that base_lr was tuned for; with scale_lr the LR follows the linear scaling rule.
    reference_batch_size: int = 16
    scale_lr: bool = False
    max_iter: int = 90000
    lr_schedule: Literal["multistep", "cosine"] = "multistep"
    steps: tuple[int, ...] = (60000, 80000)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 1.0 / 1000
    clip_grad_norm: float = 0.0  # 0 disables
    amp: Literal["none", "fp16", "bf16"] = "none"


@dataclass(frozen=True)
class TrainConfig:
    """The training run: data loading, checkpoints, logging, evaluation."""

    seed: int = 42
    num_workers: int = 2
    aspect_ratio_grouping: bool = True
    filter_empty: bool = True
    checkpoint_period: int = 5000
    keep_last: int = 3
    log_period: int = 20
    eval_period: int = 0  # 0: evaluate only at the end (if eval data is given)
    # Evaluation value that picks model_best/ (a key of the logged evaluation: segm_AP, bbox_AP, keypoints_AP,
    # val_total_loss, ...; losses are minimised, the rest maximised). "auto": keypoints_AP for keypoint models,
    # else segm_AP (bbox_AP without a mask head).
    best_metric: str = "auto"
    # Stop after this many evaluations without a new best train.best_metric; 0 never stops early.
    patience: int = 0
    # Training stops when more than this fraction of the images cannot be read (each one is skipped, replaced by
    # another image, logged and listed in skipped_images.txt); 0 stops at the first.
    max_bad_image_fraction: float = 0.01
    tensorboard: bool = False
    device: str = "auto"
    # Longest wait, in seconds, for another rank in a collective (multi-process runs): a rank that died or hangs
    # then stops the others with an error. Must exceed the slowest rank-0-only step (checkpoint, COCO metrics).
    dist_timeout_s: float = 1800.0
    # Activations in channels-last memory layout during training on the fast path (parameters stay NCHW, so
    # inference keeps its exact NCHW arithmetic). Off: its R50-FPN gain on 2 CPU cores (4.22 -> 3.85 s a step)
    # came from page faults, and once the CLI keeps freed memory (maskrcnn.runtime) the steps take the same time
    # (3.04 vs 3.08 s); it may still pay on GPUs with AMP, where channels-last convs use tensor cores better.
    channels_last: bool = False


@dataclass(frozen=True)
class Config:
    """The root config: model, input, solver and training settings."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples), JSON/YAML serialisable."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from a nested dict; unknown keys raise ConfigError listing them."""
        return _from_dict(cls, data, "")

    def __post_init__(self) -> None:
        """Check every numeric field against its range (``FIELD_RANGES``) and the fields that constrain each other.

        Every way of making a config (preset, YAML, overrides, a saved model's config.json, dataclasses.replace)
        goes through here, so a bad value is refused where it enters, naming its key.
        """
        validate_config(self)


# ---------------------------------------------------------------------------------------------------
# Ranges: every numeric field of every section, checked when a Config is made


def _group_norm_widths(m: ModelConfig) -> list[tuple[str, int, int]]:
    """(config key, channels, groups) of every GroupNorm the model config asks for."""
    from maskrcnn.modeling.backbone import stage_plan  # noqa: PLC0415 - modeling imports this module

    out: list[tuple[str, int, int]] = []
    b = m.backbone
    if b.norm == "gn":
        out.append(("model.backbone.stem_out_channels", b.stem_out_channels, b.gn_groups))
        for st in stage_plan(b):
            out.append(("model.backbone.res2_out_channels", st["out"], b.gn_groups))
            out.append(("model.backbone.width_per_group", st["width"], b.gn_groups))
    if m.fpn.norm == "gn":
        out.append(("model.fpn.out_channels", m.fpn.out_channels, HEAD_GN_GROUPS))
    if m.box_head.norm == "gn" and m.box_head.head == "conv_fc" and m.box_head.num_convs > 0:
        out.append(("model.box_head.conv_dim", m.box_head.conv_dim, HEAD_GN_GROUPS))
    if m.mask_head.enabled and m.mask_head.norm == "gn" and m.mask_head.type == "fcn" and m.mask_head.num_convs > 0:
        out.append(("model.mask_head.conv_dim", m.mask_head.conv_dim, HEAD_GN_GROUPS))
    return out


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take: an interval (ends open or closed, None for unbounded) or choices."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[float, ...] = ()

    def allows(self, value: float) -> bool:
        """Whether ``value`` (finite) lies in the range."""
        if self.choices:
            return value in self.choices
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        """The range in words, e.g. ``"in [0, 1]"``, ``"> 0"``, ``"one of 18, 34, 50"``."""
        if self.choices:
            return "one of " + ", ".join(f"{c:g}" for c in self.choices)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "finite"


ANY = Range()
POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)
UNIT_OPEN = Range(0, 1, hi_open=True)  # [0, 1): momentum and Adam betas
IOU = Range(0, 1)

# "Section.field" -> its range; a tuple field's range applies to each element. tests/test_config.py checks that
# every int and float field of every section is listed here.
FIELD_RANGES: dict[str, Range] = {
    "InputConfig.pixel_mean": ANY, "InputConfig.pixel_std": POSITIVE, "InputConfig.min_size_train": AT_LEAST_1,
    "InputConfig.max_size_train": AT_LEAST_1, "InputConfig.min_size_test": AT_LEAST_1,
    "InputConfig.max_size_test": AT_LEAST_1, "InputConfig.size_divisible": NON_NEGATIVE,
    "InputConfig.flip_prob": FRACTION, "InputConfig.lsj_scale": POSITIVE,
    "BackboneConfig.depth": Range(choices=(18, 34, 50, 101, 152)), "BackboneConfig.groups": AT_LEAST_1,
    "BackboneConfig.width_per_group": AT_LEAST_1, "BackboneConfig.stem_out_channels": AT_LEAST_1,
    "BackboneConfig.res2_out_channels": NON_NEGATIVE, "BackboneConfig.res5_dilation": AT_LEAST_1,
    "BackboneConfig.norm_eps": NON_NEGATIVE, "BackboneConfig.gn_groups": AT_LEAST_1,
    "BackboneConfig.trainable_layers": Range(0, 5),
    "FPNConfig.out_channels": AT_LEAST_1, "FPNConfig.norm_eps": NON_NEGATIVE,
    "AnchorConfig.sizes": POSITIVE, "AnchorConfig.aspect_ratios": POSITIVE, "AnchorConfig.strides": AT_LEAST_1,
    "AnchorConfig.offset": UNIT_OPEN,
    "RPNConfig.num_convs": AT_LEAST_1, "RPNConfig.pre_nms_top_n_train": AT_LEAST_1,
    "RPNConfig.pre_nms_top_n_test": AT_LEAST_1, "RPNConfig.post_nms_top_n_train": AT_LEAST_1,
    "RPNConfig.post_nms_top_n_test": AT_LEAST_1, "RPNConfig.nms_thresh": IOU,
    # Logits when sigmoid_scores is off (detectron2), so any finite value; [0, 1] is checked with sigmoid scores.
    "RPNConfig.score_thresh": ANY, "RPNConfig.min_box_size": NON_NEGATIVE, "RPNConfig.fg_iou_thresh": IOU,
    "RPNConfig.bg_iou_thresh": IOU, "RPNConfig.batch_size_per_image": AT_LEAST_1,
    "RPNConfig.positive_fraction": FRACTION, "RPNConfig.bbox_reg_weights": POSITIVE,
    "RPNConfig.smooth_l1_beta": NON_NEGATIVE,
    "BoxHeadConfig.pooler_resolution": AT_LEAST_1, "BoxHeadConfig.pooler_sampling_ratio": NON_NEGATIVE,
    "BoxHeadConfig.pooler_level_eps": NON_NEGATIVE, "BoxHeadConfig.num_convs": NON_NEGATIVE,
    "BoxHeadConfig.conv_dim": AT_LEAST_1, "BoxHeadConfig.fc_dim": AT_LEAST_1, "BoxHeadConfig.norm_eps": NON_NEGATIVE,
    "BoxHeadConfig.fg_iou_thresh": IOU, "BoxHeadConfig.bg_iou_thresh": IOU,
    "BoxHeadConfig.batch_size_per_image": AT_LEAST_1, "BoxHeadConfig.positive_fraction": FRACTION,
    "BoxHeadConfig.bbox_reg_weights": POSITIVE, "BoxHeadConfig.smooth_l1_beta": NON_NEGATIVE,
    "BoxHeadConfig.score_thresh": FRACTION, "BoxHeadConfig.nms_thresh": IOU,
    "BoxHeadConfig.detections_per_img": AT_LEAST_1, "BoxHeadConfig.inference_chunk": NON_NEGATIVE, "BoxHeadConfig.min_box_size": NON_NEGATIVE,
    "MaskHeadConfig.pooler_resolution": AT_LEAST_1, "MaskHeadConfig.pooler_sampling_ratio": NON_NEGATIVE,
    "MaskHeadConfig.num_convs": NON_NEGATIVE, "MaskHeadConfig.conv_dim": AT_LEAST_1,
    "MaskHeadConfig.dilation": AT_LEAST_1, "MaskHeadConfig.norm_eps": NON_NEGATIVE,
    "MaskHeadConfig.paste_padding": NON_NEGATIVE, "MaskHeadConfig.mask_threshold": FRACTION,
    "MaskHeadConfig.mlp_dims": AT_LEAST_1,
    "ModelConfig.num_classes": AT_LEAST_1, "ModelConfig.category_ids": NON_NEGATIVE,
    "SolverConfig.base_lr": POSITIVE, "SolverConfig.momentum": UNIT_OPEN, "SolverConfig.adam_betas": UNIT_OPEN,
    "SolverConfig.weight_decay": NON_NEGATIVE, "SolverConfig.weight_decay_norm": NON_NEGATIVE,
    "SolverConfig.weight_decay_bias": NON_NEGATIVE, "SolverConfig.ims_per_batch": AT_LEAST_1,
    "SolverConfig.reference_batch_size": AT_LEAST_1, "SolverConfig.max_iter": AT_LEAST_1,
    "SolverConfig.steps": AT_LEAST_1, "SolverConfig.gamma": POSITIVE, "SolverConfig.warmup_iters": NON_NEGATIVE,
    "SolverConfig.warmup_factor": FRACTION, "SolverConfig.clip_grad_norm": NON_NEGATIVE,
    "TrainConfig.seed": NON_NEGATIVE, "TrainConfig.num_workers": NON_NEGATIVE,
    "TrainConfig.checkpoint_period": NON_NEGATIVE, "TrainConfig.keep_last": NON_NEGATIVE,
    "TrainConfig.log_period": AT_LEAST_1, "TrainConfig.eval_period": NON_NEGATIVE,
    "TrainConfig.dist_timeout_s": POSITIVE, "TrainConfig.max_bad_image_fraction": FRACTION,
    "TrainConfig.patience": NON_NEGATIVE,
    "KeypointHeadConfig.num_keypoints": AT_LEAST_1, "KeypointHeadConfig.pooler_resolution": AT_LEAST_1,
    "KeypointHeadConfig.pooler_sampling_ratio": NON_NEGATIVE, "KeypointHeadConfig.conv_dims": AT_LEAST_1,
    "KeypointHeadConfig.deconv_kernel": AT_LEAST_1, "KeypointHeadConfig.up_scale": AT_LEAST_1,
    "KeypointHeadConfig.loss_weight": NON_NEGATIVE, "KeypointHeadConfig.min_keypoints_per_image": NON_NEGATIVE,
    # A logit (torchvision, Detectron) or a softmax probability (detectron2): any finite value.
    "KeypointHeadConfig.draw_threshold": ANY,
    # 0 (torchvision) or 0.5 (detectron2): a sub-pixel shift.
    "KeypointHeadConfig.coco_offset": Range(0, 1, hi_open=True),
    "KeypointHeadConfig.oks_sigmas": POSITIVE,
}


def numeric_fields(cls: type) -> list[str]:
    """Names of the fields of dataclass ``cls`` that hold numbers (int, float, optional or tuples of them)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None) and a is not Ellipsis]
        if typing.get_origin(tp) is Literal:
            continue
        if any(a in (int, float) for a in args) or tp in (int, float):
            out.append(f.name)
    return out


def _check_ranges(section: Any, prefix: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key)
            continue
        rng = FIELD_RANGES.get(f"{type(section).__name__}.{f.name}")
        if rng is None or value is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # types are _coerce's job
            if not math.isfinite(v) or not rng.allows(v):
                what = f"each item of config key {key!r}" if isinstance(value, tuple) else f"config key {key!r}"
                raise ConfigError(f"{what} must be {rng.describe()}, got {value!r}")


def validate_config(cfg: Config) -> None:
    """Raise ConfigError naming the key, its value and what is allowed, for any value out of its range."""
    _check_ranges(cfg, "")
    m, s, inp = cfg.model, cfg.solver, cfg.input

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name, head in (("model.rpn", m.rpn), ("model.box_head", m.box_head)):
        need(head.bg_iou_thresh <= head.fg_iou_thresh,
             f"config key {name}.bg_iou_thresh={head.bg_iou_thresh:g} must be <= {name}.fg_iou_thresh="
             f"{head.fg_iou_thresh:g}")
    if m.rpn.sigmoid_scores and m.rpn.score_thresh is not None:
        need(0.0 <= m.rpn.score_thresh <= 1.0,
             f"config key 'model.rpn.score_thresh' must be in [0, 1] with sigmoid scores, got {m.rpn.score_thresh!r}")
    for key, names in (("class_names", m.class_names), ("category_ids", m.category_ids)):
        need(not names or len(names) == m.num_classes,
             f"config key 'model.{key}' has {len(names)} entries but model.num_classes is {m.num_classes}")
    need(list(s.steps) == sorted(s.steps), f"config key 'solver.steps' must be in increasing order, got {s.steps!r}")
    for key in ("pixel_mean", "pixel_std"):
        need(len(getattr(inp, key)) == 3, f"config key 'input.{key}' must have 3 values (one per colour channel), "
                                          f"got {getattr(inp, key)!r}")
    need(not (m.mask_head.class_agnostic and m.mask_head.loss == "softmax"),
         "config key 'model.mask_head.class_agnostic'=true needs model.mask_head.loss=sigmoid: a softmax over one "
         "class and background is the sigmoid in other words")
    for key, channels, groups in _group_norm_widths(m):
        need(channels % groups == 0,
             f"config key {key!r} gives a GroupNorm layer {channels} channels, which {groups} groups do not divide "
             f"(GroupNorm needs channels divisible by its groups: model.backbone.gn_groups for the backbone, "
             f"{HEAD_GN_GROUPS} for the FPN and heads)")
    need(inp.lsj_scale[0] <= inp.lsj_scale[1],
         f"config key 'input.lsj_scale' must be [low, high] with low <= high, got {list(inp.lsj_scale)!r}")


# ---------------------------------------------------------------------------------------------------
# Presets


def _torchvision_v1() -> Config:
    """torchvision ``maskrcnn_resnet50_fpn``: FrozenBN R50-FPN, TwoMLPHead, legacy RoIAlign."""
    return Config(name="torchvision_v1")


def _torchvision_v2() -> Config:
    """torchvision ``maskrcnn_resnet50_fpn_v2`` (Li et al. 2021): BN everywhere, 2-conv RPN, 4conv1fc."""
    model = ModelConfig(
        backbone=BackboneConfig(norm="bn", norm_eps=1e-5),
        fpn=FPNConfig(norm="bn"),
        rpn=RPNConfig(num_convs=2),
        box_head=BoxHeadConfig(head="conv_fc", norm="bn"),
        mask_head=MaskHeadConfig(norm="bn"),
    )
    return Config(name="torchvision_v2", model=model)


def _r18_fpn_demo() -> Config:
    """Small ResNet-18-FPN at a short side of 192 that trains from scratch on CPU in minutes (the demo).

    Measured on the synthetic shapes (see README): the conv box head instead of the two-FC head took the val
    mask AP at 1200 iterations from 0.48 to 0.72, and AdamW beat SGD (lr 0.02 or 0.04) from scratch.
    """
    model = ModelConfig(
        num_classes=3,
        class_names=("square", "circle", "triangle"),
        # Trained from scratch (no downloads), so GroupNorm: frozen BN would leave a random net unnormalised,
        # and BatchNorm is noisy at 2 images per batch (He et al., "Rethinking ImageNet Pre-training").
        backbone=BackboneConfig(depth=18, norm="gn", trainable_layers=5),
        fpn=FPNConfig(out_channels=64, norm="gn"),
        anchors=AnchorConfig(sizes=(16, 32, 64, 128, 256)),
        rpn=RPNConfig(pre_nms_top_n_train=1000, post_nms_top_n_train=500,
                      pre_nms_top_n_test=500, post_nms_top_n_test=300),
        box_head=BoxHeadConfig(head="conv_fc", conv_dim=64, fc_dim=256, norm="gn", batch_size_per_image=64),
        mask_head=MaskHeadConfig(conv_dim=64, norm="gn"),
    )
    inp = InputConfig(min_size_train=(176, 192, 208), max_size_train=320, min_size_test=192, max_size_test=320)
    solver = SolverConfig(optimizer="adamw", base_lr=1e-3, ims_per_batch=2, reference_batch_size=2, max_iter=2000,
                          steps=(1600, 1900), warmup_iters=50)
    train = TrainConfig(checkpoint_period=500, log_period=20, num_workers=0)
    return Config(name="r18_fpn_demo", model=model, input=inp, solver=solver, train=train)


def _r18_fpn_keypoint_demo() -> Config:
    """The demo's ResNet-18-FPN as a Keypoint R-CNN that trains from scratch on a CPU, for person keypoint files.

    ``r18_fpn_demo`` (GroupNorm, AdamW, 2 images per batch) with one class, no mask head, a keypoint tower of
    8 x 64 channels and a short side of 256 (persons need more pixels than the demo's shapes); images need one
    visible keypoint (detectron2's rule).
    """
    base = _r18_fpn_demo()
    m = base.model
    model = dataclasses.replace(
        m, num_classes=1, class_names=("person",), mask_head=dataclasses.replace(m.mask_head, enabled=False),
        keypoint_head=KeypointHeadConfig(enabled=True, conv_dims=(64,) * 8, min_keypoints_per_image=1))
    inp = dataclasses.replace(base.input, min_size_train=(224, 256, 288), max_size_train=448, min_size_test=256,
                              max_size_test=448)
    return dataclasses.replace(base, name="r18_fpn_keypoint_demo", model=model, input=inp)


# detectron2's pixel statistics: BGR 0-255; std 1 for the MSRA ResNets, the ImageNet std for ResNeXt.
DETECTRON2_PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
DETECTRON2_PIXEL_STD_MSRA = (1.0, 1.0, 1.0)
DETECTRON2_PIXEL_STD_RESNEXT = (57.375, 57.120, 58.395)


def _detectron2(layout: str, depth: int, resnext: bool, schedule: str) -> Config:
    """detectron2's ``COCO-InstanceSegmentation/mask_rcnn_{R|X}_{depth}_{layout}_{schedule}.yaml`` model and recipe.

    The conventions that change numbers (fixtures README, "What detectron2 does"): BGR 0-255 input, Pillow
    resize of the uint8 image, unrounded anchors, ROIAlignV2 (aligned, adaptive sampling), class index K is
    background, no small-box removal, grid_sample paste; the C4 and DC5 layouts use one stride-16 level with all
    five anchor sizes and no padding.
    """
    single = layout in ("C4", "DC5")
    backbone = BackboneConfig(depth=depth, groups=32 if resnext else 1, width_per_group=8 if resnext else 64,
                              stride_in_1x1=not resnext, norm="frozen_bn", norm_eps=1e-5, trainable_layers=3,
                              layout=layout.lower(), res5_dilation=2 if layout == "DC5" else 1)
    pooled = 14 if layout == "C4" else 7
    model = ModelConfig(
        num_classes=80,
        background="last",
        backbone=backbone,
        anchors=AnchorConfig(round_base=False, strides=(16,) if single else (4, 8, 16, 32, 64), offset=0.0,
                             cell_dtype="float64", size_major=True),
        rpn=RPNConfig(pre_nms_top_n_train=12000 if single else 2000, post_nms_top_n_train=2000 if single else 1000,
                      pre_nms_top_n_test=6000 if single else 1000, post_nms_top_n_test=1000, score_thresh=None,
                      sigmoid_scores=False, min_box_size=0.0, min_size_inclusive=False, drop_non_finite=True,
                      smooth_l1_beta=0.0),
        box_head=BoxHeadConfig(pooler_resolution=pooled, pooler_sampling_ratio=0, pooler_aligned=True,
                               pooler_level_eps=1e-8, pooler_eps_inside_log=True, smooth_l1_beta=0.0,
                               min_box_size=None, drop_non_finite=True, clip_to_input=True),
        mask_head=MaskHeadConfig(pooler_resolution=14, pooler_sampling_ratio=0, pooler_aligned=True,
                                 num_convs=0 if layout == "C4" else 4, paste_mode="grid_sample",
                                 mask_threshold_inclusive=True),
    )
    long = schedule == "3x"
    inp = InputConfig(pixel_format="bgr255", pixel_mean=DETECTRON2_PIXEL_MEAN_BGR,
                      pixel_std=DETECTRON2_PIXEL_STD_RESNEXT if resnext else DETECTRON2_PIXEL_STD_MSRA,
                      min_size_train=(640, 672, 704, 736, 768, 800) if long else (800,), resize_mode="pil",
                      size_divisible=0 if single else 32)
    solver = SolverConfig(base_lr=0.02, ims_per_batch=16, max_iter=270000 if long else 90000,
                          steps=(210000, 250000) if long else (60000, 80000), warmup_iters=1000)
    name = f"mask_rcnn_{'X' if resnext else 'R'}_{depth}{'_32x8d' if resnext else ''}_{layout}_{schedule}"
    return Config(name=name, model=model, input=inp, solver=solver)


# The Mask R-CNN configs of detectron2's model zoo, by the zoo's config name.
_DETECTRON2_ZOO = [("FPN", 50, False, "1x"), ("C4", 50, False, "1x"), ("DC5", 50, False, "1x"),
                   ("FPN", 50, False, "3x"), ("C4", 50, False, "3x"), ("DC5", 50, False, "3x"),
                   ("FPN", 101, False, "3x"), ("C4", 101, False, "3x"), ("DC5", 101, False, "3x"),
                   ("FPN", 101, True, "3x")]



def _keypointrcnn_resnet50_fpn(norm_eps: float = 1e-5, name: str = "keypointrcnn_resnet50_fpn") -> Config:
    """torchvision ``keypointrcnn_resnet50_fpn``: R50-FPN, one class (person), 17 COCO keypoints, no mask head.

    FrozenBN eps 1e-5 is torchvision's builder default: its COCO_LEGACY weights and models trained with
    torchvision. Its COCO_V1 weights were trained with eps 0, which torchvision restores after loading them
    (``keypointrcnn_resnet50_fpn_coco_v1``).
    """
    model = ModelConfig(num_classes=1, class_names=("person",), backbone=BackboneConfig(norm_eps=norm_eps),
                        mask_head=MaskHeadConfig(enabled=False), keypoint_head=KeypointHeadConfig(enabled=True))
    inp = InputConfig(min_size_train=(640, 672, 704, 736, 768, 800))
    return Config(name=name, model=model, input=inp)


def _detectron2_keypoints(depth: int, resnext: bool, schedule: str) -> Config:
    """detectron2's ``COCO-Keypoints/keypoint_rcnn_{R|X}_{depth}_FPN_{schedule}.yaml``: one class, 17 keypoints.

    Base-Keypoint-RCNN-FPN.yaml over the Mask R-CNN FPN model: no mask head, box smooth-L1 beta 0.5, 1500 RPN
    proposals per training image, multi-scale training in both schedules; the keypoint head pools 14 x 14 with
    ROIAlignV2, scores keypoints by a softmax over the heatmap, and keeps images with 1 visible keypoint.
    """
    base = _detectron2("FPN", depth, resnext, schedule)
    m = base.model
    keypoint_head = KeypointHeadConfig(enabled=True, pooler_sampling_ratio=0, pooler_aligned=True,
                                       min_keypoints_per_image=1, score_type="softmax", draw_threshold=0.05,
                                       coco_offset=0.5)
    model = dataclasses.replace(
        m, num_classes=1, class_names=("person",), rpn=dataclasses.replace(m.rpn, post_nms_top_n_train=1500),
        box_head=dataclasses.replace(m.box_head, smooth_l1_beta=0.5),
        mask_head=dataclasses.replace(m.mask_head, enabled=False), keypoint_head=keypoint_head)
    inp = dataclasses.replace(base.input, min_size_train=(640, 672, 704, 736, 768, 800))
    return dataclasses.replace(base, name=base.name.replace("mask_rcnn_", "keypoint_rcnn_"), model=model, input=inp)


# The Keypoint R-CNN configs of detectron2's model zoo.
_DETECTRON2_KEYPOINT_ZOO = [(50, False, "1x"), (50, False, "3x"), (101, False, "3x"), (101, True, "3x")]

PRESETS: dict[str, typing.Callable[[], Config]] = {
    "torchvision_v1": _torchvision_v1,
    "torchvision_v2": _torchvision_v2,
    "r18_fpn_demo": _r18_fpn_demo,
    "r18_fpn_keypoint_demo": _r18_fpn_keypoint_demo,
    "keypointrcnn_resnet50_fpn": _keypointrcnn_resnet50_fpn,
    "keypointrcnn_resnet50_fpn_coco_v1": functools.partial(_keypointrcnn_resnet50_fpn, 0.0,
                                                           "keypointrcnn_resnet50_fpn_coco_v1"),
}
for _layout, _depth, _resnext, _sched in _DETECTRON2_ZOO:
    _cfg = _detectron2(_layout, _depth, _resnext, _sched)
    PRESETS[_cfg.name] = functools.partial(_detectron2, _layout, _depth, _resnext, _sched)
for _depth, _resnext, _sched in _DETECTRON2_KEYPOINT_ZOO:
    _cfg = _detectron2_keypoints(_depth, _resnext, _sched)
    PRESETS[_cfg.name] = functools.partial(_detectron2_keypoints, _depth, _resnext, _sched)


def get_preset(name: str) -> Config:
    """Return the named preset config (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------------
# Overrides and (de)serialisation


def apply_overrides(cfg: Config, overrides: typing.Iterable[str] | dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with ``"a.b.c=value"`` overrides applied (values parsed as YAML/JSON)."""
    data = cfg.to_dict()
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])!r} is not a section; "
                                  f"sections here: {', '.join(k for k, v in node.items() if isinstance(v, dict))}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(node))}")
        if isinstance(node[parts[-1]], dict):
            raise ConfigError(f"config key {key!r} is a section; set one of its fields: "
                              f"{', '.join(sorted(node[parts[-1]]))}")
        node[parts[-1]] = _parse_value(value) if isinstance(value, str) else value
    return Config.from_dict(data)


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. solver.max_iter=300)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _parse_value(text: str) -> Any:
    try:
        import yaml  # noqa: PLC0415 - optional dependency

        return yaml.safe_load(text)
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` to ``path`` as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
    path = Path(path)
    data = cfg.to_dict()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # noqa: PLC0415

            text = yaml.safe_dump(data, sort_keys=False)
        except ImportError:
            text = json.dumps(data, indent=2)  # JSON is valid YAML
    else:
        text = json.dumps(data, indent=2)
    atomic_write_text(path, text)


def load_config(path: str | Path, base: Config | None = None) -> Config:
    """Read a YAML/JSON config file; keys it leaves out keep ``base``'s values (or its ``preset``'s)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml  # noqa: PLC0415
            except ImportError as e:
                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from e
            else:
                data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - report any parse error with the file name
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot parse config: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    data = dict(data)
    if "preset" in data:
        base = get_preset(str(data.pop("preset")))
    merged = _deep_merge((base or Config()).to_dict(), data)
    try:
        return Config.from_dict(merged)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in section {prefix!r}" if prefix else ""
        raise ConfigError(f"unknown config keys{where}: {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        elem = args[0] if args else Any
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return tuple(_coerce(elem, v, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"config key {key!r} must be a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    return value
