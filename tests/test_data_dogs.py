"""StanfordDogs on a tiny fake tree in the official layout, with .mat lists written by scipy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from racnn.data import DatasetError, StanfordDogs, build_dataset, build_transform, list_datasets

sio = pytest.importorskip("scipy.io")

FOLDERS = ("n02085620-Chihuahua", "n02086240-Shih-Tzu", "n02116738-African_hunting_dog")
PER_CLASS = 4  # images per class: 3 train + 1 test

_XML = """<annotation><filename>%s</filename><size><width>%d</width><height>%d</height></size>
%s</annotation>"""
_OBJ = "<object><name>dog</name><bndbox><xmin>%d</xmin><ymin>%d</ymin><xmax>%d</xmax><ymax>%d</ymax></bndbox></object>"


def _cell(strings: list[str]) -> np.ndarray:
    """An N x 1 cell array of strings, as in the real list files."""
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = s
    return cell


def write_list(path: Path, files: list[str], labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    annotations = [f.rsplit(".", 1)[0] for f in files]
    labels_arr = np.array(labels, dtype=np.uint8).reshape(-1, 1)
    sio.savemat(
        path, {"file_list": _cell(files), "annotation_list": _cell(annotations), "labels": labels_arr}
    )


def write_fake_dogs(root: Path) -> Path:
    lists: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, folder in enumerate(FOLDERS, start=1):
        (root / "Images" / folder).mkdir(parents=True)
        (root / "Annotation" / folder).mkdir(parents=True)
        wnid = folder.split("-")[0]
        for k in range(PER_CLASS):
            stem = f"{wnid}_{100 + k}"
            width, height = 40 + 4 * k, 30 + 2 * k
            Image.new("RGB", (width, height), (40 * label, 50, 60)).save(
                root / "Images" / folder / f"{stem}.jpg"
            )
            objects = _OBJ % (3, 4, 20, 25)
            if k == 0:  # two dogs; the second box overhangs the image (xmax = width + 5)
                objects += _OBJ % (10, 2, width + 5, 12)
            (root / "Annotation" / folder / stem).write_text(_XML % (stem, width, height, objects))
            which = "test" if k == PER_CLASS - 1 else "train"
            lists[which][0].append(f"{folder}/{stem}.jpg")
            lists[which][1].append(label)
    for which, (files, labels) in lists.items():
        write_list(root / "lists" / f"{which}_list.mat", files, labels)
    return root


@pytest.fixture
def fake_dogs(tmp_path: Path) -> Path:
    return write_fake_dogs(tmp_path / "dogs")


def test_mat_reads_like_the_real_files(fake_dogs: Path) -> None:
    raw = sio.loadmat(fake_dogs / "lists" / "train_list.mat")  # MATLAB's own view: N x 1 cells
    assert raw["file_list"].shape == (9, 1) and raw["labels"].shape == (9, 1)
    assert raw["file_list"][0, 0][0] == "n02085620-Chihuahua/n02085620_100.jpg"


def test_labels_classes_and_splits(fake_dogs: Path) -> None:
    assert {"stanford_dogs", "stanford_cars", "fgvc_aircraft"} <= set(list_datasets())
    ds = StanfordDogs(fake_dogs, "trainval")
    assert ds.classes == ["Chihuahua", "Shih-Tzu", "African_hunting_dog"] and len(ds) == 9
    for s in ds.samples:
        assert s.path.parent.name == FOLDERS[s.label] and s.parts is None
    test = StanfordDogs(fake_dogs, "test")
    assert len(test) == 3 and Counter(s.label for s in test.samples) == {0: 1, 1: 1, 2: 1}
    train = StanfordDogs(fake_dogs, "train", val_fraction=0.34, seed=1)
    val = StanfordDogs(fake_dogs, "val", val_fraction=0.34, seed=1)
    assert len(train) == 6 and len(val) == 3
    assert {s.path for s in train.samples} | {s.path for s in val.samples} == {s.path for s in ds.samples}
    assert len(StanfordDogs(fake_dogs, "trainval", max_images=4)) == 4
    assert len(build_dataset("stanford_dogs", fake_dogs, "test")) == 3


def test_boxes_union_converted_and_clipped(fake_dogs: Path) -> None:
    ds = StanfordDogs(fake_dogs, "trainval")
    first, second = ds.samples[0], ds.samples[1]
    # union of (3, 4, 20, 25) and (10, 2, 45, 12), 1-based inclusive -> (xmin - 1, ymin - 1, xmax, ymax)
    torch.testing.assert_close(first.box, torch.tensor([2.0, 1.0, 45.0, 25.0]))
    torch.testing.assert_close(second.box, torch.tensor([2.0, 3.0, 20.0, 25.0]))
    item = ds[0]  # loaded: clipped to the 40 px wide image, then normalised
    torch.testing.assert_close(item["box"], torch.tensor([2 / 40, 1 / 30, 1.0, 25 / 30]))


def test_item_dict(fake_dogs: Path) -> None:
    t = build_transform(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=True)
    item = StanfordDogs(fake_dogs, "test", t)[-1]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 2
    assert item["box"].shape == (4,) and item["parts"].shape == (0, 3)
    assert bool(item["has_box"]) and int(item["index"]) == 2


def test_missing_files_are_named(fake_dogs: Path) -> None:
    (fake_dogs / "lists" / "test_list.mat").unlink()
    with pytest.raises(DatasetError, match=r"test_list\.mat: not found"):
        StanfordDogs(fake_dogs, "test")
    StanfordDogs(fake_dogs, "train")  # only the split's list is needed
    (fake_dogs / "Annotation" / FOLDERS[1] / "n02086240_101").unlink()
    with pytest.raises(DatasetError, match=r"n02086240_101: annotation not found"):
        StanfordDogs(fake_dogs, "trainval")
    (fake_dogs / "Images" / FOLDERS[0] / "n02085620_100.jpg").unlink()
    with pytest.raises(DatasetError, match=r"n02085620_100\.jpg: not found \(listed in .*train_list\.mat"):
        StanfordDogs(fake_dogs, "trainval")
    with pytest.raises(DatasetError, match=r"Images: not found"):
        StanfordDogs(fake_dogs / "lists")


@pytest.mark.parametrize(
    ("files", "labels", "problem"),
    [
        (["n02085620-Chihuahua/n02085620_100.jpg"], [4], r"labels entry 1: .* is not a class number 1\.\.3"),
        (["n02085620-Chihuahua/n02085620_100.jpg"], [2], r"entry 1: label 2 is folder 'n02086240-Shih-Tzu'"),
        (["../n02085620_100.jpg"], [1], r"file_list entry 1: expected '<folder>/<image>'"),
        (["a/b.jpg", "a/c.jpg"], [1], r"file_list has 2 entries but labels has 1"),
    ],
)
def test_malformed_list_entries(fake_dogs: Path, files: list[str], labels: list[int], problem: str) -> None:
    write_list(fake_dogs / "lists" / "train_list.mat", files, labels)
    with pytest.raises(DatasetError, match=rf"train_list\.mat: {problem}"):
        StanfordDogs(fake_dogs, "trainval")


def test_malformed_files(fake_dogs: Path) -> None:
    (fake_dogs / "lists" / "test_list.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match=r"test_list\.mat: not a readable MATLAB file"):
        StanfordDogs(fake_dogs, "test")
    sio.savemat(fake_dogs / "lists" / "test_list.mat", {"labels": np.ones((1, 1))})
    with pytest.raises(DatasetError, match=r"test_list\.mat: no variable 'file_list'"):
        StanfordDogs(fake_dogs, "test")
    xml = fake_dogs / "Annotation" / FOLDERS[0] / "n02085620_101"
    xml.write_text("<annotation>\n<object>\n</annotation>")
    with pytest.raises(DatasetError, match=r"n02085620_101:3: malformed XML"):
        StanfordDogs(fake_dogs, "trainval")
    xml.write_text(_XML % ("x", 1, 1, _OBJ.replace("<xmax>%d", "<xmax>wide") % (1, 2, 3)))
    with pytest.raises(DatasetError, match=r"n02085620_101: <bndbox> needs numeric"):
        StanfordDogs(fake_dogs, "trainval")
