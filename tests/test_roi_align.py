"""RoIAlign / RoIPool: torchvision fixtures, a plain-loop transcription of torchvision's CPU kernels, gradcheck."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
import torch

import maskrcnn.ops.roi_align as ra
from maskrcnn.ops.roi_align import roi_align, roi_pool, roi_warp

FLT_MAX = 3.4028234663852886e38  # C's FLT_MAX, where torchvision's RoIPool scan starts for every dtype
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ----------------------------------------------------------------------------------------------------------------
# Brute-force references: one Python float (C double) operation at a time, in the kernels' loop order.


def _bilinear(y: float, x: float, height: int, width: int) -> list[tuple[int, int, float]]:
    """(row, col, weight) of one sampling point, as torchvision's pre_calc_for_bilinear_interpolate."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    if y <= 0:
        y = 0.0
    if x <= 0:
        x = 0.0
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def _lists(x: torch.Tensor, rois: torch.Tensor, out_hw: tuple[int, int], grad_out: torch.Tensor
           ) -> tuple[list, list, list, list]:
    """Inputs as nested lists and zeroed nested lists for the output (K, C, oh, ow) and input gradient."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    out = [[[[0.0] * ow for _ in range(oh)] for _ in range(c)] for _ in range(rois.shape[0])]
    grad = [[[[0.0] * w for _ in range(h)] for _ in range(c)] for _ in range(n)]
    return x.tolist(), grad_out.tolist(), out, grad


def _ref_roi_align(
    x: torch.Tensor,
    rois: torch.Tensor,
    out_hw: tuple[int, int],
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward output (K, C, oh, ow) and input gradient (N, C, H, W) for a float64 case."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    feats, g, out, grad = _lists(x, rois, out_hw, grad_out)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        b = int(b)
        offset = 0.5 if aligned else 0.0
        start_w, start_h = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = (x2 * scale - offset) - start_w, (y2 * scale - offset) - start_h
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / oh, roi_w / ow
        grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / oh))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / ow))
        count = max(grid_h * grid_w, 1)
        for ph in range(oh):
            for pw in range(ow):
                points = []
                for iy in range(grid_h):
                    yy = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        xx = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        points += _bilinear(yy, xx, h, w)
                for ch in range(c):
                    out[k][ch][ph][pw] = sum(wt * feats[b][ch][yi][xi] for yi, xi, wt in points) / count
                    for yi, xi, wt in points:
                        grad[b][ch][yi][xi] += g[k][ch][ph][pw] * wt / count
    return torch.tensor(out, dtype=torch.float64).view(-1, c, oh, ow), torch.tensor(grad, dtype=torch.float64)


def _c_round(v: float) -> int:
    """C's round(): ties away from zero (Decimal(v) is exact, so no double-rounding)."""
    return int(Decimal(v).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _ref_roi_pool(
    x: torch.Tensor, rois: torch.Tensor, out_hw: tuple[int, int], scale: float, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward output and input gradient of torchvision's CPU RoIPool for a float64 case."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    feats, g, out, grad = _lists(x, rois, out_hw, grad_out)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        b = int(b)
        sx, sy, ex, ey = (_c_round(v * scale) for v in (x1, y1, x2, y2))
        bin_h, bin_w = max(ey - sy + 1, 1) / oh, max(ex - sx + 1, 1) / ow
        for ph in range(oh):
            for pw in range(ow):
                hs = min(max(math.floor(ph * bin_h) + sy, 0), h)
                he = min(max(math.ceil((ph + 1) * bin_h) + sy, 0), h)
                ws = min(max(math.floor(pw * bin_w) + sx, 0), w)
                we = min(max(math.ceil((pw + 1) * bin_w) + sx, 0), w)
                empty = he <= hs or we <= ws
                for ch in range(c):
                    best, arg = (0.0 if empty else -FLT_MAX), None
                    for yy in range(hs, he):
                        for xx in range(ws, we):
                            if feats[b][ch][yy][xx] > best:
                                best, arg = feats[b][ch][yy][xx], (yy, xx)
                    out[k][ch][ph][pw] = best
                    if arg is not None:
                        grad[b][ch][arg[0]][arg[1]] += g[k][ch][ph][pw]
    return torch.tensor(out, dtype=torch.float64).view(-1, c, oh, ow), torch.tensor(grad, dtype=torch.float64)


def _random_rois(gen: torch.Generator, n: int, h: int, w: int, k: int, scale: float) -> torch.Tensor:
    """RoIs in image pixels: random ones plus the kernel's edge cases (outside, sub-pixel, inverted, huge,
    exactly on the -1 / H and W limits)."""
    img_h, img_w = h / scale, w / scale
    xy = (torch.rand(k, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2) * torch.tensor([img_w, img_h])
    wh = torch.rand(k, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 1.2
    batch = torch.randint(0, n, (k, 1), generator=gen).to(torch.float64)
    rand = torch.cat([batch, xy, xy + wh], dim=1)
    s = 1.0 / scale
    special = torch.tensor(
        [
            [0, -3.0 * s, -2.0 * s, 2.5 * s, 1.5 * s],  # partly outside, top-left
            [1, 1.3 * s, 2.2 * s, 1.7 * s, 2.6 * s],  # under a pixel
            [0, 5.0 * s, 4.0 * s, 2.0 * s, 1.0 * s],  # inverted (x2 < x1, y2 < y1)
            [1, -4.0 * s, -5.0 * s, (w + 6.0) * s, (h + 7.0) * s],  # larger than the map
            [0, -1.0 * s, -1.0 * s, w * s, h * s],  # samples reaching exactly -1 and H / W
            [1, (w - 1.0) * s, (h - 1.0) * s, (w + 0.5) * s, (h + 0.5) * s],  # last row/column snapping
            [0, 0.5 * s, 0.5 * s, 0.5 * s, 0.5 * s],  # zero size
            [1, 2.0 * s, 1.0 * s, 2.0 * s + 3 * w * s, 1.5 * s],  # very wide, one pixel high
        ],
        dtype=torch.float64,
    )
    return torch.cat([rand, special], dim=0)


# ----------------------------------------------------------------------------------------------------------------
# torchvision fixtures


# ``ops_fixture`` (tests/conftest.py) loads torchvision/ops.pt, skipping when the fixtures are absent.


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str, i: int, case: dict[str, Any]) -> None:
    params = ", ".join(f"{k}={v}" for k, v in case.items() if not isinstance(v, torch.Tensor))
    tol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0, msg=lambda m: f"{what}, case {i} ({params}): {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roi_align_matches_torchvision_fixtures(ops_fixture: dict[str, Any], dtype: torch.dtype) -> None:
    cases = [c for c in ops_fixture["roi_align"] if c["features"].dtype == dtype]
    assert cases, f"no {dtype} roi_align fixtures"
    if dtype == torch.float64:
        assert all("grad_output" in c for c in cases)
    for i, case in enumerate(cases):
        feats = case["features"].clone().requires_grad_("grad_output" in case)
        out = roi_align(
            feats, case["rois"], case["output_size"], case["spatial_scale"], case["sampling_ratio"], case["aligned"]
        )
        _assert_matches(out, case["output"], "output", i, case)
        if "grad_output" in case:
            out.backward(case["grad_output"])
            _assert_matches(feats.grad, case["grad_features"], "grad", i, case)


def test_roi_pool_matches_torchvision_fixtures(ops_fixture: dict[str, Any]) -> None:
    cases = ops_fixture["roi_pool"]
    assert cases
    for i, case in enumerate(cases):
        feats = case["features"].clone().requires_grad_(True)
        out = roi_pool(feats, case["rois"], case["output_size"], case["spatial_scale"])
        _assert_matches(out, case["output"], "output", i, case)
        out.backward(case["grad_output"])
        _assert_matches(feats.grad, case["grad_features"], "grad", i, case)


# ----------------------------------------------------------------------------------------------------------------
# Brute-force kernel transcription vs the vectorised ops


@pytest.mark.parametrize(
    ("out_hw", "scale", "sampling_ratio", "aligned"),
    [
        ((3, 2), 1.0, 2, False),
        ((3, 2), 1.0, 2, True),
        ((2, 3), 0.5, 1, False),
        ((2, 2), 1.0, 3, True),
        ((3, 2), 1.0, -1, False),
        ((3, 2), 1.0, 0, True),
        ((2, 3), 0.5, -1, True),
        ((4, 4), 0.25, 0, False),
    ],
)
def test_roi_align_matches_brute_force(
    out_hw: tuple[int, int], scale: float, sampling_ratio: int, aligned: bool
) -> None:
    gen = torch.Generator().manual_seed(hash((out_hw, scale, sampling_ratio, aligned)) % 2**31)
    x = torch.randn(2, 2, 7, 9, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 2, 7, 9, 8, scale)
    grad_out = torch.randn(rois.shape[0], 2, *out_hw, generator=gen, dtype=torch.float64)
    want_out, want_grad = _ref_roi_align(x, rois, out_hw, scale, sampling_ratio, aligned, grad_out)
    xg = x.clone().requires_grad_(True)
    out = roi_align(xg, rois, out_hw, scale, sampling_ratio, aligned)
    out.backward(grad_out)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(xg.grad, want_grad, atol=1e-12, rtol=0)


def test_roi_align_chunking_and_grouping_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mixed grid sizes put RoIs in several power-of-two groups; a tiny budget then splits every group too.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 2, 7, 9, 12, 1.0)
    grad_out = torch.randn(rois.shape[0], 3, 2, 2, generator=gen, dtype=torch.float64)
    want_out, want_grad = _ref_roi_align(x, rois, (2, 2), 1.0, -1, False, grad_out)
    monkeypatch.setattr(ra, "_MAX_TRIPLETS", 1)
    xg = x.clone().requires_grad_(True)
    out = roi_align(xg, rois, (2, 2), 1.0, -1, False)
    out.backward(grad_out)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(xg.grad, want_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("out_hw", "scale"), [((3, 2), 1.0), ((2, 3), 0.5), ((4, 4), 0.25)])
def test_roi_pool_matches_brute_force(out_hw: tuple[int, int], scale: float) -> None:
    gen = torch.Generator().manual_seed(11 + out_hw[0])
    # Small integers make ties common, which checks the first-maximum-in-scan-order gradient routing.
    x = torch.randint(0, 4, (2, 3, 7, 9), generator=gen).to(torch.float64)
    rois = _random_rois(gen, 2, 7, 9, 8, scale)
    # Half-pixel coordinates after scaling exercise C's round-half-away-from-zero.
    halves = torch.tensor([[0.5, 1.5, 2.5, 3.5], [-0.5, -1.5, 4.5, 2.5]], dtype=torch.float64) / scale
    rois = torch.cat([rois, torch.cat([torch.tensor([[0.0], [1.0]], dtype=torch.float64), halves], dim=1)])
    grad_out = torch.randn(rois.shape[0], 3, *out_hw, generator=gen, dtype=torch.float64)
    want_out, want_grad = _ref_roi_pool(x, rois, out_hw, scale, grad_out)
    xg = x.clone().requires_grad_(True)
    out = roi_pool(xg, rois, out_hw, scale)
    out.backward(grad_out)
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    torch.testing.assert_close(xg.grad, want_grad, atol=1e-12, rtol=0)


def test_roi_pool_lowest_values_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    # Values at or below -FLT_MAX never win the kernel's strict ">" scan: the bin reports -FLT_MAX, no gradient.
    x = torch.full((1, 2, 4, 5), -1e300, dtype=torch.float64)
    x[0, 0, 2, 3] = float("-inf")
    x[0, 1, 1, 1] = -5.0
    rois = torch.tensor([[0, 0, 0, 4, 3], [0, 1, 1, 2, 2], [0, 2, 1, 4, 3]], dtype=torch.float64)
    grad_out = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    want_out, want_grad = _ref_roi_pool(x, rois, (2, 2), 1.0, grad_out)
    monkeypatch.setattr(ra, "_MAX_POOL_ELEMENTS", 1)
    xg = x.clone().requires_grad_(True)
    out = roi_pool(xg, rois, (2, 2), 1.0)
    out.backward(grad_out)
    assert (out[:, 0] == -FLT_MAX).any()
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    torch.testing.assert_close(xg.grad, want_grad, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Autograd, shapes and input forms


@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(2, False), (-1, True)])
def test_roi_align_gradcheck(sampling_ratio: int, aligned: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 3.9], [1, -1, 1.5, 3, 6.5], [0, 2, 2, 2.4, 2.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 1.0, sampling_ratio, aligned), (x,))


def test_roi_pool_gradcheck() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 3.9], [1, -1.0, 1.5, 3.0, 6.5]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (2, 2), 1.0), (x,))


@pytest.mark.parametrize("op", [roi_align, roi_pool])
def test_empty_rois(op: Any) -> None:
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    for rois in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
        out = op(x, rois, (7, 5))
        assert out.shape == (0, 3, 7, 5)
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        assert grad is None or (grad.shape == x.shape and not grad.any())


@pytest.mark.parametrize("op", [roi_align, roi_pool])
def test_list_of_boxes_equals_rois_tensor(op: Any) -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 10, 12, generator=gen)
    boxes = [
        torch.tensor([[1.0, 2.0, 8.0, 7.0], [0.5, 0.5, 3.0, 9.5], [4.0, 1.0, 11.0, 3.0]]),
        torch.tensor([[2.0, 3.0, 6.0, 9.0]]),
    ]
    rois = torch.cat([torch.tensor([[0.0], [0.0], [0.0], [1.0]]), torch.cat(boxes)], dim=1)
    assert torch.equal(op(x, boxes, 3, 0.5), op(x, rois, (3, 3), 0.5))
    assert torch.equal(ra.convert_boxes_to_roi_format(boxes), rois)


def test_float32_and_layout_agree_with_float64() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 9, 11, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 2, 9, 11, 6, 1.0)
    want = roi_align(x, rois, 3, 1.0, 2, True)
    got = roi_align(x.float().contiguous(memory_format=torch.channels_last), rois.float(), 3, 1.0, 2, True)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 2, 9, 11, 10, 1.0)
    grad_out = torch.randn(rois.shape[0], 3, 3, 3, generator=gen, dtype=torch.float64)
    for op, kwargs in ((roi_align, {"sampling_ratio": -1, "aligned": True}), (roi_align, {}), (roi_pool, {})):
        outs, grads = [], []
        for device in ("cpu", "cuda"):
            xg = x.to(device).requires_grad_(True)
            out = op(xg, rois.to(device), 3, 1.0, **kwargs)
            out.backward(grad_out.to(device))
            outs.append(out.cpu())
            grads.append(xg.grad.cpu())
        torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(grads[1], grads[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("op", [roi_align, roi_pool])
def test_half_input_is_computed_in_float32(op: Any) -> None:
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 6, 7, generator=gen).half()
    rois = _random_rois(gen, 2, 6, 7, 5, 1.0)
    out = op(x, rois, 3, 1.0)
    assert out.dtype == torch.float16
    assert torch.equal(out, op(x.float(), rois, 3, 1.0).half())


# ----------------------------------------------------------------------------------------------------------------
# RoIWarp (the paper's Table 2c): the box rounded to feature pixels, then bilinear samples averaged per bin


def _ref_roi_warp(
    x: torch.Tensor, rois: torch.Tensor, out_hw: tuple[int, int], scale: float, sampling_ratio: int, aligned: bool,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward output and input gradient of RoIWarp, one sample at a time, for a float64 case."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    feats, g, out, grad = _lists(x, rois, out_hw, grad_out)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        b = int(b)
        # Quantised box corners, in feature pixels; then RoIAlign's continuous bins over that box.
        qx1, qy1, qx2, qy2 = (float(_c_round(v * scale)) for v in (x1, y1, x2, y2))
        offset = 0.5 if aligned else 0.0
        sx, sy = qx1 - offset, qy1 - offset
        rw, rh = (qx2 - offset) - sx, (qy2 - offset) - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rh / oh))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rw / ow))
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                points = []
                for iy in range(gh):
                    yy = sy + ph * rh / oh + (iy + 0.5) * (rh / oh) / gh
                    for ix in range(gw):
                        xx = sx + pw * rw / ow + (ix + 0.5) * (rw / ow) / gw
                        points += _bilinear(yy, xx, h, w)
                for ch in range(c):
                    out[k][ch][ph][pw] = sum(wt * feats[b][ch][yi][xi] for yi, xi, wt in points) / count
                    for yi, xi, wt in points:
                        grad[b][ch][yi][xi] += g[k][ch][ph][pw] * wt / count
    return torch.tensor(out, dtype=torch.float64).view(-1, c, oh, ow), torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize(("out_hw", "scale", "sampling_ratio", "aligned"),
                         [((3, 2), 1.0, 2, False), ((2, 3), 0.5, -1, True), ((4, 4), 0.25, 1, False)])
def test_roi_warp_matches_brute_force(out_hw: tuple[int, int], scale: float, sampling_ratio: int,
                                      aligned: bool) -> None:
    gen = torch.Generator().manual_seed(21 + out_hw[0])
    x = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    rois = _random_rois(gen, 2, 7, 9, 8, scale)
    halves = torch.tensor([[0.5, 1.5, 2.5, 3.5], [-0.5, -1.5, 4.5, 2.5]], dtype=torch.float64) / scale
    rois = torch.cat([rois, torch.cat([torch.tensor([[0.0], [1.0]], dtype=torch.float64), halves], dim=1)])
    grad_out = torch.randn(rois.shape[0], 3, *out_hw, generator=gen, dtype=torch.float64)
    want_out, want_grad = _ref_roi_warp(x, rois, out_hw, scale, sampling_ratio, aligned, grad_out)
    xg = x.clone().requires_grad_(True)
    out = roi_warp(xg, rois, out_hw, scale, sampling_ratio, aligned)
    out.backward(grad_out)
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=0)
    torch.testing.assert_close(xg.grad, want_grad, atol=1e-10, rtol=0)


def test_roi_warp_gradcheck_and_quantisation() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 3.9], [1, -1, 1.5, 3, 6.5], [0, 2, 2, 2.4, 2.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_warp(t, rois, (2, 3), 1.0, 2, False), (x,))
    # Boxes on whole feature pixels are not moved by the rounding: there RoIWarp is RoIAlign.
    whole = torch.tensor([[0, 0, 2, 8, 6], [1, 2, 0, 10, 10]], dtype=torch.float64)
    torch.testing.assert_close(roi_warp(x, whole, 3, 0.5, 2, True), roi_align(x, whole, 3, 0.5, 2, True))
    # A sub-pixel shift of the box moves RoIAlign's output but not RoIWarp's.
    shifted = whole + torch.tensor([0, 0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    assert torch.equal(roi_warp(x, shifted, 3, 0.5, 2, True), roi_warp(x, whole, 3, 0.5, 2, True))
    assert not torch.allclose(roi_align(x, shifted, 3, 0.5, 2, True), roi_align(x, whole, 3, 0.5, 2, True))
