"""The phases of RA-CNN's training (paper Sec. 3.4), each defined in one place with all it does.

A :class:`Phase` is one kind of training run over the data: warm-up, APN initialisation, classification
(APNs fixed), attention (classifiers fixed; by the ranking loss's gradient or by the search update) and
joint. Its fields are its behaviour: the parts it trains, how its crops see the boxes, the loss function it
minimises, the optimisers that step, whether gradients are clipped, whether the classifiers' learning-rate
schedule steps, and how long it runs. :func:`racnn.training.step.train_step` runs a batch of any phase and the
trainer an epoch of any phase, neither knowing which; :class:`racnn.training.schedule.PhaseSchedule` decides
which phase runs next.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config
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
from .apn_init import apn_init_target, apn_saturation
from .search import search_loss

Terms = dict[str, torch.Tensor]
# loss(model, cfg, out, images, labels, autocast, anchor): the batch's loss terms, ``loss`` the one minimised
# and the rest for the log; ``out`` is the model's forward on ``images`` (B x 3 x S x S) under ``autocast``;
# ``anchor``, the APNs as the epoch began where the phase asks for them (``Phase.anchor``), else None
LossFn = Callable[
    [
        RACNN,
        Config,
        RACNNOutput,
        torch.Tensor,
        torch.Tensor,
        AbstractContextManager[Any],
        nn.ModuleList | None,
    ],
    Terms,
]

CLASSIFIERS = frozenset({"backbone", "head"})  # parameter groups (RACNN.parameter_groups)
APNS = frozenset({"apn"})


@dataclass(frozen=True, kw_only=True)
class Phase:
    """One kind of training run over the data, all it does in its fields."""

    name: str  # in the log (metrics.jsonl's ``phase``) and the schedule's checkpointed state
    title: str  # in messages
    # the parameter groups it trains under a config; the rest is frozen (set_phase)
    trains: Callable[[Config], frozenset[str]]
    loss: LossFn  # what it minimises (``loss``), and the log's terms
    optimizers: tuple[str, ...]  # the optimisers that step: fields of racnn.training.optim.Optimizers
    clip: bool  # gradients clipped to ``optim.grad_clip``
    lr_step: bool  # the classifiers' learning-rate schedule steps after each epoch (the epoch logs ``lr``)
    detach_boxes: bool = False  # the crops are cut with fixed boxes: no gradient reaches the APNs
    detach_crops: bool = False  # the boxes keep their gradient, but nothing of scale s+1 depends on APN s
    # maps(cfg, num_scales): its loss reads the last conv maps (the forward returns them)
    maps: Callable[[Config, int], bool] = lambda cfg, num_scales: False
    # None: one epoch of the schedule's budget (validated, checkpointed); else that many steps, once per run
    # before the alternating epochs, logged as epoch 0
    steps: Callable[[Config], int] | None = None
    probe: Callable[[RACNN, torch.Tensor], dict[str, float]] | None = None  # figures for the log after it
    initial_apns: bool = False  # the APNs it leaves are the run's initial ones (the test's ``*_init``)
    # anchor(cfg): its loss reads the APNs as they were when the epoch began (train_epoch copies them)
    anchor: Callable[[Config], bool] = lambda cfg: False
    # the training images it reads where apn.attend_holdout holds a share out (racnn.training.loaders.IMAGES):
    # "fitted", the classifiers' share (every image once no attention epoch is left in the budget);
    # "held_out", the attention phases' share; "all", every image
    images: str = "all"

    def __str__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------------------------- losses


def apn_init_loss(
    model: RACNN, cfg: Config, out: RACNNOutput, labels: torch.Tensor, *, full_map: torch.Tensor | None = None
) -> Terms:
    """``box``: every APN's smooth-L1 to its initialisation box (:func:`racnn.training.apn_init.apn_init_target`)
    from its scale's last conv map; ``full_map``: scale 1's map of the full-size image, which then gives APN 1's
    box (``apn.init_full_size``)."""
    maps = list(out.maps) if full_map is None else [full_map, *out.maps[1:]]
    box = sum(
        box_regression_loss(b.float(), apn_init_target(model, cfg, s, fmap, labels))
        for s, (b, fmap) in enumerate(zip(out.boxes, maps, strict=False))
    )
    return {"loss": box, "box": box}


def _apn_init_terms(
    model: RACNN,
    cfg: Config,
    out: RACNNOutput,
    images: torch.Tensor,
    labels: torch.Tensor,
    autocast: AbstractContextManager[Any],
    anchor: nn.ModuleList | None,
) -> Terms:
    full_map = None
    if cfg.apn.init_full_size and images.shape[-1] > model.cfg.input_size:
        with torch.no_grad(), autocast:  # a target: no graph; the backbones are frozen (eval) in this phase
            full_map = model.trunk(0, images)  # B x C x h' x w', finer than out.maps[0]
    return apn_init_loss(model, cfg, out, labels, full_map=full_map)


def _ranked(
    model: RACNN, cfg: Config, out: RACNNOutput, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Terms, Terms]:
    """The classification loss ``cls`` (the per-scale and concat-fusion cross-entropies, Eq. 7), the ranking
    loss ``rank`` (Eq. 8), ``rank_active`` (the share of active hinges) and the cross-entropies ``ce_*``."""
    lc, n_scales = cfg.loss, model.cfg.num_scales
    terms = classification_losses(out.trained_logits, labels, label_smoothing=lc.label_smoothing)
    cls = total_classification(terms, num_scales=n_scales, fusion_weight=lc.fusion_weight)
    probs = [true_class_prob(out.logits[k], labels) for k in model.scale_keys]
    ceiling = rank_ceiling(lc.label_smoothing, model.num_classes, lc.rank_margin) if lc.rank_quiet else None
    hinges = ranking_hinges(probs, lc.rank_margin, detach_coarse=lc.rank_detach_coarse, ceiling=ceiling)
    rank = sum((h.mean() for h in hinges), cls.new_zeros(()))
    extra = {"rank_active": sum((h > 0).float().mean() for h in hinges) / len(hinges)} if hinges else {}
    return cls, rank, extra, terms


def _with_prior(
    model: RACNN, cfg: Config, out: RACNNOutput, attend: torch.Tensor, extra: Terms
) -> torch.Tensor:
    """``attend`` plus ``loss.prior_weight`` times the object prior (``prior`` into ``extra``): the scale-1 box
    stays near the object scale 1's own map shows."""
    if not _prior_maps(cfg, model.cfg.num_scales):
        return attend
    box_min, box_max = model.cfg.box_min_side, model.cfg.box_max_side
    extra["prior"] = box_regression_loss(out.boxes[0].float(), aolm_boxes(out.maps[0], box_min, box_max))
    return attend + cfg.loss.prior_weight * extra["prior"]


def _prior_maps(cfg: Config, num_scales: int) -> bool:
    return cfg.loss.prior_weight > 0 and num_scales > 1


def _classify_terms(
    model: RACNN, cfg: Config, out: RACNNOutput, images: torch.Tensor, labels: torch.Tensor, *_: Any
) -> Terms:
    """``cls``; the ranking loss for the log."""
    cls, rank, extra, terms = _ranked(model, cfg, out, labels)
    return {"loss": cls, "cls": cls, "rank": rank, **extra, **terms}


def _attend_terms(
    model: RACNN, cfg: Config, out: RACNNOutput, images: torch.Tensor, labels: torch.Tensor, *_: Any
) -> Terms:
    """``rank + prior_weight * prior``; the cross-entropies for the log."""
    cls, rank, extra, terms = _ranked(model, cfg, out, labels)
    loss = _with_prior(model, cfg, out, rank, extra)
    return {"loss": loss, "cls": cls, "rank": rank, **extra, **terms}


def _joint_terms(
    model: RACNN, cfg: Config, out: RACNNOutput, images: torch.Tensor, labels: torch.Tensor, *_: Any
) -> Terms:
    """``cls + rank_weight * rank + prior_weight * prior``."""
    cls, rank, extra, terms = _ranked(model, cfg, out, labels)
    attend = _with_prior(model, cfg, out, cfg.loss.rank_weight * rank, extra)
    return {"loss": cls + attend, "cls": cls, "rank": rank, **extra, **terms}


def _search_terms(
    model: RACNN,
    cfg: Config,
    out: RACNNOutput,
    images: torch.Tensor,
    labels: torch.Tensor,
    autocast: Any,
    anchor: nn.ModuleList | None,
) -> Terms:
    """``search``, every APN's regression towards the box its finer scale ranks best
    (:func:`racnn.training.search.search_loss`); the ranking loss of the current boxes for the log."""
    probs = [true_class_prob(out.logits[k], labels) for k in model.scale_keys]
    rank = sum((h.mean() for h in ranking_hinges(probs, cfg.loss.rank_margin, detach_coarse=True)), 0.0)
    terms = search_loss(model, images, out, labels, cfg, anchor=anchor, autocast=autocast)
    return {"loss": terms["search"], "rank": torch.as_tensor(rank), **terms}


# ----------------------------------------------------------------------------------------------- phases


def _warmup_trains(cfg: Config) -> frozenset[str]:
    """``schedule.warmup_backbones=false``: the heads and fusion alone, so the APN initialisation reads the
    maps of the ImageNet features."""
    return CLASSIFIERS if cfg.schedule.warmup_backbones else CLASSIFIERS - {"backbone"}


# the heads learn to classify before the APN initialisation reads their class activation maps; APNs fixed
WARMUP = Phase(
    name="warmup",
    title="warm-up",
    trains=_warmup_trains,
    loss=_classify_terms,
    optimizers=("cls",),
    clip=True,
    lr_step=True,
    detach_boxes=True,
    images="fitted",
)
# each APN regresses towards its initialisation box for apn.init_steps steps; the crops are cut with detached
# boxes, so scale 2's target cannot move APN 1
APN_INIT = Phase(
    name="apn_init",
    title="APN initialisation",
    trains=lambda cfg: APNS,
    loss=_apn_init_terms,
    optimizers=("apn_init",),
    clip=False,
    lr_step=False,
    detach_crops=True,
    maps=lambda cfg, num_scales: True,
    steps=lambda cfg: cfg.apn.init_steps if cfg.model.num_scales > 1 else 0,
    probe=apn_saturation,
    initial_apns=True,
)
# the classifiers learn on the crops of fixed boxes
CLASSIFY = Phase(
    name="classify",
    title="classification",
    trains=lambda cfg: CLASSIFIERS,
    loss=_classify_terms,
    optimizers=("cls",),
    clip=True,
    lr_step=True,
    detach_boxes=True,
    images="fitted",
)
# the APNs learn from the ranking loss's gradient through the crops; classifiers fixed, BatchNorm too
ATTEND = Phase(
    name="attend",
    title="attention",
    trains=lambda cfg: APNS,
    loss=_attend_terms,
    optimizers=("apn",),
    clip=True,
    lr_step=False,
    maps=_prior_maps,
    images="held_out",
)
# the attention phase of apn.update=search (racnn.training.search): each APN regresses towards the neighbouring
# box the finer scale ranks best; the crops are cut with detached boxes, so each APN learns its own target
ATTEND_SEARCH = Phase(
    name="attend",
    title="attention (search)",
    trains=lambda cfg: APNS,
    loss=_search_terms,
    optimizers=("apn",),
    clip=False,
    lr_step=False,
    detach_crops=True,
    anchor=lambda cfg: cfg.apn.search_anchor,
    images="held_out",
)
# both losses every step, everything trains
JOINT = Phase(
    name="joint",
    title="joint",
    trains=lambda cfg: CLASSIFIERS | APNS,
    loss=_joint_terms,
    optimizers=("cls", "apn"),
    clip=True,
    lr_step=True,
    maps=_prior_maps,
)


def attend_phase(cfg: Config) -> Phase:
    """The attention phase that ``apn.update`` asks for: the ranking loss's gradient, or the search update."""
    return ATTEND_SEARCH if cfg.apn.update == "search" else ATTEND


def set_phase(model: RACNN, phase: Phase, cfg: Config) -> None:
    """Freeze what ``phase`` keeps fixed under ``cfg``. Frozen parts also go to eval mode, so BatchNorm
    statistics and dropout stay put: in the attention phase no classifier tensor (parameter or buffer)
    changes."""
    trains = phase.trains(cfg)
    for group, params in model.parameter_groups().items():
        for p in params:
            p.requires_grad_(group in trains)
    model.train()
    if "head" not in trains:
        for m in (model.heads, model.fusions, model.dropout):
            m.eval()
    if "backbone" not in trains:
        model.backbones.eval()
    if "apn" not in trains:
        model.apns.eval()
