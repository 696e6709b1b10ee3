"""Datasets and loaders of a run: splits with the model's normalisation, seeded shuffling and augmentation
that do not depend on workers or processes, evaluation shards, and unreadable images skipped on request."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ..backbones import Preprocessing, backbone_preprocessing
from ..config import Config, ConfigError
from ..data import DatasetError, build_dataset, build_transform
from ..data.base import BadImage, SkipBadImages, carve_val, check_labels, report_bad_images
from .runtime import raise_if_interrupted


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


def run_datasets(
    cfg: Config,
    *,
    preprocessing: Preprocessing | None,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
) -> tuple[Dataset, Dataset | None]:
    """A run's training and validation sets: those given, else the config's splits, normalised as
    ``preprocessing`` says (None: as the configured backbone's ImageNet weights). The config's validation split
    (``data.val_fraction``) comes only with its training split."""
    prep = backbone_preprocessing(cfg.model.backbone) if preprocessing is None else preprocessing
    if train_set is None:
        train_set = make_dataset(cfg, "train", prep, train=True)
        if val_set is None and cfg.data.val_fraction > 0:
            val_set = make_dataset(cfg, "val", prep, train=False)
    if cfg.model.fusion == "weighted" and val_set is None:
        raise ConfigError(
            "model.fusion=weighted fits its weights on the validation split, and this run has none: "
            "set data.val_fraction > 0 (or pass val_set), or choose mean_logprob"
        )
    return train_set, val_set


# which of the training images a phase reads (Phase.images) when apn.attend_holdout holds a share out
IMAGES = ("all", "fitted", "held_out")


def holdout_split(dataset: Dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The positions of ``dataset`` (a training split with ``samples``) the classifiers train on and those
    the attention phases learn on (``apn.attend_holdout``): ``fraction`` of each class, seeded, at least one
    image of each class left to the classifiers. Sorted, disjoint, together every position."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ConfigError(
            f"apn.attend_holdout needs a training set that lists its samples' labels "
            f"({type(dataset).__name__} has no .samples)"
        )
    fitted, held = carve_val([s.label for s in samples], fraction, seed + 1)  # (+1: not the val carve's draw)
    if not held:
        raise ConfigError(
            f"apn.attend_holdout={fraction} holds out no image: every class of the {len(samples)} training "
            "images is too small for that share"
        )
    return fitted, held


def share_positions(dataset: Dataset, cfg: Config, images: str) -> list[int] | None:
    """The positions in the training set ``dataset`` that a phase reads (``images``, one of :data:`IMAGES`;
    :meth:`SeededSampler.select` takes them): ``fitted``, the classifiers' share; ``held_out``, the attention
    phases' share, each position repeated the whole number of times that makes an epoch of it about as long
    as an epoch of the whole split; ``all``, None (the whole split)."""
    if images not in IMAGES:
        raise ValueError(f"images must be one of {IMAGES}, got {images!r}")
    if images == "all":
        return None
    fitted, held = holdout_split(dataset, cfg.apn.attend_holdout, cfg.train.seed)
    if images == "fitted":
        return fitted
    return held * max(1, round(len(dataset) / len(held)))  # type: ignore[arg-type]


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
        # the workers' base seed from a generator of its own, not the process's stream: a resumed run
        # starts its workers where an uninterrupted one does not, and the search's random draws of
        # candidates must not depend on that (each item's augmentation has its own seed anyway)
        generator=torch.Generator() if train else None,
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
                error = DatasetError(_last_line(e))
                error.racnn_one_rank = True  # type: ignore[attr-defined]  # an image of this rank's shard
                raise error from None
            raise_if_interrupted()
            if "bad" in batch:
                self.bad_images += int(batch["bad"].sum())
                report_bad_images(batch.pop("bad_messages", []))
            if "image" in batch:  # else every image of an evaluation batch was unreadable
                yield batch


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
    same crops as an uninterrupted single-process run.

    :meth:`select` narrows it to a share of the dataset's positions (``apn.attend_holdout``): the loader and
    its workers stay, started once while the training process is small (a worker forked later shares a
    process of several GB copy-on-write, and every page the trainer then writes is copied)."""

    def __init__(self, inner: DistributedSampler, seed: int) -> None:
        self.full, self.inner, self.seed, self.epoch = inner, inner, seed, 0
        self.positions: list[int] | None = None

    def select(self, positions: list[int] | None) -> None:
        """Read ``positions`` of the dataset (repeats allowed; each place in the list draws its own seed), in
        a shuffled order of their own; None: every position, as built."""
        if positions == self.positions:
            return
        full = self.full
        self.positions = positions
        self.inner = (
            full
            if positions is None
            else DistributedSampler(
                positions,  # type: ignore[arg-type]  (a Sized: the sampler reads its length)
                num_replicas=full.num_replicas,
                rank=full.rank,
                shuffle=True,
                seed=full.seed,
            )
        )
        self.inner.set_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        inner, positions, epoch = self.inner, self.positions, self.epoch  # as they were when it began
        for p in inner:  # 32 bits: what seeds torch's CPU generator
            digest = hashlib.blake2b(f"{self.seed},{epoch},{p}".encode(), digest_size=4).digest()
            yield (p if positions is None else positions[p]), int.from_bytes(digest, "little")


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
