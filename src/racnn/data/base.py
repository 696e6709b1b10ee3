"""Pieces shared by the datasets: sample records, split carving, capping and the item dict."""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from racnn.data.errors import DatasetError
from racnn.data.io import load_image
from racnn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PairedTransformFn, build_transform

__all__ = [
    "SPLITS",
    "AnnotatedImageDataset",
    "Sample",
    "SkipBadImages",
    "cap_spread",
    "carve_val",
    "check_labels",
    "check_options",
]

_log = logging.getLogger("racnn.data")

SPLITS = ("train", "val", "test", "trainval")


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


@dataclass(frozen=True, eq=False)
class Sample:
    """One image: path, contiguous label, box ``[4]`` xyxy pixels (or None), parts ``[P, 3]`` (x, y,
    visible) pixels (or None)."""

    path: Path
    label: int
    box: Tensor | None = None
    parts: Tensor | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (
            (self.path, self.label) == (other.path, other.label)
            and _same(self.box, other.box)
            and _same(self.parts, other.parts)
        )

    def __hash__(self) -> int:
        return hash((self.path, self.label))


def check_options(split: str, val_fraction: float, max_images: int | None) -> None:
    """Validate the options common to every dataset."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_images is not None and (
        not isinstance(max_images, int) or isinstance(max_images, bool) or max_images < 1
    ):
        raise DatasetError(f"max_images must be a positive integer or None, got {max_images!r}")


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    return groups


def carve_val(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split positions ``0..len(labels)-1`` into (train, val), stratified per class and seeded.

    Each class gives ``round(val_fraction * n)`` images to val, but always keeps one for train.
    Both lists are sorted; they are disjoint and together cover every position.
    """
    val: list[int] = []
    for label, members in sorted(_by_class(labels).items()):
        take = min(math.floor(val_fraction * len(members) + 0.5), len(members) - 1)
        if take <= 0:
            continue
        shuffled = list(members)
        random.Random(seed * 1_000_003 + label).shuffle(shuffled)
        val.extend(shuffled[:take])
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def cap_spread(labels: Sequence[int], max_images: int | None, seed: int) -> list[int]:
    """Pick at most ``max_images`` positions, round robin over classes in a seeded order (so a small cap
    still covers many classes); images within a class are taken in a seeded order. Returns sorted
    positions."""
    if max_images is None or len(labels) <= max_images:
        return list(range(len(labels)))
    rng = random.Random(seed)
    groups = [members for _, members in sorted(_by_class(labels).items())]
    rng.shuffle(groups)
    for members in groups:
        rng.shuffle(members)
    chosen: list[int] = []
    for rank in range(max(len(g) for g in groups)):
        for members in groups:
            if rank < len(members):
                chosen.append(members[rank])
                if len(chosen) == max_images:
                    return sorted(chosen)
    return sorted(chosen)


class AnnotatedImageDataset(Dataset):
    """Base class: a list of :class:`Sample` records and a paired transform.

    ``__getitem__`` returns ``{"image": [3, S, S] float32, "label": int64 scalar, "box": [4] xyxy in
    [0, 1], "parts": [P, 3], "has_box": bool scalar, "index": int64 scalar}``. ``has_box`` says whether
    the image has a box annotation; a box cropped away by augmentation is ``[0, 0, 0, 0]``.
    """

    samples: list[Sample]
    classes: list[str]

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: PairedTransformFn | None = None,
        *,
        val_fraction: float = 0.1,
        seed: int = 0,
        max_images: int | None = None,
    ) -> None:
        """What every dataset's constructor starts with: the options checked (:func:`check_options`), the
        transform (default: the evaluation one, 224 px, ImageNet normalisation) and ``root``, an existing
        folder (``None``: a dataset without files)."""
        check_options(split, val_fraction, max_images)
        self.transform: PairedTransformFn = (
            transform
            if transform is not None
            else build_transform(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=False)
        )
        self.split, self.val_fraction, self.seed, self.max_images = split, val_fraction, seed, max_images
        if root is not None:
            if not Path(root).is_dir():
                raise DatasetError(f"{root}: dataset folder not found")
            self.root = Path(root).absolute()

    def _pick(self, labels: Sequence[int], *, carve: bool = True) -> list[int]:
        """The positions in ``labels`` (the images of the list this split reads) that the split keeps: train
        or val carved from them (seeded, per class; with ``carve`` and only for those splits), then at most
        ``max_images`` of them, spread over the classes."""
        positions = list(range(len(labels)))
        if carve and self.split in ("train", "val"):
            train, val = carve_val(labels, self.val_fraction, self.seed)
            positions = train if self.split == "train" else val
        kept = cap_spread([labels[p] for p in positions], self.max_images, self.seed)
        return [positions[i] for i in kept]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> Image.Image:
        """Decode one image as RGB (datasets that edit the pixels, e.g. crop a banner, override this)."""
        return load_image(path)

    def raw(self, index: int) -> tuple[Image.Image, Tensor | None, Tensor | None]:
        """Image ``index`` before the transform, with its box (xyxy px, clipped to the image) and parts."""
        sample = self.samples[index]
        image = self._load(sample.path)
        box = None
        if sample.box is not None:
            width, height = image.size
            box = sample.box.clone()
            box[0::2] = box[0::2].clamp(0, width)
            box[1::2] = box[1::2].clamp(0, height)
        return image, box, sample.parts

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = range(len(self.samples))[index]  # IndexError when out of range; negative indices allowed
        image, box, parts = self.raw(index)
        image_t, box_t, parts_t = self.transform(image, box, parts)
        return {
            "image": image_t,
            "label": torch.tensor(self.samples[index].label, dtype=torch.int64),
            "box": box_t,
            "parts": parts_t,
            "has_box": torch.tensor(box is not None),
            "index": torch.tensor(index, dtype=torch.int64),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={getattr(self, 'split', '?')!r}, images={len(self)}, "
            f"classes={self.num_classes})"
        )


def check_labels(dataset: AnnotatedImageDataset) -> None:
    """Every sample's label must index ``dataset.classes``; raises a :class:`DatasetError` naming the file."""
    k = len(dataset.classes)
    if k == 0:
        raise DatasetError(f"{getattr(dataset, 'root', type(dataset).__name__)}: the dataset has no classes")
    for sample in dataset.samples:
        if not 0 <= sample.label < k:
            raise DatasetError(
                f"{sample.path}: label {sample.label} is out of range (expected 0..{k - 1}, {k} classes)"
            )


@dataclass(frozen=True)
class BadImage:
    """What :class:`SkipBadImages` returns for an unreadable evaluation image: the error message."""

    message: str


def report_bad_images(messages: Sequence[str]) -> None:
    """Warn (``racnn.data`` logger) about each unreadable image once per process, however many epochs,
    evaluations and loader workers meet it (under torchrun: once per rank that meets it)."""
    for m in messages:
        for line in m.splitlines():
            if line and line not in _reported:
                _reported.add(line)
                _log.warning("skipped unreadable image: %s", line)


_reported: set[str] = set()


class SkipBadImages(Dataset):
    """Wrap a dataset so that an unreadable image (a :class:`DatasetError` from loading it) does not stop the
    run; what ``data.skip_bad_images`` / ``--skip-bad-images`` turns on.

    ``replace=True`` (training): the item is replaced by the next readable one (index + 1, + 2, ... wrapping
    around), so batch shapes and step counts stay as planned (and equal across DDP ranks); ``item["bad"]``
    (int64 scalar) counts the unreadable images passed over for it and ``item["bad_messages"]`` (a string, one
    line per image) says why. ``replace=False`` (evaluation): the item is a :class:`BadImage`, for the loader's
    collate to drop and count. Reporting the messages (once per file) is the loader's business: it runs in
    the main process, where a worker's "already reported" memory would not survive the worker.
    """

    def __init__(self, dataset: Dataset, *, replace: bool) -> None:
        self.dataset, self.replace = dataset, replace

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:  # classes, samples, head_parts, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, Tensor | str] | BadImage:
        n, messages = len(self), []
        for tried in range(n):
            try:
                item = self.dataset[(index + tried) % n]
            except DatasetError as e:
                if not self.replace:
                    return BadImage(str(e))
                messages.append(str(e))
                continue
            item["bad"] = torch.tensor(tried, dtype=torch.int64)
            item["bad_messages"] = "\n".join(messages)
            return item
        raise DatasetError(f"{getattr(self.dataset, 'root', 'dataset')}: none of its {n} images can be read")
