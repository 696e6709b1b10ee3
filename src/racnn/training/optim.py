"""Optimisers and learning-rate schedules: one for the classifiers (backbones, heads, fusion), one for the
APNs, one for the APN initialisation; each steps only in the phases that name it
(:attr:`racnn.training.phases.Phase.optimizers`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config import Config, OptimConfig
from ..model import RACNN

if TYPE_CHECKING:
    from .phases import Phase


@dataclass
class Optimizers:
    """A run's optimisers by name, the names a phase's ``optimizers`` gives; ``cls_lr``: the classifiers'
    learning-rate schedule, which steps after each epoch of a phase whose ``lr_step`` says so."""

    cls: torch.optim.Optimizer  # backbones, heads, fusion (``optim``)
    apn: torch.optim.Optimizer  # the APNs in the attention phases (``apn.lr``)
    apn_init: torch.optim.Optimizer  # the APNs in their initialisation (``apn.init_lr``); not checkpointed
    cls_lr: torch.optim.lr_scheduler.LRScheduler

    def stepped_by(self, phase: Phase) -> list[torch.optim.Optimizer]:
        """The optimisers ``phase`` steps."""
        return [getattr(self, name) for name in phase.optimizers]

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``optimizers`` and ``schedulers``."""
        return {
            "optimizers": {"cls": self.cls.state_dict(), "apn": self.apn.state_dict()},
            "schedulers": {"cls": self.cls_lr.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a checkpoint; each optimiser keeps its own ``fused`` flag (:func:`keep_fused`)."""
        self.cls.load_state_dict(keep_fused(self.cls, state["optimizers"]["cls"]))
        self.apn.load_state_dict(keep_fused(self.apn, state["optimizers"]["apn"]))
        self.cls_lr.load_state_dict(state["schedulers"]["cls"])


def run_optimizers(
    model: RACNN,
    cfg: Config,
    *,
    lr_epochs: int,
    given: Sequence[torch.optim.Optimizer] | None = None,
) -> Optimizers:
    """A run's :class:`Optimizers`: the pair (classifiers, APNs) ``given``, else :func:`make_optimizers`'; the
    APN initialisation's Adam; the classifiers' schedule over ``lr_epochs`` epochs."""
    cls_opt, apn_opt = given or make_optimizers(model, cfg)
    apn = model.parameter_groups()["apn"]
    init = torch.optim.Adam([{"params": apn}], lr=cfg.apn.init_lr, fused=fused_ok(apn))  # (no APN: 1 scale)
    return Optimizers(cls_opt, apn_opt, init, make_scheduler(cls_opt, cfg.optim, lr_epochs))


def make_optimizers(model: RACNN, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Classifier optimiser (``optim``: backbones at ``lr * backbone_lr_mult``, heads and fusion at ``lr``) and
    the APN optimiser (``apn``); each steps only in its own phase."""
    o, a = cfg.optim, cfg.apn
    groups = model.parameter_groups()
    cls_groups = [
        {"params": groups["backbone"], "lr": o.lr * o.backbone_lr_mult, "name": "backbone"},
        {"params": groups["head"], "lr": o.lr, "name": "head"},
    ]
    if o.name == "sgd":
        cls_opt: torch.optim.Optimizer = torch.optim.SGD(
            cls_groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.momentum > 0
        )
    else:
        fused = fused_ok(groups["backbone"] + groups["head"])
        cls_opt = torch.optim.AdamW(cls_groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    apn_params = [{"params": groups["apn"], "lr": a.lr, "name": "apn"}]
    if a.optimizer == "adam":
        # fused: one kernel per step instead of a chain of per-tensor ops; the APN's first layer can hold
        # 64 M weights (MobileNetV2, apn_grid 7), where the for-loop Adam step took 0.67 s on a CPU core
        # and the fused one 0.08 s (docs/performance.md)
        apn_opt: torch.optim.Optimizer = torch.optim.Adam(apn_params, lr=a.lr, fused=fused_ok(groups["apn"]))
    else:
        apn_opt = torch.optim.SGD(apn_params, lr=a.lr, momentum=o.momentum)
    return cls_opt, apn_opt


def fused_ok(params: list[torch.nn.Parameter]) -> bool | None:
    """``fused=True`` where torch has fused Adam kernels (floating-point parameters on CPU or CUDA), else
    torch's default."""
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def keep_fused(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with each parameter group's ``fused`` flag set to ``opt``'s: ``load_state_dict`` takes the
    saved groups' options, so a run resumed from a checkpoint of an unfused optimiser would silently run
    unfused (or fused where this machine has no kernel)."""
    groups = [{**g, "fused": opt.defaults.get("fused")} for g in state["param_groups"]]
    return {**state, "param_groups": groups}


def make_scheduler(
    opt: torch.optim.Optimizer, o: OptimConfig, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule over the epochs in which ``opt`` steps."""
    if o.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if o.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
