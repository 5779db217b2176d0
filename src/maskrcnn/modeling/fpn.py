"""Feature Pyramid Network (Lin et al. 2017) with the extra max-pool level P6, in torchvision's layout."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.config import BackboneConfig, FPNConfig
from maskrcnn.modeling.backbone import ResNet, conv_norm_act, make_norm
from maskrcnn.modeling.timing import stage


class FeaturePyramidNetwork(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs, plus P6 = maxpool(P5, 1, stride 2)."""

    fast = False
    fold = False

    def __init__(self, in_channels: list[int], cfg: FPNConfig) -> None:
        """One lateral and one output conv per input level; ``cfg.norm`` adds BN/GN (the v2 model)."""
        super().__init__()
        norm = None if cfg.norm == "none" else make_norm(cfg.norm, cfg.norm_eps)
        self.inner_blocks = nn.ModuleList(conv_norm_act(c, cfg.out_channels, 1, norm, relu=False) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            conv_norm_act(cfg.out_channels, cfg.out_channels, 3, norm, relu=False) for _ in in_channels)
        self.out_channels = cfg.out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, feats: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """{"0".."3": C2..C5} -> {"0".."3": P2..P5, "pool": P6}, each (N, out_channels, h, w)."""
        names = list(feats.keys())
        x = list(feats.values())
        last_inner = self.inner_blocks[-1](x[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(x) - 2, -1, -1):
            inner_lateral = self.inner_blocks[idx](x[idx])
            if self.fast:  # the same sum, in place on the lateral map
                last_inner = add_upsampled_(inner_lateral, last_inner)
            else:
                top_down = F.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")
                last_inner = inner_lateral + top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(names + ["pool"], results))


def add_upsampled_(x: Tensor, top: Tensor) -> Tensor:
    """x + nearest-upsample(top) for x (N, C, H, W) and top (N, C, h, w), in place on x outside autograd."""
    up = F.interpolate(top, size=tuple(x.shape[-2:]), mode="nearest")
    if torch.is_grad_enabled() and (x.requires_grad or top.requires_grad):
        return x + up
    # A broadcast add over a (h, 2, w, 2) view of x would skip materialising ``up``; it measured no faster in
    # the pipeline (bench/README.md), so the simple form stays.
    return x.add_(up)


class BackboneWithFPN(nn.Module):
    """The ResNet body and, in the FPN layout, the FPN; ``body`` and ``fpn`` names match torchvision's state dict.

    Layouts (``backbone.layout``): "fpn" gives P2..P6 ("0".."3", "pool"); "c4" stops after res4 and gives
    {"res4": C4} (stride 16; res5 is the RoI head's); "dc5" runs all four stages with res5 dilated and gives
    {"res5": C5} (stride 16).
    """

    def __init__(self, backbone_cfg: BackboneConfig, fpn_cfg: FPNConfig) -> None:
        """Builds the body from ``backbone_cfg`` and, for the FPN layout, an FPN over its four stages."""
        super().__init__()
        layout = backbone_cfg.layout
        if layout == "dc5" and backbone_cfg.res5_dilation == 1:
            raise ValueError("the dc5 layout needs model.backbone.res5_dilation=2")
        self.layout = layout
        self.body = ResNet(backbone_cfg, num_stages=3 if layout == "c4" else 4)
        self.fpn: FeaturePyramidNetwork | None = None
        if layout == "fpn":
            self.fpn = FeaturePyramidNetwork(self.body.out_channels, fpn_cfg)
            self.out_channels = fpn_cfg.out_channels
            # The levels RoIs are pooled from (P6 serves the RPN only).
            self.pooled_levels = ["0", "1", "2", "3"]
        else:
            self.out_channels = self.body.out_channels[-1]
            self.pooled_levels = ["res4" if layout == "c4" else "res5"]

    def _single_level(self, feats: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """The last stage's map under its detectron2 name (C4 and DC5 layouts)."""
        return OrderedDict([(self.pooled_levels[0], feats[str(self.body.num_stages - 1)])])

    @property
    def compiled(self) -> bool:
        """True while inference runs body and FPN through ``torch.compile`` (off again after a failed compile)."""
        return self.__dict__.get("_compiled") is not None

    def set_compiled(self, enabled: bool) -> None:
        """Run body and FPN through ``torch.compile`` outside autograd (on) or eagerly always (off)."""
        # Compiled bound methods in __dict__: compiled module wrappers registered as submodules would rename
        # the state dict's keys (``_orig_mod``).
        self.__dict__["_compiled"] = (torch.compile(self.body.forward),
                                      None if self.fpn is None else torch.compile(self.fpn.forward)
                                      ) if enabled else None

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """(N, 3, H, W) normalised batch -> {"0": P2 (stride 4), ..., "3": P5, "pool": P6}, or {"res4"|"res5": C}."""
        compiled = self.__dict__.get("_compiled")
        if compiled is not None and not torch.is_grad_enabled():
            try:
                with stage("backbone"):
                    feats = compiled[0](x)
                if compiled[1] is None:
                    return self._single_level(feats)
                with stage("fpn"):
                    return compiled[1](feats)
            except Exception as e:  # noqa: BLE001 - any failure of the compiler stack; eager always works
                # A compiler that fails (no C++ compiler, no Python headers, an inductor bug) must not stop
                # a prediction run: say why once, then run eagerly from here on.
                self.__dict__["_compiled"] = None
                warnings.warn(f"torch.compile failed, running the backbone eagerly instead: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", stacklevel=2)
        with stage("backbone"):
            feats = self.body(x)
        if self.fpn is None:
            return self._single_level(feats)
        with stage("fpn"):
            return self.fpn(feats)
