"""Stanford Dogs (Khosla et al. 2011) in its original layout, with the MATLAB list files."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import torch

from racnn.data.base import AnnotatedImageDataset, Sample
from racnn.data.errors import DatasetError, line_error
from racnn.data.transforms import PairedTransformFn

__all__ = ["StanfordDogs", "load_mat", "mat_number", "mat_string", "mat_values"]

_LAYOUT = "Images/<wnid>-<breed>/*.jpg, Annotation/<wnid>-<breed>/<stem>, lists/{train,test}_list.mat"


def load_mat(path: Path, keys: tuple[str, ...], layout: str) -> dict[str, Any]:
    """``scipy.io.loadmat(path, squeeze_me=True)`` restricted to ``keys``; every key must be present.

    With ``squeeze_me`` a cell array of strings reads as an object array of ``str`` (or one ``str``), a
    numeric N x 1 array as shape ``[N]``, and a 1 x N struct array as a structured array of shape ``[N]``.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: not found (expected {layout})")
    from scipy.io import loadmat  # deferred: only the .mat datasets need scipy

    try:
        content = loadmat(str(path), squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, OSError...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"{path}: not a readable MATLAB file ({reason[:200]})") from exc
    missing = [k for k in keys if k not in content]
    if missing:
        raise DatasetError(f"{path}: no variable {missing[0]!r} (expected {', '.join(keys)})")
    return {k: content[k] for k in keys}


def mat_values(value: Any) -> list[Any]:
    """The elements of a squeezed MATLAB array (a scalar or one string becomes a one-element list)."""
    array = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
    return [array.item()] if array.ndim == 0 and array.dtype.names is None else list(np.atleast_1d(array))


def mat_string(value: Any) -> str | None:
    """A cell element as ``str``, or None when it is not a single string."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "UO":
        return mat_string(value.item())
    return None


def mat_number(value: Any) -> float | None:
    """A numeric element as a finite ``float``, or None."""
    if isinstance(value, np.ndarray):
        if value.size != 1 or value.dtype.kind not in "iuf":
            return None
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _voc_box(path: Path) -> torch.Tensor:
    """Union of the ``<object><bndbox>`` boxes of a PASCAL-VOC XML file, xyxy in continuous pixels."""
    if not path.is_file():
        raise DatasetError(f"{path}: annotation not found (expected {_LAYOUT})")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise line_error(path, exc.position[0], f"malformed XML ({exc})") from None
    boxes = []
    for obj in root.iter("object"):
        values = [obj.findtext(f"bndbox/{tag}") for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            x0, y0, x1, y1 = (float(v) for v in values)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DatasetError(
                f"{path}: <bndbox> needs numeric xmin, ymin, xmax, ymax, got {values}"
            ) from None
        if not all(map(math.isfinite, (x0, y0, x1, y1))) or x1 < x0 or y1 < y0:
            raise DatasetError(f"{path}: invalid box {x0}, {y0}, {x1}, {y1}")
        boxes.append((x0 - 1.0, y0 - 1.0, x1, y1))  # 1-based inclusive pixels -> continuous coordinates
    if not boxes:
        raise DatasetError(f"{path}: no <object> with a <bndbox>")
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    return torch.tensor([x0, y0, x1, y1], dtype=torch.float32).clamp(min=0.0)


class StanfordDogs(AnnotatedImageDataset):
    """Stanford Dogs: 120 breeds, 12,000 train and 8,580 test images, with object boxes.

    ``root`` holds ``Images/``, ``Annotation/`` and ``lists/`` (the official archives unpacked side by
    side). ``split``: "trainval" is ``lists/train_list.mat``, "test" ``lists/test_list.mat``, and
    "train"/"val" carve ``val_fraction`` of trainval per class (seeded by ``seed``); ``max_images`` caps the
    split, round robin over classes. Labels are the lists' 1-based ``labels`` minus one; they must agree
    with the sorted ``Images/`` folders, whose breed part (after the first "-") names the class.

    Boxes come from ``Annotation/<folder>/<image stem>`` (VOC XML): when an image shows several dogs the
    box is the *union* of its ``<object>`` boxes (the whole labelled evidence). VOC's 1-based inclusive
    pixels become continuous xyxy ``(xmin - 1, ymin - 1, xmax, ymax)``, clipped to >= 0 here and to the
    image when loaded. Only the selected split's annotations are read. Items have no parts (``[0, 3]``).
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
        images_dir = self.root / "Images"
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: not found (expected {_LAYOUT})")
        folders = sorted(e.name for e in os.scandir(images_dir) if e.is_dir() and not e.name.startswith("."))
        if not folders:
            raise DatasetError(f"{images_dir}: no class folders (expected {_LAYOUT})")
        self.folders: list[str] = folders
        self.classes: list[str] = [f.split("-", 1)[1] if "-" in f else f for f in folders]

        list_file = self.root / "lists" / ("test_list.mat" if split == "test" else "train_list.mat")
        entries = self._read_list(list_file)
        entries = [entries[p] for p in self._pick([label for _, label in entries])]

        self.samples: list[Sample] = []
        for rel, label in entries:
            path = images_dir / rel
            if not path.is_file():
                raise DatasetError(f"{path}: not found (listed in {list_file})")
            box = _voc_box(self.root / "Annotation" / Path(rel).parent / Path(rel).stem)
            self.samples.append(Sample(path, label, box))

    def _read_list(self, path: Path) -> list[tuple[str, int]]:
        """``[(relative image path, label)]`` of a list file, checked against the class folders."""
        content = load_mat(path, ("file_list", "labels"), _LAYOUT)
        files, labels = mat_values(content["file_list"]), mat_values(content["labels"])
        if len(files) != len(labels):
            raise DatasetError(f"{path}: file_list has {len(files)} entries but labels has {len(labels)}")
        entries: list[tuple[str, int]] = []
        for i, (file_value, label_value) in enumerate(zip(files, labels, strict=True), start=1):
            rel, number = mat_string(file_value), mat_number(label_value)
            if rel is None:
                raise DatasetError(f"{path}: file_list entry {i} is not a string: {file_value!r}")
            rel = rel.replace("\\", "/")
            parts = rel.split("/")
            if len(parts) != 2 or not all(parts) or ".." in parts or os.path.isabs(rel):
                raise DatasetError(f"{path}: file_list entry {i}: expected '<folder>/<image>', got {rel!r}")
            if number is None or number != int(number) or not 1 <= number <= len(self.folders):
                raise DatasetError(
                    f"{path}: labels entry {i}: {label_value!r} is not a class number 1..{len(self.folders)}"
                )
            label = int(number) - 1
            if parts[0] != self.folders[label]:
                raise DatasetError(
                    f"{path}: entry {i}: label {label + 1} is folder {self.folders[label]!r}, "
                    f"but the image is in {parts[0]!r}"
                )
            entries.append((rel, label))
        return entries
