"""Accuracy benchmark on a CUB-layout dataset: does RA-CNN's attention pay for its three backbones?
See docs/results.md.

One command trains, per seed (default 0, 1, 2):
- the **baseline**: the same ImageNet backbone fine-tuned alone at the scale-1 input size (the RA-CNN config
  with ``model.num_scales=1``: same optimiser, augmentation and epochs, plain cross-entropy);
- **RA-CNN** with the recipe below (``RECIPE``), which reports every fusion kind of the same trained model.

and then the **ensemble** of the baseline seeds (their probabilities averaged on each test image): the same
parameters and FLOPs as RA-CNN's three scales, so RA-CNN must beat it for its attention to be what helps.
Each training run is a ``racnn train`` process in ``--runs``; ``--jobs`` of them run at once, one torch
thread each. A run already finished with the same config is reused, a killed one resumed: rerunning the
command after an interruption only does what is left. Figures are seed means and standard deviations.
Model selection: none (``train.select=last``, the last epoch of the fixed schedule); the test split is read
once per run. Writes one JSON and one Markdown table, attention pictures and a derivative-map figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accuracy_pictures import write_pictures  # benchmarks/ is on sys.path when this script runs
from bench_machine import cpu_name

from racnn.config import FUSIONS, Config, apply_overrides, load_config, save_config
from racnn.evaluation import json_safe

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("../shared/datasets/cub200-subset/CUB_200_2011")
SEEDS = (0, 1, 2)
# no accuracy lost to the attention work: the recipe's three-seed fused mean on the CUB subset at commit 0fe23f9
FUSED_FLOOR = 0.880

# The recipe. Every choice and its reason is in docs/results.md ("Recipe").
RECIPE: list[str] = """
model.backbone=mobilenet_v2 model.pretrained=true model.num_scales=3 model.input_size=224
model.crop_from=source model.mask_k=10.0 model.box_min_side=0.25 model.box_max_side=1.0
model.apn_grid=4 model.apn_hidden=256 model.dropout=0.2 model.fusion=mean_logprob
data.name=cub data.image_size=448 data.val_fraction=0.1 data.num_workers=2 data.augment=true
data.crop_scale_min=0.6
optim.name=sgd optim.lr=0.01 optim.backbone_lr_mult=0.1 apn.optimizer=adam
apn.update=search apn.lr=0.00001 apn.search_candidates=3 apn.search_shift=0.1 apn.search_zoom=1.15
optim.momentum=0.9 optim.weight_decay=0.0001 optim.scheduler=cosine loss.label_smoothing=0.1
schedule.mode=alternate schedule.warmup_epochs=2 apn.init_response=sum
apn.init_steps=80 apn.init_lr=0.00001 apn.init_side=0.6
apn.init_box=aolm,peak apn.init_threshold=0.5
schedule.classify_epochs=2 schedule.attend_epochs=1 loss.rank_margin=0.05
loss.rank_detach_coarse=true schedule.converge_tol=0.0
train.epochs=16 train.batch_size=16 train.seed=0 runtime.device=cpu runtime.channels_last=true train.select=last
train.tensorboard=false
""".split()  # noqa: SIM905 (one line per section reads better)
# --quick: the same recipe, shortened (warm-up, classify, attend, classify) to smoke-test the pipeline.
QUICK: list[str] = ["train.epochs=4", "schedule.warmup_epochs=1", "schedule.classify_epochs=1"]

FUSED = [f"acc_s123_{kind}" for kind in FUSIONS] + [f"acc_s12_{kind}" for kind in FUSIONS]
# (JSON key, label, kind): kind "pct" prints as a percentage, "num" as a number
ROWS: list[tuple[str, str, str]] = [
    ("baseline", "baseline (backbone alone, scale-1 size)", "pct"),
    ("ensemble3", "ensemble of 3 baselines (probabilities averaged)", "pct"),
    ("acc_s1", "RA-CNN scale 1", "pct"),
    ("acc_s2", "RA-CNN scale 2", "pct"),
    ("acc_s3", "RA-CNN scale 3", "pct"),
    ("acc_s12", "RA-CNN fused 1+2 (the recipe's fusion)", "pct"),
    ("acc_s123", "RA-CNN fused 1+2+3 (the recipe's fusion)", "pct"),
    *[(f"acc_s123_{kind}", f"RA-CNN fused 1+2+3, {kind}", "pct") for kind in FUSIONS],
    *[(f"acc_s12_{kind}", f"RA-CNN fused 1+2, {kind}", "pct") for kind in FUSIONS],
    ("loc_iou_mean", "scale-1 box IoU with the bird box (mean)", "pct"),
    ("loc_acc_iou50", "scale-1 box IoU >= 0.5", "pct"),
    ("head_hit_s2", "scale-2 box holds the visible head parts", "pct"),
    ("view_in_object_s2", "scale-2 view (scale-1 box) at least half on the bird", "pct"),
    ("view_in_object_s3", "scale-3 view (scale-2 box) at least half on the bird", "pct"),
    # what the attention phases add: the same final classifiers with the APNs' state after their initialisation
    ("acc_s2_init", "scale 2, initial boxes (same classifiers)", "pct"),
    ("acc_s3_init", "scale 3, initial boxes (same classifiers)", "pct"),
    ("acc_s123_init", "fused 1+2+3, initial boxes (same classifiers)", "pct"),
    ("pt_s2", "mean p(true class), scale 2", "pct"),
    ("pt_s2_init", "mean p(true class), scale 2, initial boxes", "pct"),
    ("pt_s3", "mean p(true class), scale 3", "pct"),
    ("pt_s3_init", "mean p(true class), scale 3, initial boxes", "pct"),
    ("head_hit_s2_init", "scale-2 box holds the head, initial boxes", "pct"),
    ("loc_acc_iou50_init", "scale-1 box IoU >= 0.5, initial boxes", "pct"),
    ("box_side_mean_s1", "box side, scale 1 (mean)", "num"),
    ("box_side_std_s1", "box side, scale 1 (std)", "num"),
    ("box_side_mean_s2", "box side, scale 2 (mean)", "num"),
    ("box_side_std_s2", "box side, scale 2 (std)", "num"),
]
REQUIRED_KEYS = [k for k, _, _ in ROWS] + ["baseline_std", "acc_s123_std", "seeds", "fusion", "wall_time_s"]


def racnn_config(data: str | Path, *, quick: bool = False, extra: list[str] | None = None) -> Config:
    """RA-CNN's config: recipe, then --quick, then the user's overrides."""
    keys = [*RECIPE, *(QUICK if quick else []), *(extra or []), f"data.root={data}"]
    return apply_overrides(Config(), keys)


def baseline_config(cfg: Config) -> Config:
    """The backbone alone: one scale (no APN, no fusion), trained by plain cross-entropy for the same number of
    epochs (joint mode with one scale; the alternating mode would spend its attention epochs training nothing)."""
    keys = ["model.num_scales=1", "model.crop_from=previous", "schedule.mode=joint"]
    keys += ["schedule.warmup_epochs=0", f"data.image_size={cfg.model.input_size}"]
    return apply_overrides(Config.from_dict(cfg.to_dict()), keys)


def seeded(cfg: Config, seed: int) -> Config:
    return apply_overrides(Config.from_dict(cfg.to_dict()), [f"train.seed={seed}"])


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch versions and threads, and the load average (the machine may be shared)."""
    cpu = cpu_name()
    import torchvision

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": load()}
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


# ------------------------------------------------------------------------------------------------ runs


def run_training(cfg: Config, out: Path, *, threads: int, progress: bool, commit: str) -> dict[str, Any]:
    """``racnn train`` of ``cfg`` into ``out`` as its own process (``threads`` torch threads), or the run that
    is already there: finished with the same config and the same code (``commit``), its metrics; killed,
    resumed. A folder holding a run of another config or commit is an error (the benchmark never replaces a
    run, and never reports one commit's figures under another's). Returns the test metrics, the wall time of
    the training process and whether the run was ``reused`` or ``resumed``."""
    wanted = out.with_suffix(".yaml")  # next to the run folder: what this benchmark asks of it
    stamp = out.with_suffix(".commit")  # the code the run was started with
    save_config(cfg, wanted)
    done = out / "metrics.json"
    if (out / "config.yaml").is_file():
        if load_config(out / "config.yaml").to_dict() != cfg.to_dict():
            raise SystemExit(f"{out}: holds a run of another config; pass another --runs folder")
        recorded = stamp.read_text().strip() if stamp.is_file() else "unknown"
        if recorded != commit:
            raise SystemExit(
                f"{out}: holds a run of commit {recorded}, not of this one ({commit}); pass another --runs folder"
            )
        if done.is_file():
            print(f"  {out.name}: finished before, reused", flush=True)
            return json.loads(done.read_text()) | {"reused": True}
    else:
        stamp.write_text(commit + "\n")
    resume = (out / "last.pt").is_file()
    cmd = [sys.executable, "-m", "racnn", "train", "--out", str(out)]
    cmd += ["--resume"] if resume else ["--config", str(wanted)]
    cmd += [] if progress else ["--no-progress"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    print(f"  {out.name}: {'resumed' if resume else 'started'}", flush=True)
    with open(out.with_suffix(".log"), "a") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0 or not done.is_file():
        raise SystemExit(f"{out}: racnn train exited with {code}; its output is in {out.with_suffix('.log')}")
    metrics = json.loads(done.read_text())
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 1)  # of this process (after a resume: its part)
    metrics["resumed"] = resume
    done.write_text(json.dumps(metrics, indent=2))
    accs = {k: round(v, 4) for k, v in metrics.items() if k in ("acc_s1", "acc_s2", "acc_s3", "acc_s123")}
    print(f"  {out.name}: {json.dumps(accs)} in {metrics['wall_time_s']:.0f} s", flush=True)
    return metrics


def run_all(
    jobs: list[tuple[str, Config]], runs: Path, *, workers: int, progress: bool, commit: str
) -> dict[str, Any]:
    """Every ``(name, config)`` job in ``runs/name``, ``workers`` at a time (longest first: RA-CNN before the
    baselines, so the cores stay busy to the end)."""
    runs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // workers)
    order = sorted(jobs, key=lambda j: -j[1].model.num_scales)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            name: pool.submit(
                run_training, cfg, runs / name, threads=threads, progress=progress, commit=commit
            )
            for name, cfg in order
        }
        return {name: futures[name].result() for name, _ in jobs}


@torch.no_grad()
def ensemble_accuracy(run_dirs: list[Path], split: str = "test") -> float:
    """Top-1 of the models in ``run_dirs`` (their ``best.pt``) with their softmax probabilities averaged, on
    ``split`` of the dataset they were trained on."""
    from racnn.checkpoint import load_model
    from racnn.evaluation import accumulate
    from racnn.training import loaders

    probs, target = [], None
    for run in run_dirs:
        model = load_model(run / "best.pt")
        cfg = model.training_config
        data = loaders.make_dataset(cfg, split, model.preprocessing, train=False)
        acc = accumulate(model, loaders.make_loader(data, cfg), keep_scores=True, progress=False)
        logp, y = acc.scores()
        if target is not None and not torch.equal(y, target):
            raise ValueError(f"{run}: its {split} split differs from the other runs'")
        probs.append(logp[0].exp())
        target = y
    assert target is not None
    return float((torch.stack(probs).mean(0).argmax(1) == target).float().mean())


# ------------------------------------------------------------------------------------------ the table


def table_entry(metrics: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """One RA-CNN run's test metrics under the table's keys (``box_side_s1`` -> ``box_side_mean_s1``)."""
    out: dict[str, Any] = {"baseline": baseline.get("acc_s1") if baseline else None}
    for key, _, _ in ROWS:
        if key not in ("baseline", "ensemble3"):
            out[key] = metrics.get(key.replace("box_side_mean_", "box_side_"))
    out["loc_centre_hit"] = metrics.get("loc_centre_hit")
    return out


def mean_std(values: list[Any]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation and count of the measured values (None/NaN: not measured; one value:
    std 0)."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def check_targets(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets on the seed means: ``{name: {"rule", "value", "met"}}``; a value that was not
    measured (None) fails its target."""

    def get(k: str) -> float:
        v = r.get(k)
        return math.nan if v is None else float(v)

    base, s1, fused = get("baseline"), get("acc_s1"), get("acc_s123")
    checks: dict[str, tuple[str, Any, bool]] = {
        "fused_vs_baseline": ("acc_s123 - baseline >= 0.05", fused - base, fused - base >= 0.05),
        "fused_vs_ensemble": (
            "acc_s123 - ensemble3 >= 0.01",
            fused - get("ensemble3"),
            fused - get("ensemble3") >= 0.01,
        ),
        "scale2_vs_scale1": ("acc_s2 - acc_s1 > 0", get("acc_s2") - s1, get("acc_s2") - s1 > 0),
        "scale3_vs_scale1": ("acc_s3 - acc_s1 >= -0.01", get("acc_s3") - s1, get("acc_s3") - s1 >= -0.01),
        "iou50": ("loc_acc_iou50 >= 0.60", get("loc_acc_iou50"), get("loc_acc_iou50") >= 0.60),
        "head_hit_s2": ("head_hit_s2 >= 0.70", get("head_hit_s2"), get("head_hit_s2") >= 0.70),
    }
    # issue 18: the learned boxes beat their initialisation under the same classifiers, and no accuracy is lost
    for s in (2, 3):
        gain = get(f"acc_s{s}") - get(f"acc_s{s}_init")
        checks[f"learned_vs_init_s{s}"] = (f"acc_s{s} - acc_s{s}_init >= 0.01", gain, gain >= 0.01)
    checks["pt_s2_vs_init"] = (
        "pt_s2 > pt_s2_init",
        get("pt_s2") - get("pt_s2_init"),
        get("pt_s2") > get("pt_s2_init"),
    )
    head, head0 = get("head_hit_s2"), get("head_hit_s2_init")
    checks["head_hit_s2_vs_init"] = (
        "head_hit_s2 >= head_hit_s2_init + 0.05 and head_hit_s2 >= 0.75",
        [head - head0, head],
        head >= head0 + 0.05 and head >= 0.75,
    )
    spread = get("head_hit_s2_std")
    checks["head_hit_s2_spread"] = ("std of head_hit_s2 over seeds <= 0.05", spread, spread <= 0.05)
    checks["fused_no_loss"] = (f"acc_s123 >= {FUSED_FLOOR}", fused, fused >= FUSED_FLOOR)
    checks["fused_vs_ensemble_2"] = (
        "acc_s123 - ensemble3 >= 0.02",
        fused - get("ensemble3"),
        fused - get("ensemble3") >= 0.02,
    )
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
    baselines: dict[int, dict[str, Any]],
    racnn: dict[int, dict[str, Any]],
    *,
    ensemble3: float | None,
    fusion: str,
    wall_time_s: float,
    info: dict[str, Any],
) -> dict[str, Any]:
    """The JSON document: every table key as its seed mean at the top level, ``std`` and ``per_seed`` beside
    it (``baseline_std`` and ``acc_s123_std`` at the top level too), the ensemble, the targets, and ``info``
    (machine, command, commit...). ``baselines`` and ``racnn``: test metrics by seed."""
    seeds = sorted(racnn)
    if sorted(baselines) != seeds:
        raise ValueError(f"baseline seeds {sorted(baselines)} differ from RA-CNN's {seeds}")
    entries = {s: table_entry(racnn[s], baselines[s]) for s in seeds}
    result: dict[str, Any] = {"seeds": seeds, "fusion": fusion, "ensemble3": ensemble3}
    std: dict[str, float | None] = {}
    count: dict[str, int] = {}  # seeds that measured each figure (fewer than `seeds`: see per_seed)
    for key, _, _ in ROWS:
        if key == "ensemble3":
            continue
        result[key], std[key], count[key] = mean_std([entries[s][key] for s in seeds])
    result["loc_centre_hit"] = mean_std([entries[s]["loc_centre_hit"] for s in seeds])[0]
    result["baseline_std"], result["acc_s123_std"] = std["baseline"], std["acc_s123"]
    result["head_hit_s2_std"] = std["head_hit_s2"]
    result["std"], result["n"] = std, count
    result["per_seed"] = {
        str(s): {
            **entries[s],
            **{k: racnn[s].get(k) for k in ("wall_time_s", "resumed", "reused")},
            **{f"baseline_{k}": baselines[s].get(k) for k in ("wall_time_s", "resumed", "reused")},
        }
        for s in seeds
    }
    result["wall_time_s"] = round(wall_time_s, 1)
    result["targets"] = check_targets(result)
    result.update(info)
    return json_safe(result)


def _cell(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if kind == "pct" else f"{v:.3f}"


def _pm(mean: Any, std: Any, kind: str) -> str:
    if mean is None:
        return "n/a"
    if std is None:
        return _cell(mean, kind)
    return f"{_cell(mean, kind)} ± {100 * std:.1f}" if kind == "pct" else f"{mean:.3f} ± {std:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    """One row per metric: the mean ± standard deviation over seeds, then each seed's figure."""
    seeds = [str(s) for s in result["seeds"]]
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| metric | mean ± std ({len(seeds)} seeds) | {head} |", "|---|---:|" + "---:|" * len(seeds)]
    for key, label, kind in ROWS:
        if key == "ensemble3":
            lines.append(f"| {label} | {_cell(result.get(key), kind)} |" + " |" * len(seeds))
            continue
        cells = [_cell(result["per_seed"][s].get(key), kind) for s in seeds]
        recipe = " **(the recipe's)**" if key == f"acc_s123_{result['fusion']}" else ""
        n = result.get("n", {}).get(key, len(seeds))
        fewer = f" ({n} of {len(seeds)} seeds)" if n < len(seeds) else ""
        lines.append(
            f"| {label}{recipe} | {_pm(result.get(key), result['std'].get(key), kind)}{fewer} | "
            + " | ".join(cells)
            + " |"
        )
    walls = [_cell(result["per_seed"][s].get("wall_time_s"), "num").split(".")[0] for s in seeds]
    lines.append("| RA-CNN training + test wall time, s | | " + " | ".join(walls) + " |")
    return "\n".join(lines)


def markdown_report(result: dict[str, Any]) -> str:
    """The whole Markdown file: table, targets, command, commit, machine and wall time."""
    m = result.get("machine", {})
    kind = "QUICK smoke run (shortened schedule), not the full run" if result.get("quick") else "full run"
    lines = [f"# RA-CNN accuracy benchmark on {result.get('dataset', '?')}", "", f"**{kind}.**", ""]
    lines += [markdown_table(result), "", "Targets (seed means):", ""]
    for name, t in result["targets"].items():
        lines.append(f"- {'met' if t['met'] else 'NOT met'}: {name} ({t['rule']}; value {t['value']})")
    lines += [
        "",
        f"- the recipe's fusion: `{result.get('fusion')}`; seeds {result.get('seeds')}",
        f"- command: `{result.get('command', '?')}`",
        f"- commit: `{result.get('commit', '?')}`",
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}, "
        f"{result.get('jobs', '?')} runs at a time, load average {m.get('load_avg_1m', '?')} at start "
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


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CUB-layout folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="shortened schedule (smoke run)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds (default: %(default)s)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="training runs at a time, each with cores / jobs torch threads; 0: one per core when the "
        "machine is idle (load < 0.5), else 1 (OpenMP threads stall when another process holds a core)",
    )
    p.add_argument("--runs", help="training output folders (default: runs/bench_accuracy[_quick])")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder of the JSON/Markdown")
    p.add_argument("--name", help="result file stem (default: accuracy_cub or accuracy_cub_quick)")
    p.add_argument("--figures", default=str(ROOT / "docs/figures"), help="folder of the pictures ('' = none)")
    p.add_argument("--progress", action="store_true", help="progress bars in each run's log")
    p.add_argument("--pictures-only", action="store_true", help="only redraw the pictures from --runs")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument(
        "--baselines-from",
        metavar="JSON",
        help="take the baselines' figures and their ensemble from this earlier result of the benchmark instead "
        "of training them again (valid while the baseline's config is unchanged: it reads no APN, attention "
        "or fusion key)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    jobs = args.jobs or (cores if not load() >= 0.5 else 1)
    os.environ.setdefault("TORCH_HOME", str((ROOT / "../shared/weights").resolve()))
    torch.set_num_threads(max(1, cores // jobs))
    stem = args.name or ("accuracy_cub_quick" if args.quick else "accuracy_cub")
    runs = Path(args.runs or ROOT / ("runs/bench_accuracy_quick" if args.quick else "runs/bench_accuracy"))
    cfg = racnn_config(args.data, quick=args.quick, extra=args.set)
    first = f"racnn_seed{args.seeds[0]}"
    if args.pictures_only:
        for path in write_pictures(runs / first, Path(args.figures), stem):
            print(f"wrote {path}")
        return 0
    info: dict[str, Any] = {
        "quick": args.quick,
        "dataset": str(args.data),
        "command": shlex.join(
            ["python", "benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "commit": git_commit(),
        "machine": machine_info(),
        "jobs": jobs,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "recipe": cfg.to_dict(),
    }
    t0 = time.perf_counter()
    todo = [(f"racnn_seed{s}", seeded(cfg, s)) for s in args.seeds]
    if not args.baselines_from:
        todo += [(f"baseline_seed{s}", seeded(baseline_config(cfg), s)) for s in args.seeds]
    print(f"{len(todo)} runs of {cfg.train.epochs} epochs, {jobs} at a time, in {runs}", flush=True)
    metrics = run_all(todo, runs, workers=jobs, progress=args.progress, commit=info["commit"])
    if args.baselines_from:
        baselines, ensemble = earlier_baselines(Path(args.baselines_from), args.seeds)
        metrics |= {f"baseline_seed{s}": m for s, m in baselines.items()}
        info["baselines_from"] = args.baselines_from
    else:
        ensemble = ensemble_accuracy([runs / f"baseline_seed{s}" for s in args.seeds])
    info["images"] = _split_sizes(cfg)
    info["load_avg_1m_end"] = load()
    result = build_result(
        {s: metrics[f"baseline_seed{s}"] for s in args.seeds},
        {s: metrics[f"racnn_seed{s}"] for s in args.seeds},
        ensemble3=ensemble if len(args.seeds) > 1 else None,
        fusion=cfg.model.fusion,
        wall_time_s=time.perf_counter() - t0,
        info=info,
    )
    js, md = write_results(result, args.results, stem)
    print(markdown_table(result))
    print(f"wrote {js} and {md}")
    if args.figures:
        for path in write_pictures(runs / first, Path(args.figures), stem):
            print(f"wrote {path}")
    return 0


def earlier_baselines(path: Path, seeds: list[int]) -> tuple[dict[int, dict[str, Any]], float | None]:
    """The baselines' test figures and their ensemble's from an earlier result of this benchmark (``--baselines-
    from``): the baseline reads no key of the APN, the attention or the fusion, so a change there leaves its
    runs bit-identical (docs/results.md), and two hours of CPU need not be spent again on them."""
    try:
        earlier = json.loads(path.read_text())
        per_seed = {s: earlier["per_seed"][str(s)] for s in seeds}
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: not a result of this benchmark with seeds {seeds} ({e})") from None
    runs = {
        s: {"acc_s1": r["baseline"], "wall_time_s": r.get("baseline_wall_time_s"), "reused": str(path)}
        for s, r in per_seed.items()
    }
    return runs, earlier.get("ensemble3")


def _split_sizes(cfg: Config) -> dict[str, int]:
    from racnn.backbones import backbone_preprocessing
    from racnn.training import loaders

    prep = backbone_preprocessing(cfg.model.backbone)
    return {s: len(loaders.make_dataset(cfg, s, prep, train=False)) for s in ("train", "val", "test")}


if __name__ == "__main__":
    sys.exit(main())
