"""StanfordCars on a tiny fake devkit tree, with the .mat files written by scipy like the real ones."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from racnn.data import DatasetError, StanfordCars, build_dataset, build_transform

sio = pytest.importorskip("scipy.io")

CLASSES = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Aston Martin V8 Vantage Coupe 2012")
PER_CLASS = 4  # train images per class; 1 test image per class
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def write_annos(path: Path, rows: list[tuple[float, float, float, float, int, str]]) -> None:
    """A 1 x N struct array ``annotations`` whose fields hold 1 x 1 numbers and a string, as in the devkit."""
    records = np.empty((1, len(rows)), dtype=[(f, object) for f in FIELDS])
    for i, (*corners, label, fname) in enumerate(rows):
        numbers = [np.array([[c]], dtype=np.uint16) for c in corners]
        records[0, i] = (*numbers, np.array([[label]], dtype=np.uint8), np.array([fname]))
    sio.savemat(path, {"annotations": records})


def write_fake_cars(root: Path, *, test_annos_in_devkit: bool = False) -> Path:
    (root / "devkit").mkdir(parents=True)
    names = np.empty((1, len(CLASSES)), dtype=object)  # 1 x 196 cell in the real cars_meta.mat
    names[0, :] = CLASSES
    sio.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, per_class in (("train", PER_CLASS), ("test", 1)):
        (root / f"cars_{split}").mkdir()
        rows = []
        for k in range(per_class * len(CLASSES)):
            fname, label = f"{k + 1:05d}.jpg", k % len(CLASSES) + 1
            width, height = 48 + 2 * k, 32
            Image.new("RGB", (width, height), (20 * k, 80, 120)).save(root / f"cars_{split}" / fname)
            x2 = width + 7 if k == 0 else 30  # the first box overhangs the image
            rows.append((1, 2, x2, 20 + k % 3, label, fname))
        where = root / "devkit" if split == "train" or test_annos_in_devkit else root
        write_annos(where / f"cars_{split}_annos{'_withlabels' if split == 'test' else ''}.mat", rows)
    return root


@pytest.fixture
def fake_cars(tmp_path: Path) -> Path:
    return write_fake_cars(tmp_path / "cars")


def test_mat_reads_like_the_real_files(fake_cars: Path) -> None:
    raw = sio.loadmat(fake_cars / "devkit" / "cars_train_annos.mat")["annotations"]
    assert raw.shape == (1, 12) and raw.dtype.names == FIELDS
    assert raw[0, 0]["fname"][0] == "00001.jpg" and raw[0, 0]["class"].shape == (1, 1)


def test_labels_classes_and_splits(fake_cars: Path) -> None:
    ds = StanfordCars(fake_cars, "trainval")
    assert ds.classes == list(CLASSES) and len(ds) == 12
    assert [s.label for s in ds.samples[:4]] == [0, 1, 2, 0] and ds.samples[0].path.name == "00001.jpg"
    assert all(s.path.parent.name == "cars_train" for s in ds.samples)
    test = StanfordCars(fake_cars, "test")
    assert len(test) == 3 and all(s.path.parent.name == "cars_test" for s in test.samples)
    train = StanfordCars(fake_cars, "train", val_fraction=0.25, seed=3)
    val = StanfordCars(fake_cars, "val", val_fraction=0.25, seed=3)
    assert Counter(s.label for s in val.samples) == {0: 1, 1: 1, 2: 1} and len(train) == 9
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}
    assert len(StanfordCars(fake_cars, "trainval", max_images=5)) == 5
    assert len(build_dataset("stanford_cars", fake_cars, "test")) == 3


def test_test_annos_in_devkit_and_torchvision_parent(tmp_path: Path) -> None:
    root = write_fake_cars(tmp_path / "stanford_cars", test_annos_in_devkit=True)
    assert not (root / "cars_test_annos_withlabels.mat").exists()
    assert len(StanfordCars(root, "test")) == 3
    assert len(StanfordCars(tmp_path, "test")) == 3  # torchvision's root/stanford_cars/ layout


def test_boxes_converted_and_clipped(fake_cars: Path) -> None:
    ds = StanfordCars(fake_cars, "trainval")
    # 1-based inclusive (1, 2, x2, y2) -> continuous (0, 1, x2, y2)
    torch.testing.assert_close(ds.samples[0].box, torch.tensor([0.0, 1.0, 55.0, 20.0]))
    torch.testing.assert_close(ds.samples[1].box, torch.tensor([0.0, 1.0, 30.0, 21.0]))
    item = ds[0]  # clipped to the 48 px wide image when loaded
    torch.testing.assert_close(item["box"], torch.tensor([0.0, 1 / 32, 1.0, 20 / 32]))


def test_item_dict(fake_cars: Path) -> None:
    t = build_transform(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=False)
    item = StanfordCars(fake_cars, "test", t)[1]
    assert (
        item["image"].shape == (3, 32, 32) and item["label"].dtype == torch.int64 and int(item["label"]) == 1
    )
    assert item["parts"].shape == (0, 3) and bool(item["has_box"]) and int(item["index"]) == 1


def test_missing_files_are_named(fake_cars: Path) -> None:
    (fake_cars / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match=r"cars_test_annos_withlabels\.mat: not found \(expected devkit/"):
        StanfordCars(fake_cars, "test")
    (fake_cars / "cars_train" / "00003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"00003\.jpg: not found \(listed in .*cars_train_annos\.mat\)"):
        StanfordCars(fake_cars, "trainval")
    (fake_cars / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(DatasetError, match=r"cars_meta\.mat: not found"):
        StanfordCars(fake_cars, "trainval")
    with pytest.raises(DatasetError, match=r"devkit: not found"):
        StanfordCars(fake_cars / "cars_train")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ((1, 2, 30, 20, 9, "00001.jpg"), r"annotation 1 \(00001\.jpg\): class .* is not a number 1\.\.3"),
        ((40, 2, 30, 20, 1, "00001.jpg"), r"annotation 1 \(00001\.jpg\): box .* is inverted"),
        ((1, 2, 30, 20, 1, "../00001.jpg"), r"annotation 1: fname .* is not a file name"),
    ],
)
def test_malformed_annotations(fake_cars: Path, row: tuple, problem: str) -> None:
    write_annos(fake_cars / "devkit" / "cars_train_annos.mat", [row])  # one record: squeezes to 0-d
    with pytest.raises(DatasetError, match=rf"cars_train_annos\.mat: {problem}"):
        StanfordCars(fake_cars, "trainval")


def test_malformed_files(fake_cars: Path) -> None:
    annos = fake_cars / "devkit" / "cars_train_annos.mat"
    sio.savemat(annos, {"annotations": {"fname": "x.jpg", "class": 1}})  # a struct without the box fields
    with pytest.raises(DatasetError, match=r"cars_train_annos\.mat: 'annotations' has no field 'bbox_x1'"):
        StanfordCars(fake_cars, "trainval")
    sio.savemat(annos, {"annotations": np.ones((1, 3))})
    with pytest.raises(DatasetError, match=r"cars_train_annos\.mat: 'annotations' is not a struct array"):
        StanfordCars(fake_cars, "trainval")
    sio.savemat(fake_cars / "devkit" / "cars_meta.mat", {"names": np.ones(2)})
    with pytest.raises(DatasetError, match=r"cars_meta\.mat: no variable 'class_names'"):
        StanfordCars(fake_cars, "trainval")
