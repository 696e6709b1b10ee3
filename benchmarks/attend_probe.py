"""What one attention update does to the boxes, on validation, under fixed classifiers (docs/results.md).

From a training state taken after the APN initialisation and a classification phase (a ``last.pt`` of the
recipe after epoch 3: its APNs still hold their initial state, since classification phases do not train
them), run ``--epochs`` attention epochs of one variant (``--set`` keys, e.g. ``apn.update=search``) and print
after each the validation figures of the learned boxes and their difference to the initial boxes under the
same classifiers: scale 2 and 3 accuracy, the mean true-class probability ``pt`` (the ranking loss's own
objective), the head in the scale-2 box, the scale-1 box's IoU >= 0.5 and the box sides. One JSON line per
epoch goes to ``--json``.

    python benchmarks/attend_probe.py RUN/last.pt --out runs/probe_search --epochs 2 \\
        --set apn.update=search apn.lr=0.00001 apn.search_candidates=3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from racnn.attention import box_candidates
from racnn.checkpoint import load_checkpoint, save_checkpoint
from racnn.config import Config, apply_overrides, save_config
from racnn.losses import true_class_prob
from racnn.training.phases import ATTEND, attend_phase, set_phase
from racnn.training.search import chain_probs
from racnn.training.state import initial_apns
from racnn.training.trainer import Trainer

KEYS = [
    "acc_s1",
    "acc_s2",
    "acc_s3",
    "acc_s123",
    "pt_s2",
    "pt_s3",
    "head_hit_s2",
    "loc_acc_iou50",
    "box_side_s1",
    "box_side_std_s1",
    "box_side_s2",
    "box_side_std_s2",
]


def gradient_check(trainer: Trainer, batches: int) -> dict[str, float]:
    """How well the ranking loss's gradient predicts what a finite step of the box does, on ``batches``
    training batches (augmented, as the attention phase sees them). For APN s and every image whose hinge
    ``max(0, p_t(s) - p_t(s+1) + margin)`` is active: the box's gradient ``g`` of that hinge (through the crop,
    as the paper's attention phase takes it), the change it predicts for each of the six neighbouring boxes
    (:func:`racnn.attention.box_candidates`), ``g . (c - b)``, and the change the finer scale shows there.
    Returns, per APN: the correlation of predicted and shown changes (``corr_s<s>``), the share of
    (image, neighbour) pairs where they have the same sign (``sign_s<s>``), the share of images where the
    neighbour the gradient ranks best is the one that is best (``best_s<s>``; chance 1/6), and the share of
    active hinges (``active_s<s>``)."""
    model, cfg = trainer.model, trainer.cfg
    set_phase(model, ATTEND, cfg)  # classifiers frozen, the crops keep the boxes' gradient
    a, m, lc = cfg.apn, model.cfg, cfg.loss
    pred: dict[int, list[torch.Tensor]] = {}
    shown: dict[int, list[torch.Tensor]] = {}
    best: dict[int, list[torch.Tensor]] = {}
    active: dict[int, list[torch.Tensor]] = {}
    loader = trainer._train_loader(0, trainer._images(ATTEND))  # the attention phases' images
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        x, y = trainer._inputs(batch)
        out = model(x)
        probs = [true_class_prob(out.logits[k], y) for k in model.scale_keys]
        crop_input = model.scale_input(x)
        for s, box in enumerate(out.boxes):
            hinge = (probs[s].detach() + lc.rank_margin - probs[s + 1]).clamp(min=0)  # B
            (g,) = torch.autograd.grad(hinge.sum(), box, retain_graph=True)  # B x 3
            b = box.detach().float()
            cands = box_candidates(
                b, shift=a.search_shift, zoom=a.search_zoom, min_side=m.box_min_side, max_side=m.box_max_side
            )
            q = chain_probs(model, s, x, crop_input, out, y, cands, depth=1)[..., 0]  # B x 7: p_t(s+1)
            h = (probs[s].detach()[:, None] + lc.rank_margin - q).clamp(min=0)
            on = hinge.detach() > 0
            d_pred = ((cands[:, 1:] - b[:, None]) * g[:, None].float()).sum(-1)[on]  # n x 6
            d_shown = (h[:, 1:] - h[:, :1])[on]
            pred.setdefault(s, []).append(d_pred.flatten())
            shown.setdefault(s, []).append(d_shown.flatten())
            best.setdefault(s, []).append((d_pred.argmin(1) == d_shown.argmin(1)).float())
            active.setdefault(s, []).append(on.float())
            crop_input = out.crops[s].detach()
    result = {}
    for s in pred:
        p, d = torch.cat(pred[s]), torch.cat(shown[s])
        result[f"corr_s{s + 1}"] = round(float(torch.corrcoef(torch.stack([p, d]))[0, 1]), 4)
        result[f"sign_s{s + 1}"] = round(float(((p > 0) == (d > 0)).float().mean()), 4)
        result[f"best_s{s + 1}"] = round(float(torch.cat(best[s]).mean()), 4)
        result[f"active_s{s + 1}"] = round(float(torch.cat(active[s]).mean()), 4)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("state", type=Path, help="a training state (last.pt) after the APN initialisation")
    p.add_argument("--out", type=Path, required=True, help="a new folder for the probe's run")
    p.add_argument("--epochs", type=int, default=2, help="attention epochs (default: %(default)s)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--json", type=Path, help="append one JSON line per epoch here")
    p.add_argument(
        "--gradient-check",
        type=int,
        default=0,
        metavar="N",
        help="first measure on N training batches how well the ranking loss's box gradient predicts a "
        "finite step of the box (gradient_check), then run the epochs",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out}: exists; the probe writes a new folder")
    state = load_checkpoint(args.state)
    if not state.get("progress", {}).get("apn_init_done"):
        raise SystemExit(f"{args.state}: taken before the APN initialisation; use a later last.pt")
    cfg = apply_overrides(Config.from_dict(state["config"] | {"runtime": state.get("runtime", {})}), args.set)
    state["config"] = {k: v for k, v in cfg.to_dict().items() if k != "runtime"}
    state["runtime"] = cfg.to_dict()["runtime"]
    args.out.mkdir(parents=True)
    save_checkpoint(state, args.out / "last.pt")  # resumed below as a run of the overridden config
    save_config(cfg, args.out / "config.yaml")
    (args.out / "metrics.jsonl").write_text("")
    with Trainer(out_dir=args.out, resume=True, progress=False) as trainer:
        init = {k: v.detach().clone() for k, v in trainer.model.apns.state_dict().items()}

        def figures() -> dict[str, float]:
            m = trainer.validate()
            return {k: round(m[k], 4) for k in KEYS if k in m}

        if args.gradient_check:
            check = {"gradient_check": gradient_check(trainer, args.gradient_check), "set": args.set}
            print(json.dumps(check), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(check) + "\n")
        first = figures()
        print("initial boxes", json.dumps(first), flush=True)
        phase = attend_phase(trainer.cfg)
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            rec = trainer.train_epoch(phase)
            learned = figures()
            with initial_apns(trainer.model, init):
                same = figures()  # the initial boxes again: the validation split's own figures
            line = {
                "epoch": epoch,
                "set": args.set,
                "seconds": round(time.perf_counter() - t0, 1),
                "train": {
                    k: round(v, 4) for k, v in rec.items() if k.startswith(("search", "rank", "train_box"))
                },
                "learned": learned,
                "learned_minus_initial": {k: round(learned[k] - same[k], 4) for k in learned},
            }
            print(json.dumps(line), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
