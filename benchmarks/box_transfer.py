"""Does a better box transfer from the images it was found on to images the APN has not seen?

``box_headroom.py`` shows that, under a run's final classifiers, each image has a box that raises scale 2's
true-class probability ``p_t`` well above the APN's box, and that the gain holds on the image's mirror. An APN
can only learn such boxes if they are predictable from what it sees: boxes fitted on some images must raise
``p_t`` on others. This benchmark tests that directly, with the APN's own input (scale 1's last conv map):

* every image of ``--split`` and its mirror: scale 2's ``p_t`` with the APN's scale-1 box and with each box of
  the grid of ``box_headroom.py``; the *target* of a view is the grid box that is best on the other view (so
  it is not the maximum of noise on the view itself), or the APN's box where no grid box beats it there;
* the images are cut into two halves (alternate images: both views of an image in the same half); a predictor is fitted on one half's targets and judged on
  the other half by the ``p_t`` of the boxes it proposes, then the halves swap;
* the predictors: ``global``, one move for every image (the mean move of the fitted half, relative to the
  APN's box: centre shift in sides, log of the side ratio); ``ridge_<lambda>``, a ridge regression from the
  map's channel means to the move; ``apn_<lr>``, the run's APN itself regressed (smooth-L1, Adam, batches of
  16, ``--steps`` steps: the attention phases' budget) towards the targets, at ``apn.lr`` and ten times it;
* ``oracle``: the targets themselves on the judged half (what a predictor that transferred perfectly would
  reach); ``own``: the APN's box.

``--fit-split train`` fits on the run's training split (its classifiers have seen those images; ``--fit-images
N``: N of them, evenly spread over the split, which lists its images class by class) and judges on
``--split`` (no halves).

    python benchmarks/box_transfer.py runs/bench_accuracy_wide/racnn_seed0 runs/bench_accuracy_wide/racnn_seed1 \\
        --json benchmarks/results/diagnosis/box_transfer_val.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from box_headroom import box_grid, probe, report  # (benchmarks/ is on sys.path when it runs)
from learned_vs_init import opened_run

from racnn.losses import box_regression_loss, true_class_prob
from racnn.model import RACNN
from racnn.training import loaders

SIDES, CENTRES = [0.4, 0.55, 0.7, 0.85, 1.0], 4
RIDGE = (10.0, 100.0, 1000.0)


class Views:
    """Every image of a dataset and its mirror (view ``2i`` and ``2i + 1``): the images ``x`` (V x 3 x H x W),
    labels ``y`` (V), scale 1's maps ``maps`` (V x C x h x w), the APN's boxes ``box`` (V x 3), scale 2's
    ``p_t`` with them ``own`` (V), and the view's ``target`` (V x 3: the grid box best on the other view, else
    the APN's box)."""

    def __init__(self, model: RACNN, data, grid: torch.Tensor) -> None:
        x, y, own, on_grid = [], [], [], []
        for i in range(len(data)):
            item = data[i]
            image, label = item["image"], int(item["label"])
            got = probe(model, image, label, grid)  # own: 2, grid: 2 x C (the mirror's grid mirrored)
            x += [image, image.flip(-1)]
            y += [label, label]
            own.append(got["own"])
            on_grid.append(got["grid"])
        self.x, self.y = torch.stack(x), torch.tensor(y)
        own_t, g = torch.cat(own), torch.stack(on_grid)  # V; N x 2 x C
        with torch.no_grad():
            self.maps = torch.cat([model.trunk(0, model.scale_input(b)) for b in self.x.split(16)])
            self.box = torch.cat([model.apns[0](m).float() for m in self.maps.split(16)])
        self.own = own_t
        self.target = cross_view_targets(own_t, g, self.box, grid)


def cross_view_targets(
    own: torch.Tensor, on_grid: torch.Tensor, box: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    """Each view's target (V x 3, in the view's own frame): the grid box best on the *other* view of its
    image, where it beats the APN's box there; else the view's APN box. ``own`` (V) and ``box`` (V x 3): the
    APN's p_t and box per view (view ``2i`` an image, ``2i + 1`` its mirror); ``on_grid`` (N x 2 x C): p_t of
    the grid ``grid`` (C x 3) per image and view, the mirror's grid mirrored (:func:`box_headroom.probe`)."""
    other = on_grid.flip(1).reshape(len(own), -1)  # V x C: each view's grid p_t on its other view
    pick = other.argmax(1)
    wins = other.gather(1, pick[:, None]).squeeze(1) > own.view(-1, 2).flip(1).reshape(-1)
    mirrored = grid.clone()
    mirrored[:, 0] = 1 - mirrored[:, 0]
    boxes = torch.stack([grid, mirrored])[torch.arange(len(own)) % 2, pick]  # in the view's own frame
    return torch.where(wins[:, None], boxes, box)


def p_t(model: RACNN, views: Views, idx: torch.Tensor, boxes: torch.Tensor) -> float:
    """Mean scale-2 ``p_t`` of views ``idx`` when scale 1's boxes are ``boxes`` (len(idx) x 3)."""
    got = []
    with torch.no_grad():
        for k, b in zip(idx.split(32), boxes.split(32), strict=True):
            x = views.x[k]
            z = model.zoom_in(0, x, model.scale_input(x), b, b)
            got.append(true_class_prob(model.forward_scale(1, z), views.y[k]))
    return float(torch.cat(got).mean())


def moves(box: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``box`` relative to ``ref`` (N x 3 each): centre shifts in units of ``ref``'s side, log side ratio."""
    side = 2 * ref[:, 2]
    return torch.stack(
        [(box[:, 0] - ref[:, 0]) / side, (box[:, 1] - ref[:, 1]) / side, torch.log(box[:, 2] / ref[:, 2])], 1
    )


def moved(move: torch.Tensor, ref: torch.Tensor, min_side: float, max_side: float) -> torch.Tensor:
    """The inverse of :func:`moves`, the box kept within the side bounds and the image."""
    half = (ref[:, 2] * move[:, 2].exp()).clamp(min_side / 2, max_side / 2)
    side = 2 * ref[:, 2]
    cx = torch.maximum(torch.minimum(ref[:, 0] + move[:, 0] * side, 1 - half), half)
    cy = torch.maximum(torch.minimum(ref[:, 1] + move[:, 1] * side, 1 - half), half)
    return torch.stack([cx, cy, half], 1)


Predictor = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (maps V x C x h x w, APN boxes V x 3) -> V x 3


def predictors(
    model: RACNN, fit: Views, a: torch.Tensor, apn_lr: float, steps: int, seed: int
) -> dict[str, Predictor]:
    """Each predictor fitted on ``fit``'s views ``a``: name -> a function from (maps, APN boxes) to boxes. The
    APN's regressions draw their batches from one generator seeded with ``seed``."""
    lo, hi = model.cfg.box_min_side, model.cfg.box_max_side
    d = moves(fit.target[a], fit.box[a])
    mean = d.mean(0, keepdim=True)
    out: dict[str, Predictor] = {"global": lambda maps, box: moved(mean.expand(len(box), 3), box, lo, hi)}
    z = fit.maps[a].mean(dim=(2, 3))
    mu, sd = z.mean(0), z.std(0) + 1e-6
    zs = (z - mu) / sd
    for lam in RIDGE:
        w = torch.linalg.solve(zs.T @ zs + lam * torch.eye(zs.shape[1]), zs.T @ (d - mean))
        out[f"ridge_{lam:g}"] = lambda maps, box, w=w: moved(
            ((maps.mean(dim=(2, 3)) - mu) / sd) @ w + mean, box, lo, hi
        )
    gen = torch.Generator().manual_seed(seed)  # (the second rate draws the batches after the first's)
    for lr in (apn_lr, 10 * apn_lr):
        apn = copy.deepcopy(model.apns[0]).requires_grad_(True).train()
        opt = torch.optim.Adam(apn.parameters(), lr=lr)
        for _ in range(steps):
            k = a[torch.randint(len(a), (16,), generator=gen)]
            loss = box_regression_loss(apn(fit.maps[k]).float(), fit.target[k])
            opt.zero_grad()
            loss.backward()
            opt.step()
        apn.eval().requires_grad_(False)
        out[f"apn_{lr:g}"] = lambda maps, box, apn=apn: torch.cat([apn(m).float() for m in maps.split(16)])
    return out


def judge(model: RACNN, fit: Views, a: torch.Tensor, views: Views, b: torch.Tensor, **kw) -> dict[str, float]:
    """``p_t`` on ``views``' views ``b`` of every predictor fitted on ``fit``'s views ``a`` (``_fitted``: on
    ``a`` itself), of the APN's boxes (``own``) and of the targets (``oracle``); and the common move the
    ``global`` predictor makes (``move_dx``, ``move_dy``: centre shifts in sides; ``move_side``: side ratio)."""
    # own: the APN boxes' p_t that Views already measured; oracle: the targets'
    got = {"own": float(views.own[b].mean()), "oracle": p_t(model, views, b, views.target[b])}
    dx, dy, log_side = moves(fit.target[a], fit.box[a]).mean(0).tolist()
    got |= {"move_dx": dx, "move_dy": dy, "move_side": math.exp(log_side)}
    for name, predict in predictors(model, fit, a, **kw).items():
        got[name] = p_t(model, views, b, predict(views.maps[b], views.box[b]))
        got[f"{name}_fitted"] = p_t(model, fit, a, predict(fit.maps[a], fit.box[a]))
    return got


def run_transfer(
    run: Path, split: str, fit_split: str | None, steps: int, fit_images: int | None = None
) -> dict[str, float]:
    with opened_run(run, split) as (trainer, data):
        model = trainer.model.eval().requires_grad_(False)
        if model.cfg.num_scales < 2:
            raise SystemExit(f"{run}: a 1-scale model has no box to learn")
        grid = box_grid(SIDES, CENTRES, model.cfg.box_min_side, model.cfg.box_max_side)
        views = Views(model, data, grid)
        kw = {"apn_lr": trainer.cfg.apn.lr, "steps": steps, "seed": trainer.cfg.train.seed}
        if fit_split == "train":
            train = loaders.make_dataset(
                trainer.cfg, "train", model.preprocessing, train=False, classes=trainer.classes
            )
            if fit_images is not None and fit_images < len(train):
                keep = torch.linspace(0, len(train) - 1, fit_images).round().long().tolist()
                train = torch.utils.data.Subset(train, keep)
            fit = Views(model, train, grid)
            got = judge(model, fit, torch.arange(len(fit.x)), views, torch.arange(len(views.x)), **kw)
            return {"images": len(data), "fitted_images": len(train)} | got
        image = torch.arange(len(views.x)) // 2
        halves = [(image % 2 == h).nonzero().squeeze(1) for h in (0, 1)]
        both = [judge(model, views, halves[h], views, halves[1 - h], **kw) for h in (0, 1)]
    return {"images": len(data)} | {
        k: (both[0][k] + both[1][k]) / 2 for k in both[0]
    }  # (halves 1 image apart)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", type=Path, help="training run folders (each with its last.pt)")
    p.add_argument("--split", default="val", choices=["val", "test"], help="the images judged")
    p.add_argument(
        "--fit-split",
        choices=["train"],
        help="fit on the run's training split and judge on --split (default: two halves of --split)",
    )
    p.add_argument("--fit-images", type=int, help="with --fit-split: fit on N of its images, evenly spread")
    p.add_argument("--steps", type=int, default=160, help="the APN's regression steps (batch 16)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.fit_images is not None and (args.fit_split is None or args.fit_images < 1):
        p.error("--fit-images needs --fit-split and a positive N")
    per_run = {
        str(r): run_transfer(r, args.split, args.fit_split, args.steps, args.fit_images) for r in args.runs
    }
    keys = [k for k in next(iter(per_run.values())) if "images" not in k]  # (move_*: not p_t, the moves)
    fitted = "the run's training split" if args.fit_split else "the other half"
    print(f"{args.split} split: mean p_t at scale 2, boxes fitted on {fitted} (_fitted: judged where fitted)")
    payload = {"split": args.split, "fit_split": args.fit_split, "fit_images": args.fit_images}
    report(per_run, keys, "boxes", width=22, json_path=args.json, payload=payload | {"steps": args.steps})
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
