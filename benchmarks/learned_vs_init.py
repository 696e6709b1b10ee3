"""The boxes the attention phases learned against those of the APN initialisation, under the same final
classifiers, on a split of the run's own dataset (validation by default: the split that decides).

``racnn train`` reports these figures on test (``metrics.json``'s ``*_init`` keys); a recipe is chosen on
validation, so this reads each run's ``last.pt`` (its final model and the APN state kept right after the
initialisation; the model ``racnn train`` tests where ``train.select=last``, the recipe's) and evaluates the
split twice: the learned boxes, then the initial ones. Prints each run and the mean and standard deviation
over the runs of scale 2 and 3 and fused top-1, the mean true-class probability at scales 2 and 3, the head
in the scale-2 box, the scale-1 box IoU >= 0.5 and the box sides.

    python benchmarks/learned_vs_init.py runs/bench_accuracy/racnn_seed0 runs/bench_accuracy/racnn_seed1 \\
        --json benchmarks/results/diagnosis/learned_vs_init_val.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from attend_probe import KEYS  # the same figures (benchmarks/ is on sys.path when this script runs)

from racnn.training import loaders
from racnn.training.trainer import Trainer


@contextmanager
def opened_run(run: Path, split: str) -> Iterator[tuple[Trainer, Any]]:
    """The training run in folder ``run``, resumed from its ``last.pt``, and its ``split`` dataset (``val``,
    the run's own carve-out, or ``test``); a one-line exit when either is missing."""
    if not (run / "last.pt").is_file():
        raise SystemExit(f"{run}: no last.pt; pass the folder of a training run")
    with Trainer(out_dir=run, resume=True, progress=False) as trainer:
        data = (
            trainer.val_set
            if split == "val"
            else loaders.make_dataset(
                trainer.cfg, "test", trainer.model.preprocessing, train=False, classes=trainer.classes
            )
        )
        if data is None or len(data) == 0:
            raise SystemExit(f"{run}: the {split} split is empty")
        yield trainer, data


def compare(run: Path, split: str) -> dict[str, dict[str, float]]:
    """``{"learned": figures, "initial": figures}`` of the run in folder ``run`` on ``split``."""
    with opened_run(run, split) as (trainer, data):
        if trainer.state.apn_init is None:
            raise SystemExit(f"{run}: its state keeps no APN initialisation (a 1-scale run, or an older one)")
        m = trainer.evaluate_boxes(trainer.model, data, split)
    learned = {k: m[k] for k in KEYS if k in m}
    initial = {k: m[f"{k}_init"] for k in KEYS if f"{k}_init" in m}
    return {"learned": learned, "initial": initial}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", type=Path, help="training run folders (each with its last.pt)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    per_run = {str(r): compare(r, args.split) for r in args.runs}
    print(f"{args.split} split; learned boxes - initial boxes under the same classifiers")
    print(f"{'figure':<16}" + "".join(f"{Path(r).name:>22}" for r in per_run) + f"{'mean +- std':>22}")
    summary = {}
    for k in KEYS:
        diffs = [v["learned"][k] - v["initial"][k] for v in per_run.values()]
        cells = [
            f"{100 * v['learned'][k]:.1f} ({100 * d:+.1f})"
            for v, d in zip(per_run.values(), diffs, strict=True)
        ]
        mean = statistics.mean(diffs)
        std = statistics.stdev(diffs) if len(diffs) > 1 else None  # (one run has no spread)
        summary[k] = {"mean_difference": mean, "std_difference": std}
        spread = f"{100 * mean:+.1f} +- {100 * std:.1f}" if std is not None else f"{100 * mean:+.1f}"
        print(f"{k:<16}" + "".join(f"{c:>22}" for c in cells) + f"{spread:>22}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"split": args.split, "runs": per_run, "summary": summary}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
