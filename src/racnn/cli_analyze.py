"""``racnn analyze``: analyses of a trained model. ``derivative-map``: the paper's attention-learning figure."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyses of a trained model (derivative maps of the attention)",
        description="Analyses of a trained RA-CNN.",
    )
    analyses = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    d = analyses.add_parser(
        "derivative-map",
        help="loss derivative w.r.t. the pixels under a box, and the box update it implies",
        description="For each image and a box (default: the scale-1 attention box), draws the derivative map "
        "(-||dL/dX||^2 of the scale-2 loss over the pixels the crop is cut from: the darker, the more a pixel "
        "matters) and the direction a gradient step would move the box (arrow: tx, ty; +/-: grow or shrink "
        "tl), as in the paper's section on attention learning. Prints the update per image.",
    )
    d.add_argument("--checkpoint", required=True, help="best.pt / last.pt or an exported folder")
    d.add_argument("images", nargs="+", help="image files (one figure row each)")
    d.add_argument("--out", required=True, help="PNG file to write")
    d.add_argument(
        "--box",
        help="cx,cy,half normalised to the image (0..1; side = 2 * half), for every image "
        "(default: the model's scale-1 box of each image)",
    )
    d.add_argument(
        "--label", help="class index or name the loss is taken for (default: each image's fused prediction)"
    )
    d.add_argument(
        "--loss",
        choices=("ce", "rank"),
        default="ce",
        help="ce: scale-2 cross-entropy; rank: ranking loss against scale 1 (zero once scale 2 wins by "
        "the margin) (default: %(default)s)",
    )
    d.set_defaults(func=cmd_derivative_map)


def parse_box(text: str) -> tuple[float, float, float]:
    """``"cx,cy,half"`` -> floats; the box must lie inside the image with a positive side."""
    try:
        cx, cy, half = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box {text!r}: expected three numbers cx,cy,half") from None
    if not (0 < half <= 0.5 and half <= cx <= 1 - half and half <= cy <= 1 - half):
        raise ValueError(f"--box {text!r}: need 0 < half <= 0.5 and the box inside the image")
    return cx, cy, half


def _label(text: str | None, classes: list[str]) -> int | None:
    if text is None:
        return None
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    matches = [i for i, c in enumerate(classes) if c == text or c.split(".", 1)[-1] == text]
    if not matches:
        raise ValueError(f"--label {text!r}: not a class index (0..{len(classes) - 1}) or class name")
    return matches[0]


def cmd_derivative_map(a: argparse.Namespace) -> int:
    import torch

    from .analysis import derivative_map_figure, describe_update
    from .checkpoint import load_model
    from .data import load_image

    model = load_model(a.checkpoint, backend="torch")
    classes = model.classes
    if model.cfg.num_scales < 2:
        raise ValueError(f"{a.checkpoint}: a one-scale model has no attention to analyse")
    transform = model.transforms()
    images = torch.stack([transform(load_image(p)) for p in a.images])
    label = _label(a.label, classes)
    if label is None:
        with torch.no_grad():
            targets = model(images).logits[model.keys[-1]].argmax(1).tolist()
    else:
        targets = [label] * len(a.images)
    boxes = torch.tensor([parse_box(a.box)] * len(a.images)) if a.box else None
    titles = [f"{Path(p).name}: {classes[t]}" for p, t in zip(a.images, targets, strict=True)]
    maps = derivative_map_figure(
        model, images, targets, a.out, boxes=boxes, kind=a.loss, classes=classes, titles=titles
    )
    for p, d in zip(a.images, maps, strict=True):
        cx, cy, half = d.box.tolist()
        print(f"{p}: box ({cx:.3f}, {cy:.3f}, {half:.3f}), loss {d.loss:.4f}; update {describe_update(d)}")
    print(f"wrote {a.out}")
    return 0
