"""Stanford Cars (Krause et al. 2013) in the devkit layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from racnn.data.base import AnnotatedImageDataset, Sample
from racnn.data.errors import DatasetError
from racnn.data.stanford_dogs import load_mat, mat_number, mat_string, mat_values
from racnn.data.transforms import PairedTransformFn

__all__ = ["StanfordCars"]

_LAYOUT = (
    "devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat (in the root or "
    "devkit/), cars_train/, cars_test/"
)
_TEST_ANNOS = "cars_test_annos_withlabels.mat"
_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _find_root(root: Path) -> Path:
    """Accept the folder holding ``devkit/`` or its parent with a ``stanford_cars`` folder (torchvision's)."""
    for candidate in (root, root / "stanford_cars"):
        if (candidate / "devkit").is_dir():
            return candidate
    raise DatasetError(f"{root / 'devkit'}: not found (expected {_LAYOUT})")


def _records(path: Path) -> list[Any]:
    """The ``annotations`` struct array of an annos file, as a list of records with every field."""
    annotations = load_mat(path, ("annotations",), _LAYOUT)["annotations"]
    names = getattr(annotations, "dtype", None) and annotations.dtype.names
    if not names:
        raise DatasetError(f"{path}: 'annotations' is not a struct array")
    missing = [f for f in _FIELDS if f not in names]
    if missing:
        raise DatasetError(
            f"{path}: 'annotations' has no field {missing[0]!r} (expected {', '.join(_FIELDS)})"
        )
    return list(np.atleast_1d(annotations).ravel())


class StanfordCars(AnnotatedImageDataset):
    """Stanford Cars: 196 models, 8,144 train and 8,041 test images, with object boxes.

    ``root`` holds ``devkit/`` (``cars_meta.mat``, ``cars_train_annos.mat``), ``cars_train/``,
    ``cars_test/`` and ``cars_test_annos_withlabels.mat`` (the labelled test annotations, released apart
    from the devkit; looked for in the root first, then in ``devkit/``); torchvision's parent folder with
    ``stanford_cars/`` inside is accepted too. ``split``: "trainval" is the official train set, "test" the
    test set, "train"/"val" carve ``val_fraction`` of trainval per class (seeded by ``seed``);
    ``max_images`` caps the split, round robin over classes.

    Classes are ``class_names`` of ``cars_meta.mat`` in order; labels are the 1-based ``class`` minus one.
    Boxes: the 1-based inclusive pixel corners become continuous xyxy ``(x1 - 1, y1 - 1, x2, y2)``, clipped
    to >= 0 here and to the image when loaded. Items have no parts (``[0, 3]``).
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
        self.root = _find_root(self.root)
        meta = self.root / "devkit" / "cars_meta.mat"
        self.classes: list[str] = []
        for i, value in enumerate(mat_values(load_mat(meta, ("class_names",), _LAYOUT)["class_names"]), 1):
            name = mat_string(value)
            if name is None:
                raise DatasetError(f"{meta}: class_names entry {i} is not a string: {value!r}")
            self.classes.append(name)
        if not self.classes:
            raise DatasetError(f"{meta}: class_names is empty")

        if split == "test":
            annos = next(
                (p for p in (self.root / _TEST_ANNOS, self.root / "devkit" / _TEST_ANNOS) if p.is_file()),
                self.root / _TEST_ANNOS,
            )
            image_dir = self.root / "cars_test"
        else:
            annos, image_dir = self.root / "devkit" / "cars_train_annos.mat", self.root / "cars_train"
        entries = self._read_annos(annos)
        entries = [entries[p] for p in self._pick([label for _, label, _ in entries])]

        self.samples: list[Sample] = []
        for fname, label, box in entries:
            path = image_dir / fname
            if not path.is_file():
                raise DatasetError(f"{path}: not found (listed in {annos})")
            self.samples.append(Sample(path, label, box))

    def _read_annos(self, path: Path) -> list[tuple[str, int, torch.Tensor]]:
        """``[(file name, label, box xyxy)]`` in file order."""
        entries: list[tuple[str, int, torch.Tensor]] = []
        for i, record in enumerate(_records(path), start=1):
            fname = mat_string(record["fname"])
            if fname is None or not fname or os.path.basename(fname) != fname or fname in (".", ".."):
                raise DatasetError(f"{path}: annotation {i}: fname {record['fname']!r} is not a file name")
            number = mat_number(record["class"])
            if number is None or number != int(number) or not 1 <= number <= len(self.classes):
                raise DatasetError(
                    f"{path}: annotation {i} ({fname}): class {record['class']!r} is not a number "
                    f"1..{len(self.classes)}"
                )
            corners = [mat_number(record[f]) for f in _FIELDS[:4]]
            if any(c is None for c in corners):
                raise DatasetError(f"{path}: annotation {i} ({fname}): box {corners} is not numeric")
            x1, y1, x2, y2 = (float(c) for c in corners)  # type: ignore[arg-type]
            if x2 < x1 or y2 < y1:
                raise DatasetError(
                    f"{path}: annotation {i} ({fname}): box {x1}, {y1}, {x2}, {y2} is inverted"
                )
            box = torch.tensor([x1 - 1.0, y1 - 1.0, x2, y2], dtype=torch.float32).clamp(min=0.0)
            entries.append((fname, int(number) - 1, box))
        return entries
