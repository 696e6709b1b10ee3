"""One training step of any phase (:class:`racnn.training.phases.Phase`): the forward pass, the phase's loss,
the backward pass and the optimiser steps. The trainer and ``benchmarks/speed.py`` both run it, so the
benchmark times what training does. Also the watch for a non-finite loss and a training epoch's record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config import Config
from ..evaluation import Accumulator
from ..model import RACNN, RACNNOutput
from .distributed import DistEnv, all_reduce_min, all_reduce_sum, broadcast_object, gather_accumulator
from .phases import Phase

Forward = Callable[..., RACNNOutput]  # the model, or its DDP wrapper


def train_step(
    model: RACNN,
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    phase: Phase,
    cfg: Config,
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    autocast: Any,
    anchor: torch.nn.ModuleList | None = None,
) -> tuple[dict[str, torch.Tensor], RACNNOutput]:
    """One step of ``phase`` on the batch ``x`` (B x 3 x S x S), ``y`` (B): forward (under ``autocast``, the
    crops seeing the boxes as the phase says), the phase's loss, backward, gradient clipping
    (``optim.grad_clip``, where the phase clips) and a step of ``optimizers``, those the phase steps
    (:meth:`racnn.training.optim.Optimizers.stepped_by`). The model must already be in the phase
    (:func:`racnn.training.phases.set_phase`); ``anchor``: the APNs as the epoch began, for a phase that reads
    them (``Phase.anchor``). Returns the loss terms and the model's output."""
    with autocast:
        out = forward(
            x,
            detach_boxes=phase.detach_boxes,
            detach_crops=phase.detach_crops,
            return_maps=phase.maps(cfg, model.cfg.num_scales),
        )
    terms = phase.loss(model, cfg, out, x, y, autocast, anchor)
    loss = terms["loss"]
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
        if cfg.optim.grad_clip and phase.clip:
            params = [p for p in model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        for o in optimizers:
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
