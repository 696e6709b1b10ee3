"""The APN's search update (``apn.update=search``): the attention phase's ranking loss minimised by looking
around each box through the frozen finer scale, instead of by its gradient through the crop.

Why: the ranking loss ``max(0, p_t(s) - p_t(s+1) + margin)`` reaches APN s only through the crop's box
gradient, which on a k = 10 boxcar comes from the one or two pixels each edge crosses and swings with
sub-pixel shifts (:func:`racnn.attention.soft_box_gradient`); at a rate where that noise averages out the
boxes hardly move, at ten times it they collapse (docs/results.md). The search asks the ranking loss itself:
for every image the finer scale classifies the box and its neighbours (:func:`racnn.attention.box_candidates`),
and the APN takes a regression step (smooth-L1, as in its initialisation) towards the neighbour on which the
pair's hinge is lowest, where that beats the box itself; an image whose hinge is already quiet, or where no
neighbour does better, keeps its box. Each move is one bounded step, so the APN learns where to look from
what the finer scale sees, at a rate that cannot run away (NTS-Net's navigator and MMAL-Net also rank regions
by what a classifier sees in them).
"""

from __future__ import annotations

import torch

from ..attention import box_candidates, compose_boxes
from ..config import Config
from ..losses import box_regression_loss, rank_ceiling, true_class_prob
from ..model import RACNN, RACNNOutput


@torch.no_grad()
def search_targets(
    model: RACNN, images: torch.Tensor, out: RACNNOutput, y: torch.Tensor, cfg: Config
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The box each APN moves towards on the batch ``images`` (B x 3 x H x W) with labels ``y`` (B), given the
    model's forward ``out`` on it (classifiers frozen, in eval mode). Returns the targets (per APN, B x 3,
    relative to that scale's input) and the log's figures: ``search_moved_s<s>``, the share of images whose
    APN s moves; ``search_gain_s<s>``, the mean rise of ``p_t(s+1)`` on the chosen boxes over the current
    ones; ``search_grow_s<s>``, the share of images whose chosen box is larger."""
    a, lc, m = cfg.apn, cfg.loss, model.cfg
    ceiling = rank_ceiling(lc.label_smoothing, model.num_classes, lc.rank_margin) if lc.rank_quiet else None
    targets, stats = [], {}
    x = model.scale_input(images)  # scale s's input (crop_from="previous" zooms it)
    for s, box in enumerate(out.boxes):
        box = box.detach().float()
        cands = box_candidates(
            box, shift=a.search_shift, zoom=a.search_zoom, min_side=m.box_min_side, max_side=m.box_max_side
        )  # B x C x 3; candidate 0 is the box itself, whose p_t(s+1) the forward already gave
        if a.search_candidates < cands.shape[1] - 1:  # a random share of the neighbours, drawn per image
            pick = torch.rand(cands.shape[:2], device=cands.device)[:, 1:].argsort(1)[
                :, : a.search_candidates
            ]
            cands = torch.cat([cands[:, :1], cands.gather(1, (pick + 1)[..., None].expand(-1, -1, 3))], 1)
        b = cands.shape[0]
        q = finer_probs(model, s, images, x, out, y, cands)  # B x C: p_t(s+1) on every candidate
        coarse = out.logits[model.scale_keys[s]]
        goal = true_class_prob(coarse, y) + lc.rank_margin  # the coarse scale is a reference
        if ceiling is not None:
            goal = goal.clamp(max=ceiling)
        hinge = (goal[:, None] - q).clamp(min=0)  # B x C, the pair's ranking loss on every candidate
        # the lowest hinge, ties (several quiet boxes) to the most confident finer scale
        best = (hinge - 1e-6 * q).argmin(dim=1)
        gain = q.gather(1, best[:, None]).squeeze(1) - q[:, 0]
        move = (hinge[:, 0] > 0) & (gain > a.search_min_gain)
        best = torch.where(move, best, torch.zeros_like(best))
        target = cands[torch.arange(b, device=cands.device), best]  # B x 3
        targets.append(target)
        stats[f"search_moved_s{s + 1}"] = move.float().mean()
        stats[f"search_gain_s{s + 1}"] = torch.where(move, gain, torch.zeros_like(gain)).mean()
        stats[f"search_grow_s{s + 1}"] = (target[:, 2] > box[:, 2] * (1 + 1e-6)).float().mean()
        if s + 1 < len(out.boxes):
            x = out.crops[s].detach()
    return targets, stats


@torch.no_grad()
def finer_probs(
    model: RACNN,
    s: int,
    images: torch.Tensor,
    x: torch.Tensor,
    out: RACNNOutput,
    y: torch.Tensor,
    cands: torch.Tensor,
) -> torch.Tensor:
    """``p_t(s+1)``, the true class's probability at scale ``s + 1`` (0-based ``s``: of APN s's finer scale), on
    each candidate box ``cands`` (B x C x 3, relative to scale s's input ``x``; candidate 0 is ``out``'s own box,
    whose ``p_t`` ``out`` holds). ``images``: the model's input, ``y``: the labels. Returns B x C."""
    b, c = cands.shape[:2]
    alt = cands[:, 1:].reshape(-1, 3)  # B(C-1) x 3, image-major
    rep = lambda t: t.repeat_interleave(c - 1, dim=0)  # noqa: E731  (B x ... -> B(C-1) x ...)
    view = alt if s == 0 else compose_boxes(rep(out.views[s - 1].detach().float()), alt)
    logits = model.forward_scale(s + 1, model.zoom_in(s, rep(images), rep(x), alt, view))  # B(C-1) x K
    own = true_class_prob(out.logits[model.scale_keys[s + 1]], y)[:, None]
    return torch.cat([own, true_class_prob(logits, rep(y)).view(b, c - 1)], dim=1)


def search_loss(
    model: RACNN, images: torch.Tensor, out: RACNNOutput, y: torch.Tensor, cfg: Config
) -> dict[str, torch.Tensor]:
    """The search update's loss terms: ``search``, every APN's smooth-L1 to its :func:`search_targets` box
    (its gradient reaches APN s alone: the forward cut the crops from the boxes), and the log's figures."""
    targets, stats = search_targets(model, images, out, y, cfg)
    loss = sum(
        (box_regression_loss(b.float(), t) for b, t in zip(out.boxes, targets, strict=True)),
        torch.zeros((), device=images.device),
    )
    return {"search": loss, **stats}
