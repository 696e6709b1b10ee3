"""Where a run stands, and the training checkpoint ``last.pt`` that holds it with the model and optimisers:
what a run killed at any moment resumes from (exactly, in deterministic mode)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import TRAIN_FORMAT, CheckpointError, load_checkpoint, model_record
from ..config import Config
from ..model import RACNN
from . import runtime
from .optim import Optimizers
from .outputs import RunFolder
from .schedule import PhaseSchedule


@dataclass
class RunState:
    """A run's progress: the schedule's, the selected model's, the APNs' initial state and the log's."""

    schedule: PhaseSchedule
    best: float = -math.inf  # the selected model's score (train.select)
    best_epoch: int = -1
    # the APNs' state right after their initialisation: the test compares their boxes with the learned ones
    apn_init: dict[str, torch.Tensor] | None = None
    log_bytes: int = 0  # metrics.jsonl's size when last.pt was written (-1: unknown, a run of an old release)
    saved_epoch: int = 0  # the epochs done in last.pt
    resumed: bool = False

    def checkpoint(
        self, model: RACNN, cfg: Config, classes: list[str], optimizers: Optimizers
    ) -> dict[str, Any]:
        """The training state ``last.pt`` holds: the model, its config and runtime, the optimisers, this
        progress and the random generators."""
        return {
            **model_record(model, cfg, classes),
            "runtime": cfg.to_dict()["runtime"],
            "format": TRAIN_FORMAT,
            **optimizers.state_dict(),
            "progress": {
                "schedule": self.schedule.state_dict(),
                "apn_init_done": self.schedule.apn_init_done,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "log_bytes": self.log_bytes,
            },
            "rng": runtime.rng_state(),
            **({"apn_init": self.apn_init} if self.apn_init is not None else {}),
        }

    def load(
        self,
        s: dict[str, Any],
        *,
        model: RACNN,
        optimizers: Optimizers,
        cfg: Config,
        classes: list[str],
        where: str,
    ) -> None:
        """Continue from the training state ``s`` (read from ``where``): model, optimisers, progress, random
        generators. A state of other classes or of another model is a :class:`CheckpointError`."""
        saved = list(s.get("classes", classes))
        if saved != classes:
            raise CheckpointError(
                f"{where}: saved for {len(saved)} classes, but {cfg.data.root} now has "
                f"{len(classes)} (or other names); resume with the dataset the run started with"
            )
        try:
            model.load_state_dict(s["model"])
            optimizers.load_state_dict(s)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = f"a {cfg.model.backbone} RA-CNN with {len(classes)} classes"
            raise CheckpointError(f"{where}: does not fit {what} ({first[:200]})") from e
        p = s["progress"]
        self.schedule.load_state_dict(p["schedule"])
        self.schedule.apn_init_done = p["apn_init_done"]
        self.best, self.best_epoch = p["best"], p["best_epoch"]
        self.apn_init = s.get("apn_init")
        self.saved_epoch = self.schedule.epoch
        self.log_bytes = p.get("log_bytes", -1)
        self.resumed = True
        runtime.set_rng_state(s["rng"])


def read_resume(run: RunFolder) -> tuple[dict[str, Any], Config]:
    """The training state a resumed run continues from, and its config (the one saved in it). An
    ``--overwrite`` stopped before the new run's first checkpoint left the old run aside: that one is resumed
    (:meth:`RunFolder.start` moves it back)."""
    aside = run.aside / run.last.name
    state = load_checkpoint(aside if not run.last.exists() and aside.is_file() else run.last)
    if state.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{run.last}: not a training state (resume needs a last.pt)")
    cfg = Config.from_dict(state["config"] | {"runtime": state.get("runtime", {})}, source=str(run.last))
    return state, cfg


@contextlib.contextmanager
def initial_apns(model: RACNN, state: dict[str, torch.Tensor]) -> Iterator[RACNN]:
    """``model`` with its APNs set to ``state`` (their state after the APN initialisation) inside, its own
    APNs restored after: the learned boxes against the initial ones under the same classifiers."""
    learned = {k: v.detach().clone() for k, v in model.apns.state_dict().items()}
    model.apns.load_state_dict(state)
    try:
        yield model
    finally:
        model.apns.load_state_dict(learned)
