"""The ``maskrcnn`` command line: predict, train, eval, weights, data, demo, ablate and bench.

Every command's ``--help`` lists each option with its default. Problems the user can fix (a missing file, a bad
config key, an unknown class name, an unreadable checkpoint) print one ``error: ...`` line on stderr and exit
with status 2; ``--debug`` shows the traceback instead. Results go to stdout, progress and logs to stderr.

Heavy modules (torch and the model) are imported inside the commands, so a typo costs no model import.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maskrcnn.engine.ablate import BUDGETS as ABLATION_BUDGETS
from maskrcnn.engine.ablate import VARIANTS as ABLATION_VARIANTS
from maskrcnn.engine.demo import DEMO
from maskrcnn.runtime import keep_freed_memory

__all__ = ["CLIError", "build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

logger = logging.getLogger("maskrcnn.cli")


class CLIError(Exception):
    """A command-line problem the user can fix; printed as one ``error:`` line."""


# ---------------------------------------------------------------------------------------------------------------
# Parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (or "required"); help texts that state their default keep their wording."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return text + " (required)"
        if "%(default)" in text or "(default:" in text or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def _common() -> argparse.ArgumentParser:
    """Options every command takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    return p


def _add(sub: Any, name: str, help_text: str, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=description or help_text, epilog=epilog or None,
                          formatter_class=_HelpFormatter, parents=[_common()])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _add_device(p: argparse.ArgumentParser, default: str | None = "auto", help_default: str = "") -> None:
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=default,
                   help="where to run: cpu, cuda, or auto (cuda when available)" + help_default)


def _add_devices(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=_positive_int, default=1, metavar="N",
                   help="processes to start on this machine, one per GPU (gloo processes on CPU), through "
                        "torchrun's launcher; ignored inside a torchrun worker (for several machines run torchrun "
                        "yourself, see docs/distributed.md)")


def _add_sizes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-size", type=_positive_int, default=None,
                   help="resize the shorter image side to this many pixels (default: the model's config)")
    p.add_argument("--max-size", type=_positive_int, default=None,
                   help="cap the longer image side at this many pixels (default: the model's config)")


def _add_inference(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="images per forward pass on a GPU (on the CPU images always run one at a time)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                   help="refuse images of more than N pixels (height x width), e.g. 100000000; memory grows with "
                        "the image only through its decoded copy and one float plane, about 7 bytes per pixel "
                        "(default: no limit beyond Pillow's decompression-bomb check)")
    _add_sizes(p)
    p.add_argument("--fast-math", action="store_true",
                   help="fold norms into convs and run channels-last: ~20%% faster on CPU, features differ from "
                        "torchvision's by ~1e-6 relative (default: off, bit-exact fast path)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed-precision inference: bf16 (CPUs with AVX512-BF16/AMX: ~2x faster; GPUs) or fp16 "
                        "(GPUs); scores move by ~1e-2 (default: none, float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone and FPN (needs a C++ compiler on CPU): slower start, some "
                        "percent faster per image, not bit-exact (default: off)")


def _add_allow_outside(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept COCO file_name entries that are absolute or lead out of the image folder with '..' "
                        "(refused by default)")


def _add_overrides(p: argparse.ArgumentParser, what: str,
                   example: str = "solver.max_iter=300 input.min_size_train=[640]") -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"config overrides applied {what}, e.g. {example} (default: none)")


def build_parser() -> argparse.ArgumentParser:
    """The ``maskrcnn`` argument parser with all its subcommands."""
    from maskrcnn import __version__  # noqa: PLC0415
    from maskrcnn.config import PRESETS  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="maskrcnn", formatter_class=_HelpFormatter,
        description="Mask R-CNN in pure PyTorch: predict, train, evaluate, manage weights and datasets.",
        epilog="Run 'maskrcnn COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"maskrcnn {__version__}")
    parser.add_argument("--debug", dest="debug_global", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # predict ----------------------------------------------------------------------------------------------------
    p = _add(sub, "predict", "detect objects in images and write overlays, masks and COCO results",
             epilog="examples:\n  maskrcnn predict --weights maskrcnn_resnet50_fpn photos/ --out preds/\n"
                    "  maskrcnn predict --weights run/model_final 'data/**/*.jpg' --recursive --out preds/ "
                    "--classes person,car --save-masks")
    p.add_argument("--weights", required=True, metavar="NAME_OR_PATH",
                   help="registry name (see 'maskrcnn weights list'), model folder, .safetensors, torchvision .pth, "
                        "or an .onnx file from 'maskrcnn export' (runs in onnxruntime)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for overlays, masks and JSON")
    p.add_argument("--score-threshold", type=_fraction, default=0.5, help="keep detections scoring at least this")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="comma-separated class names to keep, e.g. person,car (default: all classes)")
    _add_device(p)
    _add_inference(p)
    p.add_argument("--save-masks", action="store_true", help="also write one PNG per instance under OUT/masks/")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="where to write the COCO results JSON (default: OUT/predictions.json)")
    p.add_argument("--recursive", action="store_true", help="search folders and ** patterns recursively")
    p.set_defaults(func=cmd_predict)

    # export and serve (deployment: maskrcnn.export, maskrcnn.serve) -------------------------------------------------
    p = _add(sub, "export", "export a model as one ONNX graph: image in; resize, network, NMS and mask paste inside",
             epilog="examples:\n  maskrcnn export --weights maskrcnn_resnet50_fpn_v2 --out model.onnx\n"
                    "  maskrcnn predict --weights model.onnx photos/ --out preds/   # runs in onnxruntime")
    p.add_argument("--weights", required=True, metavar="NAME_OR_PATH",
                   help="registry name, model folder, .safetensors or torchvision .pth")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=_positive_int, default=None,
                   help="ONNX opset version, 18 or newer (default: maskrcnn.export.DEFAULT_OPSET, 18)")
    _add_sizes(p)
    p.add_argument("--score-threshold", type=_fraction, default=None,
                   help="default minimum score stored in the graph; callers can still pass their own "
                        "(default: the model's config, 0.05 for torchvision's models)")
    p.add_argument("--nms-threshold", type=_fraction, default=None,
                   help="IoU of the per-class NMS (default: the model's config)")
    p.add_argument("--detections-per-img", type=_positive_int, default=None,
                   help="most detections per image (default: the model's config)")
    p.set_defaults(func=cmd_export)

    p = _add(sub, "serve", "serve a model over HTTP: /v1/predict, KServe v2 endpoints and a web page at /",
             epilog="examples:\n  maskrcnn serve --weights model.onnx            # http://127.0.0.1:8000/\n"
                    "  maskrcnn serve --weights maskrcnn_resnet50_fpn_v2 --host 0.0.0.0 --api-key \"$KEY\"")
    p.add_argument("--weights", required=True, metavar="NAME_OR_PATH",
                   help="registry name, model folder, .safetensors, torchvision .pth or an exported .onnx")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; others than localhost need --api-key")
    p.add_argument("--port", type=_positive_int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (or X-API-Key) on every endpoint but / and health")
    p.add_argument("--insecure-no-api-key", action="store_true",
                   help="accept binding to a non-local address without an API key (anyone who reaches it can use it)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; default: CORS off)")
    p.add_argument("--score-threshold", type=_fraction, default=0.5,
                   help="minimum score when a request gives no score_threshold")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest upload in MB (413 above)")
    p.add_argument("--max-pixels", type=_positive_int, default=40_000_000, help="largest image in pixels (413 above)")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting beyond the running one (503 above)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may wait and run (504 after)")
    _add_device(p)
    _add_sizes(p)
    p.set_defaults(func=cmd_serve)

    # weights ----------------------------------------------------------------------------------------------------
    pw = _add(sub, "weights", "list, download and convert checkpoints")
    wsub = pw.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _add(wsub, "list", "list the known pretrained weights")
    p.add_argument("--json", action="store_true", help="print the registry as JSON instead of a table")
    p.set_defaults(func=cmd_weights_list)
    p = _add(wsub, "download", "download known weights into the cache and verify their checksum")
    p.add_argument("name", metavar="NAME", help="registry name, see 'maskrcnn weights list'")
    p.add_argument("--force", action="store_true", help="download again even when the file is cached")
    p.set_defaults(func=cmd_weights_download)
    p = _add(wsub, "convert", "convert a checkpoint (torchvision .pth, registry name, ...) to this library's format")
    p.add_argument("src", metavar="SRC", help="checkpoint to read: .pth, model folder, .safetensors or registry name")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write model.safetensors and config.json to")
    p.add_argument("--class-names", default=None, metavar="NAMES",
                   help="comma-separated names of the K foreground classes to store (default: keep the source's)")
    _add_sizes(p)
    p.set_defaults(func=cmd_weights_convert)

    # train ------------------------------------------------------------------------------------------------------
    p = _add(sub, "train", "train a model on a COCO-format dataset",
             description="Train on a COCO instances JSON (or a person_keypoints JSON for a keypoint preset, e.g. "
                         "r18_fpn_keypoint_demo). The config is the preset, then --config, then KEY=VALUE "
                         "overrides; the classes (and keypoints) come from the dataset.\nWrites OUT/config.yaml, "
                         "OUT/metrics.jsonl, OUT/checkpoints/, OUT/loss_curves.png and OUT/model_final/.",
             epilog="example:\n  maskrcnn train --data train.json --images imgs/ --out runs/a --preset r18_fpn_demo "
                    "solver.max_iter=2000")
    p.add_argument("--data", required=True, metavar="ANN.json", help="COCO instances JSON of the training set")
    p.add_argument("--images", required=True, metavar="DIR", help="folder the JSON's file_name entries are under")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (config, logs, checkpoints, model)")
    p.add_argument("--preset", default="torchvision_v1", choices=sorted(PRESETS), help="config preset to start from")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML/JSON config applied over the preset (default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in RUN_DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a RUN_DIR that holds an earlier run, deleting that run's files (config, "
                        "metrics, checkpoints, models, evaluation); without it or --resume such a RUN_DIR is refused")
    _add_allow_outside(p)
    p.add_argument("--val-data", default=None, metavar="ANN.json",
                   help="COCO JSON of a validation set, evaluated at the end (default: no evaluation)")
    p.add_argument("--val-images", default=None, metavar="DIR",
                   help="image folder of the validation set (default: --images)")
    p.add_argument("--weights", default=None, metavar="NAME_OR_PATH",
                   help="checkpoint to initialise from; tensors whose shape differs (e.g. the class predictors) "
                        "keep their fresh init (default: random init)")
    _add_device(p, default=None, help_default=" (default: the config's train.device)")
    _add_devices(p)
    _add_overrides(p, "after the preset and --config")
    p.set_defaults(func=cmd_train)

    # eval -------------------------------------------------------------------------------------------------------
    p = _add(sub, "eval", "evaluate a model on a COCO-format dataset (box, mask and keypoint AP)",
             description="COCO box AP of a model, with its mask AP when it has a mask head and its keypoint (OKS) AP "
                         "when it has a keypoint head (give a person_keypoints JSON). Writes OUT/metrics.json "
                         "(fractions in [0, 1]) and OUT/results.json (COCO results).")
    p.add_argument("--weights", required=True, metavar="NAME_OR_PATH", help="checkpoint or registry name")
    p.add_argument("--data", required=True, metavar="ANN.json", help="COCO instances JSON with the ground truth")
    p.add_argument("--images", required=True, metavar="DIR", help="folder the JSON's file_name entries are under")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json and results.json")
    _add_device(p)
    _add_devices(p)
    _add_inference(p)
    p.add_argument("--per-class", action="store_true", help="also print the AP of each class")
    _add_allow_outside(p)
    _add_overrides(p, "to the checkpoint's config (test-time keys)",
                   example="model.box_head.score_thresh=0.01 model.box_head.detections_per_img=50")
    p.set_defaults(func=cmd_eval)

    # data -------------------------------------------------------------------------------------------------------
    pd = _add(sub, "data", "make and convert datasets")
    dsub = pd.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _add(dsub, "shapes", "generate a synthetic shapes dataset (squares, circles, triangles) in COCO format",
             description="Writes OUT/images/*.png and OUT/annotations.json; use OUT as the image folder.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--num-images", type=_positive_int, default=100, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--image-size", type=_positive_int, nargs=2, default=[256, 256], metavar=("H", "W"),
                   help="image height and width in pixels")
    p.add_argument("--max-objects", type=_positive_int, default=4, help="most objects per image")
    p.set_defaults(func=cmd_data_shapes)
    p = _add(dsub, "from-labelme", "convert a folder of labelme JSON files to one COCO instances JSON")
    p.add_argument("src_dir", metavar="SRC_DIR", help="folder of labelme .json files (searched recursively)")
    p.add_argument("out_json", metavar="OUT.json", help="COCO JSON to write")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="labels.txt fixing the class list and order (default: SRC_DIR/labels.txt if present, "
                        "else labels in order of appearance)")
    p.set_defaults(func=cmd_data_labelme)
    p = _add(dsub, "from-yolo", "convert a YOLO-segmentation folder to one COCO instances JSON")
    p.add_argument("src_dir", metavar="SRC_DIR", help="folder with images/ and labels/ (or .txt beside each image)")
    p.add_argument("out_json", metavar="OUT.json", help="COCO JSON to write")
    p.add_argument("--names", required=True, metavar="FILE",
                   help="class names, one per line, or an ultralytics data YAML with 'names'")
    p.set_defaults(func=cmd_data_yolo)
    p = _add(dsub, "check", "check a COCO dataset before training: every image and every annotation",
             description="Decodes every image (in parallel) and compares its size with the JSON; checks the "
                         "annotations for non-finite, absurd or short polygons, RLE masks of the wrong size, unknown "
                         "categories and images, boxes outside their image, duplicate ids and file names that leave "
                         "the image folder. Prints a report; exits with status 1 when it holds errors.")
    p.add_argument("--data", required=True, metavar="ANN.json", help="COCO instances JSON to check")
    p.add_argument("--images", required=True, metavar="DIR", help="folder the JSON's file_name entries are under")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="threads decoding images (default: one per CPU this process may use)")
    _add_allow_outside(p)
    p.set_defaults(func=cmd_data_check)

    # demo -------------------------------------------------------------------------------------------------------
    p = _add(sub, "demo", "train and evaluate a small model on synthetic shapes, end to end on a CPU",
             description="Generates train and validation shapes datasets under OUT/data, trains the "
                         f"{DEMO.preset} preset ({' '.join(DEMO.overrides) or 'as it is'}), evaluates it and writes OUT/metrics.json, OUT/loss_curves.png, "
                         "OUT/model_final/ and overlays of the validation predictions in OUT/val_predictions/.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--train-images", type=_positive_int, default=DEMO.train_images, help="training images")
    p.add_argument("--val-images", type=_positive_int, default=DEMO.val_images, help="validation images")
    p.add_argument("--image-size", type=_positive_int, default=DEMO.image_size, help="side of the square images")
    p.add_argument("--max-iter", type=_positive_int, default=DEMO.max_iter,
                   help="training iterations; the preset's schedule (LR steps, warmup, checkpoints) is scaled to it"
                        + ("" if DEMO.max_iter is not None else " (default: the preset's solver.max_iter)"))
    _add_device(p, default=None, help_default=" (default: the preset's train.device)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in OUT")
    _add_overrides(p, f"to the {DEMO.preset} preset after --max-iter")
    p.set_defaults(func=cmd_demo)

    # ablate -----------------------------------------------------------------------------------------------------
    p = _add(sub, "ablate", "reproduce the paper's ablations (Table 2) in miniature on synthetic shapes",
             description="Trains the baseline (RoIAlign, per-class sigmoid masks, FCN head) and one variant per "
                         "switch (RoIPool, RoIWarp, softmax masks, class-agnostic masks, MLP head) with the same "
                         "recipe, budget and seeds on crowded synthetic shapes, evaluates each with pycocotools and "
                         "writes OUT/ablations.md (mask AP, AP50, AP75 as mean ± std over the seeds beside the "
                         "paper's numbers), OUT/ablations.png and OUT/ablations.json. Finished runs are kept: "
                         "running the same command again skips them and resumes an interrupted one.",
             epilog="example:\n  maskrcnn ablate --out ablations --seeds 3 --budget demo")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (data, runs, table, chart)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="training seeds per variant")
    p.add_argument("--budget", choices=sorted(ABLATION_BUDGETS), default="demo",
                   help="demo: ~1.5 min per run on 2 CPU cores (about 30 min for 3 seeds); long: 5x the "
                        "iterations on more images; smoke: seconds, checks the pipeline only")
    p.add_argument("--variants", default=None, metavar="NAMES",
                   help=f"comma-separated subset of {','.join(v.name for v in ABLATION_VARIANTS)}; the baseline "
                        f"always runs (default: all)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads; on a CPU that other processes keep busy, 1 thread is several "
                        "times faster than threads spin-waiting for each other (default: one per usable CPU)")
    _add_device(p, default=None, help_default=" (default: the preset's train.device)")
    p.set_defaults(func=cmd_ablate)

    # bench ------------------------------------------------------------------------------------------------------
    p = _add(sub, "bench", "measure inference and training speed, memory and FLOP/s against the naive path",
             description="Benchmarks at 800x1216 (R50-FPN v1/v2, R18-FPN): inference latency with a per-stage "
                         "breakdown, training step time, images/s for a batch, peak RSS and FLOP/s as a fraction "
                         "of a conv microbenchmark. Each mode of --modes is measured in the same run; ratios are "
                         "taken against the second mode, a --baseline JSON and torchvision's reference figures.",
             epilog="examples:\n  maskrcnn bench\n  maskrcnn bench --only inference --models r50_fpn_v1 --repeats 3\n"
                    "  maskrcnn bench --modes fast,naive,fast_math --baseline bench/baseline.json")
    p.add_argument("--models", default="r50_fpn_v1,r50_fpn_v2,r18_fpn", metavar="NAMES",
                   help="comma-separated inference models: r50_fpn_v1, r50_fpn_v2, r18_fpn, and detectron2's zoo "
                        "architectures d2_R_50_FPN, d2_R_50_C4, d2_R_50_DC5, d2_R_101_FPN, d2_R_101_C4, "
                        "d2_R_101_DC5, d2_X_101_32x8d_FPN (random weights)")
    p.add_argument("--modes", default="fast,naive", metavar="MODES",
                   help="comma-separated modes to measure (fast, naive, fast_math, compile, bf16, onnx: the exported graph in "
                        "onnxruntime, inference only); ratios are "
                        "against the second")
    p.add_argument("--only", default="inference,training,throughput", metavar="TASKS",
                   help="comma-separated tasks: inference, training, throughput, large_image (peak RSS of predict "
                        "and eval on a 12000x9000 photo with DETECTIONS masks, against the same runs at "
                        "HEIGHT x WIDTH; fast mode only), serve (requests/s and p50/p95 latency of maskrcnn serve "
                        "under --serve-clients x --serve-requests; fast and onnx modes)")
    p.add_argument("--serve-model", default="r18_fpn", metavar="NAME", help="model of the serve task")
    p.add_argument("--serve-clients", type=_positive_int, default=4, help="concurrent clients of the serve task")
    p.add_argument("--serve-requests", type=_positive_int, default=25, help="requests per client of the serve task")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per scenario (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--height", type=_positive_int, default=800, help="image height in pixels")
    p.add_argument("--width", type=_positive_int, default=1216, help="image width in pixels")
    p.add_argument("--detections", type=_positive_int, default=100,
                   help="detections per image (score threshold 0, so the mask head and paste do full work)")
    p.add_argument("--train-batches", default="1,2", metavar="SIZES", help="comma-separated training batch sizes")
    p.add_argument("--train-model", default="r50_fpn_v1", metavar="NAME", help="model of the training steps")
    p.add_argument("--throughput-batch", type=_positive_int, default=8, help="images per batch for images/s")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch.set_num_threads in every scenario (default: torch's, one per core)")
    p.add_argument("--fixtures", default=None, metavar="DIR",
                   help="fixtures folder with torchvision/maskrcnn_r50_fpn_v1|v2 weights (default: "
                        "$MASKRCNN_FIXTURES or ../shared/fixtures; random weights when absent)")
    p.add_argument("--random-weights", action="store_true", help="use random weights even when fixtures exist")
    p.add_argument("--no-isolate", action="store_true",
                   help="run all scenarios in this process (peak RSS then is the running maximum)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count and the conv microbenchmark")
    p.add_argument("--thp", choices=("on", "off", "inherit"), default="inherit",
                   help="THP_MEM_ALLOC_ENABLE in the scenario processes (transparent huge pages for large tensors; "
                        "needs process isolation); inherit keeps this process's setting, which maskrcnn turns on "
                        "unless THP_MEM_ALLOC_ENABLE is set")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each scenario, wait up to this long for other processes to leave the CPUs idle")
    p.add_argument("--json", default="bench_results.json", metavar="FILE", help="where to write the results JSON")
    p.add_argument("--baseline", default=None, metavar="FILE.json",
                   help="earlier results JSON to compare against (default: none)")
    p.set_defaults(func=cmd_bench)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Entry point


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs this process may use under a cgroup CPU quota (v2 ``cpu.max`` or v1 CFS files), or None if unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def _match_threads_to_cpus() -> None:
    """Cap torch's intra-op threads at the CPUs the process may really use (affinity mask, cgroup quota).

    torch starts one thread per core it sees; in a container limited to fewer CPUs by a quota the extra
    threads only wait on each other. OMP_NUM_THREADS, when set, is the user's choice and is kept.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch  # noqa: PLC0415 - the CLI parses arguments before paying for torch

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None:
        allowed = min(allowed, max(1, math.ceil(quota)))
    if allowed < torch.get_num_threads():
        torch.set_num_threads(allowed)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``maskrcnn`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: argparse has printed its message already
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_ERROR)
    # --devices N starts torchrun workers that run this same command line.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(getattr(args, "debug", False) or getattr(args, "debug_global", False))
    _setup_logging()
    _match_threads_to_cpus()
    keep_freed_memory()
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - only the user-facing kinds below are turned into one line
        if debug or not _is_user_error(e):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _is_user_error(exc: BaseException) -> bool:
    """True for errors whose message tells the user what to fix (config, weights, data, files, devices)."""
    from maskrcnn.engine.dist import RankFailureError  # noqa: PLC0415
    from maskrcnn.weights.zoo import HubError  # noqa: PLC0415

    # ConfigError, WeightsError, DatasetError, ImageReadError and AnnotationImportError are ValueErrors;
    # FileNotFoundError and PermissionError are OSErrors; a non-finite training loss is a FloatingPointError;
    # RankFailureError says which rank stopped waiting for a dead or stalled peer.
    return isinstance(exc, (CLIError, HubError, ValueError, OSError, FloatingPointError, RankFailureError))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text or type(exc).__name__


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is now (tests swap it between calls)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """Ignored: the stream is always the current ``sys.stderr``."""


def _setup_logging() -> None:
    """Show the package's INFO logs (training progress) on stderr, once per process."""
    root = logging.getLogger("maskrcnn")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def _check_device(device: str | None) -> None:
    if device == "cuda":
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise CLIError("--device cuda was requested but CUDA is not available on this machine; "
                           "use --device cpu or auto")


def _split_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names or None


# ---------------------------------------------------------------------------------------------------------------
# predict


def cmd_predict(args: argparse.Namespace) -> int:
    """``maskrcnn predict``: detect objects in images, write overlays (+ masks) and a COCO results JSON."""
    from maskrcnn.predict import Predictor, expand_sources  # noqa: PLC0415
    from maskrcnn.weights import load_model  # noqa: PLC0415

    _check_device(args.device)
    # Finding the files first avoids loading a model for a run that has nothing to do.
    paths, problems = expand_sources(args.sources, args.recursive)
    if not paths:
        details = "; ".join(f"{s}: {why}" for s, why in problems)
        raise CLIError(f"no images found ({details})")
    model = load_model(args.weights, min_size=args.min_size, max_size=args.max_size, device=args.device,
                       fast_math=args.fast_math, compile=args.compile, amp=args.amp)
    predictor = Predictor(model, score_threshold=args.score_threshold, classes=_split_names(args.classes),
                          batch_size=args.batch_size, save_masks=args.save_masks, max_pixels=args.max_pixels)
    summary = predictor.run(args.sources, args.out, json_path=args.json, recursive=args.recursive)
    print(summary.format())
    if summary.images == 0:
        raise CLIError(f"none of the {summary.skipped} inputs could be read (see the messages above)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# export


def cmd_export(args: argparse.Namespace) -> int:
    """``maskrcnn export``: write the whole inference as one ONNX graph (see :mod:`maskrcnn.export`)."""
    from maskrcnn.export import DEFAULT_OPSET, export_onnx, is_onnx_file  # noqa: PLC0415
    from maskrcnn.weights import load_model  # noqa: PLC0415

    if is_onnx_file(args.weights):
        raise CLIError(f"{args.weights}: already an ONNX file; export from the PyTorch weights it came from")
    if not is_onnx_file(args.out):
        raise CLIError(f"--out {args.out}: the file name must end in .onnx")
    model = load_model(args.weights, min_size=args.min_size, max_size=args.max_size, device="cpu",
                       score_threshold=args.score_threshold, nms_threshold=args.nms_threshold,
                       detections_per_img=args.detections_per_img)
    t0 = time.perf_counter()
    try:
        path = export_onnx(model, args.out, opset=args.opset or DEFAULT_OPSET, source=str(args.weights))
    except NotImplementedError as e:
        raise CLIError(f"{args.weights}: {e}") from None
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.1f} MB, opset {args.opset or DEFAULT_OPSET}) in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """``maskrcnn serve``: run the HTTP service until SIGTERM or Ctrl-C (requests in flight are finished first)."""
    from maskrcnn.export import is_onnx_file  # noqa: PLC0415
    from maskrcnn.serve.app import ServeSettings, check_bind, serve  # noqa: PLC0415

    check_bind(args.host, args.api_key, args.insecure_no_api_key)
    settings = ServeSettings(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pixels=args.max_pixels,
                             max_queue=max(args.max_queue, 0), request_timeout_s=args.timeout, api_key=args.api_key,
                             cors_origins=tuple(args.cors_origin), score_threshold=args.score_threshold)
    options: dict[str, Any] = {}
    if not is_onnx_file(args.weights):
        _check_device(args.device)
        options = {"min_size": args.min_size, "max_size": args.max_size, "device": args.device}
    serve(args.weights, args.host, args.port, settings, args.insecure_no_api_key, **options)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# weights


def cmd_weights_list(args: argparse.Namespace) -> int:
    """``maskrcnn weights list``: the registry as a table or JSON."""
    from maskrcnn.weights import zoo  # noqa: PLC0415

    rows = zoo.registry_as_json()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    header = ["name", "format", "classes", "box AP", "mask AP", "kp AP", "check", "cached", "description"]
    table = [[r["name"], r["format"], str(r["num_classes"]),
              *("-" if r.get(k) is None else f"{r[k]:.1f}" for k in ("box_ap", "mask_ap", "keypoint_ap")),
              r["check"].split(" (")[0], "yes" if r["cached"] else "no", r["description"]] for r in rows]
    print(_text_table(header, table))
    print(f"\ncache: {zoo.weights_dir()}")
    return EXIT_OK


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_weights_download(args: argparse.Namespace) -> int:
    """``maskrcnn weights download``: fetch and verify registry weights; prints the cached path."""
    from maskrcnn.weights import zoo  # noqa: PLC0415

    print(zoo.download(args.name, force=args.force))
    return EXIT_OK


def cmd_weights_convert(args: argparse.Namespace) -> int:
    """``maskrcnn weights convert``: read any supported checkpoint and save it in this library's format."""
    from maskrcnn.weights import load_model  # noqa: PLC0415

    model = load_model(args.src, min_size=args.min_size, max_size=args.max_size).model
    names = _split_names(args.class_names)
    if names is not None:
        k = int(model.cfg.model.num_classes)
        if len(names) != k:
            raise CLIError(f"--class-names gives {len(names)} names but the model has {k} foreground classes")
        # Names are metadata only (results and the config); nothing in the network depends on them.
        model.cfg = dataclasses.replace(model.cfg, model=dataclasses.replace(model.cfg.model, class_names=tuple(names)))
    from maskrcnn.weights import save_model  # noqa: PLC0415

    out = save_model(model, args.out_dir)
    print(f"wrote {out} ({model.cfg.name}, {model.cfg.model.num_classes} classes)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# train


def _build_train_config(preset: str, config_file: str | None, overrides: Sequence[str], device: str | None) -> Any:
    """Preset, then the config file, then the overrides, then --device."""
    from maskrcnn.config import apply_overrides, get_preset, load_config  # noqa: PLC0415

    cfg = get_preset(preset)
    if config_file is not None:
        cfg = load_config(config_file, base=cfg)
    cfg = apply_overrides(cfg, list(overrides))
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    """``maskrcnn train``: train on a COCO dataset; writes the run folder and model_final/."""
    from maskrcnn.engine import dist as du  # noqa: PLC0415
    from maskrcnn.engine.evaluator import format_metrics_table  # noqa: PLC0415

    _check_device(args.device)
    if args.val_images is not None and args.val_data is None:
        raise CLIError("--val-images needs --val-data")
    cfg = _build_train_config(args.preset, args.config, args.overrides, args.device)
    if args.devices > 1 and not du.launched_by_torchrun():
        for path, what in ((args.data, "training annotations"), (args.images, "training image folder"),
                           (args.val_data, "validation annotations"), (args.val_images, "validation image folder")):
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"{path}: {what} not found")  # before starting any worker
        return _launch_workers(args, cfg.train.device)
    with du.distributed_session(cfg.train.device, cfg.train.dist_timeout_s):
        _quiet_unless_main()
        from maskrcnn.engine.runs import train_run  # noqa: PLC0415

        _, metrics = train_run(cfg, args.data, args.images, args.out, val_data=args.val_data,
                               val_images=args.val_images, init_weights=args.weights, resume=args.resume,
                               overwrite=args.overwrite, allow_outside_images=args.allow_outside_images)
        if du.get_rank() != 0:
            return EXIT_OK
    print(f"model: {Path(args.out) / 'model_final'}")
    if metrics is not None:
        print(format_metrics_table(metrics))
    return EXIT_OK


def _launch_workers(args: argparse.Namespace, device: str | None) -> int:
    """Run this command line in ``args.devices`` torchrun workers on this machine; returns when they are done."""
    import torch  # noqa: PLC0415
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415

    from maskrcnn.engine import dist as du  # noqa: PLC0415

    n = int(args.devices)
    cuda = torch.cuda.is_available() if device in (None, "", "auto") else str(device).startswith("cuda")
    if cuda and torch.cuda.device_count() < n:
        raise CLIError(f"--devices {n} needs {n} GPUs but this machine has {torch.cuda.device_count()}")
    logger.info("starting %d %s worker processes (torchrun --standalone --nproc-per-node=%d)", n,
                "GPU" if cuda else "CPU (gloo)", n)
    try:
        du.run_torchrun(n, args.argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise CLIError(f"worker rank {rank} of {n} failed with exit code {failure.exitcode} (its error is printed "
                       f"above); the other workers were stopped") from e
    return EXIT_OK


def _quiet_unless_main() -> None:
    """In a worker other than rank 0, show only warnings and errors: rank 0 logs the run."""
    from maskrcnn.engine import dist as du  # noqa: PLC0415

    if du.get_rank() != 0:
        logging.getLogger("maskrcnn").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------------------------
# eval


def _worker_device(device: str | None) -> str | None:
    """``device`` made specific to this worker's GPU (``cuda:LOCAL_RANK``) inside a multi-process run."""
    import torch  # noqa: PLC0415

    from maskrcnn.engine import dist as du  # noqa: PLC0415

    if du.get_world_size() > 1 and torch.cuda.is_available() and device in (None, "auto", "cuda"):
        return f"cuda:{torch.cuda.current_device()}"
    return device


def cmd_eval(args: argparse.Namespace) -> int:
    """``maskrcnn eval``: COCO box/mask AP; writes OUT/metrics.json and OUT/results.json, prints the table."""
    from maskrcnn.config import TrainConfig  # noqa: PLC0415
    from maskrcnn.engine import dist as du  # noqa: PLC0415
    from maskrcnn.engine.evaluator import format_metrics_table, format_per_class_table  # noqa: PLC0415
    from maskrcnn.weights import load_model  # noqa: PLC0415

    _check_device(args.device)
    if args.devices > 1 and not du.launched_by_torchrun():
        return _launch_workers(args, args.device)
    with du.distributed_session(args.device, TrainConfig().dist_timeout_s):
        _quiet_unless_main()
        model = load_model(args.weights, min_size=args.min_size, max_size=args.max_size,
                           device=_worker_device(args.device), fast_math=args.fast_math, compile=args.compile,
                           amp=args.amp)
        from maskrcnn.engine.runs import apply_model_overrides, evaluate_run  # noqa: PLC0415

        model = apply_model_overrides(model, args.overrides)
        metrics = evaluate_run(model, args.data, args.images, args.out, batch_size=args.batch_size,
                               allow_outside_images=args.allow_outside_images, max_pixels=args.max_pixels)
        if du.get_rank() != 0:
            return EXIT_OK
    print(format_metrics_table(metrics))
    if args.per_class:
        print()
        print(format_per_class_table(metrics))
    print(f"\nmetrics: {Path(args.out) / 'metrics.json'}\nresults: {Path(args.out) / 'results.json'}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# data


def cmd_data_shapes(args: argparse.Namespace) -> int:
    """``maskrcnn data shapes``: write a synthetic shapes dataset."""
    from maskrcnn.data.shapes import generate_shapes  # noqa: PLC0415

    ann = generate_shapes(args.out, args.num_images, seed=args.seed, image_size=tuple(args.image_size),
                          max_objects=args.max_objects)
    print(f"wrote {args.num_images} images to {Path(args.out) / 'images'} and annotations to {ann}\n"
          f"(train with --data {ann} --images {args.out})")
    return EXIT_OK


def _print_import_counts(counts: dict[str, Any], out_json: str) -> None:
    print(f"wrote {out_json}: {counts.get('images', 0)} images, {counts.get('annotations', 0)} annotations, "
          f"{counts.get('categories', 0)} categories")
    for why, n in (counts.get("skipped") or {}).items():
        print(f"skipped {n} {why}")
    if counts.get("image_dir"):
        print(f"(use --images {counts['image_dir']})")


def cmd_data_labelme(args: argparse.Namespace) -> int:
    """``maskrcnn data from-labelme``: labelme folder -> COCO JSON."""
    from maskrcnn.data.importers import labelme_to_coco  # noqa: PLC0415

    _print_import_counts(labelme_to_coco(args.src_dir, args.out_json, labels_file=args.labels), args.out_json)
    return EXIT_OK


def cmd_data_yolo(args: argparse.Namespace) -> int:
    """``maskrcnn data from-yolo``: YOLO-segmentation folder -> COCO JSON."""
    from maskrcnn.data.importers import yolo_to_coco  # noqa: PLC0415

    _print_import_counts(yolo_to_coco(args.src_dir, args.out_json, args.names), args.out_json)
    return EXIT_OK


EXIT_CHECK_FAILED = 1  # `data check` found errors in the dataset


def cmd_data_check(args: argparse.Namespace) -> int:
    """``maskrcnn data check``: check every image and annotation; prints the report, status 1 on errors."""
    from maskrcnn.data.check import check_dataset  # noqa: PLC0415

    for path, what in ((args.data, "annotations"), (args.images, "image folder")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: {what} not found")
    report = check_dataset(args.data, args.images, workers=args.workers,
                           allow_outside_images=args.allow_outside_images)
    print(report.format())
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


# ---------------------------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    """``maskrcnn demo``: the whole pipeline on synthetic shapes; prints the AP table."""
    from maskrcnn.engine.evaluator import format_metrics_table  # noqa: PLC0415

    _check_device(args.device)
    settings = dataclasses.replace(DEMO, train_images=args.train_images, val_images=args.val_images,
                                   image_size=args.image_size, max_iter=args.max_iter)
    start = time.perf_counter()
    from maskrcnn.engine.demo import run_demo  # noqa: PLC0415

    metrics = run_demo(args.out, settings, args.overrides, args.device, overwrite=args.overwrite)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    print(format_metrics_table(metrics))
    print(f"\ndemo finished in {elapsed / 60:.1f} min: val mask AP {metrics['segm']['AP']:.3f}, "
          f"box AP {metrics['bbox']['AP']:.3f}")
    print(f"\nmetrics: {out / 'metrics.json'}\nloss curves: {out / 'loss_curves.png'}\n"
          f"model: {out / 'model_final'}\nval overlays: {out / 'val_predictions'}")
    return EXIT_OK



# ---------------------------------------------------------------------------------------------------------------
# ablate


def cmd_ablate(args: argparse.Namespace) -> int:
    """``maskrcnn ablate``: every Table 2 switch trained and evaluated; prints the markdown table."""
    import shlex  # noqa: PLC0415

    from maskrcnn.engine.ablate import run_ablation  # noqa: PLC0415

    _check_device(args.device)
    if args.threads is not None:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    variants = None if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    command = "maskrcnn " + " ".join(shlex.quote(a) for a in args.argv)
    summary = run_ablation(args.out, seeds=args.seeds, budget=args.budget, variants=variants, device=args.device,
                           command=command)
    out = Path(args.out)
    print((out / "ablations.md").read_text())
    print(f"ablations finished in {summary['wall_minutes']:.1f} min\ntable: {out / 'ablations.md'}\n"
          f"chart: {out / 'ablations.png'}\nper-run metrics and models: {out / 'runs'}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# bench


def cmd_bench(args: argparse.Namespace) -> int:
    """``maskrcnn bench``: run the benchmark suite, print its tables and write the JSON."""
    from maskrcnn import bench  # noqa: PLC0415

    def names(text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())

    try:
        batches = tuple(int(b) for b in names(args.train_batches))
    except ValueError:
        raise CLIError(f"--train-batches: expected comma-separated integers, got {args.train_batches!r}") from None
    settings = bench.BenchSettings(
        height=args.height, width=args.width, models=names(args.models), modes=names(args.modes),
        tasks=names(args.only), repeats=args.repeats, warmup=args.warmup, detections=args.detections,
        train_batches=batches, train_model=args.train_model, throughput_batch=args.throughput_batch,
        threads=args.threads, fixtures=args.fixtures, random_weights=args.random_weights,
        isolate=not args.no_isolate, count_flops=not args.no_flops,
        thp=None if args.thp == "inherit" else args.thp == "on", wait_idle=args.wait_idle,
        serve_model=args.serve_model, serve_clients=args.serve_clients, serve_requests=args.serve_requests)
    baseline = None
    if args.baseline:
        try:
            baseline = json.loads(Path(args.baseline).read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"{args.baseline}: invalid JSON ({e})") from None
    report = bench.run_benchmarks(settings, log=lambda line: print(line, file=sys.stderr))
    if baseline is not None:
        report["comparisons"] = bench.compare(report, baseline)
        report["baseline_file"] = str(args.baseline)
    print(bench.format_report(report))
    print(f"\nresults: {bench.write_json(report, args.json)}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover - ``python -m maskrcnn`` goes through __main__.py
    sys.exit(main())
