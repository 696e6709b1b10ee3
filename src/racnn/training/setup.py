"""What a run needs besides the model: device, seeds, data loaders (reading the model's preprocessing),
optimisers and learning-rate schedules for the two alternating parts."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ..backbones import Preprocessing
from ..config import Config, ConfigError, OptimConfig
from ..data import DatasetError, build_dataset, build_transform
from ..data.base import BadImage, SkipBadImages, check_labels, report_bad_images
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


def remove_stray_tmp(out: Path) -> None:
    """Delete the temporary files (``.last.pt.*.tmp``) of checkpoint writes killed half-way."""
    for tmp in out.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def trim_file(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes when it is longer (``size < 0``: leave it)."""
    if size >= 0 and path.is_file() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def make_dataset(
    cfg: Config, split: str, preprocessing: Preprocessing, *, train: bool, classes: list[str] | None = None
) -> Dataset:
    """A split of the configured dataset, transformed with the model's normalisation; its labels are checked,
    and its classes must be ``classes`` when given (another split's)."""
    if cfg.data.root is None and cfg.data.name != "synthetic":
        raise ValueError("no dataset folder: pass --data DIR or set data.root in the config")
    transform = build_transform(
        size=cfg.data.image_size,
        mean=preprocessing.mean,
        std=preprocessing.std,
        train=train and cfg.data.augment,
        crop_scale_min=cfg.data.crop_scale_min,
    )
    dataset = build_dataset(
        cfg.data.name,
        cfg.data.root,
        split,
        transform,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.train.seed,
        max_images=cfg.data.max_images,
    )
    check_labels(dataset)
    if classes is not None and list(dataset.classes) != list(classes):
        raise DatasetError(
            f"{cfg.data.root}: the {split} split has {len(dataset.classes)} classes, the training split "
            f"{len(classes)} (or other names)"
        )
    return dataset


def per_rank_batch(cfg: Config, world_size: int) -> int:
    """``train.batch_size`` is the global batch: each of ``world_size`` processes takes an equal share."""
    if cfg.train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the batch of all {world_size} processes together "
            f"and must be divisible by {world_size}"
        )
    return cfg.train.batch_size // world_size


def make_loader(
    dataset: Dataset, cfg: Config, *, train: bool = False, world_size: int = 1, rank: int = 0
) -> Loader:
    """Training loaders shuffle with a ``DistributedSampler`` (seeded by ``train.seed`` and the epoch via
    ``loader.sampler.set_epoch``; one replica without DDP), augment each image from its own seed (see
    :class:`SeededSampler`) and keep their workers across epochs. Evaluation loaders keep the dataset order;
    with ``world_size > 1`` rank r takes images r, r + N, ... Each process loads ``train.batch_size /
    world_size`` images per batch. With ``data.skip_bad_images`` unreadable images are skipped (training:
    replaced by the next readable one; evaluation: dropped) and counted in ``loader.bad_images``."""
    workers = cfg.data.num_workers
    skip = cfg.data.skip_bad_images
    sampler: Sampler | None = None
    if train:
        inner = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed
        )
        sampler = SeededSampler(inner, cfg.train.seed)
        dataset = _SeededItems(SkipBadImages(dataset, replace=True) if skip else dataset)
    else:
        if world_size > 1:
            sampler = _Shard(len(dataset), rank, world_size)  # type: ignore[arg-type]
        if skip:
            dataset = SkipBadImages(dataset, replace=False)
    return Loader(
        dataset,
        batch_size=per_rank_batch(cfg, world_size) if train else max(1, cfg.train.batch_size // world_size),
        sampler=sampler,
        num_workers=workers,
        persistent_workers=train and workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        collate_fn=_collate_skipping if skip and not train else None,
    )


class Loader(DataLoader):
    """A ``DataLoader`` whose dataset errors are one line (a worker's traceback is cut to its last line) and
    which counts the unreadable images skipped so far in ``bad_images``."""

    bad_images = 0

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DatasetError as e:
                raise DatasetError(_last_line(e)) from None
            raise_if_interrupted()
            if "bad" in batch:
                self.bad_images += int(batch["bad"].sum())
                report_bad_images(batch.pop("bad_messages", []))
            if "image" in batch:  # else every image of an evaluation batch was unreadable
                yield batch


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


def _last_line(e: Exception) -> str:
    """The original message of an exception re-raised by a DataLoader worker (``"Caught ... Original
    Traceback ... racnn.data.errors.DatasetError: <message>"``); other messages unchanged."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(e)
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    return lines[-1][len(prefix) :] if lines[-1].startswith(prefix) else lines[-1]


def _collate_skipping(items: list[dict[str, torch.Tensor] | BadImage]) -> dict[str, Any]:
    """Collate the readable items, count the others in ``"bad"`` and keep their messages."""
    good = [it for it in items if not isinstance(it, BadImage)]
    batch: dict[str, Any] = default_collate(good) if good else {}
    batch["bad"] = torch.tensor(len(items) - len(good), dtype=torch.int64)
    batch["bad_messages"] = [it.message for it in items if isinstance(it, BadImage)]
    return batch


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, seed)`` pairs: the wrapped sampler's index and a seed made of ``train.seed``, the epoch
    and the index. Each image's augmentation then depends on these alone, not on the worker that loads it, the
    number of processes or what ran before: a resumed run (with or without workers) and a DDP run see the
    same crops as an uninterrupted single-process run."""

    def __init__(self, inner: DistributedSampler, seed: int) -> None:
        self.inner, self.seed, self.epoch = inner, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.inner:  # 32 bits: what seeds torch's CPU generator
            digest = hashlib.blake2b(f"{self.seed},{self.epoch},{i}".encode(), digest_size=4).digest()
            yield i, int.from_bytes(digest, "little")


class _SeededItems(Dataset):
    """``dataset[(index, seed)]``: item ``index`` with the CPU generator seeded by ``seed`` (its state is
    restored after, so the training process's own random stream is untouched)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class _Shard(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: an evaluation shard (no padding, no repeats)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


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
        fused = fused_ok(groups["backbone"] + groups["head"])
        cls_opt = torch.optim.AdamW(cls_groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    apn_params = [{"params": groups["apn"], "lr": o.apn_lr, "name": "apn"}]
    if o.apn_optimizer == "adam":
        # fused: one kernel per step instead of a chain of per-tensor ops; the APN's first layer can hold
        # 64 M weights (MobileNetV2, apn_grid 7), where the for-loop Adam step took 0.67 s on a CPU core
        # and the fused one 0.08 s (docs/performance.md)
        apn_opt: torch.optim.Optimizer = torch.optim.Adam(
            apn_params, lr=o.apn_lr, fused=fused_ok(groups["apn"])
        )
    else:
        apn_opt = torch.optim.SGD(apn_params, lr=o.apn_lr, momentum=o.momentum)
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


class TensorBoard:
    """``train.tensorboard``: per-epoch scalars and an attention picture per validation in ``OUT/tb/``. Inert
    (``writer`` None) when the optional ``tensorboard`` package is not installed."""

    def __init__(self, log_dir: Path, *, purge_step: int | None = None) -> None:
        self.writer: Any = None
        self._batch: tuple[torch.Tensor, list[int]] | None = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pip install 'racnn[tensorboard]'
            return
        # purge_step: a resumed run hides the events its crashed predecessor logged after the checkpoint
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, rec: dict[str, Any], step: int, group: str = "train") -> None:
        """Numbers of an epoch record as ``train/<key>`` and ``val/<key>`` (``test/<key>`` for the test)."""
        if self.writer is None:
            return
        for k, v in rec.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or k == "epoch":
                continue
            tag = f"val/{k[4:]}" if k.startswith("val_") else f"{group}/{k.removeprefix('train_')}"
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def attention(
        self, model: RACNN, data: Callable[[], Dataset], classes: list[str], step: int, device: torch.device
    ) -> None:
        """The picture of :func:`racnn.visualization.attention_figure` for the first (up to) 4 readable images
        of ``data()`` (called once; evaluation transform, so no random draw)."""
        if self.writer is None or model.cfg.num_scales < 2:
            return
        from PIL import Image

        from ..visualization import attention_figure

        if self._batch is None:
            dataset, items = data(), []
            for i in range(min(4, len(dataset))):  # type: ignore[arg-type]
                with contextlib.suppress(DatasetError):  # an unreadable image is not worth a failed run
                    items.append(dataset[i])
            if not items:
                return
            self._batch = (torch.stack([it["image"] for it in items]), [int(it["label"]) for it in items])
        images, labels = self._batch  # B x 3 x S x S, B
        was_training = model.training
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "attention.png"
            attention_figure(model, images.to(device), classes, out, labels=labels)
            with Image.open(out) as picture:
                pixels = np.asarray(picture.convert("RGB"))  # H x W x 3 uint8
        model.train(was_training)
        self.writer.add_image("attention", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
