"""The phases of RA-CNN's training and the paper's alternating schedule (Sec. 3.4).

A :class:`Phase` says what one kind of epoch trains, how its crops see the boxes, which loss it minimises
and which optimisers step: warm-up, APN initialisation, classification (APNs fixed), attention (classifiers
fixed) and joint. :class:`PhaseSchedule` decides which phase each epoch is, classification and attention
alternating until both losses converge or the epoch budget is spent; :func:`set_phase` freezes the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..config import Config, ScheduleConfig
from ..model import RACNN


@dataclass(frozen=True)
class Phase:
    """One kind of training epoch (paper Sec. 3.4): what it trains, how the crops see the boxes, the loss it
    minimises and the optimisers that step. :func:`racnn.training.step.train_step` runs a batch of any phase."""

    name: str
    trains: frozenset[str]  # parameter groups (RACNN.parameter_groups): "backbone", "head", "apn"
    # "cls": the cross-entropies; "rank": Eq. 8 (and the object prior); "box": APN init; "search": the
    # search update's regression (racnn.training.search)
    losses: tuple[str, ...]
    optimizers: tuple[str, ...]  # "cls" (optim), "apn" (apn.lr), "apn_init" (apn.init_lr)
    detach_boxes: bool = False  # the crops are cut with fixed boxes: no gradient reaches the APNs
    detach_crops: bool = False  # the boxes keep their gradient, but nothing of scale s+1 depends on APN s

    def trained(self, cfg: Config) -> frozenset[str]:
        """The groups this phase trains under ``cfg`` (a heads-only warm-up keeps the backbones fixed)."""
        if self.name == "warmup" and not cfg.schedule.warmup_backbones:
            return self.trains - {"backbone"}
        return self.trains

    def __str__(self) -> str:
        return self.name


CLASSIFIERS = frozenset({"backbone", "head"})
# the heads learn to classify before the APN initialisation reads their class activation maps
WARMUP = Phase("warmup", CLASSIFIERS, ("cls",), ("cls",), detach_boxes=True)
# each APN regresses towards its initialisation box; crops cut with detached boxes, so scale 2's target
# cannot move APN 1
APN_INIT = Phase("apn_init", frozenset({"apn"}), ("box",), ("apn_init",), detach_crops=True)
CLASSIFY = Phase("classify", CLASSIFIERS, ("cls",), ("cls",), detach_boxes=True)  # APNs fixed
ATTEND = Phase("attend", frozenset({"apn"}), ("rank",), ("apn",))  # classifiers fixed, BatchNorm too
# the attention phase of apn.update=search (racnn.training.search): each APN regresses towards the neighbouring
# box the finer scale ranks best; the crops are cut with detached boxes, so each APN learns its own target
ATTEND_SEARCH = Phase("attend", frozenset({"apn"}), ("search",), ("apn",), detach_crops=True)
JOINT = Phase("joint", CLASSIFIERS | {"apn"}, ("cls", "rank"), ("cls", "apn"))  # both losses every step
PHASES = {p.name: p for p in (WARMUP, APN_INIT, CLASSIFY, ATTEND, JOINT)}


def attend_phase(cfg: Config) -> Phase:
    """The attention phase that ``apn.update`` asks for: the ranking loss's gradient, or the search update."""
    return ATTEND_SEARCH if cfg.apn.update == "search" else ATTEND


@dataclass
class PhaseSchedule:
    """Which :class:`Phase` each epoch of the budget is: ``warmup`` epochs, then classification and attention
    phases alternating (or ``joint`` epochs), until the budget is spent or both kinds of phase converge. Its
    state holds only primitives (phase names), so it goes into the checkpoint."""

    cfg: ScheduleConfig
    epochs: int
    attend: Phase = ATTEND  # the attention phase's kind (attend_phase)
    # state (checkpointed)
    epoch: int = 0  # epochs finished
    phase: str = ""  # name of the phase of the epoch in progress / last finished
    phase_epoch: int = 0  # epochs finished in the current phase
    phase_losses: list[float] = field(default_factory=list)  # epoch losses of the current phase
    last: dict[str, float] = field(default_factory=dict)  # mean loss of the last finished phase per kind
    converged: dict[str, bool] = field(default_factory=dict)
    stopped: str = ""  # why the run stopped early ("" while running)

    def _length(self, name: str) -> int:
        return {CLASSIFY.name: self.cfg.classify_epochs, ATTEND.name: self.cfg.attend_epochs}.get(name, 1)

    def next_phase(self) -> Phase | None:
        """Phase of the next epoch, or None when the budget is spent or both phases converged."""
        if self.epoch >= self.epochs or self.stopped:
            return None
        if self.epoch < self.cfg.warmup_epochs:
            return WARMUP
        if self.cfg.mode == JOINT.name:
            return JOINT
        if self.phase in ("", WARMUP.name):
            return CLASSIFY
        if self.phase_epoch < self._length(self.phase):
            return self.attend if self.phase == ATTEND.name else PHASES[self.phase]
        return self.attend if self.phase == CLASSIFY.name else CLASSIFY

    def start_epoch(self, phase: Phase) -> None:
        if phase.name != self.phase or self.phase_epoch >= self._length(phase.name):
            self.phase, self.phase_epoch, self.phase_losses = phase.name, 0, []

    def end_epoch(self, loss: float) -> None:
        """Record the epoch's mean loss; at a phase's end apply the convergence rule: a phase kind has
        converged when its mean loss improved by less than ``converge_tol`` (relative) since its last phase;
        the run stops once every kind has converged in the same cycle."""
        self.epoch += 1
        self.phase_epoch += 1
        self.phase_losses.append(loss)
        if self.phase_epoch < self._length(self.phase) or self.phase == WARMUP.name:
            return
        mean = sum(self.phase_losses) / len(self.phase_losses)
        prev = self.last.get(self.phase)
        if prev is not None and self.cfg.converge_tol > 0:
            self.converged[self.phase] = (prev - mean) < self.cfg.converge_tol * max(abs(prev), 1e-8)
        self.last[self.phase] = mean
        kinds = [JOINT.name] if self.cfg.mode == JOINT.name else [CLASSIFY.name, ATTEND.name]
        if all(self.converged.get(k, False) for k in kinds):
            self.stopped = "converged"

    def planned_epochs(self, phase: Phase) -> int:
        """How many of the budget's epochs would be of ``phase`` without early stopping (for LR schedules)."""
        warm = min(self.cfg.warmup_epochs, self.epochs)
        if phase is WARMUP:
            return warm
        if self.cfg.mode == JOINT.name:
            return self.epochs - warm if phase is JOINT else 0
        cycle = self.cfg.classify_epochs + self.cfg.attend_epochs
        full, rest = divmod(self.epochs - warm, cycle)
        if phase is CLASSIFY:
            return full * self.cfg.classify_epochs + min(rest, self.cfg.classify_epochs)
        if phase.name == ATTEND.name:
            return full * self.cfg.attend_epochs + max(0, rest - self.cfg.classify_epochs)
        return 0

    def state_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cfg")
        d.pop("attend")
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if k != "epochs":
                setattr(self, k, v)


def set_phase(model: RACNN, phase: Phase, cfg: Config | None = None) -> None:
    """Freeze what ``phase`` keeps fixed (``cfg``: for a heads-only warm-up). Frozen parts also go to eval
    mode, so BatchNorm statistics and dropout stay put: in the attention phase no classifier tensor
    (parameter or buffer) changes."""
    trains = phase.trained(cfg) if cfg is not None else phase.trains
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


def trainable(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]
