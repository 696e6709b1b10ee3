"""ImageFolderDataset on tiny fake trees."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from racnn.data import DatasetError, ImageFolderDataset, build_dataset, build_transform


def _image(path: Path, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 120).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """train/{ant,bee,cat} with 4 images each (mixed extensions/case), test/{ant,cat}, no val."""
    root = tmp_path / "folder"
    for name in ("ant", "bee", "cat"):
        for k, ext in enumerate((".jpg", ".JPEG", ".png", ".bmp")):
            _image(root / "train" / name / f"{name}{k}{ext}")
    _image(root / "train" / "bee" / "nested" / "bee9.webp")  # sub-folders are searched
    _image(root / "train" / "cat" / "grey.png", mode="L")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / "ant" / ".hidden.jpg").write_bytes(b"")
    _image(root / "test" / "ant" / "a.jpg")
    _image(root / "test" / "cat" / "c.PNG")
    return root


def test_classes_and_splits(tree: Path) -> None:
    trainval = ImageFolderDataset(tree, "trainval")
    assert trainval.classes == ["ant", "bee", "cat"] and trainval.num_classes == 3
    assert Counter(s.label for s in trainval.samples) == {0: 4, 1: 5, 2: 5}
    assert all(
        s.path.parent.name == trainval.classes[s.label]
        for s in trainval.samples
        if "nested" not in str(s.path)
    )
    test = ImageFolderDataset(tree, "test")
    assert sorted(s.label for s in test.samples) == [0, 2]
    train = ImageFolderDataset(tree, "train", val_fraction=0.25, seed=3)
    val = ImageFolderDataset(tree, "val", val_fraction=0.25, seed=3)
    assert {s.path for s in train.samples} | {s.path for s in val.samples} == {
        s.path for s in trainval.samples
    }
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}
    assert Counter(s.label for s in val.samples) == {0: 1, 1: 1, 2: 1}
    assert val.samples == ImageFolderDataset(tree, "val", val_fraction=0.25, seed=3).samples
    capped = ImageFolderDataset(tree, "trainval", max_images=3)
    assert len({s.label for s in capped.samples}) == 3


def test_explicit_val_folder(tree: Path) -> None:
    _image(tree / "val" / "bee" / "b.jpg")
    assert [s.path.name for s in ImageFolderDataset(tree, "val").samples] == ["b.jpg"]
    assert len(ImageFolderDataset(tree, "train")) == 14
    assert len(ImageFolderDataset(tree, "trainval")) == 15


def test_item_dict(tree: Path) -> None:
    t = build_transform(size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=True)
    ds = build_dataset("imagefolder", tree, "trainval", t)
    grey = next(i for i, s in enumerate(ds.samples) if s.path.name == "grey.png")
    item = ds[grey]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 2
    torch.testing.assert_close(item["box"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert item["parts"].shape == (0, 3) and not bool(item["has_box"]) and int(item["index"]) == grey
    assert ds.raw(grey)[0].size == (20, 16)


def test_errors(tree: Path, tmp_path: Path) -> None:
    _image(tree / "test" / "dog" / "d.jpg")
    with pytest.raises(DatasetError, match=r"dog: class 'dog' is not among the train classes"):
        ImageFolderDataset(tree, "test")
    with pytest.raises(DatasetError, match=r"missing: dataset folder not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty/train: not found"):
        ImageFolderDataset(tmp_path / "empty")
    _image(tmp_path / "flat" / "train" / "x.jpg")
    with pytest.raises(DatasetError, match=r"x\.jpg: image outside a class folder"):
        ImageFolderDataset(tmp_path / "flat")
    _image(tmp_path / "notest" / "train" / "a" / "x.jpg")
    with pytest.raises(DatasetError, match=r"notest/test: not found"):
        ImageFolderDataset(tmp_path / "notest", "test")
