"""How good are the APN initialisation's targets? (docs/results.md, "Localisation" and experiment 9)

For a checkpoint, evaluates on a split, next to the APN's own boxes, the boxes the APN initialisation
regresses towards (``racnn.training.apn_init.apn_init_target``; with the recipe of
``benchmarks/accuracy.py``: scale 1, the ``aolm`` box of scale 1's channel sum; scale 2, a ``peak``
square on the map of the crop that box cuts). Prints the scale-1 IoU >= 0.5 rate, the mean IoU, the
head-in-scale-2-box rate and the box sides, with the true class's map and the predicted class's (the same
boxes for the channel sum), and, where the loader's images are larger than scale 1's input
(``crop_from=source``), with scale 1's map of the full-size image (the same rule on a finer grid).
``--set`` measures the targets of another initialisation on the same model
(``--set apn.init_response=cam apn.init_box=region,peak``).

    python benchmarks/init_ceiling.py runs/bench_accuracy/racnn_seed0/last.pt --data DIR [--split val] [--set ...]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from functools import partial

import torch

from racnn.attention import compose_boxes, crop_zoom
from racnn.checkpoint import load_model
from racnn.config import apply_overrides
from racnn.evaluation import Accumulator
from racnn.training import loaders
from racnn.training.apn_init import apn_init_target


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="CUB-layout folder")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides (apn.init_*): other targets",
    )
    args = p.parse_args(argv)
    model = load_model(args.checkpoint)
    cfg = apply_overrides(model.training_config, args.set)
    cfg.data.root, cfg.data.num_workers = args.data, 0
    data = loaders.make_dataset(cfg, args.split, model.preprocessing, train=False)
    head = getattr(data, "head_parts", None)
    model.eval()
    accs: dict[str, Accumulator] = defaultdict(partial(Accumulator, model.cfg.num_scales))
    for batch in torch.utils.data.DataLoader(data, batch_size=args.batch_size):
        x, y = batch["image"], batch["label"]
        out = model(x)
        accs["APN boxes"].update(out.logits, out.boxes, out.views, batch, head)
        x1 = model.scale_input(x)
        f1 = model.trunk(0, x1)  # B x C x h x w, scale 1's last conv map
        rows = [("targets, true class", True, f1), ("targets, predicted", False, f1)]
        if x.shape[-1] > x1.shape[-1]:  # the loader's image is larger: the same rule on its finer map
            rows.append(("targets, full-size map", True, model.trunk(0, x)))  # e.g. 14 x 14 at 448 px
        for name, true, fmap in rows:
            c1 = y if true else model.heads[0](f1.mean((2, 3))).argmax(1)
            t1 = apn_init_target(model, cfg, 0, fmap, c1)
            source = x if cfg.model.crop_from == "source" else x1
            f2 = model.trunk(1, crop_zoom(source, t1, model.scale_sizes[1], cfg.model.mask_k))
            c2 = y if true else model.heads[1](f2.mean((2, 3))).argmax(1)
            t2 = apn_init_target(model, cfg, 1, f2, c2)
            accs[name].update(out.logits, [t1, t2], [t1, compose_boxes(t1, t2)], batch, head)
    res = {k: a.summary() for k, a in accs.items()}
    for k, s in res.items():
        print(
            f"{k:<22} IoU>=0.5 {s['loc_acc_iou50']:.3f}  IoU {s['loc_iou_mean']:.3f}  head {s['head_hit_s2']:.3f}"
            f"  sides {s['box_side_s1']:.3f}±{s['box_side_std_s1']:.3f} / {s['box_side_s2']:.3f}±{s['box_side_std_s2']:.3f}"
        )
    return res


if __name__ == "__main__":
    main()
