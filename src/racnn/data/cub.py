"""CUB-200-2011 (Caltech-UCSD Birds) in its original folder layout."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from racnn.data.base import AnnotatedImageDataset, Sample
from racnn.data.errors import DatasetError, line_error
from racnn.data.transforms import PairedTransformFn

__all__ = ["CUB200", "HEAD_PART_NAMES"]

_LAYOUT = (
    "images.txt",
    "image_class_labels.txt",
    "classes.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "parts/parts.txt",
    "parts/part_locs.txt",
    "images/",
)
HEAD_PART_NAMES = ("beak", "crown", "forehead", "left eye", "right eye", "throat", "nape")


def _find_root(root: str | Path) -> Path:
    """Accept the ``CUB_200_2011`` folder itself or its parent."""
    root = Path(root)
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise _missing(root / "images.txt")


def _missing(path: Path) -> DatasetError:
    return DatasetError(f"{path}: not found (expected the CUB-200-2011 layout: {', '.join(_LAYOUT)})")


def _rows(path: Path, fields: int, *, text_last: bool = False) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(lineno, fields)`` for each non-blank line; the last field may hold spaces if
    ``text_last``."""
    if not path.is_file():
        raise _missing(path)
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=fields - 1) if text_last else line.split()
            if len(parts) != fields:
                raise line_error(path, lineno, f"expected {fields} fields, got {len(parts)}: {line[:80]!r}")
            yield lineno, parts


def _int(path: Path, lineno: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise line_error(path, lineno, f"{what} {text!r} is not an integer") from None


def _float(path: Path, lineno: int, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise line_error(path, lineno, f"{what} {text!r} is not a finite number")
    return value


def _id_table(path: Path, *, text_last: bool = False) -> dict[int, tuple[int, list[str]]]:
    """``{id: (lineno, other fields)}`` for a two-field ``<id> <value>`` file, rejecting duplicates."""
    table: dict[int, tuple[int, list[str]]] = {}
    for lineno, (id_text, value) in _rows(path, 2, text_last=text_last):
        key = _int(path, lineno, id_text, "id")
        if key in table:
            raise line_error(path, lineno, f"duplicate id {key} (first on line {table[key][0]})")
        table[key] = (lineno, [value])
    return table


def _per_image(path: Path, fields: int, images: Mapping[int, object]) -> dict[int, tuple[int, list[str]]]:
    """``{image_id: (lineno, remaining fields)}`` for a one-line-per-image file; every image must appear."""
    table: dict[int, tuple[int, list[str]]] = {}
    for lineno, parts in _rows(path, fields):
        image_id = _int(path, lineno, parts[0], "image id")
        if image_id not in images:
            raise line_error(path, lineno, f"unknown image id {image_id} (not in images.txt)")
        if image_id in table:
            first = table[image_id][0]
            raise line_error(path, lineno, f"duplicate image id {image_id} (first on line {first})")
        table[image_id] = (lineno, parts[1:])
    missing = [i for i in images if i not in table]
    if missing:
        raise DatasetError(f"{path}: no line for {len(missing)} image id(s), e.g. {missing[0]}")
    return table


class CUB200(AnnotatedImageDataset):
    """CUB-200-2011 with boxes and 15 part locations.

    ``root`` is the ``CUB_200_2011`` folder or its parent. ``split``: "trainval" is the official train
    split, "test" the official test split, and "train"/"val" carve ``val_fraction`` of trainval per class
    (seeded by ``seed``). Class ids of classes.txt map to labels ``0..K-1`` in sorted id order.
    ``max_images`` caps the split, round robin over classes. See :class:`AnnotatedImageDataset` for
    the item dict; ``parts`` rows follow parts.txt in sorted part-id order.

    Attributes: ``classes``, ``num_classes``, ``part_names``, ``head_parts`` (sorted indices of the head
    parts named in :data:`HEAD_PART_NAMES`), ``samples`` (boxes clipped to >= 0 here and to the image
    size when loaded; missing part lines count as invisible).
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
        self.root = root = _find_root(self.root)

        # Classes: contiguous labels in sorted id order.
        class_table = _id_table(root / "classes.txt", text_last=True)
        class_ids = sorted(class_table)
        label_of = {cid: label for label, cid in enumerate(class_ids)}
        self.classes: list[str] = [class_table[cid][1][0] for cid in class_ids]

        # Parts: tensor rows in sorted part-id order.
        part_table = _id_table(root / "parts" / "parts.txt", text_last=True)
        part_ids = sorted(part_table)
        part_index = {pid: i for i, pid in enumerate(part_ids)}
        self.part_names: list[str] = [part_table[pid][1][0] for pid in part_ids]
        wanted = set(HEAD_PART_NAMES)
        self.head_parts: list[int] = [i for i, n in enumerate(self.part_names) if n.strip().lower() in wanted]

        # Images, in images.txt order.
        images_file = root / "images.txt"
        images: dict[int, tuple[int, str]] = {}
        for lineno, (id_text, rel) in _rows(images_file, 2, text_last=True):
            image_id = _int(images_file, lineno, id_text, "image id")
            if image_id in images:
                raise line_error(images_file, lineno, f"duplicate image id {image_id}")
            norm = os.path.normpath(rel)
            if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
                raise line_error(images_file, lineno, f"image path {rel!r} escapes {root / 'images'}")
            images[image_id] = (lineno, norm)

        labels_file = root / "image_class_labels.txt"
        labels: dict[int, int] = {}
        for image_id, (lineno, (cid_text,)) in _per_image(labels_file, 2, images).items():
            cid = _int(labels_file, lineno, cid_text, "class id")
            if cid not in label_of:
                raise line_error(labels_file, lineno, f"unknown class id {cid} (not in classes.txt)")
            labels[image_id] = label_of[cid]

        split_file = root / "train_test_split.txt"
        is_train: dict[int, bool] = {}
        for image_id, (lineno, (flag,)) in _per_image(split_file, 2, images).items():
            if flag not in ("0", "1"):
                raise line_error(split_file, lineno, f"train flag {flag!r} is not 0 or 1")
            is_train[image_id] = flag == "1"

        box_file = root / "bounding_boxes.txt"
        boxes: dict[int, torch.Tensor] = {}
        for image_id, (lineno, values) in _per_image(box_file, 5, images).items():
            names = ("x", "y", "width", "height")
            x, y, w, h = (_float(box_file, lineno, v, n) for v, n in zip(values, names, strict=True))
            if w < 0 or h < 0:
                raise line_error(box_file, lineno, f"negative box size {w} x {h}")
            boxes[image_id] = torch.tensor([x, y, x + w, y + h], dtype=torch.float32).clamp(min=0.0)

        parts = self._read_part_locs(root / "parts" / "part_locs.txt", images, part_index)

        # Select the split.
        ids = [i for i in images if is_train[i] == (split != "test")]
        ids = [ids[p] for p in self._pick([labels[i] for i in ids])]

        self.samples: list[Sample] = []
        for image_id in ids:
            path = root / "images" / images[image_id][1]
            if not path.is_file():
                raise DatasetError(f"{path}: not found (listed in {images_file}:{images[image_id][0]})")
            self.samples.append(Sample(path, labels[image_id], boxes[image_id], parts[image_id]))

    @staticmethod
    def _read_part_locs(
        path: Path, images: dict[int, tuple[int, str]], part_index: dict[int, int]
    ) -> dict[int, torch.Tensor]:
        """``{image_id: [P, 3] (x, y, visible)}``; invisible or unlisted parts are (0, 0, 0)."""
        rows: dict[int, list[list[float]]] = {i: [[0.0, 0.0, 0.0] for _ in part_index] for i in images}
        seen: set[tuple[int, int]] = set()
        for lineno, (id_text, pid_text, x_text, y_text, vis_text) in _rows(path, 5):
            image_id = _int(path, lineno, id_text, "image id")
            part_id = _int(path, lineno, pid_text, "part id")
            if image_id not in rows:
                raise line_error(path, lineno, f"unknown image id {image_id} (not in images.txt)")
            if part_id not in part_index:
                raise line_error(path, lineno, f"unknown part id {part_id} (not in parts/parts.txt)")
            if (image_id, part_id) in seen:
                raise line_error(path, lineno, f"duplicate entry for image {image_id}, part {part_id}")
            seen.add((image_id, part_id))
            if vis_text not in ("0", "1"):
                raise line_error(path, lineno, f"visible flag {vis_text!r} is not 0 or 1")
            if vis_text == "1":
                x, y = _float(path, lineno, x_text, "x"), _float(path, lineno, y_text, "y")
                rows[image_id][part_index[part_id]] = [x, y, 1.0]
        return {i: torch.tensor(r, dtype=torch.float32).reshape(len(part_index), 3) for i, r in rows.items()}
