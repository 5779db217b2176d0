"""Speed and memory benchmarks: inference latency per stage, training steps, throughput, FLOP/s, peak RSS.

Every figure is measured for each requested *mode* of the same code, in the same run, and reported as ratios
against the comparison mode (``naive``: :meth:`MaskRCNN.optimize` off), against a stored baseline JSON, and
against the reference figures of torchvision 0.28 on 2 CPU cores (:data:`REFERENCE`)::

    maskrcnn bench                                   # everything, fast vs naive, table + bench_results.json
    maskrcnn bench --only inference --models r50_fpn_v1 --repeats 3
    maskrcnn bench --baseline old.json --json new.json

Each scenario (model x mode x task) runs in a fresh process by default, so that peak RSS is that scenario's and
no allocator state carries over. Times are medians of ``repeats`` runs after ``warmup`` runs. Per-stage times come
from :class:`maskrcnn.modeling.timing.StageTimer`. Efficiency is the model's FLOPs (counted by
``torch.utils.flop_counter.FlopCounterMode`` on one forward of the same mode) per second, as a fraction of the
best 3x3 conv microbenchmark (NCHW or channels-last) measured in the same process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskrcnn.runtime import keep_freed_memory

__all__ = ["REFERENCE", "BenchSettings", "MODELS", "MODEL_PRESETS", "MODES", "compare", "format_report", "run_benchmarks",
           "write_json"]

# torchvision 0.28, 2 CPU cores, R50-FPN v1, one 800x1216 image, 100 detections with masks pasted, median of 5.
REFERENCE: dict[str, Any] = {
    "source": "torchvision 0.28 on 2 CPU cores (the figures of the performance issue, not measured here)",
    "inference_s": 6.4,
    "train_step_s": 14.0,
    "peak_rss_inference_mb": 1800.0,
    "peak_rss_train_mb": 3600.0,
    "stage_share": {"backbone+fpn": 0.52, "rpn.head": 0.12, "box_head.roi_align": 0.07, "mask_head": 0.14,
                    "paste": 0.07},
    "conv_gflops_nchw": 147.0,
    "conv_gflops_channels_last": 208.0,
    "targets": {"inference_vs_reference": 0.5, "train_vs_reference": 0.7, "conv_fraction": 0.6},
}

MODELS = ("r50_fpn_v1", "r50_fpn_v2", "r18_fpn")
# Each benchmark model's preset. The detectron2 zoo architectures (``--models d2_R_50_C4,...``) run with random
# weights at full size: their speed does not depend on the weights' values, only on the detections' count.
MODEL_PRESETS: dict[str, str] = {
    "r50_fpn_v1": "torchvision_v1", "r50_fpn_v2": "torchvision_v2", "r18_fpn": "r18_fpn_demo",
    **{f"d2_{arch}": f"mask_rcnn_{arch}_3x" for arch in
       ("R_50_FPN", "R_50_C4", "R_50_DC5", "R_101_FPN", "R_101_C4", "R_101_DC5", "X_101_32x8d_FPN")},
}
# "fast" is load_model's default; "fast_math" adds norm folding and channels-last everywhere (not bit-exact);
# "compile" is "fast" with the body and FPN of inference through torch.compile (not bit-exact; no training);
# "bf16" is fast_math under bfloat16 autocast (training too: solver.amp=bf16).
# "onnx" runs the model exported by maskrcnn.export in onnxruntime's CPU provider (inference only; [onnx] extra).
MODES = ("fast", "naive", "fast_math", "compile", "bf16", "onnx")
INFERENCE_ONLY_MODES = ("compile", "onnx")
TASKS = ("inference", "training", "throughput", "large_image", "serve")
# serve runs `maskrcnn serve` on the model saved (fast: load_model's default path) or exported (onnx).
SERVE_MODES = ("fast", "onnx")
# large_image measures peak RSS, so it runs on the default path only: the naive path pastes dense float masks
# (100 x 9000 x 12000 x 4 bytes = 43 GB) and the other modes change no memory-relevant step.
LARGE_IMAGE_MODES = ("fast",)
LARGE_IMAGE_RUNS = ("predict", "eval")
TOP_STAGES = ("transform", "backbone", "fpn", "rpn", "box_head", "mask_head", "paste")


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. Sizes in pixels, times in seconds, memory in MB."""

    height: int = 800
    width: int = 1216
    models: tuple[str, ...] = MODELS
    # Measured modes; the second one (if any) is what ratios are taken against.
    modes: tuple[str, ...] = ("fast", "naive")
    tasks: tuple[str, ...] = ("inference", "training", "throughput")
    repeats: int = 5
    warmup: int = 1
    detections: int = 100
    train_batches: tuple[int, ...] = (1, 2)
    train_model: str = "r50_fpn_v1"
    throughput_batch: int = 8
    throughput_model: str = "r50_fpn_v1"
    throughput_repeats: int = 2
    # None: torch's default (one thread per core).
    threads: int | None = None
    # Fixture weights (../shared/fixtures/torchvision) for the R50 models when present; random weights otherwise.
    fixtures: str | None = None
    random_weights: bool = False
    # One fresh process per scenario (clean peak RSS); False runs everything here (tests, quick looks).
    isolate: bool = True
    # Channels, height and width of the conv microbenchmark (a 3x3 conv C -> C, stride 1, batch 1).
    conv_shape: tuple[int, int, int] = (256, 200, 304)
    count_flops: bool = True
    seed: int = 0
    # THP_MEM_ALLOC_ENABLE for the worker processes (PyTorch then backs large tensors with transparent huge
    # pages, which makes first touches of fresh activations cheaper): True / False, or None to inherit ours.
    # torch reads it once, at import, so it only acts with ``isolate``.
    thp: bool | None = None
    # Before each scenario wait up to this many seconds for other processes to leave the CPUs idle (0: don't).
    wait_idle: float = 0.0
    # large_image: (height, width) of the big photo, run through `predict` and `eval` end to end, each also at
    # (height, width) above as the baseline of its peak-RSS ratio; the model resizes to its usual test size.
    large_size: tuple[int, int] = (9000, 12000)
    large_model: str = "r50_fpn_v1"
    large_test_size: tuple[int, int] = (800, 1333)
    # serve: the bounded load test of `maskrcnn serve` (clients x requests, each client its own HEIGHT x WIDTH PNG).
    serve_model: str = "r18_fpn"
    serve_clients: int = 4
    serve_requests: int = 25


# ---------------------------------------------------------------------------------------------------------------
# Memory and timing helpers


def _rss_mb(field_name: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    peak = _rss_mb("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource  # noqa: PLC0415 - POSIX only

        scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    except ImportError:
        return None


def _median_runs(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return runs


def conv_microbench(shape: tuple[int, int, int], repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a 3x3 conv C -> C on a (1, C, H, W) map, NCHW and channels-last (median of ``repeats``)."""
    c, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, h, w, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g) * 0.02
    flop = 2.0 * c * c * 9 * h * w
    out: dict[str, float] = {"gflop": flop / 1e9}
    with torch.inference_mode():
        for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xi, wi = x.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt)
            runs = _median_runs(lambda: torch.nn.functional.conv2d(xi, wi, None, 1, 1), repeats, 1)
            out[f"{name}_gflops"] = flop / statistics.median(runs) / 1e9
    out["best_gflops"] = max(out["nchw_gflops"], out["channels_last_gflops"])
    return out


def _register_fused_conv_flops() -> None:
    """Teach FlopCounterMode the oneDNN fused convs of the fast path (counted like the aten conv they replace)."""
    from torch.utils import flop_counter  # noqa: PLC0415

    packet = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if packet is None or packet in flop_counter.flop_registry or packet.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(packet)
    def _conv(x_shape: Any, second: Any, third: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        # default: (X, W, B, ...); binary: (X, other, W, B, ...), where W is the 4-D argument after other.
        w_shape = third if third is not None and len(third) == 4 else second
        return flop_counter.conv_flop_count(list(x_shape), list(w_shape), list(out_shape))


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs (multiply-add = 2) of the ops ``fn`` runs, as counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    _register_fused_conv_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------------
# Models and inputs


def _fixtures_root(settings: BenchSettings) -> Path:
    if settings.fixtures:
        return Path(settings.fixtures)
    env = os.environ.get("MASKRCNN_FIXTURES")
    if env:
        return Path(env)
    shared = Path(os.environ.get("MASKRCNN_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    return shared / "fixtures"


def _fixture_state(name: str, settings: BenchSettings) -> dict[str, torch.Tensor] | None:
    """The torchvision fixture state dict for an R50 model (v2 completed with v1's body), or None."""
    if settings.random_weights or name not in ("r50_fpn_v1", "r50_fpn_v2"):
        return None
    root = _fixtures_root(settings) / "torchvision"
    v1 = root / "maskrcnn_r50_fpn_v1" / "weights.pth"
    own = root / ("maskrcnn_r50_fpn_v1" if name == "r50_fpn_v1" else "maskrcnn_r50_fpn_v2") / "weights.pth"
    if not (v1.is_file() and own.is_file()):
        return None
    state = torch.load(own, map_location="cpu", weights_only=True)
    if name == "r50_fpn_v2":
        body = torch.load(v1, map_location="cpu", weights_only=True)
        state.update({k: v for k, v in body.items() if k.startswith("backbone.body.")})
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def build_model(name: str, mode: str, settings: BenchSettings) -> tuple[Any, str]:
    """The named benchmark model in ``mode`` ("fast", "naive", "fast_math") and where its weights came from.

    Test-time sizes equal the input's, so the image is not resized; score threshold 0 and ``detections`` per
    image make the mask head and the paste do their full work.
    """
    from maskrcnn.config import apply_overrides, get_preset  # noqa: PLC0415
    from maskrcnn.modeling.mask_rcnn import MaskRCNN  # noqa: PLC0415
    from maskrcnn.weights import config_for_torchvision  # noqa: PLC0415

    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODEL_PRESETS)}")
    state = _fixture_state(name, settings)
    if state is not None:
        cfg = config_for_torchvision(state)
        source = "torchvision fixture weights"
    else:
        preset = MODEL_PRESETS[name]
        cfg = get_preset(preset)
        source = f"random init ({preset} preset)"
    cfg = apply_overrides(cfg, {
        "input.min_size_test": min(settings.height, settings.width),
        "input.max_size_test": max(settings.height, settings.width),
        "model.box_head.score_thresh": 0.0,
        "model.box_head.detections_per_img": settings.detections,
    })
    torch.manual_seed(settings.seed)
    model = MaskRCNN(cfg)
    if state is not None:
        model.load_state_dict(state, strict=False)
    elif name.startswith("d2_"):
        # Random weights in a frozen-BN ResNet fed 0-255 pixels overflow float32 by res5, and non-finite
        # proposals are dropped: the bench would time a model that finds nothing. Unit-scale input and
        # zero-initialised last norms of the residual branches (Goyal et al. 2017) keep the activations finite;
        # one class scoring ~1 for every proposal then gives a trained model's work: ~1000 proposals, NMS, and
        # ``detections`` masks to predict and paste. Neither changes the amount of arithmetic.
        with torch.no_grad():
            model.pixel_std.fill_(58.0)
            for block in model.modules():
                if hasattr(block, "bn3") and hasattr(block.bn3, "weight"):
                    block.bn3.weight.zero_()
            cls = model.roi_heads.box_predictor.cls_score
            cls.weight.zero_()
            cls.bias.zero_()
            cls.bias[0] = 10.0
    model.eval()
    model.optimize(mode != "naive", fast_math=mode == "fast_math", compile=mode == "compile",
                   amp="bf16" if mode == "bf16" else "none")
    return model, source


def _image(settings: BenchSettings, index: int = 0) -> torch.Tensor:
    """A (3, H, W) uint8 test image: smooth random blobs, so that proposals and masks vary like a photo's."""
    g = torch.Generator().manual_seed(settings.seed + index)
    coarse = torch.rand(1, 3, max(settings.height // 32, 2), max(settings.width // 32, 2), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(settings.height, settings.width), mode="bilinear",
                                          align_corners=False)[0]
    noise = torch.rand(3, settings.height, settings.width, generator=g) * 0.1
    return ((img * 0.9 + noise) * 255).clamp(0, 255).to(torch.uint8)


def _targets(settings: BenchSettings, num_classes: int, index: int) -> dict[str, torch.Tensor]:
    """Three random boxes with rectangular masks inside them, labels in 1..K."""
    g = torch.Generator().manual_seed(1000 + index)
    h, w = settings.height, settings.width
    boxes, masks = [], torch.zeros(3, h, w, dtype=torch.uint8)
    for i in range(3):
        bw, bh = int(w * (0.15 + 0.3 * torch.rand(1, generator=g))), int(h * (0.15 + 0.3 * torch.rand(1, generator=g)))
        x0, y0 = int((w - bw) * torch.rand(1, generator=g)), int((h - bh) * torch.rand(1, generator=g))
        boxes.append([x0, y0, x0 + bw, y0 + bh])
        masks[i, y0 + bh // 8: y0 + bh - bh // 8, x0 + bw // 8: x0 + bw - bw // 8] = 1
    labels = torch.randint(1, num_classes + 1, (3,), generator=g)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels, "masks": masks}


# ---------------------------------------------------------------------------------------------------------------
# Scenarios (each returns a JSON-ready dict)


def _stage_medians(per_run: list[dict[str, float]], totals: list[float]) -> dict[str, float]:
    names = sorted({k for r in per_run for k in r})
    out = {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in names}
    top = sum(out.get(k, 0.0) for k in TOP_STAGES)
    out["other"] = max(statistics.median(totals) - top, 0.0)
    return out


def bench_inference(name: str, mode: str, settings: BenchSettings) -> dict[str, Any]:
    """Latency of ``predict`` on one image (median, s), per-stage medians, detections, FLOPs and peak RSS."""
    from maskrcnn.modeling.timing import StageTimer  # noqa: PLC0415

    from maskrcnn.predict import Predictor  # noqa: PLC0415

    if mode == "onnx":
        return bench_onnx_inference(name, settings)
    net, source = build_model(name, mode, settings)
    model = Predictor(net)
    image = _image(settings)
    _reset_peak_rss()
    rss_before = _rss_mb("VmRSS")
    for _ in range(settings.warmup):
        results = model.predict(image)
    stages: list[dict[str, float]] = []
    runs: list[float] = []
    for _ in range(max(settings.repeats, 1)):
        with StageTimer() as timer:
            start = time.perf_counter()
            results = model.predict(image)
            runs.append(time.perf_counter() - start)
        stages.append(dict(timer.seconds))
    peak = _peak_rss_mb()
    out: dict[str, Any] = {
        "median_s": statistics.median(runs), "runs_s": runs, "stages_s": _stage_medians(stages, runs),
        "detections": len(results[0]), "weights": source, "peak_rss_mb": peak, "rss_before_mb": rss_before,
        "image": [3, settings.height, settings.width],
    }
    if settings.count_flops:
        flop = count_flops(lambda: model.predict(image))
        out["gflop"] = flop / 1e9
        out["gflops_per_s"] = flop / 1e9 / out["median_s"]
    return out


def bench_onnx_inference(name: str, settings: BenchSettings) -> dict[str, Any]:
    """Latency of the exported graph in onnxruntime on one (H, W, 3) image (median, s), with the export time.

    The graph holds the whole inference (resize, networks, NMS, paste), as ``predict`` does in PyTorch; it runs
    with as many onnxruntime threads as torch has here.
    """
    import tempfile  # noqa: PLC0415

    from maskrcnn.export import OnnxModel, export_onnx  # noqa: PLC0415

    model, source = build_model(name, "fast", settings)
    image = _image(settings).permute(1, 2, 0).contiguous().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(model, Path(tmp) / f"{name}.onnx")
        export_s = time.perf_counter() - start
        del model
        runner = OnnxModel(path, threads=settings.threads or torch.get_num_threads())
        _reset_peak_rss()
        rss_before = _rss_mb("VmRSS")
        runs = _median_runs(lambda: runner.infer(image), settings.repeats, settings.warmup)
        out = runner.infer(image)
    # onnxruntime runs the graph as one call: no per-stage times.
    return {"median_s": statistics.median(runs), "runs_s": runs, "stages_s": {},
            "detections": int(out["boxes"].shape[0]), "weights": source, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_mb": rss_before,
            "image": [3, settings.height, settings.width], "export_s": export_s}


def bench_serve(name: str, mode: str, settings: BenchSettings) -> dict[str, Any]:
    """The bounded load test of ``maskrcnn serve``: requests/s and p50/p95 latency (s) of ``serve_clients`` clients
    sending ``serve_requests`` PNGs each (``mask_format=none``), the model saved (fast) or exported (onnx).

    The server runs in its own process with ``threads`` OpenMP threads; every answer must be a 200 or a 503. Its
    peak RSS (MB) and the CPU time it spent under the load are recorded with the figures.
    """
    import io  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    from maskrcnn.serve.load import run_load, serving  # noqa: PLC0415
    from maskrcnn.weights import save_model  # noqa: PLC0415

    model, source = build_model(name, "fast", settings)
    images = []
    for c in range(settings.serve_clients):
        buf = io.BytesIO()
        Image.fromarray(_image(settings, c).permute(1, 2, 0).numpy()).save(buf, format="PNG")
        images.append(buf.getvalue())

    def check(client: int, status: int, headers: dict[str, str], body: bytes) -> None:
        if status not in (200, 503):
            raise RuntimeError(f"serve bench: client {client} got HTTP {status}: {body[:300]!r}")

    env = dict(os.environ, OMP_NUM_THREADS=str(settings.threads or torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "onnx":
            from maskrcnn.export import export_onnx  # noqa: PLC0415

            weights = str(export_onnx(model, Path(tmp) / f"{name}.onnx"))
            args: list[str] = []
        else:
            weights = str(save_model(model, Path(tmp) / name))
            args = ["--device", "cpu"]
        del model
        # Score threshold 0: every detection's mask is predicted, as in the inference task.
        with serving(weights, *args, "--score-threshold", "0", env=env) as server:
            cpu0 = server.cpu_seconds()
            figs = run_load(server.url, images, settings.serve_requests, check)
            cpu1 = server.cpu_seconds()
            # The server's own work, which the foreign-CPU share must not count as another process's.
            figs["server_cpu_s"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            figs["peak_rss_mb"] = server.peak_rss_mb()
    figs.update(median_s=figs["p50_s"], weights=source, image=[3, settings.height, settings.width])
    return figs


def format_serve(figs: dict[str, dict[str, Any]]) -> str:
    """The serve task's table: one row per mode."""
    rows = [[mode, f"{f['clients']} x {f['requests'] // max(f['clients'], 1)}", f"{f['ok']}", f"{f['busy']}",
             f"{f['requests_per_s']:.2f}", _fmt_s(f["p50_s"]), _fmt_s(f["p95_s"])] for mode, f in figs.items()]
    return "serve (bounded load test of maskrcnn serve)\n" + _table(
        ["mode", "clients x requests", "200", "503", "requests/s", "p50", "p95"], rows)


def large_image_keys(settings: BenchSettings) -> list[str]:
    """Scenario keys of the large_image task: "<predict|eval>@<H>x<W>" at the large size, then the baseline size."""
    sizes = (settings.large_size, (settings.height, settings.width))
    return [f"{run}@{h}x{w}" for run in LARGE_IMAGE_RUNS for h, w in sizes]


def _large_image_files(settings: BenchSettings, size: tuple[int, int]) -> tuple[Path, Path]:
    """(JPEG, COCO JSON with two ground-truth instances) of a smooth random (H, W) picture, made once per size."""
    import tempfile  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    h, w = size
    folder = Path(tempfile.gettempdir()) / f"maskrcnn-bench-{h}x{w}-seed{settings.seed}"
    jpg, ann = folder / "image.jpg", folder / "annotations.json"
    if jpg.is_file() and ann.is_file():
        return jpg, ann
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(settings.seed)
    coarse = (torch.rand(max(h // 300, 2), max(w // 300, 2), 3, generator=g) * 255).to(torch.uint8).numpy()
    # Pillow upsamples the coarse noise: no full-size float tensor, so making the file stays cheap.
    Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(jpg, quality=90)
    polys = [[w * 0.1, h * 0.1, w * 0.4, h * 0.1, w * 0.4, h * 0.5, w * 0.1, h * 0.5],
             [w * 0.5, h * 0.3, w * 0.9, h * 0.35, w * 0.7, h * 0.9]]
    anns = []
    for i, p in enumerate(polys, 1):
        xs, ys = p[0::2], p[1::2]
        box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        anns.append({"id": i, "image_id": 1, "category_id": i, "segmentation": [p], "bbox": box,
                     "area": box[2] * box[3], "iscrowd": 0})
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": jpg.name, "height": h, "width": w}],
                               "annotations": anns,
                               "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return jpg, ann


def bench_large_image(key: str, mode: str, settings: BenchSettings) -> dict[str, Any]:
    """Peak RSS and time of `predict` (overlay, COCO JSON) or `eval` (COCO AP) on one (H, W) photo, end to end.

    The picture is decoded, resized to ``large_test_size`` and run with score threshold 0 and ``detections``
    per image, so the masks of that many boxes are pasted at the photo's full size.
    """
    import tempfile  # noqa: PLC0415

    from maskrcnn.engine.runs import evaluate_run  # noqa: PLC0415
    from maskrcnn.predict import Predictor  # noqa: PLC0415

    run, size = key.split("@")
    h, w = (int(v) for v in size.split("x"))
    jpg, ann = _large_image_files(settings, (h, w))
    test_h, test_w = settings.large_test_size
    net, source = build_model(settings.large_model, mode, dataclasses.replace(settings, height=test_h, width=test_w))
    _reset_peak_rss()
    rss_before = _rss_mb("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        if run == "predict":
            summary = Predictor(net, score_threshold=0.0, progress=False).run([jpg], out)
            detections = summary.detections
        else:
            evaluate_run(net, ann, jpg.parent, out, progress=False)
            detections = len(json.loads((Path(out) / "results.json").read_text()))
        seconds = time.perf_counter() - start
    return {"median_s": seconds, "runs_s": [seconds], "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before,
            "detections": detections, "image": [3, h, w], "weights": source, "model": settings.large_model,
            # What the masks would take as (N, H, W) bool tensors, which the results no longer hold.
            "dense_masks_mb": detections * h * w / 2**20}


def format_large_image(figs: dict[str, Any]) -> str:
    """The large_image table: peak RSS of each run at the large size against the same run at the baseline size."""
    rows = []
    for key, fig in figs.items():
        run, size = key.split("@")
        base = next((f for k, f in figs.items() if k.startswith(run + "@") and k != key), None)
        large = base is not None and fig["image"][1] * fig["image"][2] > base["image"][1] * base["image"][2]
        rows.append([key, str(fig["detections"]), _fmt_s(fig["median_s"]), f"{fig['peak_rss_mb'] or 0:.0f} MB",
                     f"{fig['dense_masks_mb']:.0f} MB",
                     _fmt_r(_ratio(fig["peak_rss_mb"], base["peak_rss_mb"])) if large else "(baseline)"])
    model = next(iter(figs.values()))["model"] if figs else "-"
    return (f"large images ({model}, score threshold 0: predict writes the overlay and COCO JSON, eval computes AP)\n"
            + _table(["run", "detections", "time", "peak RSS", "dense masks would be", "peak / baseline size"],
                     rows))


def bench_training(batch: int, mode: str, settings: BenchSettings) -> dict[str, Any]:
    """Time of one SGD step (forward, backward, update) at ``batch`` images (median, s), per stage, peak RSS."""
    from maskrcnn.modeling.timing import StageTimer, stage  # noqa: PLC0415

    model, source = build_model(settings.train_model, mode, settings)
    model.train()
    num_classes = model.cfg.model.num_classes
    images = [_image(settings, i) for i in range(batch)]
    targets = [_targets(settings, num_classes, i) for i in range(batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(settings.seed)

    # bf16 trains under autocast, as the trainer does with solver.amp=bf16.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")

    def step() -> float:
        with stage("forward"):
            with autocast:
                losses = model(images, targets, generator=gen)
            loss = sum(losses.values())
        with stage("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
        with stage("optimizer"):
            opt.step()
        return float(loss.detach())  # type: ignore[union-attr]

    _reset_peak_rss()
    for _ in range(settings.warmup):
        step()
    stages: list[dict[str, float]] = []
    runs: list[float] = []
    losses: list[float] = []
    for _ in range(max(settings.repeats, 1)):
        with StageTimer() as timer:
            start = time.perf_counter()
            losses.append(step())
            runs.append(time.perf_counter() - start)
        stages.append(dict(timer.seconds))
    names = {k for s in stages for k in s}
    order = ["forward"]
    for top in TOP_STAGES:
        order += [top, *sorted(n for n in names if n.startswith(top + "."))]
    order += ["backward", "optimizer"]
    per_stage = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in order if k in names}
    return {"median_s": statistics.median(runs), "runs_s": runs, "stages_s": per_stage, "batch": batch,
            "losses": losses, "weights": source, "peak_rss_mb": _peak_rss_mb(), "model": settings.train_model}


def bench_throughput(mode: str, settings: BenchSettings) -> dict[str, Any]:
    """Images per second of ``predict(images, batch_size=throughput_batch)`` (on the CPU: one image at a time)."""
    from maskrcnn.predict import Predictor  # noqa: PLC0415

    net, source = build_model(settings.throughput_model, mode, settings)
    model = Predictor(net)
    images = [_image(settings, i) for i in range(settings.throughput_batch)]
    n = settings.throughput_batch
    _reset_peak_rss()
    runs = _median_runs(lambda: model.predict(images, batch_size=n), settings.throughput_repeats,
                        min(settings.warmup, 1))
    med = statistics.median(runs)
    return {"images_per_s": n / med, "median_s": med, "runs_s": runs, "batch": n, "weights": source,
            "padded_batch": bool(model.batch_on_cpu or model.device.type != "cpu"),
            "peak_rss_mb": _peak_rss_mb(), "model": settings.throughput_model}


def _busy_seconds() -> float | None:
    """CPU-seconds all processes have spent busy since boot, summed over CPUs (Linux /proc/stat), else None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _wait_until_idle(max_wait: float, say: Callable[[str], None], threshold: float = 0.15) -> float | None:
    """Wait (up to ``max_wait`` s) until other processes keep the CPUs less than ``threshold`` busy; returns
    the last busy fraction seen (0..1), None where it cannot be measured."""
    deadline = time.time() + max_wait
    while True:
        b0, t0 = _busy_seconds(), time.time()
        time.sleep(1.0)
        b1 = _busy_seconds()
        if b0 is None or b1 is None:
            return None
        busy = (b1 - b0) / ((time.time() - t0) * (os.cpu_count() or 1))
        if busy < threshold or time.time() >= deadline:
            return busy
        say(f"  other processes keep the CPUs {100 * busy:.0f}% busy; waiting")
        time.sleep(10.0)


def _scenario(kind: str, key: Any, mode: str, settings: BenchSettings) -> dict[str, Any]:
    """Run one scenario (possibly in a fresh worker process) with the configured thread count."""
    cpu_start = time.process_time()
    if settings.isolate:
        keep_freed_memory()  # what the maskrcnn command does (maskrcnn.runtime); a fresh process per scenario
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out: dict[str, Any]
    if kind == "inference":
        out = bench_inference(key, mode, settings)
    elif kind == "training":
        out = bench_training(key, mode, settings)
    elif kind == "large_image":
        out = bench_large_image(key, mode, settings)
    elif kind == "serve":
        out = bench_serve(key, mode, settings)
    else:
        out = bench_throughput(mode, settings)
    out["threads"] = torch.get_num_threads()
    if settings.count_flops:
        out["conv_microbench"] = conv_microbench(settings.conv_shape)
        best = out["conv_microbench"]["best_gflops"]
        if "gflops_per_s" in out:
            out["conv_fraction"] = out["gflops_per_s"] / best
            out["conv_fraction_nchw"] = out["gflops_per_s"] / out["conv_microbench"]["nchw_gflops"]
    # In a fresh worker this is its whole life's CPU time, which is what the caller's busy-time window spans.
    out["cpu_s"] = time.process_time() if settings.isolate else time.process_time() - cpu_start
    out["cpu_s"] += out.get("server_cpu_s") or 0.0  # the serve task's work runs in its server process
    return out


# ---------------------------------------------------------------------------------------------------------------
# The suite


def _plan(settings: BenchSettings) -> list[tuple[str, Any]]:
    plan: list[tuple[str, Any]] = []
    if "inference" in settings.tasks:
        plan += [("inference", m) for m in settings.models]
    if "training" in settings.tasks:
        plan += [("training", b) for b in settings.train_batches]
    if "throughput" in settings.tasks:
        plan.append(("throughput", settings.throughput_model))
    if "large_image" in settings.tasks:
        plan += [("large_image", key) for key in large_image_keys(settings)]
    if "serve" in settings.tasks:
        plan.append(("serve", settings.serve_model))
    return plan


def run_benchmarks(settings: BenchSettings = BenchSettings(), log: Callable[[str], None] | None = None
                   ) -> dict[str, Any]:
    """Run the suite: ``{"meta", "results": {mode: {task: {key: figures}}}, "comparisons"}`` (seconds, MB)."""
    for m in settings.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for t in settings.tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    say = log or (lambda s: None)
    results: dict[str, dict[str, dict[str, Any]]] = {m: {t: {} for t in settings.tasks} for m in settings.modes}
    plan = _plan(settings)
    if "large_image" in settings.tasks:
        for size in (settings.large_size, (settings.height, settings.width)):
            _large_image_files(settings, size)  # made here: the workers' peak RSS must not include making them
    started = time.time()
    load_start = _loadavg()  # before our own work raises it
    for kind, key in plan:
        # Modes interleave per scenario so that a drift in machine load hits them alike.
        for mode in settings.modes:
            if kind == "training" and mode in INFERENCE_ONLY_MODES:
                continue  # these apply to inference only; their training step is the fast one
            if kind == "large_image" and mode not in LARGE_IMAGE_MODES:
                continue
            if kind == "serve" and mode not in SERVE_MODES:
                continue
            label = f"{kind} {key} [{mode}]"
            say(f"running {label} ...")
            idle_before = _wait_until_idle(settings.wait_idle, say) if settings.wait_idle > 0 else None
            busy0, wall0 = _busy_seconds(), time.time()
            if settings.isolate:
                # A fresh interpreter per scenario: its own peak RSS, no allocator state from the last one.
                with _worker_env(settings), ProcessPoolExecutor(
                        max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    out = pool.submit(_scenario, kind, key, mode, settings).result()
            else:
                out = _scenario(kind, key, mode, settings)
            busy1 = _busy_seconds()
            if busy0 is not None and busy1 is not None:
                # CPU time of other processes during the scenario, as a share of the machine: timings taken
                # while this is more than a few percent are not comparable.
                foreign = max(busy1 - busy0 - out["cpu_s"], 0.0)
                out["foreign_cpu_share"] = foreign / (max(time.time() - wall0, 1e-9) * (os.cpu_count() or 1))
            out["busy_before"] = idle_before
            results[mode][kind][str(key) if kind != "training" else f"batch{key}"] = out
            share = out.get("foreign_cpu_share")
            say(f"  {label}: {out.get('median_s', 0.0):.3f} s, peak RSS {out.get('peak_rss_mb') or 0:.0f} MB"
                + ("" if share is None else f", other processes used {100 * share:.0f}% of the CPUs"))
    report: dict[str, Any] = {
        "meta": {
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "threads": settings.threads or torch.get_num_threads(),
            "loadavg_start": load_start, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "seconds": time.time() - started, "settings": _jsonable(dataclasses.asdict(settings)),
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE") if settings.thp is None else settings.thp,
        },
        "reference": REFERENCE,
        "results": results,
    }
    report["comparisons"] = compare(report)
    return report


@contextlib.contextmanager
def _worker_env(settings: BenchSettings) -> Iterator[None]:
    """Environment for spawned workers: THP_MEM_ALLOC_ENABLE per ``settings.thp`` (read once, at torch import)."""
    if settings.thp is None:
        yield
        return
    old = os.environ.get("THP_MEM_ALLOC_ENABLE")
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if settings.thp else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
        else:
            os.environ["THP_MEM_ALLOC_ENABLE"] = old


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (isinstance(b, float) and math.isnan(b)):
        return None
    return a / b


def _headline(results: dict[str, Any]) -> dict[str, float]:
    """Flat {"inference/r50_fpn_v1/median_s": x, ...} of the comparable figures of one mode."""
    flat: dict[str, float] = {}
    for task, per_key in results.items():
        for key, fig in per_key.items():
            for metric in ("median_s", "images_per_s", "peak_rss_mb", "gflops_per_s", "conv_fraction"):
                if fig.get(metric) is not None:
                    flat[f"{task}/{key}/{metric}"] = float(fig[metric])
            for st, sec in fig.get("stages_s", {}).items():
                flat[f"{task}/{key}/stage/{st}"] = float(sec)
    return flat


def compare(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ratios of the first mode's figures to the other modes', to ``baseline`` (same keys) and to REFERENCE."""
    modes = list(report["results"])
    if not modes:
        return {}
    primary = _headline(report["results"][modes[0]])
    out: dict[str, Any] = {"primary": modes[0]}
    for other in modes[1:]:
        sec = _headline(report["results"][other])
        out[f"vs_{other}"] = {k: _ratio(v, sec.get(k)) for k, v in primary.items() if k in sec}
    if baseline is not None:
        base_modes = list(baseline.get("results", {}))
        if base_modes:
            base = _headline(baseline["results"][modes[0] if modes[0] in base_modes else base_modes[0]])
            out["vs_baseline"] = {k: _ratio(v, base.get(k)) for k, v in primary.items() if k in base}
    ref: dict[str, float | None] = {}
    for mode in modes:
        res = report["results"][mode]
        inf = res.get("inference", {}).get("r50_fpn_v1")
        if inf:
            ref[f"{mode}/inference_s"] = _ratio(inf["median_s"], REFERENCE["inference_s"])
            ref[f"{mode}/inference_s_conv_normalised"] = _normalised_ratio(inf, REFERENCE["inference_s"])
            ref[f"{mode}/inference_peak_rss"] = _ratio(inf.get("peak_rss_mb"), REFERENCE["peak_rss_inference_mb"])
        tr = res.get("training", {}).get("batch1")
        if tr and tr.get("model") == "r50_fpn_v1":
            ref[f"{mode}/train_step_s"] = _ratio(tr["median_s"], REFERENCE["train_step_s"])
            ref[f"{mode}/train_step_s_conv_normalised"] = _normalised_ratio(tr, REFERENCE["train_step_s"])
            ref[f"{mode}/train_peak_rss"] = _ratio(tr.get("peak_rss_mb"), REFERENCE["peak_rss_train_mb"])
    out["vs_reference"] = ref
    return out


def _normalised_ratio(fig: dict[str, Any], reference_s: float) -> float | None:
    """time / reference time, with this machine's time scaled to the reference machine by the ratio of their
    channels-last conv microbenchmarks (the reference's 208 GFLOP/s against the one measured here)."""
    mb = fig.get("conv_microbench")
    if not mb or not mb.get("channels_last_gflops"):
        return None
    scale = mb["channels_last_gflops"] / REFERENCE["conv_gflops_channels_last"]
    return _ratio(fig["median_s"] * scale, reference_s)


# ---------------------------------------------------------------------------------------------------------------
# Output


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s")


def _fmt_r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """Human-readable tables: a summary per scenario, the per-stage breakdowns and the ratios."""
    modes = list(report["results"])
    primary = modes[0]
    other = modes[1] if len(modes) > 1 else None
    res = report["results"]
    meta = report["meta"]
    parts = [f"maskrcnn bench: torch {meta['torch']}, {meta['threads']} threads, {meta['processor']}, "
             f"load at start {meta['loadavg_start']}; times are medians of {meta['settings']['repeats']} runs"]
    # Summary.
    header = ["scenario", primary] + ([other, f"{primary}/{other}"] if other else []) + \
        [m for m in modes[2:]] + ["peak RSS", "vs reference", "conv-normalised", "foreign CPU"]
    rows = []
    for task in res[primary]:
        for key, fig in res[primary][task].items():
            val = fig.get("median_s")
            cells = [f"{task} {key}", _fmt_s(val)]
            if task == "throughput":
                cells[1] = f"{fig['images_per_s']:.2f} img/s"
            if other:
                of = res[other].get(task, {}).get(key, {})
                if task == "throughput":
                    cells += [f"{of.get('images_per_s', 0):.2f} img/s",
                              _fmt_r(_ratio(fig["images_per_s"], of.get("images_per_s")))]
                else:
                    cells += [_fmt_s(of.get("median_s")), _fmt_r(_ratio(val, of.get("median_s")))]
            for m in modes[2:]:
                mf = res[m].get(task, {}).get(key, {})
                cells.append(f"{mf.get('images_per_s', 0):.2f} img/s" if task == "throughput"
                             else _fmt_s(mf.get("median_s")))
            cells.append("-" if fig.get("peak_rss_mb") is None else f"{fig['peak_rss_mb']:.0f} MB")
            refv = norm = None
            if task == "inference" and key == "r50_fpn_v1":
                refv = _ratio(val, REFERENCE["inference_s"])
                norm = _normalised_ratio(fig, REFERENCE["inference_s"])
            elif task == "training" and key == "batch1" and fig.get("model") == "r50_fpn_v1":
                refv = _ratio(val, REFERENCE["train_step_s"])
                norm = _normalised_ratio(fig, REFERENCE["train_step_s"])
            cells += [_fmt_r(refv), _fmt_r(norm)]
            shares = [res[m].get(task, {}).get(key, {}).get("foreign_cpu_share") for m in modes]
            known = [x for x in shares if x is not None]
            cells.append(f"{100 * max(known):.0f}%" if known else "-")
            rows.append(cells)
    parts.append(_table(header, rows))
    # Stages per inference model.
    for key, fig in res[primary].get("inference", {}).items():
        of = res[other]["inference"].get(key) if other else None
        total = fig["median_s"]
        stage_names = [s for s in TOP_STAGES if s in fig["stages_s"]]
        subs = sorted(s for s in fig["stages_s"] if "." in s)
        rows = []
        for st in [*stage_names, "other"]:
            for name in [st, *[s for s in subs if s.startswith(st + ".")]]:
                sec = fig["stages_s"].get(name, 0.0)
                cells = [("  " if "." in name else "") + name, _fmt_s(sec), f"{100 * sec / total:.0f}%"]
                if of:
                    osec = of["stages_s"].get(name, 0.0)
                    cells += [_fmt_s(osec), _fmt_r(_ratio(sec, osec))]
                rows.append(cells)
        head = ["stage", primary, "share"] + ([other, "ratio"] if of else [])
        eff = ""
        if "gflop" in fig:
            mb = fig.get("conv_microbench", {})
            eff = (f"; {fig['gflop']:.0f} GFLOP, {fig['gflops_per_s']:.0f} GFLOP/s = "
                   f"{100 * fig.get('conv_fraction', 0):.0f}% of the conv microbenchmark's best, "
                   f"{100 * fig.get('conv_fraction_nchw', 0):.0f}% of its NCHW "
                   f"({mb.get('channels_last_gflops', 0):.0f} channels-last / {mb.get('nchw_gflops', 0):.0f} NCHW "
                   f"GFLOP/s)")
        for m in modes[1:]:
            mf = res[m]["inference"].get(key, {})
            if "gflops_per_s" in mf:
                eff += f"; {m}: {mf['gflops_per_s']:.0f} GFLOP/s = {100 * mf.get('conv_fraction', 0):.0f}%"
        parts.append(f"inference {key} ({fig['weights']}, {fig['detections']} detections{eff})\n"
                     + _table(head, rows))
    for key, fig in res[primary].get("training", {}).items():
        of = res[other]["training"].get(key) if other else None
        rows = []
        for name, sec in fig["stages_s"].items():
            indent = "    " if "." in name else ("  " if name in TOP_STAGES else "")
            cells = [indent + name, _fmt_s(sec)]
            if of:
                cells += [_fmt_s(of["stages_s"].get(name)), _fmt_r(_ratio(sec, of["stages_s"].get(name)))]
            rows.append(cells)
        parts.append(f"training {key} ({fig['model']}, {fig['weights']})\n"
                     + _table(["stage", primary] + ([other, "ratio"] if of else []), rows))
    if res[primary].get("large_image"):
        parts.append(format_large_image(res[primary]["large_image"]))
    serve = {m: f for m in modes for f in res[m].get("serve", {}).values()}
    if serve:
        parts.append(format_serve(serve))
    comp = report.get("comparisons", {})
    if "vs_baseline" in comp:
        rows = [[k, _fmt_r(v)] for k, v in comp["vs_baseline"].items() if "/stage/" not in k]
        parts.append("against the baseline JSON (this run / baseline)\n" + _table(["figure", "ratio"], rows))
    return "\n\n".join(parts)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
