"""The paper's ablations (Table 2) in miniature: every switch trained on crowded synthetic shapes, one recipe.

:func:`run_ablation` generates one dataset of many small, touching and overlapping shapes of three classes,
trains the baseline (RoIAlign, per-class sigmoid masks, FCN head) and each variant that flips one switch
(RoIPool, RoIWarp, softmax masks, class-agnostic masks, MLP head) with the same budget and the same seeds,
evaluates each with pycocotools and writes a markdown table beside the paper's numbers and a bar chart. Each
finished (variant, seed) writes its metrics atomically, so a rerun skips it; an interrupted training resumes
from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskrcnn.atomic import atomic_write, atomic_write_json, atomic_write_text

logger = logging.getLogger("maskrcnn.engine.ablate")

__all__ = ["BUDGETS", "PAPER", "VARIANTS", "AblationBudget", "Variant", "format_table", "run_ablation"]


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: the switch it flips (config overrides) and what that means."""

    name: str
    overrides: tuple[str, ...]
    description: str


# The baseline first; every other variant flips one switch of it.
VARIANTS: tuple[Variant, ...] = (
    Variant("baseline", (), "RoIAlign, per-class sigmoid masks, FCN mask head (the paper's Mask R-CNN)"),
    Variant("roipool", ("model.roi_pooler.type=pool",), "RoIPool: box and bins quantised, max-pooled"),
    Variant("roiwarp", ("model.roi_pooler.type=warp",), "RoIWarp: box quantised, bins sampled bilinearly"),
    Variant("softmax", ("model.mask_head.loss=softmax",), "per-pixel softmax over classes + background"),
    Variant("agnostic", ("model.mask_head.class_agnostic=true",), "one class-agnostic sigmoid mask"),
    Variant("mlp", ("model.mask_head.type=mlp",), "MLP mask head (fc 1024, fc 1024, fc K x 28 x 28)"),
)


@dataclass(frozen=True)
class PaperRow:
    """The paper's mask AP, AP50, AP75 (percent, COCO minival) of a variant and of its own baseline."""

    table: str
    model: str
    ap: tuple[float | None, float | None, float | None]
    baseline: tuple[float, float, float]


# Mask R-CNN (He et al., ICCV 2017), Table 2: (b) multinomial vs. independent masks and the class-agnostic
# figure of Sec. 4.2, (c) RoIPool / RoIWarp (average) / RoIAlign (average) on ResNet-50-C4, (e) MLP vs. FCN
# mask head on ResNet-50-FPN. Each variant's baseline is the RoIAlign, sigmoid, class-specific FCN model of
# the same table. The paper gives the class-agnostic AP only.
_C4 = (30.3, 51.2, 31.5)
PAPER: dict[str, PaperRow] = {
    "baseline": PaperRow("2b, 2c", "R50-C4", _C4, _C4),
    "roipool": PaperRow("2c", "R50-C4", (26.9, 48.8, 26.4), _C4),
    "roiwarp": PaperRow("2c", "R50-C4", (27.1, 48.9, 27.1), _C4),
    "softmax": PaperRow("2b", "R50-C4", (24.8, 44.1, 25.1), _C4),
    "agnostic": PaperRow("Sec. 4.2", "R50-C4", (29.7, None, None), _C4),
    "mlp": PaperRow("2e", "R50-FPN", (31.5, 53.7, 32.8), (33.6, 55.2, 35.3)),
}


@dataclass(frozen=True)
class AblationBudget:
    """Everything a variant's result depends on besides its switch and its seed: data, model and schedule."""

    name: str
    preset: str = "r18_fpn_demo"
    train_images: int = 400
    val_images: int = 100
    train_seed: int = 11
    val_seed: int = 12
    # Side of the square images (px); the model trains and tests at this size (no resize).
    image_size: int = 128
    # The crowded shapes: many small objects of the three classes, half of them placed against an earlier one.
    min_objects: int = 4
    max_objects: int = 10
    object_size: tuple[float, float] = (0.08, 0.25)
    max_occlusion: float = 0.4
    touching: float = 0.5
    max_iter: int = 600
    # Config overrides of the preset shared by every variant (the recipe); the variants' switches go on top.
    overrides: tuple[str, ...] = ()


# The recipe of every budget: the demo preset thinned to half its widths (so that 18 trainings fit in half an
# hour of a busy 2-core CPU), at the images' own size, with anchors for small objects and fewer logs.
_RECIPE = (
    "model.backbone.stem_out_channels=32",
    "model.backbone.res2_out_channels=32",
    "model.fpn.out_channels=32",
    "model.box_head.conv_dim=32",
    "model.box_head.fc_dim=128",
    "model.mask_head.conv_dim=32",
    "model.anchors.sizes=[8,16,32,64,128]",
    "train.log_period=100",
    "train.checkpoint_period=100",
    "train.keep_last=1",
)


def _sized(size: int) -> tuple[str, ...]:
    """Overrides that train and test at ``size`` px, the synthetic images' own side (no resize)."""
    return (f"input.min_size_train=[{size}]", f"input.max_size_train={size}", f"input.min_size_test={size}",
            f"input.max_size_test={size}")


BUDGETS: dict[str, AblationBudget] = {
    # About 1.5 minutes per training on one thread of a busy 2-core CPU: 6 variants x 3 seeds in half an hour.
    "demo": AblationBudget("demo", val_images=80, max_iter=400, overrides=_RECIPE + _sized(128)),
    # Five times the iterations on more images: the variants' differences settle further (hours on a CPU).
    "long": AblationBudget("long", train_images=1000, val_images=200, max_iter=2000,
                           overrides=_RECIPE + _sized(128)),
    # Seconds: checks that the whole pipeline runs (the numbers mean nothing).
    "smoke": AblationBudget("smoke", train_images=4, val_images=2, image_size=64, min_objects=2, max_objects=4,
                            object_size=(0.2, 0.4), max_iter=2, overrides=_RECIPE + _sized(64) + (
                                "model.mask_head.mlp_dims=[32,32]", "model.rpn.pre_nms_top_n_test=50",
                                "model.rpn.post_nms_top_n_test=20", "model.rpn.pre_nms_top_n_train=50",
                                "model.rpn.post_nms_top_n_train=20", "model.box_head.batch_size_per_image=16",
                                "model.rpn.batch_size_per_image=32", "model.box_head.detections_per_img=10",
                                "train.checkpoint_period=0")),
}

METRICS_FILE = "ablation_metrics.json"
SETTINGS_FILE = "ablation_settings.json"


def _budget_of(budget: str | AblationBudget) -> AblationBudget:
    if isinstance(budget, AblationBudget):
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"unknown ablation budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[budget]


def variant_config(budget: AblationBudget, variant: Variant, seed: int, device: str | None = None) -> Any:
    """The config of one (variant, seed) run: the budget's preset and recipe, the schedule, the switch, the seed."""
    from maskrcnn.config import apply_overrides, get_preset  # noqa: PLC0415
    from maskrcnn.engine.demo import scale_schedule  # noqa: PLC0415

    cfg = scale_schedule(get_preset(budget.preset), budget.max_iter)
    cfg = apply_overrides(cfg, list(budget.overrides) + list(variant.overrides) + [f"train.seed={seed}"])
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    return cfg


def _generate_data(out_dir: Path, budget: AblationBudget) -> tuple[Path, Path]:
    """The budget's train and val shapes under out_dir/data (kept from an earlier run with the same settings)."""
    from maskrcnn.data.shapes import generate_shapes  # noqa: PLC0415

    size = (budget.image_size, budget.image_size)
    paths = []
    for split, n, seed in (("train", budget.train_images, budget.train_seed), ("val", budget.val_images,
                                                                                budget.val_seed)):
        folder = out_dir / "data" / split
        ann = folder / "annotations.json"
        # annotations.json is written last and atomically: its presence means the split is complete.
        if not ann.is_file():
            logger.info("ablate: generating %d %s images under %s", n, split, folder)
            generate_shapes(folder, n, seed=seed, image_size=size, min_objects=budget.min_objects,
                            max_objects=budget.max_objects, object_size=budget.object_size,
                            max_occlusion=budget.max_occlusion, touching=budget.touching)
        paths.append(folder)
    return paths[0], paths[1]


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Record the budget in out_dir, or refuse a folder whose finished runs used another budget."""
    path = out_dir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # tuples as lists, as the file holds them
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier != settings:
            changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
            raise ValueError(f"{out_dir} holds ablation runs of other settings ({', '.join(changed)} differ); "
                             f"choose another --out, or delete the folder to start afresh")
        return
    atomic_write_json(path, settings)


def _finite(value: Any) -> float | None:
    """A metric as a float, or None for pycocotools' "no such objects" (nan or -1), so the JSON stays strict."""
    v = float(value)
    return None if math.isnan(v) or v < 0 else v


def _run_one(out_dir: Path, budget: AblationBudget, variant: Variant, seed: int, train_dir: Path, val_dir: Path,
             device: str | None) -> dict[str, Any]:
    """Train and evaluate one (variant, seed); writes and returns its metrics record."""
    from maskrcnn.engine.runs import evaluate_run, train_run  # noqa: PLC0415

    run_dir = out_dir / "runs" / variant.name / f"seed{seed}"
    cfg = variant_config(budget, variant, seed, device)
    start = time.perf_counter()
    # resume: an interrupted run continues from its last checkpoint (or starts afresh when it has none).
    model, _ = train_run(cfg, train_dir / "annotations.json", train_dir, run_dir, resume=True)
    train_s = time.perf_counter() - start
    model.eval()
    metrics = evaluate_run(model, val_dir / "annotations.json", val_dir, run_dir / "eval", progress=False)
    record = {
        "variant": variant.name, "seed": seed, "overrides": list(variant.overrides),
        "segm": {k: _finite(metrics["segm"][k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
        "bbox": {k: _finite(metrics["bbox"][k]) for k in ("AP", "AP50", "AP75")},
        "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(run_dir / METRICS_FILE, record)
    # The weights stay in model_final/; the checkpoints (optimiser state included) only served a resume.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return record


def run_ablation(out_dir: str | Path, seeds: int = 3, budget: str | AblationBudget = "demo",
                 variants: Sequence[str] | None = None, device: str | None = None, command: str = ""
                 ) -> dict[str, Any]:
    """Train and evaluate every variant for ``seeds`` seeds; write out_dir/ablations.md, .png and .json.

    Returns the summary (per variant: mean and std of mask AP, AP50, AP75 in percent, the effects against the
    baseline and the paper's). ``variants`` picks a subset by name (the baseline is always added);
    ``command`` is quoted in the markdown.
    """
    from maskrcnn.engine.runs import holds_run  # noqa: PLC0415

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    b = _budget_of(budget)
    names = [v.name for v in VARIANTS]
    wanted = list(names if variants is None else variants)
    unknown = [v for v in wanted if v not in names]
    if unknown:
        raise ValueError(f"unknown ablation variants {', '.join(unknown)}; known: {', '.join(names)}")
    chosen = [v for v in VARIANTS if v.name == "baseline" or v.name in wanted]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(out_dir, {"budget": dataclasses.asdict(b), "device": device or "default"})
    train_dir, val_dir = _generate_data(out_dir, b)
    jobs = [(v, s) for s in range(1, seeds + 1) for v in chosen]  # seed-major: every variant has seed 1 first
    records: dict[tuple[str, int], dict[str, Any]] = {}
    started = time.perf_counter()
    fresh = 0
    for i, (variant, seed) in enumerate(jobs, 1):
        path = out_dir / "runs" / variant.name / f"seed{seed}" / METRICS_FILE
        if path.is_file():
            records[(variant.name, seed)] = json.loads(path.read_text())
            logger.info("ablate [%d/%d] %s seed %d: finished earlier, mask AP %.3f", i, len(jobs), variant.name,
                        seed, records[(variant.name, seed)]["segm"]["AP"])
        else:
            resumed = holds_run(path.parent)
            logger.info("ablate [%d/%d] %s seed %d: %s", i, len(jobs), variant.name, seed,
                        "resuming" if resumed else "training")
            rec = _run_one(out_dir, b, variant, seed, train_dir, val_dir, device)
            records[(variant.name, seed)] = rec
            fresh += 1
            per_run = (time.perf_counter() - started) / fresh
            left = sum(1 for v, s in jobs[i:] if not (out_dir / "runs" / v.name / f"seed{s}" / METRICS_FILE).is_file())
            logger.info("ablate [%d/%d] %s seed %d: mask AP %.3f in %.0f s; about %.0f min left", i, len(jobs),
                        variant.name, seed, rec["segm"]["AP"], rec["total_seconds"], per_run * left / 60)
    summary = summarize(records, [v.name for v in chosen], seeds)
    summary.update(budget=dataclasses.asdict(b), seeds=seeds, command=command, machine=machine_description(),
                   wall_minutes=round((time.perf_counter() - started) / 60, 1))
    atomic_write_json(out_dir / "ablations.json", summary)
    atomic_write_text(out_dir / "ablations.md", format_table(summary))
    write_chart(summary, out_dir / "ablations.png")
    return summary


def _mean_std(values: list[float]) -> list[float]:
    """[mean, sample std] (std 0 for one value); a list, as it reads back from the JSON."""
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarize(records: dict[tuple[str, int], dict[str, Any]], names: list[str], seeds: int) -> dict[str, Any]:
    """Per variant: mask AP/AP50/AP75 (percent) mean and std over seeds, and the paired effect on AP vs baseline."""
    rows: dict[str, Any] = {}
    base = [records[("baseline", s)]["segm"] for s in range(1, seeds + 1)]
    for name in names:
        segm = [records[(name, s)]["segm"] for s in range(1, seeds + 1)]
        row: dict[str, Any] = {}
        for key in ("AP", "AP50", "AP75"):
            row[key] = _mean_std([100 * m[key] for m in segm])
            # Paired by seed: the same seed draws the same initial backbone and data order in both runs.
            diffs = [100 * (m[key] - b[key]) for m, b in zip(segm, base)]
            row[f"d{key}"] = _mean_std(diffs)
        row["box_AP"] = _mean_std([100 * records[(name, s)]["bbox"]["AP"] for s in range(1, seeds + 1)])
        row["minutes"] = statistics.fmean(records[(name, s)]["total_seconds"] for s in range(1, seeds + 1)) / 60
        rows[name] = row
    return {"variants": rows}


def _verdict(ours: Sequence[float], paper: float, seeds: int) -> str:
    """Whether our effect (mean, std of the paired differences) has the paper's sign, and how clearly."""
    mean, std = ours
    # Two standard errors of the paired mean: below that the sign is not measured (with 1 seed: never).
    noise = 2 * std / math.sqrt(seeds) if seeds > 1 else math.inf
    same = (mean > 0) == (paper > 0) and mean != 0
    if abs(mean) <= noise:
        return f"within noise (±{noise:.1f})" if math.isfinite(noise) else "one seed: not measured"
    return "yes" if same else "no: opposite sign"


def machine_description() -> str:
    """CPU model, cores this process may use, OS and torch version, for the record."""
    import os  # noqa: PLC0415

    import torch  # noqa: PLC0415

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} CPU cores, {torch.get_num_threads()} torch thread(s), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


def _pm(value: Sequence[float]) -> str:
    return f"{value[0]:.1f} ± {value[1]:.1f}"


def _paper(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def format_table(summary: dict[str, Any]) -> str:
    """The markdown report: setup, the table against the paper, the effects and their signs."""
    rows = summary["variants"]
    seeds = int(summary.get("seeds", 1))
    b = summary.get("budget", {})
    lines = ["# The paper's ablations in miniature", ""]
    if summary.get("command"):
        lines += ["```bash", summary["command"], "```", ""]
    if b:
        lines += [f"Budget `{b['name']}`: preset `{b['preset']}`, {b['train_images']} training and "
                  f"{b['val_images']} validation images of {b['image_size']}×{b['image_size']} px with "
                  f"{b['min_objects']}–{b['max_objects']} shapes each (sides {b['object_size'][0]:g}–"
                  f"{b['object_size'][1]:g} of the image, touching probability {b['touching']:g}, up to "
                  f"{b['max_occlusion']:g} of an object hidden), {b['max_iter']} iterations; recipe overrides "
                  f"`{' '.join(b['overrides'])}`. {seeds} seeds per variant; mask AP from pycocotools on the "
                  f"validation images, in percent, mean ± std over the seeds.", ""]
    if summary.get("machine"):
        lines += [f"Machine: {summary['machine']}. Wall time {summary.get('wall_minutes', '?')} min.", ""]
    lines += ["| variant | mask AP | AP50 | AP75 | Δ AP vs baseline | paper AP / AP50 / AP75 | paper Δ AP | "
              "paper's sign? | size vs paper |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        paper = PAPER.get(name)
        if paper is None:
            continue
        p_ap, p50, p75 = paper.ap
        paper_cell = f"{_paper(p_ap)} / {_paper(p50)} / {_paper(p75)} ({paper.model}, {paper.table})"
        if name == "baseline":
            effect = paper_delta = verdict = size = "–"
        else:
            d = row["dAP"]
            effect = f"{d[0]:+.1f} ± {d[1]:.1f}"
            pd = (p_ap or 0.0) - paper.baseline[0]
            paper_delta = f"{pd:+.1f}"
            verdict = _verdict(d, pd, seeds)
            size = f"{d[0] / pd:.2f}×" if pd else "–"
        lines.append(f"| {name} | {_pm(row['AP'])} | {_pm(row['AP50'])} | {_pm(row['AP75'])} | {effect} | "
                     f"{paper_cell} | {paper_delta} | {verdict} | {size} |")
    lines += ["", "Δ AP is paired by seed (variant minus baseline of the same seed), mean ± std over the seeds; "
              "\"within noise\" means |mean| ≤ 2 standard errors of that mean. \"size vs paper\" is our Δ AP "
              "over the paper's. The paper's baseline is the RoIAlign, sigmoid, class-specific FCN model of the "
              "same table: R50-C4 30.3 / 51.2 / 31.5 for pool, warp, softmax and class-agnostic; R50-FPN 33.6 / "
              "55.2 / 35.3 for the MLP head.", ""]
    lines += ["| variant | what changes | box AP | minutes per run |", "| --- | --- | --- | --- |"]
    for v in VARIANTS:
        if v.name in rows:
            lines.append(f"| {v.name} | {v.description}; `{' '.join(v.overrides) or 'defaults'}` | "
                         f"{_pm(rows[v.name]['box_AP'])} | {rows[v.name]['minutes']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def write_chart(summary: dict[str, Any], path: str | Path) -> Path | None:
    """Bar chart of mask AP, AP50, AP75 (mean ± std) per variant, and Δ AP against the paper's; None without
    matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'maskrcnn[train]'): no chart")
        return None
    rows = summary["variants"]
    names = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.27
    for j, key in enumerate(("AP", "AP50", "AP75")):
        xs = [i + (j - 1) * width for i in range(len(names))]
        left.bar(xs, [rows[n][key][0] for n in names], width, yerr=[rows[n][key][1] for n in names], capsize=3,
                 label=f"mask {key}")
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("percent")
    left.set_title(f"ours (mean ± std over {summary.get('seeds', 1)} seeds)")
    top = max(rows[n][k][0] + rows[n][k][1] for n in names for k in ("AP", "AP50", "AP75"))
    left.set_ylim(0, max(top, 1.0) * 1.18)  # headroom for the legend above the bars
    left.legend(loc="upper center", ncol=3, fontsize=8)
    effects = [n for n in names if n != "baseline"]
    xs = range(len(effects))
    right.bar([x - 0.2 for x in xs], [rows[n]["dAP"][0] for n in effects], 0.4,
              yerr=[rows[n]["dAP"][1] for n in effects], capsize=3, label="ours")
    right.bar([x + 0.2 for x in xs], [(PAPER[n].ap[0] or 0.0) - PAPER[n].baseline[0] for n in effects], 0.4,
              label="paper")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(list(xs), effects)
    right.set_ylabel("Δ mask AP vs baseline (points)")
    right.set_title("effect of each switch")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, True, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
