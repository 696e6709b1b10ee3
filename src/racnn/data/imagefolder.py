"""A generic class-per-folder dataset: ``root/{train,val,test}/<class>/<image>``."""

from __future__ import annotations

import os
from pathlib import Path

from racnn.data.base import AnnotatedImageDataset, Sample
from racnn.data.errors import DatasetError
from racnn.data.transforms import PairedTransformFn

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_LAYOUT = "expected root/train/<class>/*.jpg, optional root/val/<class>/..., root/test/<class>/..."


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted class folder names of ``split_dir``; an image directly inside it is an error."""
    names = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            names.append(entry.name)
        elif _is_image(entry.name):
            raise DatasetError(f"{entry.path}: image outside a class folder ({_LAYOUT})")
    return names


def _scan(split_dir: Path, classes: list[str]) -> list[Sample]:
    """Every image under ``split_dir/<class>/`` (recursively, sorted), labelled by ``classes``."""
    label_of = {name: i for i, name in enumerate(classes)}
    samples: list[Sample] = []
    for name in _class_dirs(split_dir):
        if name not in label_of:
            raise DatasetError(f"{split_dir / name}: class {name!r} is not among the train classes")
        for folder, subdirs, files in os.walk(split_dir / name, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for file in sorted(files):
                if _is_image(file):
                    samples.append(Sample(Path(folder) / file, label_of[name]))
    return samples


class ImageFolderDataset(AnnotatedImageDataset):
    """Images sorted into ``root/train/<class>/``, optional ``root/val/<class>/`` and
    ``root/test/<class>/`` (extensions jpg, jpeg, png, bmp, webp, any case; sub-folders are searched).

    Classes are the sorted sub-folder names of ``root/train``; val/test folders may hold a subset of
    them. When ``root/val`` exists, "train"/"val" are those folders and "trainval" both; otherwise
    "trainval" is ``root/train`` and "train"/"val" are carved from it per class like :class:`CUB200`.
    Items have no annotations: ``has_box`` False, box ``[0, 0, 1, 1]``, parts of shape ``[0, 3]``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: PairedTransformFn | None = None,
        *,
        val_fraction: float = 0.1,
        seed: int = 0,
        max_images: int | None = None,
    ) -> None:
        super().__init__(root, split, transform, val_fraction=val_fraction, seed=seed, max_images=max_images)
        train_dir, val_dir, test_dir = (self.root / s for s in ("train", "val", "test"))
        if not train_dir.is_dir():
            raise DatasetError(f"{train_dir}: not found ({_LAYOUT})")
        self.classes: list[str] = _class_dirs(train_dir)
        if not self.classes:
            raise DatasetError(f"{train_dir}: no class folders ({_LAYOUT})")

        if split == "test":
            if not test_dir.is_dir():
                raise DatasetError(f"{test_dir}: not found ({_LAYOUT})")
            samples = _scan(test_dir, self.classes)
        elif val_dir.is_dir():
            samples = []
            if split in ("train", "trainval"):
                samples += _scan(train_dir, self.classes)
            if split in ("val", "trainval"):
                samples += _scan(val_dir, self.classes)
        else:
            samples = _scan(train_dir, self.classes)
        keep = self._pick([s.label for s in samples], carve=not val_dir.is_dir())
        self.samples: list[Sample] = [samples[p] for p in keep]
