"""One training step of any phase (:class:`racnn.training.schedule.Phase`): the forward pass, the loss
terms, the backward pass and the optimiser steps. The trainer and ``benchmarks/speed.py`` both run it, so the
benchmark times what training does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import Config
from ..evaluation import Accumulator
from ..localization import aolm_boxes
from ..losses import (
    box_regression_loss,
    classification_losses,
    rank_ceiling,
    ranking_hinges,
    total_classification,
    true_class_prob,
)
from ..model import RACNN, RACNNOutput
from .apn_init import apn_init_target
from .distributed import DistEnv, all_reduce_min, all_reduce_sum, broadcast_object, gather_accumulator
from .schedule import Phase
from .search import search_loss

Forward = Callable[..., RACNNOutput]  # the model, or its DDP wrapper


def loss_terms(
    model: RACNN,
    out: RACNNOutput,
    y: torch.Tensor,
    phase: Phase,
    cfg: Config,
    *,
    full_map: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch, as a dict (a task module's answer): ``loss``, what ``phase`` minimises,
    and its parts for the log. The APN initialisation: ``box``, every APN's smooth-L1 to its initialisation
    box. Every other phase: ``cls`` (the per-scale and concat-fusion cross-entropies ``ce_*``, Eq. 7), ``rank``
    (Eq. 8), ``rank_active`` (the share of active hinges) and, with ``loss.prior_weight``, the object
    ``prior``; the classifier phases minimise ``cls``, the attention phase ``rank + prior_weight * prior``,
    the joint phase ``cls + rank_weight * rank + prior_weight * prior``. ``full_map``: scale 1's map of the
    full-size image, which then gives APN 1's initialisation box (``apn.init_full_size``)."""
    if "box" in phase.losses:
        maps = list(out.maps) if full_map is None else [full_map, *out.maps[1:]]
        box = sum(
            box_regression_loss(b.float(), apn_init_target(model, cfg, s, fmap, y))
            for s, (b, fmap) in enumerate(zip(out.boxes, maps, strict=False))
        )
        return {"loss": box, "box": box}
    lc, n_scales = cfg.loss, model.cfg.num_scales
    if "search" in phase.losses:  # the search update; the ranking loss of the current boxes for the log
        assert images is not None, "the search update needs the batch's images"
        probs = [true_class_prob(out.logits[k], y) for k in model.scale_keys]
        rank = sum((h.mean() for h in ranking_hinges(probs, lc.rank_margin, detach_coarse=True)), 0.0)
        terms = search_loss(model, images, out, y, cfg)
        return {"loss": terms["search"], "rank": torch.as_tensor(rank), **terms}
    terms = classification_losses(out.trained_logits, y, label_smoothing=lc.label_smoothing)
    cls = total_classification(terms, num_scales=n_scales, fusion_weight=lc.fusion_weight)
    probs = [true_class_prob(out.logits[k], y) for k in model.scale_keys]
    ceiling = rank_ceiling(lc.label_smoothing, model.num_classes, lc.rank_margin) if lc.rank_quiet else None
    hinges = ranking_hinges(probs, lc.rank_margin, detach_coarse=lc.rank_detach_coarse, ceiling=ceiling)
    rank = sum((h.mean() for h in hinges), cls.new_zeros(()))
    extra = {"rank_active": sum((h > 0).float().mean() for h in hinges) / len(hinges)} if hinges else {}
    attend = rank if phase.losses == ("rank",) else lc.rank_weight * rank
    if needs_maps(phase, cfg, n_scales):  # the scale-1 box stays near the object scale 1's own map shows
        box_min, box_max = model.cfg.box_min_side, model.cfg.box_max_side
        extra["prior"] = box_regression_loss(out.boxes[0].float(), aolm_boxes(out.maps[0], box_min, box_max))
        attend = attend + lc.prior_weight * extra["prior"]
    if "rank" not in phase.losses:
        loss = cls
    elif "cls" in phase.losses:
        loss = cls + attend
    else:
        loss = attend
    return {"loss": loss, "cls": cls, "rank": rank, **extra, **terms}


def needs_maps(phase: Phase, cfg: Config, num_scales: int) -> bool:
    """Whether ``phase``'s loss reads the last conv maps: the APN initialisation's targets, the object prior."""
    if "box" in phase.losses:
        return True
    return "rank" in phase.losses and cfg.loss.prior_weight > 0 and num_scales > 1


def train_step(
    model: RACNN,
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    phase: Phase,
    cfg: Config,
    optimizers: dict[str, torch.optim.Optimizer],
    *,
    autocast: Any,
) -> tuple[dict[str, torch.Tensor], RACNNOutput]:
    """One step of ``phase`` on the batch ``x`` (B x 3 x S x S), ``y`` (B): forward (under ``autocast``),
    :func:`loss_terms`, backward, gradient clipping (``optim.grad_clip``; not in the APN initialisation) and
    a step of the phase's ``optimizers`` (by name: ``cls``, ``apn``, ``apn_init``). The model must already be
    in the phase (:func:`racnn.training.schedule.set_phase`). Returns the terms and the model's output."""
    with autocast:
        out = forward(
            x,
            detach_boxes=phase.detach_boxes,
            detach_crops=phase.detach_crops,
            return_maps=needs_maps(phase, cfg, model.cfg.num_scales),
        )
    full_map = None
    if "box" in phase.losses and cfg.apn.init_full_size and x.shape[-1] > model.cfg.input_size:
        with torch.no_grad(), autocast:  # a target: no graph; the backbones are frozen (eval) in this phase
            full_map = model.trunk(0, x)  # B x C x h' x w', finer than out.maps[0]
    terms = loss_terms(model, out, y, phase, cfg, full_map=full_map, images=x)
    loss = terms["loss"]
    opts = [optimizers[name] for name in phase.optimizers]
    for o in opts:
        o.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
        if cfg.optim.grad_clip and not {"box", "search"} & set(phase.losses):
            params = [p for p in model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        for o in opts:
            o.step()
    return terms, out


class NonFiniteWatch:
    """The first step (1-based) whose loss was not finite, kept on the device by ``mark``; ``check`` reads it
    (over every rank) and raises a :class:`FloatingPointError` naming ``where`` and the step, then ``kept``.

    ``mark`` checks every ``train.log_every`` steps on an accelerator (no host sync per step) but at every step
    on the CPU, where reading the flag costs nothing: a NaN that reached the weights makes NaN attention boxes,
    and the next step's crop would index with them."""

    NEVER = 2**62

    def __init__(self, device: torch.device, env: DistEnv, every: int, where: str, kept: str) -> None:
        self.first = torch.full((), self.NEVER, dtype=torch.int64, device=device)
        self.every = 1 if device.type == "cpu" else every
        self.env, self.where, self.kept = env, where, kept

    def mark(self, loss: torch.Tensor, step: int) -> None:
        self.first = torch.where(torch.isfinite(loss.detach()), self.first, self.first.clamp(max=step))
        if step % self.every == 0:
            self.check()

    def check(self) -> None:
        step = int(all_reduce_min(self.first, self.env))  # the same decision on every rank
        if step < self.NEVER:
            raise FloatingPointError(
                f"{self.where}, step {step}: the loss is not finite (nan or inf); stopped, {self.kept}"
            )


def epoch_record(
    sums: dict[str, torch.Tensor],
    acc: Accumulator,
    steps: int,
    seen: int,
    seconds: float,
    bad: int | None,
    env: DistEnv,
) -> dict[str, Any]:
    """A training epoch's record: loss means over the steps (``sums``: per-step loss terms, summed on the
    device), training accuracy and box sides, speed and (when skipping) unreadable images; over every rank,
    and rank 0's record on every rank so that all take the same decisions."""
    if not env.active:
        rec = {k: float(v) / max(steps, 1) for k, v in sums.items()}
    else:  # every rank ran `steps` steps on an equal share of each global batch
        total = all_reduce_sum(torch.stack([v.float() for v in sums.values()]), env)
        rec = {k: v / max(steps * env.world_size, 1) for k, v in zip(sums, total.tolist(), strict=True)}
        acc = gather_accumulator(acc, env)
        seen *= env.world_size
    summary = acc.summary()
    rec.update({f"train_{k}": v for k, v in summary.items() if k.startswith(("acc_", "box_side"))})
    rec.update(
        {"steps": steps, "time_s": round(seconds, 2), "images_per_s": round(seen / max(seconds, 1e-9), 2)}
    )
    if bad is not None:
        rec["bad_images"] = int(all_reduce_sum(torch.tensor(bad), env))
    return broadcast_object(rec, env)
