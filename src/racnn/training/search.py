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

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ..attention import APN, box_candidates, compose_boxes
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
    ones; ``search_grow_s<s>``, the share of images whose chosen box is larger.

    A candidate's score is the ranking loss it leaves: ``apn.search_score=pair``, the hinge of the pair
    (s, s+1) alone; ``total``, the hinges of every pair from (s, s+1) to the last, the finer APNs re-run on
    what the candidate shows them (a larger scale-1 box may please scale 2 and cost scale 3). Each pair's
    coarse side is the current forward's ``p_t``, a fixed reference (``loss.rank_detach_coarse``)."""
    a, lc, m = cfg.apn, cfg.loss, model.cfg
    ceiling = rank_ceiling(lc.label_smoothing, model.num_classes, lc.rank_margin) if lc.rank_quiet else None
    current = [true_class_prob(out.logits[k], y) for k in model.scale_keys]  # p_t of every scale, B each
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
        depth = len(out.boxes) - s if a.search_score == "total" else 1
        q = chain_probs(model, s, images, x, out, y, cands, depth=depth)  # B x C x depth: p_t(s+1), ...
        goal = torch.stack(current[s : s + depth], dim=1) + lc.rank_margin  # B x depth, the coarse sides
        if ceiling is not None:
            goal = goal.clamp(max=ceiling)
        score = (goal[:, None, :] - q).clamp(min=0).sum(2)  # B x C, the ranking loss each candidate leaves
        # the lowest score, ties (several quiet boxes) to the most confident finer scale
        best = (score - 1e-6 * q[..., 0]).argmin(dim=1)
        rise = q[..., 0].gather(1, best[:, None]).squeeze(1) - q[:, 0, 0]  # of p_t(s+1)
        gain = rise if depth == 1 else score[:, 0] - score.gather(1, best[:, None]).squeeze(1)
        move = (score[:, 0] > 0) & (gain > a.search_min_gain)
        best = torch.where(move, best, torch.zeros_like(best))
        target = cands[torch.arange(b, device=cands.device), best]  # B x 3
        targets.append(target)
        stats[f"search_moved_s{s + 1}"] = move.float().mean()
        stats[f"search_gain_s{s + 1}"] = torch.where(move, rise, torch.zeros_like(rise)).mean()
        stats[f"search_grow_s{s + 1}"] = (target[:, 2] > box[:, 2] * (1 + 1e-6)).float().mean()
        if s + 1 < len(out.boxes):
            x = out.crops[s].detach()
    return targets, stats


@torch.no_grad()
def chain_probs(
    model: RACNN,
    s: int,
    images: torch.Tensor,
    x: torch.Tensor,
    out: RACNNOutput,
    y: torch.Tensor,
    cands: torch.Tensor,
    *,
    depth: int,
) -> torch.Tensor:
    """``p_t`` at scales ``s + 1 .. s + depth`` (0-based ``s``: APN s's finer scales) when APN s's box is each
    candidate of ``cands`` (B x C x 3, relative to scale s's input ``x``; candidate 0 is ``out``'s own box,
    whose figures ``out`` holds): the finer APNs run on what each candidate shows them, as they would at test
    time. ``images``: the model's input, ``y``: the labels. Returns B x C x depth."""
    b, c = cands.shape[:2]
    alt = cands[:, 1:].reshape(-1, 3)  # B(C-1) x 3, image-major
    rep = lambda t: t.repeat_interleave(c - 1, dim=0)  # noqa: E731  (B x ... -> B(C-1) x ...)
    big = rep(images)
    view = alt if s == 0 else compose_boxes(rep(out.views[s - 1].detach().float()), alt)
    z, probs = model.zoom_in(s, big, rep(x), alt, view), []
    for j in range(s + 1, s + depth):  # z: scale j's input, B(C-1) x 3 x S x S; a finer scale follows
        fmap = model.trunk(j, z)
        probs.append(true_class_prob(model.heads[j](model.dropout(fmap.mean(dim=(2, 3)))), rep(y)))
        box = model.apns[j](fmap).float()  # the finer APN's box on this candidate's view
        view = compose_boxes(view, box)
        z = model.zoom_in(j, big, z, box, view)
    probs.append(true_class_prob(model.forward_scale(s + depth, z), rep(y)))  # the chain's last scale
    own = torch.stack([true_class_prob(out.logits[k], y) for k in model.scale_keys[s + 1 : s + 1 + depth]], 1)
    alts = torch.stack(probs, dim=1).view(b, c - 1, depth)
    return torch.cat([own[:, None], alts], dim=1)


@contextmanager
def apns_of(model: RACNN, apns: nn.ModuleList) -> Iterator[RACNN]:
    """``model`` running ``apns`` (a copy of its APNs, e.g. :func:`epoch_anchor`'s) inside; its own after. The
    module is swapped, not its weights loaded: the forward that the loss's backward needs keeps its tensors."""
    own = model.apns
    model.apns = apns
    try:
        yield model
    finally:
        model.apns = own


def epoch_anchor(model: RACNN) -> nn.ModuleList:
    """The APNs as they are now, frozen: the boxes an anchored search (``apn.search_anchor``) starts from for
    a whole attention epoch (a copy of their weights: 0.5 GB for three MobileNetV2 scales' APNs)."""
    anchor = copy.deepcopy(model.apns).requires_grad_(False).eval()
    for apn in anchor:
        if isinstance(apn, APN):  # (a map APN keeps no copy)
            apn._fc1_cast = None  # (no low-precision copy of the live weights rides along)
    return anchor


def search_loss(
    model: RACNN,
    images: torch.Tensor,
    out: RACNNOutput,
    y: torch.Tensor,
    cfg: Config,
    *,
    anchor: nn.ModuleList | None = None,
    autocast: AbstractContextManager[Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The search update's loss terms: ``search``, every APN's smooth-L1 to its :func:`search_targets` box
    (its gradient reaches APN s alone: the forward cut the crops from the boxes), and the log's figures.

    ``anchor`` (``apn.search_anchor``; :func:`epoch_anchor`): the targets are searched around the boxes of
    those APNs, run on ``images`` under ``autocast``, so every target lies within one neighbour's step of the
    anchor's box and an image that does not move pulls back to it. Each live APN is then run on the view
    the anchor shows its scale (the anchor forward's map), so its box and its target are relative to the same
    crop. Without an anchor the search starts from ``out``'s boxes, the current APNs'."""
    boxes = out.boxes
    if anchor is None:
        targets, stats = search_targets(model, images, out, y, cfg)
    else:
        with apns_of(model, anchor):  # (the finer APNs of a total score are the anchor's too)
            with torch.no_grad(), autocast or nullcontext():
                ref = model(images, detach_boxes=True, return_maps=True)
            targets, stats = search_targets(model, images, ref, y, cfg)
        with autocast or nullcontext():  # B x 3 each, the gradient to APN s alone
            boxes = [model.apns[s](ref.maps[s].detach()) for s in range(len(targets))]
    loss = sum(
        (box_regression_loss(b.float(), t) for b, t in zip(boxes, targets, strict=True)),
        torch.zeros((), device=images.device),
    )
    return {"search": loss, **stats}
