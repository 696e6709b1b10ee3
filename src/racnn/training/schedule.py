"""The paper's alternating schedule (Sec. 3.4): classification phases (APNs fixed) and attention phases
(classifiers fixed), repeated until both losses converge or the epoch budget is spent; or a joint mode.

The schedule decides which phase each epoch belongs to and when to stop; it holds only primitives so its
state goes into the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..config import ScheduleConfig
from ..model import RACNN

CLASSIFY, ATTEND, JOINT, WARMUP = "classify", "attend", "joint", "warmup"


@dataclass
class PhaseSchedule:
    cfg: ScheduleConfig
    epochs: int
    # state (checkpointed)
    epoch: int = 0  # epochs finished
    phase: str = ""  # phase of the epoch in progress / last finished
    phase_epoch: int = 0  # epochs finished in the current phase
    phase_losses: list[float] = field(default_factory=list)  # epoch losses of the current phase
    last: dict[str, float] = field(default_factory=dict)  # mean loss of the last finished phase per kind
    converged: dict[str, bool] = field(default_factory=dict)
    stopped: str = ""  # why the run stopped early ("" while running)

    def _length(self, phase: str) -> int:
        return {CLASSIFY: self.cfg.classify_epochs, ATTEND: self.cfg.attend_epochs}.get(phase, 1)

    def next_phase(self) -> str | None:
        """Phase of the next epoch, or None when the budget is spent or both phases converged."""
        if self.epoch >= self.epochs or self.stopped:
            return None
        if self.epoch < self.cfg.warmup_epochs:
            return WARMUP
        if self.cfg.mode == JOINT:
            return JOINT
        if self.phase in ("", WARMUP):
            return CLASSIFY
        if self.phase_epoch < self._length(self.phase):
            return self.phase
        return ATTEND if self.phase == CLASSIFY else CLASSIFY

    def start_epoch(self, phase: str) -> None:
        if phase != self.phase or self.phase_epoch >= self._length(phase):
            self.phase, self.phase_epoch, self.phase_losses = phase, 0, []

    def end_epoch(self, loss: float) -> None:
        """Record the epoch's mean loss; at a phase's end apply the convergence rule: a phase kind has
        converged when its mean loss improved by less than ``converge_tol`` (relative) since its last phase;
        the run stops once every kind has converged in the same cycle."""
        self.epoch += 1
        self.phase_epoch += 1
        self.phase_losses.append(loss)
        if self.phase_epoch < self._length(self.phase) or self.phase == WARMUP:
            return
        mean = sum(self.phase_losses) / len(self.phase_losses)
        prev = self.last.get(self.phase)
        if prev is not None and self.cfg.converge_tol > 0:
            self.converged[self.phase] = (prev - mean) < self.cfg.converge_tol * max(abs(prev), 1e-8)
        self.last[self.phase] = mean
        kinds = [JOINT] if self.cfg.mode == JOINT else [CLASSIFY, ATTEND]
        if all(self.converged.get(k, False) for k in kinds):
            self.stopped = "converged"

    def planned_epochs(self, phase: str) -> int:
        """How many of the budget's epochs would be of ``phase`` without early stopping (for LR schedules)."""
        warm = min(self.cfg.warmup_epochs, self.epochs)
        if phase == WARMUP:
            return warm
        if self.cfg.mode == JOINT:
            return self.epochs - warm if phase == JOINT else 0
        cycle = self.cfg.classify_epochs + self.cfg.attend_epochs
        full, rest = divmod(self.epochs - warm, cycle)
        if phase == CLASSIFY:
            return full * self.cfg.classify_epochs + min(rest, self.cfg.classify_epochs)
        return full * self.cfg.attend_epochs + max(0, rest - self.cfg.classify_epochs)

    def state_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cfg")
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if k != "epochs":
                setattr(self, k, v)


def set_phase(model: RACNN, phase: str, *, backbones: bool = True) -> None:
    """Freeze what the phase keeps fixed. Frozen parts also go to eval mode, so BatchNorm statistics and
    dropout stay put: in the attention phase no classifier tensor (parameter or buffer) changes.
    ``backbones=False`` also keeps the backbones fixed in a classifier phase (a heads-only warm-up)."""
    groups = model.parameter_groups()
    train_cls = phase in (CLASSIFY, JOINT, WARMUP)
    train_apn = phase in (ATTEND, JOINT, "apn_init")
    for p in groups["backbone"]:
        p.requires_grad_(train_cls and backbones)
    for p in groups["head"]:
        p.requires_grad_(train_cls)
    for p in groups["apn"]:
        p.requires_grad_(train_apn)
    model.train()
    if not train_cls:
        for m in (model.heads, model.fusions, model.dropout):
            m.eval()
    if not (train_cls and backbones):
        model.backbones.eval()
    if not train_apn:
        model.apns.eval()


def trainable(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]
