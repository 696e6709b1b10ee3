"""FGVC-Aircraft (Maji et al. 2013) in its original ``fgvc-aircraft-2013b`` layout."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from racnn.data.base import AnnotatedImageDataset, Sample
from racnn.data.errors import DatasetError, line_error
from racnn.data.io import load_image
from racnn.data.transforms import PairedTransformFn

__all__ = ["BANNER_PX", "LEVELS", "FGVCAircraft"]

BANNER_PX = 20  # height of the copyright banner at the bottom of every image
LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
_LAYOUT = (
    "data/images/<id>.jpg, data/images_box.txt, data/{variants,families,manufacturers}.txt, "
    "data/images_<level>_{trainval,test,train,val}.txt"
)


def _find_data(root: Path) -> Path:
    """The ``data`` folder of ``root`` (``fgvc-aircraft-2013b``) or of ``root/fgvc-aircraft-2013b``."""
    for candidate in (root, root / "fgvc-aircraft-2013b"):
        if (candidate / "data").is_dir():
            return candidate / "data"
    raise DatasetError(f"{root / 'data'}: not found (expected {_LAYOUT})")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(lineno, stripped line)`` for each non-blank line."""
    if not path.is_file():
        raise DatasetError(f"{path}: not found (expected {_LAYOUT})")
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line.strip()


def _read_classes(path: Path) -> list[str]:
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, name in _lines(path):
        if name in seen:
            raise line_error(path, lineno, f"duplicate class {name!r} (first on line {seen[name]})")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: no class names")
    return names


def _read_split(path: Path, label_of: dict[str, int]) -> list[tuple[str, int]]:
    """``[(image id, label)]`` of an ``images_<level>_<split>.txt`` file (``<id> <class name>``)."""
    entries: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for lineno, line in _lines(path):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise line_error(path, lineno, f"expected '<image id> <class name>', got {line[:80]!r}")
        image_id, name = fields
        if image_id in seen:
            raise line_error(path, lineno, f"duplicate image id {image_id} (first on line {seen[image_id]})")
        if name not in label_of:
            raise line_error(path, lineno, f"unknown class {name!r}")
        seen[image_id] = lineno
        entries.append((image_id, label_of[name]))
    return entries


def _read_boxes(path: Path) -> dict[str, Tensor]:
    """``{image id: xyxy}`` from ``images_box.txt`` (1-based inclusive pixels -> continuous coordinates)."""
    boxes: dict[str, Tensor] = {}
    for lineno, line in _lines(path):
        fields = line.split()
        if len(fields) != 5:
            raise line_error(path, lineno, f"expected 5 fields, got {len(fields)}: {line[:80]!r}")
        try:
            x0, y0, x1, y1 = (float(v) for v in fields[1:])
        except ValueError:
            raise line_error(path, lineno, f"box {' '.join(fields[1:])!r} is not numeric") from None
        if not all(map(math.isfinite, (x0, y0, x1, y1))) or x1 < x0 or y1 < y0:
            raise line_error(path, lineno, f"invalid box {x0:g} {y0:g} {x1:g} {y1:g}")
        if fields[0] in boxes:
            raise line_error(path, lineno, f"duplicate image id {fields[0]}")
        boxes[fields[0]] = torch.tensor([x0 - 1.0, y0 - 1.0, x1, y1], dtype=torch.float32).clamp(min=0.0)
    return boxes


class FGVCAircraft(AnnotatedImageDataset):
    """FGVC-Aircraft 2013b: 10,000 images, 100 variants / 70 families / 30 manufacturers, object boxes.

    ``root`` is ``fgvc-aircraft-2013b`` (holding ``data/``) or its parent. ``level`` picks the labels:
    "variant" (default), "family" or "manufacturer"; ``classes`` are the lines of ``variants.txt`` /
    ``families.txt`` / ``manufacturers.txt`` in file order (names hold spaces and slashes, e.g. "F/A-18").
    ``split``: "trainval" and "test" are the official ``images_<level>_{trainval,test}.txt``. "train"/"val"
    carve ``val_fraction`` of trainval per class (seeded by ``seed``) like every other dataset, so that
    ``val_fraction=0`` trains on all of trainval as the literature does; ``official_val=True`` uses the
    official ``images_<level>_{train,val}.txt`` halves instead. ``max_images`` caps the split.

    ``crop_banner`` (default True) cuts the bottom :data:`BANNER_PX` rows (a copyright banner) off every
    image, as is usual in the literature; boxes keep their coordinates (the origin is the top-left corner)
    and are clipped to the cropped image when loaded.
    ``images_box.txt`` boxes (1-based inclusive) become continuous xyxy ``(xmin - 1, ymin - 1, xmax, ymax)``.
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
        level: str = "variant",
        crop_banner: bool = True,
        official_val: bool = False,
    ) -> None:
        super().__init__(root, split, transform, val_fraction=val_fraction, seed=seed, max_images=max_images)
        if level not in LEVELS:
            raise DatasetError(f"unknown level {level!r} (expected one of: {', '.join(LEVELS)})")
        self.root = _find_data(self.root).parent
        self.level, self.crop_banner = level, bool(crop_banner)
        data = self.root / "data"
        self.classes: list[str] = _read_classes(data / LEVELS[level])
        label_of = {name: i for i, name in enumerate(self.classes)}

        official = split in ("train", "val") and official_val
        if official:
            entries = _read_split(data / f"images_{level}_{split}.txt", label_of)
        else:
            entries = _read_split(
                data / f"images_{level}_{'test' if split == 'test' else 'trainval'}.txt", label_of
            )
        entries = [entries[p] for p in self._pick([label for _, label in entries], carve=not official)]

        box_file = data / "images_box.txt"
        boxes = _read_boxes(box_file)
        self.samples: list[Sample] = []
        for image_id, label in entries:
            path = data / "images" / f"{image_id}.jpg"
            if not path.is_file():
                raise DatasetError(f"{path}: not found (expected {_LAYOUT})")
            if image_id not in boxes:
                raise DatasetError(f"{box_file}: no box for image {image_id}")
            self.samples.append(Sample(path, label, boxes[image_id]))

    def _load(self, path: Path) -> Image.Image:
        image = load_image(path)
        if self.crop_banner:
            width, height = image.size
            if height <= BANNER_PX:
                raise DatasetError(
                    f"{path}: image is only {height} px high, no {BANNER_PX} px banner to crop"
                )
            image = image.crop((0, 0, width, height - BANNER_PX))
        return image
