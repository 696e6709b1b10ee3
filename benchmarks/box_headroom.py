"""How much a box search could raise the finer scale's p_t under a run's final classifiers, and how far from
the learned box it must look to find it.

For each run's final model (``last.pt``) on a split of its dataset (validation by default: the split that
decides), on every image and on its mirror: scale 2's true-class probability ``p_t`` when scale 1's box is
the one the APN proposes, and when it is each box of a grid over the image (``--sides`` x ``--centres`` x
``--centres`` centres, the whole image once). A box is chosen per image on one view and judged on the other,
so the figure is not the maximum of noisy values (the winner's curse: a box chosen and judged on the same
view always looks better): over the whole grid, and over the grid boxes within one search step of the
learned box (centre moved by at most ``shift`` times its side, side within a factor ``zoom``; the learned box
is kept where no such box beats it on the choosing view). The reaches compared include the search update's
default step (``apn.search_shift``, ``apn.search_zoom``).

    python benchmarks/box_headroom.py runs/bench_accuracy_wide/racnn_seed0 runs/bench_accuracy_wide/racnn_seed1 \\
        --json benchmarks/results/diagnosis/box_headroom_val.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
from learned_vs_init import opened_run  # the same run and split (benchmarks/ is on sys.path when it runs)

from racnn.config import APNConfig
from racnn.losses import true_class_prob
from racnn.model import RACNN

DEFAULT_REACHES = ((APNConfig.search_shift, APNConfig.search_zoom), (0.2, 1.3), (0.3, 1.45), (0.5, 1.8))


def box_grid(sides: list[float], centres: int, min_side: float, max_side: float) -> torch.Tensor:
    """C x 3 boxes ``(cx, cy, half)``: each side of ``sides`` within ``[min_side, max_side]`` on a
    ``centres`` x ``centres`` grid of centres that keeps it inside the image (the whole image once)."""
    rows = []
    for side in sorted({min(max(s, min_side), max_side) for s in sides}):
        h = side / 2
        n = 1 if side >= 1.0 - 1e-6 else centres
        cs = [0.5] if n == 1 else [h + (1 - 2 * h) * i / (n - 1) for i in range(n)]
        rows += [(cx, cy, h) for cx, cy in itertools.product(cs, cs)]
    return torch.tensor(rows)


@torch.no_grad()
def probe(model: RACNN, image: torch.Tensor, label: int, grid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scale 2's p_t on ``image`` (3 x H x W) and its mirror: ``own`` (2), with the APN's box; ``grid``
    (2 x C), with each box of ``grid`` (mirrored on the mirror); ``box`` (3), the APN's box on ``image``."""
    own, on_grid, boxes = [], [], []
    y = torch.tensor([label])
    for view in (image, image.flip(-1)):
        x = view[None]
        out = model(x)
        own.append(true_class_prob(out.logits[model.scale_keys[1]], y)[0])
        boxes.append(out.boxes[0][0])
        g = grid.clone()
        if len(own) == 2:
            g[:, 0] = 1 - g[:, 0]
        big = x.expand(len(g), -1, -1, -1)
        z = model.zoom_in(0, big, model.scale_input(big), g, g)  # scale 1's box is also its view
        on_grid.append(true_class_prob(model.forward_scale(1, z), y.expand(len(g))))
    return {"own": torch.stack(own), "grid": torch.stack(on_grid), "box": boxes[0]}


def summarise(
    own: torch.Tensor, on_grid: torch.Tensor, box: torch.Tensor, grid: torch.Tensor, reaches
) -> dict[str, float]:
    """``own`` N x 2, ``on_grid`` N x 2 x C, ``box`` N x 3 (the learned boxes on the first view) -> the mean
    p_t of the learned box; of the best box, the learned one included, chosen and judged on the same view
    (in sample); of the grid box chosen on one view and judged on the other (the mean of both ways), over the
    whole grid and per reach ``(shift, zoom)``; of the whole image."""
    n = torch.arange(len(own))

    def cross(allowed: torch.Tensor) -> float:  # allowed: N x C; the learned box stays where none beats it
        masked = on_grid.masked_fill(~allowed[:, None, :], -1.0)
        judged = []
        for a, b in ((0, 1), (1, 0)):
            pick = masked[:, a].argmax(1)
            wins = masked[n, a, pick] > own[:, a]
            judged.append(torch.where(wins, on_grid[n, b, pick], own[:, b]))
        return float(torch.stack(judged).mean())

    side, grid_side = 2 * box[:, 2:3], 2 * grid[None, :, 2]  # N x 1, 1 x C
    out = {
        "pt_learned": float(own.mean()),
        "pt_best_in_sample": float(torch.maximum(on_grid.max(2).values, own).mean()),
        "pt_best_cross": cross(torch.ones(on_grid.shape[0], on_grid.shape[2], dtype=torch.bool)),
    }
    whole = (grid[:, 2] >= 0.5 - 1e-6).nonzero()  # the whole image, where the grid holds it
    if len(whole):
        out["pt_whole_image"] = float(on_grid[:, :, int(whole[0])].mean())
    for shift, zoom in reaches:
        near = (
            ((grid[None, :, 0] - box[:, :1]).abs() <= shift * side + 1e-6)
            & ((grid[None, :, 1] - box[:, 1:2]).abs() <= shift * side + 1e-6)
            & ((grid_side / side).log().abs() <= torch.log(torch.tensor(zoom)) + 1e-6)
        )
        out[f"pt_cross_reach_{shift:g}_{zoom:g}"] = cross(near)
    return out


def run_probe(run: Path, split: str, grid_sides: list[float], centres: int, reaches) -> dict[str, float]:
    with opened_run(run, split) as (trainer, data):
        model = trainer.model.eval()
        if model.cfg.num_scales < 2:
            raise SystemExit(f"{run}: a 1-scale model has no box to search")
        grid = box_grid(grid_sides, centres, model.cfg.box_min_side, model.cfg.box_max_side)
        got = [probe(model, data[i]["image"], int(data[i]["label"]), grid) for i in range(len(data))]
    own, on_grid, box = (torch.stack([g[k] for g in got]) for k in ("own", "grid", "box"))
    return {"images": len(got), "candidates": len(grid)} | summarise(own, on_grid, box, grid, reaches)


def report(
    per_run: dict[str, dict[str, float]],
    keys: list[str],
    first: str,
    *,
    width: int,
    json_path: Path | None,
    payload: dict,
) -> None:
    """Print one row per key of ``keys``: each run's figure (columns named by the run folders) and their
    mean +- std; with ``json_path``, write there ``payload`` with ``runs`` and ``summary`` (``{key: {"mean",
    "std"}}``)."""
    print(f"{first:<{width}}" + "".join(f"{Path(r).name:>14}" for r in per_run) + f"{'mean +- std':>18}")
    summary = {}
    for k in keys:
        vals = [v[k] for v in per_run.values()]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        summary[k] = {"mean": statistics.mean(vals), "std": std}
        print(
            f"{k:<{width}}"
            + "".join(f"{v:>14.3f}" for v in vals)
            + f"{summary[k]['mean']:>11.3f} +- {std:.3f}"
        )
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload | {"runs": per_run, "summary": summary}, indent=2))
        print(f"wrote {json_path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", type=Path, help="training run folders (each with its last.pt)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--sides", type=float, nargs="+", default=[0.4, 0.55, 0.7, 0.85, 1.0])
    p.add_argument("--centres", type=int, default=4, help="centres per axis for each side below 1")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    per_run = {str(r): run_probe(r, args.split, args.sides, args.centres, DEFAULT_REACHES) for r in args.runs}
    keys = [k for k in next(iter(per_run.values())) if k.startswith("pt_")]
    print(
        f"{args.split} split: mean p_t at scale 2 by scale 1's box (chosen on one view, judged on its mirror)"
    )
    payload = {"split": args.split, "sides": args.sides, "centres": args.centres}
    report(per_run, keys, "box", width=28, json_path=args.json, payload=payload)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
