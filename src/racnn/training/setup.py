"""What a run needs besides the model: device, seeds, data loaders (reading the model's preprocessing),
optimisers and learning-rate schedules for the two alternating parts."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..backbones import Preprocessing
from ..config import Config, OptimConfig
from ..data import build_dataset, build_transform
from ..model import RACNN


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name}: CUDA is not available on this machine; use cpu or auto")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def make_dataset(cfg: Config, split: str, preprocessing: Preprocessing, *, train: bool) -> Dataset:
    """A split of the configured dataset, transformed with the model's normalisation."""
    if cfg.data.root is None and cfg.data.name != "synthetic":
        raise ValueError("no dataset folder: pass --data DIR or set data.root in the config")
    transform = build_transform(
        size=cfg.data.image_size,
        mean=preprocessing.mean,
        std=preprocessing.std,
        train=train and cfg.data.augment,
        crop_scale_min=cfg.data.crop_scale_min,
    )
    return build_dataset(
        cfg.data.name,
        cfg.data.root,
        split,
        transform,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.train.seed,
        max_images=cfg.data.max_images,
    )


def make_loader(
    dataset: Dataset, cfg: Config, *, train: bool = False, world_size: int = 1, rank: int = 0
) -> DataLoader:
    """Training loaders shuffle with a ``DistributedSampler`` (seeded by ``train.seed`` and the epoch via
    ``loader.sampler.set_epoch``; one replica without DDP) and keep their workers across epochs."""
    workers = cfg.data.num_workers
    sampler = (
        DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed)
        if train
        else None
    )
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=train and workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )


def make_optimizers(model: RACNN, o: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Classifier optimiser (backbones at ``lr * backbone_lr_mult``, heads and fusion at ``lr``) and the APN
    optimiser; each steps only in its own phase."""
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
        cls_opt = torch.optim.AdamW(cls_groups, lr=o.lr, weight_decay=o.weight_decay)
    apn_params = [{"params": groups["apn"], "lr": o.apn_lr, "name": "apn"}]
    if o.apn_optimizer == "adam":
        apn_opt: torch.optim.Optimizer = torch.optim.Adam(apn_params, lr=o.apn_lr)
    else:
        apn_opt = torch.optim.SGD(apn_params, lr=o.apn_lr, momentum=o.momentum)
    return cls_opt, apn_opt


def make_scheduler(
    opt: torch.optim.Optimizer, o: OptimConfig, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule over the epochs in which ``opt`` steps."""
    if o.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if o.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
