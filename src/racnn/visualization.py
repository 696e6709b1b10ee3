"""Pictures: attention boxes and zoomed crops per scale with the top predictions, and training curves.

matplotlib is imported lazily (inside the functions) with the non-interactive Agg backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import RACNN

SCALE_COLOURS = ["#ffd400", "#00e5ff", "#ff3df5", "#7dff5c"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_box(ax: Any, box: torch.Tensor, width: int, height: int, colour: str, **kwargs: Any) -> None:
    """Outline a ``(cx, cy, half)`` box (normalised) on an axis showing a ``width x height`` image."""
    from matplotlib.patches import Rectangle

    cx, cy, half = box.tolist()
    ax.add_patch(
        Rectangle(
            ((cx - half) * width, (cy - half) * height),
            2 * half * width,
            2 * half * height,
            fill=False,
            lw=2,
            ec=colour,
            **kwargs,
        )
    )


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """3 x H x W normalised -> H x W x 3 array in [0, 1] for display."""
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def attention_figure(
    model: RACNN,
    images: torch.Tensor,
    classes: list[str],
    out: str | Path,
    *,
    labels: list[int] | None = None,
    titles: list[str] | None = None,
    topk: int = 3,
) -> Path:
    """One row per image: the image with every scale's box, the zoomed input of scales 2..N, and the top-k
    classes with probabilities per scale and fused. ``images``: B x 3 x S x S, normalised."""
    plt = _plt()

    model.eval()
    result = model(images)
    probs = {k: result.logits[k].float().softmax(1) for k in model.keys}
    boxes = [b.float() for b in result.views]
    prep = model.preprocessing
    n, scales = images.shape[0], model.cfg.num_scales
    cols = scales + 1  # image, crops of scales 2..N, text
    fig, axes = plt.subplots(
        n,
        cols,
        figsize=(2.6 * cols + 1.4, 2.6 * n),
        squeeze=False,
        gridspec_kw={"width_ratios": [1] * scales + [1.5]},
    )
    for i in range(n):
        img = denormalize(images[i].float().cpu(), prep.mean, prep.std)
        h, w = img.shape[:2]
        ax = axes[i, 0]
        ax.imshow(img)
        for s, b in enumerate(boxes):
            draw_box(ax, b[i], w, h, SCALE_COLOURS[s % len(SCALE_COLOURS)], label=f"box of scale {s + 1}")
        head = titles[i] if titles else ""
        if labels is not None:
            head = f"{head}\ntruth: {classes[labels[i]]}".strip()  # two lines: a long one overflows the image
        ax.set_title(head, fontsize=8)
        for s, crop in enumerate(result.crops):
            a = axes[i, s + 1]
            a.imshow(denormalize(crop[i].float().cpu(), prep.mean, prep.std))
            for side in a.spines.values():
                side.set_edgecolor(SCALE_COLOURS[s % len(SCALE_COLOURS)])
                side.set_linewidth(3)
            a.set_title(f"scale {s + 2} input", fontsize=8)
        lines = []
        for key, p in probs.items():
            val, idx = p[i].topk(min(topk, p.shape[1]))
            truth = labels[i] if labels is not None else -1
            entries = ", ".join(
                f"{'*' if int(j) == truth else ' '}{classes[int(j)][:18]} {100 * float(v):.0f}%"
                for v, j in zip(val, idx, strict=True)
            )
            lines.append(f"{key:>5}: {entries}")
        axes[i, -1].text(0, 0.5, "\n".join(lines), fontsize=7, family="monospace", va="center")
        for a in axes[i]:
            a.set_xticks([])
            a.set_yticks([])
        axes[i, -1].axis("off")
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl`` (APN-init and event lines left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {run_dir} a racnn train output folder?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
        if isinstance(rec.get("epoch"), int) and rec["epoch"] > 0 and "loss" in rec:
            records.append(rec)
    return records


PHASE_COLOURS = {"warmup": "#dddddd", "classify": "#e8f0ff", "attend": "#ffeedd", "joint": "#eeffee"}


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss and per-scale accuracy per epoch, with the phases shaded: ``RUN_DIR/curves.png`` by default."""
    plt = _plt()
    recs = read_metrics(run_dir)
    if not recs:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: no epoch records yet")
    epochs = [r["epoch"] for r in recs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax in (ax_loss, ax_acc):
        seen = set()
        for r in recs:
            ph = r["phase"]
            ax.axvspan(
                r["epoch"] - 0.5,
                r["epoch"] + 0.5,
                color=PHASE_COLOURS.get(ph, "#f4f4f4"),
                lw=0,
                label=None if ph in seen else ph,
            )
            seen.add(ph)
    ax_loss.plot(epochs, [r.get("cls", r["loss"]) for r in recs], "o-", label="classification loss")
    ax_loss.set_ylabel("classification loss")
    ax_rank = ax_loss.twinx()
    ax_rank.plot(
        epochs, [r.get("rank", float("nan")) for r in recs], "s--", color="#c0392b", label="ranking loss"
    )
    ax_rank.set_ylabel("ranking loss", color="#c0392b")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend(loc="upper right", fontsize=8)
    keys = [k for k in recs[-1] if k.startswith("val_acc_")] or [
        k for k in recs[-1] if k.startswith("train_acc_")
    ]
    for k in keys:
        ax_acc.plot(epochs, [r.get(k, float("nan")) for r in recs], "o-", ms=3, label=k.split("_acc_")[1])
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation top-1" if keys and keys[0].startswith("val") else "training top-1")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def confusion_figure(
    confusion: torch.Tensor,
    classes: list[str],
    most_confused: list[tuple[str, str, int]],
    out: str | Path,
    *,
    title: str = "confusion of the fused output",
) -> Path:
    """The confusion matrix (rows: true class, K x K counts) as a picture readable for 200 classes: each row
    as shares of its class's images, classes sorted by their accuracy (the weakest at the top left, classes
    without images last), a square-root colour scale so that rare confusions show, and the ``most_confused``
    (true class, predicted class, count) pairs listed beside it."""
    from matplotlib.colors import PowerNorm

    plt = _plt()
    counts = confusion.double()
    seen = counts.sum(1)
    rates = counts / seen.clamp(min=1)[:, None]
    order = torch.argsort(torch.where(seen > 0, rates.diag(), 2.0), stable=True)  # 2: after every accuracy
    k = len(classes)
    side = min(24.0, max(5.0, 0.085 * k + 2.5))  # inches: about 6 pt per class row at 200 classes
    fig = plt.figure(figsize=(side + 7.5, side))
    # the matrix, its colour bar, room for the bar's label, the list of pairs
    grid = fig.add_gridspec(1, 4, width_ratios=(side, 0.25, 1.0, 6.0), wspace=0.05)
    ax, cax, ax_list = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[3])
    shares = np.ma.masked_equal(rates[order][:, order].numpy(), 0)  # no image: white, not the scale's end
    cmap = plt.get_cmap("magma_r").with_extremes(bad="white")
    image = ax.imshow(shares, cmap=cmap, norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="none")
    names = [classes[i] for i in order.tolist()]
    font = min(9.0, max(3.0, 900 / max(k, 1)))  # 4.5 pt at 200 classes: a row is about 6 pt high
    ax.set_xticks(range(k), names, rotation=90, fontsize=font)
    ax.set_yticks(range(k), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (sorted by accuracy, weakest first)")
    ax.set_title(title)
    fig.colorbar(image, cax=cax, label="share of the true class's images")
    lines = [f"{n:>4}  {true[:30]}\n      -> {pred[:30]}" for true, pred, n in most_confused]
    ax_list.axis("off")
    ax_list.set_title("most confused: images, true class -> predicted", fontsize=10, loc="left")
    text = "\n".join(lines) or "no confusions"
    ax_list.text(0, 1, text, family="monospace", fontsize=8, va="top", transform=ax_list.transAxes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return out
