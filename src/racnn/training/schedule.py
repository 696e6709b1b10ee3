"""The paper's alternating schedule (Sec. 3.4): which :class:`racnn.training.phases.Phase` runs next.

Warm-up epochs, then the APN initialisation, then classification and attention phases alternating (or joint
epochs) until both losses converge or the epoch budget is spent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import ScheduleConfig
from .phases import APN_INIT, ATTEND, CLASSIFY, JOINT, WARMUP, Phase


@dataclass
class PhaseSchedule:
    """Which phase runs next: ``warmup`` epochs, the APN initialisation (once), then classification and
    attention phases alternating (or ``joint`` epochs), until the budget of ``epochs`` is spent or both kinds
    of phase converge. ``attend``: the attention phase's kind (:func:`racnn.training.phases.attend_phase`). Its
    state holds only primitives (phase names), so it goes into the checkpoint."""

    cfg: ScheduleConfig
    epochs: int
    attend: Phase = ATTEND
    # state (checkpointed)
    epoch: int = 0  # epochs finished
    phase: str = ""  # name of the phase of the epoch in progress / last finished
    phase_epoch: int = 0  # epochs finished in the current phase
    phase_losses: list[float] = field(default_factory=list)  # epoch losses of the current phase
    last: dict[str, float] = field(default_factory=dict)  # mean loss of the last finished phase per kind
    converged: dict[str, bool] = field(default_factory=dict)
    stopped: str = ""  # why the run stopped early ("" while running)
    apn_init_done: bool = False  # the APN initialisation has run (the checkpoint keeps it beside this state)

    def _length(self, name: str) -> int:
        return {CLASSIFY.name: self.cfg.classify_epochs, ATTEND.name: self.cfg.attend_epochs}.get(name, 1)

    def next_phase(self) -> Phase | None:
        """The next phase, or None when the budget is spent or both phases converged."""
        if self.epoch >= self.epochs or self.stopped:
            return None
        if self.epoch < self.cfg.warmup_epochs:
            return WARMUP
        if not self.apn_init_done:
            return APN_INIT
        if self.cfg.mode == JOINT.name:
            return JOINT
        if self.phase in ("", WARMUP.name):
            return CLASSIFY
        if self.phase_epoch < self._length(self.phase):
            return self.attend if self.phase == ATTEND.name else CLASSIFY
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

    def end_steps(self, phase: Phase) -> None:
        """A phase of fixed steps (``phase.steps``) has run: the APN initialisation, once per run."""
        assert phase is APN_INIT, phase
        self.apn_init_done = True

    def planned_epochs(self, phase: Phase) -> int:
        """How many of the budget's epochs would be of ``phase`` without early stopping."""
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

    def last_attention_epoch(self) -> int:
        """The budget's last attention epoch (0-based; -1: none), early stopping aside: the alternating
        schedule puts attention epochs at the end of each cycle of ``classify_epochs + attend_epochs`` after
        the warm-up."""
        if self.cfg.mode == JOINT.name:
            return -1
        warm = min(self.cfg.warmup_epochs, self.epochs)
        c, cycle = self.cfg.classify_epochs, self.cfg.classify_epochs + self.cfg.attend_epochs
        full, rest = divmod(self.epochs - warm, cycle)
        return warm + full * cycle + rest - 1 if rest > c else warm + full * cycle - 1 if full else -1

    def attention_ahead(self) -> bool:
        """Whether an attention epoch of the budget is still to come after the epochs finished so far (the
        epoch about to run is ``epoch``, 0-based), early stopping aside."""
        return self.last_attention_epoch() > self.epoch

    def lr_epochs(self) -> int:
        """How many of the budget's epochs step the classifiers' learning-rate schedule (``Phase.lr_step``)."""
        return sum(self.planned_epochs(p) for p in (WARMUP, CLASSIFY, self.attend, JOINT) if p.lr_step)

    def state_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("cfg", "attend", "apn_init_done"):
            d.pop(k)
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if k != "epochs":
                setattr(self, k, v)
