"""How a training process runs on this machine: the model placed for training (on :mod:`racnn.runtime`'s
device and memory format, with the crop mode and synchronised BatchNorm), the random generators, and Ctrl-C;
the device, autocast and the memory format themselves are :mod:`racnn.runtime`'s (imported here for the
trainer)."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..config import RuntimeConfig
from ..model import RACNN
from ..runtime import autocast, place_batch, place_model, resolve_device
from .ddp import sync_batchnorm
from .distributed import DistEnv

__all__ = [
    "autocast",
    "place_batch",
    "place_for_training",
    "raise_if_interrupted",
    "resolve_device",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "sturdy_ctrl_c",
]


def place_for_training(model: RACNN, cfg: RuntimeConfig, *, device: torch.device, env: DistEnv) -> RACNN:
    """``model`` set up to train on ``device`` as ``cfg`` says (compiled crop, activation checkpointing,
    memory format), its BatchNorm synchronised over the processes of ``env``
    (:func:`racnn.training.ddp.sync_batchnorm`): the module whose parameters the optimisers hold."""
    model.compile_crop = cfg.compile_crop
    model.checkpoint_activations = cfg.checkpoint_activations
    model.to(device)
    model = sync_batchnorm(model, device, env)
    return place_model(model, device, channels_last=cfg.channels_last)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """The random generators a resumed run restores (CPU, and every CUDA device when there is one)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


_ctrl_c = {"requested": False}


@contextlib.contextmanager
def sturdy_ctrl_c() -> Iterator[None]:
    """Inside, Ctrl-C raises ``KeyboardInterrupt`` as usual and is also remembered: Python drops an exception
    raised while it runs fork handlers (a DataLoader starting workers), so :func:`raise_if_interrupted` (at
    every batch of a :class:`Loader`) raises it again. Only replaces Python's default SIGINT handler, and only
    in the main thread."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def remember(signum: int, frame: Any) -> None:
        _ctrl_c["requested"] = True
        raise KeyboardInterrupt

    _ctrl_c["requested"] = False
    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _ctrl_c["requested"] = False


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C came (inside :func:`sturdy_ctrl_c`) and was swallowed."""
    if _ctrl_c["requested"]:
        raise KeyboardInterrupt
