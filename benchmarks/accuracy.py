"""Accuracy benchmark on a CUB-layout dataset: does RA-CNN beat its own backbone, and do its attended scales
beat the full image (paper Table 2)? See docs/results.md.

Trains (a) the **baseline**, the same ImageNet backbone fine-tuned alone at the scale-1 input size (the
RA-CNN config with ``model.num_scales=1``: same optimiser, augmentation and total epochs, plain
cross-entropy), and (b) **RA-CNN** with the full alternating schedule, once per crop mode asked for
(``previous``: zoom the previous scale as in the paper; ``source``: crop the higher-resolution copy of the
image). Model selection uses the validation split carved from train; the test split is read once per run, at
its end. Writes one table as JSON and Markdown, attention pictures and a derivative-map figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_machine import cpu_name  # benchmarks/ is on sys.path when this script runs

from racnn.config import Config, apply_overrides
from racnn.evaluation import json_safe

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("../shared/datasets/cub200-subset/CUB_200_2011")
CROP_MODES = ("previous", "source")
MAIN_VARIANT = "source"  # declared before any run: the variant whose figures fill the top-level JSON keys

# The recipe. Every choice and its reason is in docs/results.md ("Recipe").
RECIPE: list[str] = """
model.backbone=mobilenet_v2 model.pretrained=true model.num_scales=3 model.input_size=224
model.mask_k=10.0 model.box_min_side=0.25 model.box_max_side=1.0 model.apn_grid=4 model.apn_hidden=256
model.dropout=0.2
data.name=cub data.val_fraction=0.1 data.num_workers=2 data.augment=true data.crop_scale_min=0.6
optim.name=sgd optim.lr=0.01 optim.backbone_lr_mult=0.1 optim.apn_lr=0.000001 optim.apn_optimizer=adam
optim.momentum=0.9 optim.weight_decay=0.0001 optim.scheduler=cosine optim.label_smoothing=0.1
schedule.mode=alternate schedule.warmup_epochs=2 schedule.apn_init_response=cam
schedule.apn_init_steps=80 schedule.apn_init_lr=0.00001 schedule.apn_init_side=0.6
schedule.apn_init_box=region,peak schedule.apn_init_threshold=0.5
schedule.classify_epochs=2 schedule.attend_epochs=1 schedule.rank_margin=0.05
schedule.rank_detach_coarse=true schedule.converge_tol=0.0
train.epochs=16 train.batch_size=16 train.seed=0 train.device=cpu train.channels_last=true
""".split()  # noqa: SIM905 (one line per section reads better)
# --quick: the same recipe, shortened (warm-up, classify, attend, classify) to smoke-test the pipeline.
QUICK: list[str] = ["train.epochs=4", "schedule.warmup_epochs=1", "schedule.classify_epochs=1"]
# crop_from=source needs a loader image larger than the scale input: 448 px holds the CUB originals' detail
IMAGE_SIZE = {"previous": 224, "source": 448}

# (JSON key, label, kind): kind "pct" prints as a percentage, "num" as a number
ROWS: list[tuple[str, str, str]] = [
    ("baseline", "baseline (backbone alone, scale-1 size)", "pct"),
    ("acc_s1", "RA-CNN scale 1", "pct"),
    ("acc_s2", "RA-CNN scale 2", "pct"),
    ("acc_s3", "RA-CNN scale 3", "pct"),
    ("acc_s12", "RA-CNN fused 1+2", "pct"),
    ("acc_s123", "RA-CNN fused 1+2+3", "pct"),
    ("loc_iou_mean", "scale-1 box IoU with the bird box (mean)", "pct"),
    ("loc_acc_iou50", "scale-1 box IoU >= 0.5", "pct"),
    ("head_hit_s2", "scale-2 box holds the visible head parts", "pct"),
    ("box_side_mean_s1", "box side, scale 1 (mean)", "num"),
    ("box_side_std_s1", "box side, scale 1 (std)", "num"),
    ("box_side_mean_s2", "box side, scale 2 (mean)", "num"),
    ("box_side_std_s2", "box side, scale 2 (std)", "num"),
]
REQUIRED_KEYS = [k for k, _, _ in ROWS] + ["wall_time_s"]


def racnn_config(
    data: str | Path, crop_from: str, *, quick: bool = False, extra: list[str] | None = None
) -> Config:
    """The RA-CNN config of one crop mode: recipe, then --quick, then the user's overrides."""
    keys = [*RECIPE, f"model.crop_from={crop_from}", f"data.image_size={IMAGE_SIZE[crop_from]}"]
    keys += [*(QUICK if quick else []), *(extra or []), f"data.root={data}"]
    return apply_overrides(Config(), keys)


def baseline_config(cfg: Config) -> Config:
    """The backbone alone: one scale (no APN, no fusion), trained by plain cross-entropy for the same number of
    epochs (joint mode with one scale; the alternating mode would spend its attention epochs training nothing)."""
    keys = ["model.num_scales=1", "model.crop_from=previous", "schedule.mode=joint"]
    keys += ["schedule.warmup_epochs=0", f"data.image_size={cfg.model.input_size}"]
    return apply_overrides(Config.from_dict(cfg.to_dict()), keys)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch versions and threads, and the load average (the machine may be shared)."""
    cpu = cpu_name()
    import torchvision

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "load_avg_1m": load()}
    return info | {"torch": torch.__version__, "torchvision": torchvision.__version__, "gpu": gpu}


def load() -> float:
    """The 1-minute load average (other processes on a shared machine slow the runs down)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan


def git_commit() -> str:
    """HEAD's hash, ``+dirty`` when src/ or benchmarks/ differ from it or hold new files; ``unknown`` outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + (
            "+dirty" if git("status", "--porcelain", "--", "src", "benchmarks") else ""
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table_entry(metrics: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """One RA-CNN run's test metrics renamed to the table's keys (``box_side_s1`` -> ``box_side_mean_s1``)."""
    out = {"baseline": baseline.get("acc_s1") if baseline else None}
    for key, _, _ in ROWS[1:]:
        src = key.replace("box_side_mean_", "box_side_")
        out[key] = metrics.get(src)
    out["loc_centre_hit"] = metrics.get("loc_centre_hit")
    return out


def check_targets(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets on one table entry: ``{name: {"rule", "value", "met"}}``; a value that was not
    measured (None) fails its target."""

    def get(k: str) -> float:
        v = r.get(k)
        return math.nan if v is None else float(v)

    base, s1 = get("baseline"), get("acc_s1")
    checks: dict[str, tuple[str, Any, bool]] = {
        "fused_vs_baseline": (
            "acc_s123 - baseline >= 0.05",
            get("acc_s123") - base,
            get("acc_s123") - base >= 0.05,
        ),
        "scale2_vs_scale1": ("acc_s2 - acc_s1 > 0", get("acc_s2") - s1, get("acc_s2") - s1 > 0),
        "scale3_vs_scale1": ("acc_s3 - acc_s1 >= -0.01", get("acc_s3") - s1, get("acc_s3") - s1 >= -0.01),
        "iou50": ("loc_acc_iou50 >= 0.60", get("loc_acc_iou50"), get("loc_acc_iou50") >= 0.60),
        "head_hit_s2": ("head_hit_s2 >= 0.70", get("head_hit_s2"), get("head_hit_s2") >= 0.70),
    }
    for s in (1, 2):
        mean, std = get(f"box_side_mean_s{s}"), get(f"box_side_std_s{s}")
        rule = f"0.35 <= box_side_mean_s{s} <= 0.85 and box_side_std_s{s} > 0.03"
        checks[f"no_collapse_s{s}"] = (rule, [mean, std], 0.35 <= mean <= 0.85 and std > 0.03)

    def clean(v: Any) -> Any:
        if isinstance(v, list):
            return [clean(x) for x in v]
        return None if math.isnan(v) else round(v, 4)

    return {
        name: {"rule": rule, "value": clean(v), "met": bool(ok)} for name, (rule, v, ok) in checks.items()
    }


def build_result(
    baseline: dict[str, Any],
    variants: dict[str, dict[str, Any]],
    *,
    main: str,
    wall_time_s: float,
    info: dict[str, Any],
) -> dict[str, Any]:
    """The JSON document: the main variant's table entry at the top level (the required keys), every run's
    figures under ``variants`` and ``baseline_run``, the targets, and ``info`` (machine, command, commit...)."""
    entries = {name: table_entry(m, baseline) for name, m in variants.items()}
    if main not in entries:
        raise ValueError(f"main variant {main!r} was not run (ran: {', '.join(entries) or 'none'})")
    result: dict[str, Any] = {**entries[main], "wall_time_s": round(wall_time_s, 1), "main_variant": main}
    result["targets"] = check_targets(entries[main])
    result["variants"] = {
        name: {**entries[name], **{k: variants[name].get(k) for k in ("wall_time_s", "best_epoch")}}
        for name in variants
    }
    result["baseline_run"] = {k: baseline.get(k) for k in ("acc_s1", "wall_time_s", "best_epoch")}
    result.update(info)
    return json_safe(result)


def _cell(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if kind == "pct" else f"{v:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per metric, one column per RA-CNN variant (the main one first)."""
    names = [result["main_variant"]] + [n for n in result["variants"] if n != result["main_variant"]]
    head = " | ".join(f"crop_from={n}" + (" (main)" if i == 0 else "") for i, n in enumerate(names))
    lines = [f"| metric | {head} |", "|---|" + "---:|" * len(names)]
    for key, label, kind in ROWS:
        cells = [_cell(result["variants"][n].get(key), kind) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    walls = [_cell(result["variants"][n].get("wall_time_s"), "num").split(".")[0] for n in names]
    lines.append("| training + test wall time, s | " + " | ".join(walls) + " |")
    return "\n".join(lines)


def markdown_report(result: dict[str, Any]) -> str:
    """The whole Markdown file: table, targets, command, commit, machine and wall time."""
    m = result.get("machine", {})
    kind = "QUICK smoke run (shortened schedule), not the full run" if result.get("quick") else "full run"
    lines = [f"# RA-CNN accuracy benchmark on {result.get('dataset', '?')}", "", f"**{kind}.**", ""]
    lines += [markdown_table(result), "", "Targets (main variant):", ""]
    for name, t in result["targets"].items():
        lines.append(f"- {'met' if t['met'] else 'NOT met'}: {name} ({t['rule']}; value {t['value']})")
    base = result.get("baseline_run", {})
    lines += [
        "",
        f"- baseline run: {_cell(base.get('wall_time_s'), 'num')} s, best epoch {base.get('best_epoch')}",
        f"- command: `{result.get('command', '?')}`",
        f"- commit: `{result.get('commit', '?')}`",
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, "
        f"{m.get('threads', '?')} threads, load average {m.get('load_avg_1m', '?')} at start "
        f"and {result.get('load_avg_1m_end', '?')} at the end (shared machine: timings are noisy)",
        f"- total wall time: {result['wall_time_s']:.0f} s",
        f"- images: {result.get('images', '?')}",
    ]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], results_dir: str | Path, name: str) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.md`` in ``results_dir``."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"
    js.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown_report(result))
    return js, md


def shrink_png(path: Path, max_bytes: int = 300_000) -> Path:
    """Re-save a PNG with a 256-colour palette, downscaled until it is under ``max_bytes``."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    while True:
        img.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= max_bytes or img.width < 300:
            return path
        img = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.Resampling.LANCZOS)


@torch.no_grad()
def write_pictures(run_dir: Path, fig_dir: Path, stem: str, *, rows: int = 6, pool: int = 64) -> list[Path]:
    """Attention boxes on ``rows`` test images the fused output gets right and ``rows`` it gets wrong (a seeded
    sample of ``pool`` test images; titles give the scale-1 box IoU and the scale-2 head hit), and derivative
    maps (:mod:`racnn.analysis`) of two of them."""
    from racnn.analysis import derivative_map_figure
    from racnn.attention import box_to_xyxy
    from racnn.evaluation import box_iou, head_hits
    from racnn.training import setup
    from racnn.training.checkpoint import load_model
    from racnn.visualization import attention_figure

    model, cfg, classes = load_model(run_dir / "best.pt")
    test = setup.make_dataset(cfg, "test", model.preprocessing, train=False)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:pool].tolist()
    items = [test[i] for i in idx]
    x, y = torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])
    outs = [model(x[i : i + 16]) for i in range(0, len(x), 16)]
    pred = torch.cat([o.logits[model.keys[-1]] for o in outs]).argmax(1)
    v2, v3 = (torch.cat([o.views[s] for o in outs]) for s in (0, 1))  # what scales 2 and 3 see
    iou = box_iou(box_to_xyxy(v2), torch.stack([it["box"] for it in items]))
    parts = torch.stack([it["parts"] for it in items])
    hit, has = head_hits(box_to_xyxy(v3), parts, getattr(test, "head_parts", []))
    titles = [
        f"IoU {iou[i]:.2f} head {'n/a' if not has[i] else 'in' if hit[i] else 'OUT'}" for i in range(len(x))
    ]
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, want in (("successes", True), ("failures", False)):
        sel = [i for i in range(len(x)) if bool(pred[i] == y[i]) == want][:rows]
        if not sel:
            continue
        path = fig_dir / f"{stem}_{kind}.png"
        attention_figure(
            model, x[sel], classes, path, labels=y[sel].tolist(), titles=[titles[i] for i in sel], topk=2
        )
        paths.append(shrink_png(path))
    sel = [0, int((pred != y).nonzero()[0]) if (pred != y).any() else 1]
    path = fig_dir / f"{stem}_derivative_map.png"
    derivative_map_figure(model, x[sel], y[sel].tolist(), path, classes=classes)
    paths.append(shrink_png(path))
    return paths


def train_and_test(cfg: Config, out_dir: Path, *, progress: bool) -> dict[str, Any]:
    """One ``Trainer`` run (validation-based selection, test read once at the end), with its wall time."""
    from racnn.training.loop import Trainer

    t0 = time.perf_counter()
    metrics = Trainer(cfg, out_dir, progress=progress).fit()
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 1)
    print(
        f"  {out_dir.name}: {json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith('acc')})}"
        f" in {metrics['wall_time_s']:.0f} s",
        flush=True,
    )
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CUB-layout folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="shortened schedule (smoke run, < 15 min on 2 cores)")
    p.add_argument(
        "--crop-from", choices=(*CROP_MODES, "both"), default="both", help="RA-CNN variants to run"
    )
    p.add_argument("--runs", help="training output folders (default: runs/bench_accuracy[_quick])")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder of the JSON/Markdown")
    p.add_argument("--name", help="result file stem (default: accuracy_cub or accuracy_cub_quick)")
    p.add_argument("--figures", default=str(ROOT / "docs/figures"), help="folder of the pictures ('' = none)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads; 0: all cores when the machine is idle (load < 0.5), else 1 (OpenMP threads stall "
        "when another process holds a core: 4x slower steps measured with 2 threads on 2 busy cores)",
    )
    p.add_argument("--progress", action="store_true", help="progress bars and per-epoch lines")
    p.add_argument("--pictures-only", action="store_true", help="only redraw the pictures from --runs")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or ((os.cpu_count() or 1) if not load() >= 0.5 else 1))
    os.environ.setdefault("TORCH_HOME", str((ROOT / "../shared/weights").resolve()))
    stem = args.name or ("accuracy_cub_quick" if args.quick else "accuracy_cub")
    runs = Path(args.runs or ROOT / ("runs/bench_accuracy_quick" if args.quick else "runs/bench_accuracy"))
    modes = list(CROP_MODES) if args.crop_from == "both" else [args.crop_from]
    main_variant = MAIN_VARIANT if MAIN_VARIANT in modes else modes[0]
    if args.pictures_only:
        for path in write_pictures(runs / f"racnn_{main_variant}", Path(args.figures), stem):
            print(f"wrote {path}")
        return 0
    cfgs = {m: racnn_config(args.data, m, quick=args.quick, extra=args.set) for m in modes}
    info: dict[str, Any] = {
        "quick": args.quick,
        "dataset": str(args.data),
        "command": shlex.join(
            ["python", "benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "commit": git_commit(),
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "recipe": cfgs[main_variant].to_dict(),
    }
    t0 = time.perf_counter()
    print(f"baseline ({cfgs[main_variant].train.epochs} epochs, 1 scale)", flush=True)
    baseline = train_and_test(baseline_config(cfgs[main_variant]), runs / "baseline", progress=args.progress)
    variants = {}
    for m in modes:
        print(f"RA-CNN crop_from={m}", flush=True)
        variants[m] = train_and_test(cfgs[m], runs / f"racnn_{m}", progress=args.progress)
    info["images"] = _split_sizes(cfgs[main_variant])
    info["load_avg_1m_end"] = load()
    result = build_result(
        baseline, variants, main=main_variant, wall_time_s=time.perf_counter() - t0, info=info
    )
    js, md = write_results(result, args.results, stem)
    print(markdown_table(result))
    print(f"wrote {js} and {md}")
    if args.figures:
        for path in write_pictures(runs / f"racnn_{main_variant}", Path(args.figures), stem):
            print(f"wrote {path}")
    return 0


def _split_sizes(cfg: Config) -> dict[str, int]:
    from racnn.backbones import backbone_preprocessing
    from racnn.training import setup

    prep = backbone_preprocessing(cfg.model.backbone)
    return {s: len(setup.make_dataset(cfg, s, prep, train=False)) for s in ("train", "val", "test")}


if __name__ == "__main__":
    sys.exit(main())
