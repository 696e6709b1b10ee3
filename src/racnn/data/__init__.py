"""Datasets and paired (image + box + parts) transforms for RA-CNN. Never imports model code."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from racnn.data.base import AnnotatedImageDataset, Sample
from racnn.data.cub import CUB200
from racnn.data.errors import DatasetError
from racnn.data.fgvc_aircraft import FGVCAircraft
from racnn.data.imagefolder import ImageFolderDataset
from racnn.data.io import load_image
from racnn.data.stanford_cars import StanfordCars
from racnn.data.stanford_dogs import StanfordDogs
from racnn.data.synthetic import SyntheticBirds
from racnn.data.transforms import PairedTransform, PairedTransformFn, build_transform

__all__ = [
    "CUB200",
    "DATASETS",
    "AnnotatedImageDataset",
    "DatasetError",
    "FGVCAircraft",
    "ImageFolderDataset",
    "PairedTransform",
    "PairedTransformFn",
    "Sample",
    "StanfordCars",
    "StanfordDogs",
    "SyntheticBirds",
    "build_dataset",
    "build_transform",
    "list_datasets",
    "load_image",
]

DATASETS: dict[str, Callable[..., AnnotatedImageDataset]] = {
    "cub": CUB200,
    "imagefolder": ImageFolderDataset,
    "synthetic": SyntheticBirds,
    "stanford_dogs": StanfordDogs,
    "stanford_cars": StanfordCars,
    "fgvc_aircraft": FGVCAircraft,  # the 100 variants; the coarser levels of the same images:
    "fgvc_aircraft_family": partial(FGVCAircraft, level="family"),
    "fgvc_aircraft_manufacturer": partial(FGVCAircraft, level="manufacturer"),
}
# datasets drawn by code: no folder needed
GENERATED = {"synthetic"}


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset`, sorted."""
    return sorted(DATASETS)


def build_dataset(
    name: str,
    root: str | Path | None,
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
    if name not in GENERATED and (root is None or not Path(root).is_dir()):
        raise DatasetError(f"{root}: dataset folder not found")
    return DATASETS[name](root, split, transform, val_fraction=val_fraction, seed=seed, max_images=max_images)
