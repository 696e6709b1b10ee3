"""CUB200 on a tiny fake tree (always) and on the real subset in ../shared (marked ``cub``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REAL_CUB
from racnn.data import CUB200, DatasetError, build_dataset, build_transform, list_datasets


def _edit_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_labels_classes_and_parts(fake_cub: Path) -> None:
    ds = CUB200(fake_cub, "trainval")
    assert ds.classes == ["003.Bird_3", "007.Bird_7", "012.Bird_12"] and ds.num_classes == 3
    for s in ds.samples:
        assert s.path.parent.name == ds.classes[s.label]
    assert ds.part_names == ["back", "beak", "left eye", "right eye", "tail"]
    assert ds.head_parts == [1, 2, 3]
    assert CUB200(fake_cub.parent, "trainval").samples == ds.samples  # parent folder accepted too


def test_splits_are_disjoint_stratified_and_seeded(fake_cub: Path) -> None:
    trainval = {s.path for s in CUB200(fake_cub, "trainval").samples}
    test = CUB200(fake_cub, "test")
    assert len(trainval) == 12 and len(test) == 3 and not trainval & {s.path for s in test.samples}
    splits = {}
    for seed in range(4):
        train = CUB200(fake_cub, "train", val_fraction=0.25, seed=seed)
        val = CUB200(fake_cub, "val", val_fraction=0.25, seed=seed)
        train_paths, val_paths = {s.path for s in train.samples}, {s.path for s in val.samples}
        assert not train_paths & val_paths and train_paths | val_paths == trainval
        assert Counter(s.label for s in val.samples) == {0: 1, 1: 1, 2: 1}  # one per class
        splits[seed] = val_paths
    assert {s.path for s in CUB200(fake_cub, "val", val_fraction=0.25, seed=2).samples} == splits[2]
    assert len(set(map(frozenset, splits.values()))) > 1  # the seed matters
    assert len(CUB200(fake_cub, "val", val_fraction=0.0)) == 0
    assert {s.path for s in CUB200(fake_cub, "train", val_fraction=0.0).samples} == trainval


def test_max_images_spreads_over_classes(fake_cub: Path) -> None:
    ds = CUB200(fake_cub, "trainval", max_images=4, seed=1)
    assert len(ds) == 4 and len({s.label for s in ds.samples}) == 3
    assert ds.samples == CUB200(fake_cub, "trainval", max_images=4, seed=1).samples
    assert len(CUB200(fake_cub, "test", max_images=100)) == 3


def test_box_conversion_and_clipping(fake_cub: Path) -> None:
    ds = CUB200(fake_cub, "trainval")
    first, second = ds.samples[0], ds.samples[1]  # k = 0 (overhanging) and k = 1 of class id 12
    torch.testing.assert_close(first.box, torch.tensor([0.0, 5.0, 42.0, 21.0]))  # x = -1 clipped to 0
    torch.testing.assert_close(second.box, torch.tensor([4.0, 5.0, 4.0 + 23.0, 5.0 + 18.0]))
    assert ds.raw(0)[0].size == (40, 32)
    item = ds[0]  # eval transform: the box is clipped to the 40 px width, then scaled
    torch.testing.assert_close(item["box"], torch.tensor([0.0, 5 / 32, 1.0, 21 / 32]))


def test_item_dict(fake_cub: Path) -> None:
    t = build_transform(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=True)
    ds = CUB200(fake_cub, "trainval", t)
    for i in (0, len(ds) - 1, -1):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].shape == ()
        assert item["box"].shape == (4,) and item["parts"].shape == (5, 3)
        assert item["has_box"].dtype == torch.bool and bool(item["has_box"])
        assert item["index"].dtype == torch.int64 and int(item["index"]) == i % len(ds)
        assert item["parts"][4].eq(0).all()  # "tail" is invisible everywhere
    with pytest.raises(IndexError):
        ds[len(ds)]
    default = CUB200(fake_cub, "test")[0]  # no transform: eval at 224
    assert default["image"].shape == (3, 224, 224)
    grey = next(i for i, s in enumerate(ds.samples) if s.path.name == "img_106.jpg")
    assert ds[grey]["image"].shape == (3, 32, 32)


def test_missing_file_names_it(fake_cub: Path) -> None:
    (fake_cub / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetError, match=r"bounding_boxes\.txt: not found \(expected the CUB-200-2011"):
        CUB200(fake_cub)
    with pytest.raises(DatasetError, match=r"images\.txt: not found"):
        CUB200(fake_cub / "images")


@pytest.mark.parametrize(
    ("file", "lineno", "text", "problem"),
    [
        ("image_class_labels.txt", 2, "102 x", "class id 'x' is not an integer"),
        ("image_class_labels.txt", 3, "103 99", "unknown class id 99"),
        ("image_class_labels.txt", 4, "999 3", "unknown image id 999"),
        ("bounding_boxes.txt", 3, "103 1 2 3", "expected 5 fields, got 4"),
        ("bounding_boxes.txt", 2, "102 1 2 nan 4", "width 'nan' is not a finite number"),
        ("train_test_split.txt", 5, "101 1", r"duplicate image id 101 \(first on line 1\)"),
        ("train_test_split.txt", 2, "102 2", "train flag '2' is not 0 or 1"),
        ("images.txt", 2, "102 ../../etc/passwd", "image path .* escapes"),
        ("images.txt", 3, "101 x.jpg", "duplicate image id 101"),
        ("classes.txt", 1, "abc name", "id 'abc' is not an integer"),
        ("parts/part_locs.txt", 7, "101 9 1 1 1", "unknown part id 9"),
    ],
)
def test_malformed_line_names_file_and_line(
    fake_cub: Path, file: str, lineno: int, text: str, problem: str
) -> None:
    _edit_line(fake_cub / file, lineno, text)
    with pytest.raises(DatasetError, match=rf"{file.split('/')[-1]}:{lineno}: {problem}"):
        CUB200(fake_cub, "trainval")


def test_missing_and_broken_images(fake_cub: Path) -> None:
    ds = CUB200(fake_cub, "trainval")
    data = ds.samples[1].path.read_bytes()
    ds.samples[1].path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=rf"{ds.samples[1].path.name}: cannot read image"):
        ds[1]
    ds.samples[2].path.unlink()
    with pytest.raises(
        DatasetError, match=rf"{ds.samples[2].path.name}: not found \(listed in .*images\.txt:3\)"
    ):
        CUB200(fake_cub, "trainval")


def test_registry(fake_cub: Path, tmp_path: Path) -> None:
    expected = ["cub", "fgvc_aircraft", "fgvc_aircraft_family", "fgvc_aircraft_manufacturer", "imagefolder"]
    expected += ["stanford_cars", "stanford_dogs", "synthetic"]
    assert list_datasets() == expected
    assert len(build_dataset("cub", fake_cub.parent, "test")) == 3
    with pytest.raises(DatasetError, match=rf"unknown dataset 'imagenet' \(known: {', '.join(expected)}\)"):
        build_dataset("imagenet", fake_cub, "train")
    with pytest.raises(DatasetError, match=r"nowhere: dataset folder not found"):
        build_dataset("cub", tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        CUB200(fake_cub, "dev")
    with pytest.raises(DatasetError, match="val_fraction"):
        CUB200(fake_cub, "train", val_fraction=1.0)


@pytest.mark.cub
@pytest.mark.skipif(not REAL_CUB.is_dir(), reason=f"{REAL_CUB} not present")
def test_real_cub_subset() -> None:
    trainval, test = CUB200(REAL_CUB, "trainval"), CUB200(REAL_CUB.parent, "test")
    assert (len(trainval), len(test), trainval.num_classes) == (750, 652, 25)
    train, val = CUB200(REAL_CUB, "train"), CUB200(REAL_CUB, "val")
    assert len(train) + len(val) == 750 and not {s.path for s in train.samples} & {
        s.path for s in val.samples
    }
    assert len(trainval.head_parts) == 7 and len(trainval.part_names) == 15
    assert [trainval.part_names[i] for i in trainval.head_parts] == [
        "beak",
        "crown",
        "forehead",
        "left eye",
        "nape",
        "right eye",
        "throat",
    ]
    item = trainval[0]
    box = item["box"]
    assert item["image"].shape == (3, 224, 224) and item["parts"].shape == (15, 3)
    assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1 and (box[2] - box[0]) > 0.1
    visible = item["parts"][:, 2] == 1
    assert visible.any() and ((item["parts"][visible, :2] >= 0) & (item["parts"][visible, :2] <= 1)).all()
    assert len({s.label for s in CUB200(REAL_CUB, "train", max_images=32).samples}) == 25
