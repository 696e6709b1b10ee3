"""Deployment benchmark: what RA-CNN costs at inference, engine by engine, against ONE backbone.

For a trained checkpoint, on the test split of its dataset: eager PyTorch, PyTorch with channels_last,
onnxruntime fp32 and onnxruntime int8 (``racnn export --format onnx [--quantize int8]``), each with and without
early exit (``--exit-confidence``, its threshold chosen on the *validation* split: the lowest mean number of
scales whose validation answers differ from the full model's on at most half a percent of the images; the
labels play no part; the int8 graphs get their own threshold by the same rule), at batch 1 and 16 and with 1
and 2 threads.
Per variant: top-1 of the fused output (early exit: of the answer), the median ms per image, images per
second and the mean scales run. The reference row is ONE eager backbone of the same kind at the scale-1 input
size (a 1-scale model of the same backbone, random weights: timing does not depend on them).

Timings run on preprocessed test images held in memory (the model's time, not JPEG decoding), interleaved:
every variant times one pass over the images in turn, for ``--rounds`` rounds, and the median is taken over
all passes' per-image times. The JSON (``--json``) carries, beside every figure, the issue's target ratios
(``ort_fp32_over_eager``, ``int8_over_ort_fp32``, ``best_over_backbone``, ... by thread count, batch 1);
``--figure`` draws accuracy against ms per image (each variant a point, early exit a curve over thresholds).

    python benchmarks/deploy.py runs/cub/best.pt --data ../shared/datasets/cub200-subset/CUB_200_2011 \\
        --json benchmarks/results/deploy_cpu.json --figure benchmarks/results/figures/deploy_cpu.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_machine import cpu_name  # benchmarks/ is on sys.path when this script runs

import racnn
from racnn.cli import main as racnn_main
from racnn.config import apply_overrides
from racnn.early_exit import EXIT_GRID, EXIT_MAX_DISAGREE, choose_exit_confidence, exit_decisions
from racnn.evaluation import accumulate, stage_predictions
from racnn.inference import forward_probs
from racnn.runtime import place_batch, place_model
from racnn.training import loaders

ACC_TOL = 0.005  # "within half a point" of the targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("checkpoint", type=Path, help="a trained .pt checkpoint (best.pt)")
    p.add_argument("--data", type=Path, required=True, help="its dataset folder")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="(default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="(default: %(default)s)")
    p.add_argument("--time-images", type=int, default=32, help="test images per timed pass (default: 32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: 3)")
    p.add_argument("--calibration-images", type=int, default=64, help="int8 calibration (default: 64)")
    p.add_argument(
        "--max-images", type=int, help="evaluate the first N images of each split only (smoke test)"
    )
    p.add_argument("--no-int8", action="store_true", help="leave out the int8 variants")
    p.add_argument(
        "--exports", type=Path, help="keep the ONNX exports in this folder (default: a temporary one)"
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--figure", type=Path, help="write accuracy against ms per image here (PNG)")
    p.add_argument(
        "--serve-results",
        type=Path,
        nargs=2,
        metavar=("EAGER", "FAST"),
        help="two benchmarks/serve.py JSONs (the eager server's, the fast one's): their 8-client ratio",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ variants


def variants(args: argparse.Namespace, folder: Path) -> dict[str, Callable[[int], Any]]:
    """Name -> a loader of the model for a thread count: eager torch, channels_last, ORT fp32, ORT int8."""
    fp32 = folder / "fp32"
    if not (fp32 / "model.onnx").is_file():
        export = ["export", "--checkpoint", str(args.checkpoint), "--format", "onnx", "--out", str(fp32)]
        if racnn_main(export) != 0:
            raise SystemExit(f"{args.checkpoint}: racnn export --format onnx failed (its message is above)")
    out: dict[str, Callable[[int], Any]] = {
        "torch": lambda t: racnn.load_model(args.checkpoint),
        "torch_channels_last": lambda t: place_model(
            racnn.load_model(args.checkpoint), "cpu", channels_last=True
        ),
        "ort_fp32": lambda t: racnn.load_model(fp32, threads=t),
    }
    if not args.no_int8:
        int8 = folder / "int8"
        if not (int8 / "model.onnx").is_file():
            quantize = [
                "export",
                "--checkpoint",
                str(args.checkpoint),
                "--format",
                "onnx",
                "--out",
                str(int8),
            ]
            quantize += ["--quantize", "int8", "--calibrate", str(args.data)]
            quantize += ["--calibration-images", str(args.calibration_images)]
            if racnn_main(quantize) != 0:
                raise SystemExit(f"{args.checkpoint}: the int8 export failed (its message is above)")
        out["ort_int8"] = lambda t: racnn.load_model(int8, threads=t)
    return out


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ accuracy


def split_loader(model: Any, args: argparse.Namespace, split: str) -> Any:
    cfg = model.training_config
    overrides = [f"data.root={args.data}", "train.batch_size=16", "data.num_workers=2"]
    overrides += [f"data.max_images={args.max_images}"] if args.max_images else []
    apply_overrides(cfg, overrides)
    return loaders.make_loader(loaders.make_dataset(cfg, split, model.preprocessing, train=False), cfg)


def evaluate(model: Any, loader: Any, exit_confidence: float | None) -> dict[str, float]:
    """Top-1 of the fused output (early exit: of the answers, ``acc_s123``) and the mean scales run."""
    m = accumulate(model, loader, exit_confidence=exit_confidence, progress=False).summary()
    fused = model.keys[-1]
    return {"top1": m[f"acc_{fused}"], "scales_mean": m.get("exit_scales_mean", float(len(model.scale_keys)))}


def choose_exit(model: Any, val: Any) -> tuple[float | None, list[dict[str, float]]]:
    """The threshold chosen on the validation split (:func:`racnn.early_exit.choose_exit_confidence`, the
    labels play no part in it), and the validation figures of every threshold, after the full model's top-1."""
    if len(val.dataset) == 0:
        raise SystemExit(
            "the validation split is empty: early exit's threshold is chosen on it (data.val_fraction)"
        )
    stages, labels = stage_predictions(model, val)
    p, rows = choose_exit_confidence(stages, labels=labels)
    full, _ = exit_decisions(stages, 1.0)
    return p, [{"full_top1": float((full == labels).float().mean())}, *rows]


# ------------------------------------------------------------------------------------------------ timing


def time_pass(model: Any, images: torch.Tensor, batch: int, exit_p: float | None, cl: bool) -> list[float]:
    """Seconds per image of each batch of one pass over ``images``: the batch's layout (NHWC for channels_last),
    the model and the softmax; no decoding or preprocessing."""
    out = []
    for start in range(0, len(images) - batch + 1, batch):
        t0 = time.perf_counter()
        x = place_batch(images[start : start + batch], "cpu", channels_last=cl)
        forward_probs(model, x, exit_confidence=exit_p)
        out.append((time.perf_counter() - t0) / batch)
    return out


def timings(
    runs: dict[str, tuple[Callable[[int], Any], torch.Tensor, list[float | None]]],
    args: argparse.Namespace,
    *,
    thread_counts: list[int],
    batches: list[int],
) -> dict[str, dict[str, float]]:
    """``runs``: name -> (loader of the model for a thread count, the images it reads, the exit thresholds to
    time: None for the full model). Returns ``{"<name>|<full|exit P>|t<threads>|b<batch>": {"ms", "images_per_s"}}``:
    the median over ``args.rounds`` interleaved passes (after one warm-up pass each)."""
    results: dict[str, list[float]] = {}
    for t in thread_counts:
        with threads(t):
            models = {name: load(t) for name, (load, _, _) in runs.items()}
            for b in batches:
                for r in range(1 + args.rounds):
                    for name, (_, images, exits) in runs.items():
                        for p in exits:
                            key = f"{name}|{mode_name(p)}|t{t}|b{b}"
                            times = time_pass(models[name], images, b, p, name.endswith("channels_last"))
                            if r > 0:
                                results.setdefault(key, []).extend(times)
                            print(
                                f"  {key}: {1e3 * statistics.median(times):.1f} ms",
                                file=sys.stderr,
                                flush=True,
                            )
    return {
        k: {"ms": 1e3 * statistics.median(v), "images_per_s": 1 / statistics.median(v)}
        for k, v in results.items()
    }


def mode_name(exit_p: float | None) -> str:
    return "full" if exit_p is None else "exit"


# ------------------------------------------------------------------------------------------------ results


def ratios(
    rows: dict[str, dict[str, Any]],
    times: dict[str, dict[str, float]],
    t: int,
    serve: dict[str, float] | None,
) -> dict[str, Any]:
    """The issue's target ratios at batch 1 and ``t`` threads (accuracy drops as fractions)."""

    def ms(name: str, mode: str = "full") -> float | None:
        entry = times.get(f"{name}|{mode}|t{t}|b1")
        return entry["ms"] if entry else None

    def acc(name: str, mode: str = "full") -> float | None:
        return rows.get(f"{name}|{mode}", {}).get("top1")

    eager, eager_acc = ms("torch"), acc("torch")
    out: dict[str, Any] = {
        "ort_fp32_over_eager": _div(ms("ort_fp32"), eager),
        "ort_fp32_top1_equal_eager": acc("ort_fp32") == eager_acc,
        "int8_over_ort_fp32": _div(ms("ort_int8"), ms("ort_fp32")),
        "int8_acc_drop": _sub(acc("ort_fp32"), acc("ort_int8")),
        "exit_scales_mean": rows.get("torch|exit", {}).get("scales_mean"),
        "exit_acc_drop": _sub(eager_acc, acc("torch", "exit")),
    }
    close = sorted(
        (ms(n, mode), f"{n}|{mode}")
        for n in VARIANTS
        for mode in ("full", "exit")
        if ms(n, mode) is not None and acc(n, mode) is not None and eager_acc - acc(n, mode) <= ACC_TOL + 1e-9
    )
    out["best_variant"] = close[0][1] if close else None
    out["best_over_backbone"] = _div(close[0][0], ms("backbone")) if close else None
    out["serve_fast_over_eager_8"] = serve["ratio"] if serve else None
    return out


VARIANTS = ("torch", "torch_channels_last", "ort_fp32", "ort_int8")


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def serve_ratio(paths: list[Path] | None) -> dict[str, float] | None:
    """8-client throughput of the fast server over the eager one, from two ``benchmarks/serve.py`` JSONs."""
    if not paths:
        return None
    eager, fast = (json.loads(p.read_text()) for p in paths)
    for path, r in zip(paths, (eager, fast), strict=True):
        if r["many_clients"]["clients"] != 8:
            raise SystemExit(
                f"{path}: measured {r['many_clients']['clients']} clients, not 8 (serve.py --many 8)"
            )
    e, f = (r["many_clients"]["images_per_s"] for r in (eager, fast))
    return {"eager_8_images_per_s": e, "fast_8_images_per_s": f, "ratio": f / e}


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table (batch 1 and 16, each thread count) and the ratios."""
    lines = [
        f"# Deployment benchmark ({result['machine']['cpu']}, torch {result['machine']['torch']})",
        "",
        f"Checkpoint `{result['checkpoint']}`; early exit at {result['exit_confidence']}, int8 at "
        f"{result.get('exit_confidence_int8')} (each chosen on validation); "
        f"ms per image: medians over {result['rounds']} interleaved passes of {result['time_images']} test images.",
        "",
    ]
    keys = sorted(
        {k.rsplit("|", 2)[0] for k in result["times"]}, key=lambda k: (k.split("|")[0] not in VARIANTS, k)
    )
    heads = [f"t{t}|b{b}" for t in result["machine"]["threads"] for b in result["batches"]]
    lines.append(
        "| variant | top-1 | mean scales | "
        + " | ".join(f"ms/img {h.replace('|', ', ')}" for h in heads)
        + " |"
    )
    lines.append("|---|---:|---:|" + "---:|" * len(heads))
    for k in keys:
        row = result["accuracy"].get(k, {})
        top1 = f"{100 * row['top1']:.2f}%" if row else "-"
        scales = f"{row['scales_mean']:.2f}" if row else "1"
        cells = [
            f"{result['times'][f'{k}|{h}']['ms']:.1f}" if f"{k}|{h}" in result["times"] else "-"
            for h in heads
        ]
        lines.append(f"| {k} | {top1} | {scales} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| ratio (batch 1) | " + " | ".join(result["ratios"]) + " |",
        "|---|" + "---:|" * len(result["ratios"]),
    ]
    for name in next(iter(result["ratios"].values())):
        cells = [result["ratios"][t][name] for t in result["ratios"]]
        fmt = [f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells]
        lines.append(f"| {name} | " + " | ".join(fmt) + " |")
    full, *tried = result["exit_validation"]
    lines += [
        "",
        f"Early exit on validation (the full model's top-1 {100 * full['full_top1']:.2f}%); the rule takes the "
        f"fewest scales whose answers differ from the full model's on at most {100 * EXIT_MAX_DISAGREE:g}% of the images:",
        "",
        "| threshold | answers not the full model's | mean scales | top-1 |",
        "|---:|---:|---:|---:|",
    ]
    for t in tried:
        mark = " (chosen)" if t["exit_confidence"] == result["exit_confidence"] else ""
        lines.append(
            f"| {t['exit_confidence']}{mark} | {100 * t['disagree']:.1f}% | {t['scales_mean']:.2f} | "
            f"{100 * t['top1']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def figure(result: dict[str, Any], path: Path) -> None:
    """Top-1 against ms per image at batch 1 and the most threads: a point per variant, early exit a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = f"t{max(result['machine']['threads'])}|b1"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, row in result["accuracy"].items():
        entry = result["times"].get(f"{key}|{t}")
        if entry:
            ax.scatter(entry["ms"], 100 * row["top1"], s=30)
            ax.annotate(
                key.replace("|full", "").replace("|", ", "), (entry["ms"], 100 * row["top1"]), fontsize=7
            )
    curve = [
        (result["exit_curve_times"].get(f"{c['exit_confidence']}"), 100 * c["top1"])
        for c in result["exit_curve"]
    ]
    curve = [(x, y) for x, y in curve if x is not None]
    if curve:
        xs, ys = zip(*curve, strict=True)
        ax.plot(xs, ys, "-o", ms=3, label="onnxruntime fp32, early exit over thresholds (test)")
        chosen = [c for c in result["exit_curve"] if c["exit_confidence"] == result["exit_confidence"]]
        ms = result["exit_curve_times"].get(str(result["exit_confidence"]))
        if chosen and ms is not None:
            ax.scatter([ms], [100 * chosen[0]["top1"]], s=90, facecolors="none", edgecolors="k",
                       label=f"the threshold chosen on validation ({result['exit_confidence']})")  # fmt: skip
    backbone = result["times"].get(f"backbone|full|{t}")
    if backbone:
        ax.axvline(backbone["ms"], ls="--", c="grey", label="ONE eager backbone at the scale-1 size")
    ax.set_xlabel(f"ms per image (batch 1, {max(result['machine']['threads'])} threads)")
    ax.set_ylabel("top-1 of the fused output (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.time_images < max(args.batch):
        raise SystemExit(
            f"--time-images {args.time_images} is less than the largest --batch {max(args.batch)}"
        )
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        folder = args.exports or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="racnn-deploy-"))
        )
        folder.mkdir(parents=True, exist_ok=True)
        print("exporting", file=sys.stderr, flush=True)
        by_name = variants(args, folder)
        ref = racnn.load_model(args.checkpoint)
        test, val = split_loader(ref, args, "test"), split_loader(ref, args, "val")
        most = max(args.threads)
        with threads(most):
            print("choosing the exit threshold on validation", file=sys.stderr, flush=True)
            ort = by_name["ort_fp32"](most)
            exit_p, tried = choose_exit(ort, val)
            print(f"  exit confidence {exit_p}", file=sys.stderr, flush=True)
            # the int8 graphs answer otherwise than the float ones: their own threshold, by the same rule
            exit_of = {name: exit_p for name in by_name}

            def modes(name: str) -> list[float | None]:  # the full model, then early exit where chosen
                return [None] + ([exit_of[name]] if exit_of[name] is not None else [])

            int8_tried = None
            if "ort_int8" in by_name:
                exit_of["ort_int8"], int8_tried = choose_exit(by_name["ort_int8"](most), val)
                print(f"  int8 exit confidence {exit_of['ort_int8']}", file=sys.stderr, flush=True)
            rows: dict[str, dict[str, Any]] = {}
            for name, load in by_name.items():
                model = load(most)
                for p in modes(name):
                    rows[f"{name}|{mode_name(p)}"] = row = evaluate(model, test, p)
                    print(
                        f"  {name}|{mode_name(p)}: top-1 {100 * row['top1']:.2f}%",
                        file=sys.stderr,
                        flush=True,
                    )
            test_stages, test_labels = stage_predictions(ort, test)  # every threshold from one staged run
            _, curve = choose_exit_confidence(test_stages, labels=test_labels)
        # the timed images: spread evenly over the test split (it is in class order), decoded alone
        n = len(test.dataset)
        picks = torch.linspace(0, n - 1, min(args.time_images, n)).round().long().unique().tolist()
        images = torch.stack([test.dataset[i]["image"] for i in picks])
        cfg = ref.cfg
        small = torch.nn.functional.interpolate(images, size=cfg.input_size, mode="bilinear", antialias=True)

        def backbone(t: int) -> Any:  # ONE backbone of the same kind at the scale-1 size (random weights)
            return racnn.create_model(
                cfg.backbone, num_classes=ref.num_classes, num_scales=1, input_size=cfg.input_size
            )

        runs = {name: (load, images, modes(name)) for name, load in by_name.items()}
        runs |= {"backbone": (backbone, small, [None])}
        runs |= {
            "backbone_channels_last": (
                lambda t: place_model(backbone(t), "cpu", channels_last=True),
                small,
                [None],
            )
        }
        print("timing", file=sys.stderr, flush=True)
        times = timings(runs, args, thread_counts=args.threads, batches=args.batch)
        curve_times = {}
        for p in EXIT_GRID:  # the curve: onnxruntime fp32 at batch 1 and the most threads, each threshold
            got = timings(
                {"ort_fp32": (by_name["ort_fp32"], images, [p])}, args, thread_counts=[most], batches=[1]
            )
            curve_times[str(p)] = next(iter(got.values()))["ms"]
    result = {
        "benchmark": "deploy",
        "checkpoint": os.path.relpath(args.checkpoint),  # (no machine's absolute path in the results)
        "machine": {"cpu": cpu_name(), "torch": torch.__version__, "threads": args.threads},
        "batches": args.batch,
        "rounds": args.rounds,
        "time_images": len(images),
        "test_images": len(test.dataset),
        "exit_confidence": exit_p,
        "exit_validation": tried,
        "exit_confidence_int8": exit_of.get("ort_int8"),  # (the int8 graphs' own, chosen on validation)
        "exit_validation_int8": int8_tried,
        "accuracy": rows,
        "times": times,
        "exit_curve": curve,
        "exit_curve_times": curve_times,
        "serve": serve_ratio(args.serve_results),
    }
    result["ratios"] = {f"t{t}": ratios(rows, times, t, result["serve"]) for t in args.threads}
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        args.json.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    if args.figure:
        figure(result, args.figure)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
