"""The paper's derivative maps (Sec. 3.3, attention learning): how the loss of the finer scale pulls the box.

For an image and a box ``(tx, ty, tl)`` (here ``(cx, cy, half)``, normalised), the crop ``crop_zoom(X, box)`` is
classified by the next scale. The *derivative map* is the per-pixel negative squared norm (over channels) of
the loss gradient with respect to the pixels ``X`` the crop is cut from: the darker (more negative), the more
that pixel matters to the finer scale's loss. The gradient with respect to the box, taken by autograd through
:func:`racnn.attention.crop_zoom`, gives the direction a gradient step would move it: ``-dL/dtx > 0`` moves
the box right, ``-dL/dty > 0`` down, ``-dL/dtl > 0`` grows it. The paper's Eqs. 9-10 write the same
derivative as the derivative map weighted by the mask's derivatives, so the box moves towards the darker side.

The loss is the cross-entropy of the scale-2 head on the crop (``ce``) or the ranking loss against scale 1
(``rank``, Eq. 8; it is zero, and so are all gradients, once ``p_t(2) >= p_t(1) + margin``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import crop_zoom
from .model import RACNN

LossFn = Callable[[torch.Tensor], torch.Tensor]  # crop 1 x 3 x S x S -> scalar loss
LOSSES = ("ce", "rank")


@dataclass
class DerivativeMap:
    """Result of :func:`derivative_map` for one image."""

    source: torch.Tensor  # 3 x H x W, the (normalised) pixels the crop is cut from
    box: torch.Tensor  # 3: (cx, cy, half), normalised to ``source``
    saliency: torch.Tensor  # H x W: -||dL/dX||^2 over the channels (<= 0)
    grad_box: torch.Tensor  # 3: dL/d(cx, cy, half)
    crop: torch.Tensor  # 3 x S x S, the zoomed crop
    loss: float

    @property
    def update(self) -> torch.Tensor:
        """The direction of a gradient-descent step on the box: ``-dL/d(tx, ty, tl)``."""
        return -self.grad_box


def derivative_map(
    source: torch.Tensor, box: torch.Tensor, loss_fn: LossFn, *, out_size: int, k: float = 10.0
) -> DerivativeMap:
    """Derivative map and box gradient of ``loss_fn(crop_zoom(source, box))``.

    ``source``: 3 x H x W (or 1 x 3 x H x W); ``box``: 3 (or 1 x 3), ``(cx, cy, half)`` normalised to it.
    """
    src = source.detach().float().reshape(1, *source.shape[-3:]).clone().requires_grad_(True)
    bx = box.detach().float().reshape(1, 3).clone().requires_grad_(True)
    with torch.enable_grad():
        crop = crop_zoom(src, bx, out_size, k)
        loss = loss_fn(crop)
        g_src, g_box = torch.autograd.grad(loss, [src, bx], allow_unused=False)
    return DerivativeMap(
        source=src.detach()[0],
        box=bx.detach()[0],
        saliency=-(g_src[0] ** 2).sum(0),
        grad_box=g_box[0],
        crop=crop.detach()[0],
        loss=float(loss.detach()),
    )


def scale2_loss(
    model: RACNN, image: torch.Tensor, target: int, *, kind: str = "ce", margin: float | None = None
) -> tuple[torch.Tensor, LossFn]:
    """What the scale-2 crop is cut from and the loss of scale 2 on a crop of it.

    ``image``: 3 x H x W, normalised (the loader's image). With ``crop_from="source"`` the crop comes from the
    image itself, otherwise from the scale-1 input. ``kind``: ``ce`` (cross-entropy of the scale-2 head) or
    ``rank`` (``max(0, p_t(1) - p_t(2) + margin)``, scale 1 fixed; ``margin`` defaults to 0.05).
    """
    if kind not in LOSSES:
        raise ValueError(f"loss kind must be one of {', '.join(LOSSES)}, got {kind!r}")
    if model.cfg.num_scales < 2:
        raise ValueError("a derivative map needs a model with at least 2 scales")
    x = image.detach().float()[None]
    x1 = model.scale_input(x)
    source = x[0] if model.cfg.crop_from == "source" else x1[0]
    y = torch.tensor([target])
    with torch.no_grad():
        p1 = model.forward_scale(0, x1).float().softmax(1)[0, target]
    m = 0.05 if margin is None else margin

    def loss_fn(crop: torch.Tensor) -> torch.Tensor:
        logits = model.forward_scale(1, crop).float()
        if kind == "ce":
            return F.cross_entropy(logits, y)
        return (p1 - logits.softmax(1)[0, target] + m).clamp(min=0)

    return source, loss_fn


def model_derivative_map(
    model: RACNN,
    image: torch.Tensor,
    target: int,
    *,
    box: torch.Tensor | None = None,
    kind: str = "ce",
) -> DerivativeMap:
    """:func:`derivative_map` of the scale-2 loss for ``image`` (3 x H x W, normalised) and ``box``
    (default: the scale-1 APN's box; normalised to the image, which is the scale-1 input's frame too)."""
    model.eval()
    if box is None:
        with torch.no_grad():
            box = model(image[None].float()).boxes[0][0].float()
    source, loss_fn = scale2_loss(model, image, target, kind=kind)
    return derivative_map(source, box, loss_fn, out_size=model.scale_sizes[1], k=model.cfg.mask_k)


def describe_update(d: DerivativeMap) -> str:
    """The update direction in words, e.g. ``tx +1.2e-03 (right), ty -4.0e-04 (up), tl +2.0e-04 (grow)``."""
    u = d.update.tolist()
    words = [("right", "left"), ("down", "up"), ("grow", "shrink")]
    return ", ".join(
        f"{n} {v:+.1e} ({w[0] if v > 0 else w[1] if v < 0 else 'stay'})"
        for n, v, w in zip(("tx", "ty", "tl"), u, words, strict=True)
    )


def display_map(saliency: torch.Tensor, *, blur: int = 5, clip: float = 0.01) -> torch.Tensor:
    """The derivative map for display: a ``blur`` x ``blur`` box average (per-pixel gradients are speckled),
    then clipped at its ``clip`` quantile (a few pixels would otherwise take the whole colour range)."""
    m = F.avg_pool2d(saliency.detach().float().cpu()[None, None], blur, stride=1, padding=blur // 2)
    m = m[0, 0, : saliency.shape[0], : saliency.shape[1]]
    low = torch.quantile(m.flatten()[:: max(1, m.numel() // 100_000)], clip)
    return m.clamp(min=float(low)) if float(low) < 0 else m


def derivative_map_figure(
    model: RACNN,
    images: torch.Tensor,
    targets: list[int],
    out: str | Path,
    *,
    boxes: torch.Tensor | None = None,
    kind: str = "ce",
    classes: list[str] | None = None,
    titles: list[str] | None = None,
) -> list[DerivativeMap]:
    """One row per image: the image with the box, an arrow for the (tx, ty) update and a +/- for tl; the
    derivative map as a heat map; the zoomed crop. ``images``: B x 3 x H x W normalised; ``boxes``: B x 3."""
    from .visualization import _plt, denormalize, draw_box

    plt = _plt()

    prep = model.preprocessing
    maps = [
        model_derivative_map(model, images[i], targets[i], box=None if boxes is None else boxes[i], kind=kind)
        for i in range(images.shape[0])
    ]
    fig, axes = plt.subplots(len(maps), 3, figsize=(9.6, 3.3 * len(maps)), squeeze=False)
    for i, d in enumerate(maps):
        img = denormalize(d.source.cpu(), prep.mean, prep.std)
        h, w = img.shape[:2]
        cx, cy, half = d.box.tolist()
        u = d.update
        for ax in axes[i, :2]:
            draw_box(ax, d.box, w, h, "#ffd400")
        axes[i, 0].imshow(img)
        vec = torch.tensor([u[0] * w, u[1] * h])
        if float(vec.norm()) > 0:  # direction only: a fixed length of a fifth of the image side
            dx, dy = (vec / vec.norm() * 0.2 * min(w, h)).tolist()
            axes[i, 0].annotate(
                "", xy=(cx * w + dx, cy * h + dy), xytext=(cx * w, cy * h),
                arrowprops={"arrowstyle": "-|>", "color": "#ff3030", "lw": 3, "mutation_scale": 22},
            )  # fmt: skip
        sign = "+" if u[2] > 0 else "\u2212" if u[2] < 0 else "0"
        axes[i, 0].text(
            (cx - half) * w + 3, (cy - half) * h + 3, f"tl {sign}", color="#ff3030", fontsize=13,
            fontweight="bold", va="top", ha="left",
        )  # fmt: skip
        name = classes[targets[i]] if classes else str(targets[i])
        head = titles[i] if titles else name
        axes[i, 0].set_title(f"{head}\nloss {d.loss:.3f} ({kind})", fontsize=8)
        sal = display_map(d.saliency).numpy()
        axes[i, 1].imshow(img, alpha=0.35)
        hm = axes[i, 1].imshow(sal, cmap="magma", alpha=0.75, vmin=float(sal.min()), vmax=0.0)
        fig.colorbar(hm, ax=axes[i, 1], fraction=0.046, pad=0.02, format="%.0e")
        axes[i, 1].set_title("derivative map -||dL/dX||^2 (darker: matters more)", fontsize=8)
        axes[i, 2].imshow(denormalize(d.crop.cpu(), prep.mean, prep.std))
        axes[i, 2].set_title(describe_update(d).replace(", ", "\n"), fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return maps
