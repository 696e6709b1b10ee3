"""The paper's alternating schedule (Sec. 3.4): classification phases (APNs fixed) and attention phases
(classifiers fixed), repeated until both losses converge or the epoch budget is spent; or a joint mode.

The schedule decides which phase each epoch belongs to and when to stop; it holds only primitives so its
state goes into the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import Config, ScheduleConfig
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


def class_activation(fmap: torch.Tensor, head: nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """Class activation map (Zhou et al. 2016) of the true class: B x C x h x w -> B x 1 x h x w."""
    w = head.weight[target].to(fmap.dtype)  # B x C
    return torch.einsum("bchw,bc->bhw", fmap, w)[:, None]


def _smoothed_response(fmap: torch.Tensor) -> torch.Tensor:
    """Channel sum of the last conv layer smoothed by a 3x3 binomial kernel (a single peak stays the
    maximum; borders renormalised). B x C x h x w -> B x 1 x h x w."""
    k1 = torch.tensor([1.0, 2.0, 1.0], device=fmap.device)
    kernel = (k1[:, None] * k1[None, :])[None, None]  # 1 x 1 x 3 x 3
    resp = torch.nn.functional.conv2d(fmap.float().sum(1, keepdim=True), kernel, padding=1)
    norm = torch.nn.functional.conv2d(torch.ones_like(resp[:1]), kernel, padding=1)  # border correction
    return resp / norm


def _square_inside(cx: torch.Tensor, cy: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """(cx, cy, half side) of a square of ``side`` moved inside the unit image. B, B, B -> B x 3."""
    half = side / 2
    return torch.stack([cx.clamp(half, 1 - half), cy.clamp(half, 1 - half), half], 1)


def peak_response_boxes(fmap: torch.Tensor, side: float) -> torch.Tensor:
    """APN initialisation target (Sec. 3.4 step 2): a square of ``side`` centred on the strongest response of
    the last conv layer, moved inside the image. B x C x h x w -> B x 3."""
    _, _, h, w = fmap.shape
    idx = _smoothed_response(fmap).flatten(1).argmax(1)  # B
    cy = ((idx // w).float() + 0.5) / h
    cx = ((idx % w).float() + 0.5) / w
    return _square_inside(cx, cy, torch.full_like(cx, side))


def region_response_boxes(
    fmap: torch.Tensor, threshold: float, min_side: float, max_side: float
) -> torch.Tensor:
    """APN initialisation target sized to the response: the bounding box of the cells whose response
    (smoothed as for :func:`peak_response_boxes`, so an isolated peak counts with its ring of neighbours) is
    at least ``threshold`` of the way from the image's minimum to its maximum (the CAM localisation rule of
    Zhou et al. 2016), turned into the square of the same centre and area (side sqrt(w h)), side clamped to
    the APN's range [min_side, max_side], moved inside the image. Where the paper's fixed-side square keeps
    every box the same size, this one follows the object's extent. B x C x h x w -> B x 3."""
    _, _, h, w = fmap.shape
    resp = _smoothed_response(fmap)[:, 0]  # B x h x w
    lo = resp.amin((1, 2), keepdim=True)
    hi = resp.amax((1, 2), keepdim=True)
    hot = resp >= lo + threshold * (hi - lo)  # B x h x w; the maximum is always in
    rows, cols = hot.any(2), hot.any(1)  # B x h, B x w
    ar_h = torch.arange(h, device=fmap.device)
    ar_w = torch.arange(w, device=fmap.device)
    # first and last hot row / column (a flat response makes every cell hot: the whole image)
    y0 = torch.where(rows, ar_h, h).amin(1).float() / h
    y1 = (torch.where(rows, ar_h, -1).amax(1).float() + 1) / h
    x0 = torch.where(cols, ar_w, w).amin(1).float() / w
    x1 = (torch.where(cols, ar_w, -1).amax(1).float() + 1) / w
    side = ((x1 - x0) * (y1 - y0)).sqrt().clamp(min_side, max_side)
    return _square_inside((x0 + x1) / 2, (y0 + y1) / 2, side)


@torch.no_grad()
def apn_init_target(
    model: RACNN, cfg: Config, s: int, fmap: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The box (B x 3) the APN of scale ``s`` is initialised towards (Sec. 3.4), from that scale's last conv
    map ``fmap`` (B x C x h x w): its channel sum or the activation map of class ``target`` (B), then the
    ``peak`` square or the ``region`` box that ``schedule.apn_init_box`` names for this APN."""
    sch, m, fmap = cfg.schedule, cfg.model, fmap.detach().float()
    if sch.apn_init_response == "cam":
        fmap = class_activation(fmap, model.heads[s], target)
    kinds = sch.apn_init_box.split(",")
    if kinds[min(s, len(kinds) - 1)] == "region":
        return region_response_boxes(fmap, sch.apn_init_threshold, m.box_min_side, m.box_max_side)
    return peak_response_boxes(fmap, sch.apn_init_side)


@torch.no_grad()  # a measurement: no graph through three backbones
def apn_saturation(model: RACNN, x: torch.Tensor) -> dict[str, float]:
    """Share of each APN's tanh units past |3| (gradient under 1 % of its peak) on the batch ``x``: near 1
    means the initialisation learning rate was too high and every image gets the same box."""
    pre: dict[int, torch.Tensor] = {}
    hooks = [
        apn.fc1.register_forward_hook(lambda _m, _i, o, s=s: pre.__setitem__(s, o))
        for s, apn in enumerate(model.apns)
    ]
    try:
        model(x)  # float32: under autocast a frozen-weight fast path skips fc1's hook
    finally:
        for h in hooks:
            h.remove()
    return {f"apn_saturation_s{s + 1}": float((v.float().abs() > 3).float().mean()) for s, v in pre.items()}
