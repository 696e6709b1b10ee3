"""Datasets and paired (image + box + parts) transforms for RA-CNN. Never imports model code."""

from __future__ import annotations

from pathlib import Path

from racnn.data.base import AnnotatedImageDataset, Sample
from racnn.data.cub import CUB200
from racnn.data.errors import DatasetError
from racnn.data.imagefolder import ImageFolderDataset
from racnn.data.io import load_image
from racnn.data.transforms import PairedTransform, PairedTransformFn, build_transform

__all__ = [
    "CUB200",
    "DATASETS",
    "AnnotatedImageDataset",
    "DatasetError",
    "ImageFolderDataset",
    "PairedTransform",
    "PairedTransformFn",
    "Sample",
    "build_dataset",
    "build_transform",
    "list_datasets",
    "load_image",
]

DATASETS: dict[str, type[AnnotatedImageDataset]] = {"cub": CUB200, "imagefolder": ImageFolderDataset}


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset`, sorted."""
    return sorted(DATASETS)


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    transform: PairedTransformFn | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_images: int | None = None,
) -> AnnotatedImageDataset:
    """Construct dataset ``name`` (see :func:`list_datasets`) for ``split`` of the folder ``root``."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r} (known: {', '.join(list_datasets())})")
    if not Path(root).is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    return DATASETS[name](root, split, transform, val_fraction=val_fraction, seed=seed, max_images=max_images)
