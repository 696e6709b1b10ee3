"""``racnn demo``, ``racnn visualize`` and ``racnn plot``: the commands that show what the model does."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train and evaluate a small RA-CNN on embedded synthetic data (CPU, a few minutes)",
        description="Builds the embedded synthetic fine-grained dataset (classes differ only in a small pattern "
        "that is unreadable at scale 1 and plain once zoomed), trains a small RA-CNN from random init, prints "
        "the paper-style table and writes metrics.json, attention.png and curves.png into --out.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--quick", action="store_true", help="a shorter run (fewer epochs and images), for smoke tests"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override keys of the demo config",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    metrics = run_demo(a.out, overrides=a.overrides, quick=a.quick, progress=not a.no_progress)
    out = Path(a.out)
    gain = 100 * (metrics["acc_s2"] - metrics["acc_s1"])
    print(
        f"scale 2 vs scale 1: {gain:+.1f} points; scale-2 box holds the detail on "
        f"{100 * metrics['head_hit_s2']:.0f}% of test images"
    )
    print(f"wrote {out / 'metrics.json'}, {out / 'attention.png'}, {out / 'curves.png'}")
    return 0


def add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="draw attention boxes, zoomed crops and top predictions for images",
        description="One row per image: the image with the box of every scale, the zoomed input of "
        "every finer scale, and the top predictions with probabilities per scale and fused.",
    )
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt or an exported folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--topk", type=int, default=3)
    p.set_defaults(func=cmd_visualize)


def cmd_visualize(a: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .data import load_image
    from .visualization import attention_figure

    model = load_model(a.checkpoint, backend="torch")
    transform = model.transforms()
    images = torch.stack([transform(load_image(p)) for p in a.images])
    out = attention_figure(
        model, images, model.classes, a.out, titles=[Path(p).name for p in a.images], topk=a.topk
    )
    print(f"wrote {out}")
    return 0


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="training curves of a run (loss, per-scale accuracy, phases shaded)")
    p.add_argument("run_dir", help="a racnn train output folder (reads metrics.jsonl)")
    p.add_argument("--out", help="PNG file (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(a: argparse.Namespace) -> int:
    from .visualization import plot_curves

    print(f"wrote {plot_curves(a.run_dir, a.out)}")
    return 0
