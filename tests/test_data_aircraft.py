"""FGVCAircraft on a tiny fake ``fgvc-aircraft-2013b`` tree."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from racnn.data import DatasetError, FGVCAircraft, build_dataset, build_transform

# variant -> (family, manufacturer)
VARIANTS = {
    "707-320": ("Boeing 707", "Boeing"),
    "F/A-18": ("F/A-18", "McDonnell Douglas"),
    "DHC-8-100": ("DHC-8", "de Havilland"),
    "DHC-8-300": ("DHC-8", "de Havilland"),
}
PER_CLASS = 4  # 2 train + 1 val (= 3 trainval) + 1 test per variant
WIDTH, HEIGHT = 48, 60


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def write_fake_aircraft(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    rows: dict[str, list[str]] = {}
    boxes = []
    image_id = 34300
    for v, (variant, (family, maker)) in enumerate(VARIANTS.items()):
        for k, split in enumerate(("train", "train", "val", "test")):
            image_id += 1
            name = f"{image_id:07d}"  # ids keep their leading zeros
            Image.new("RGB", (WIDTH, HEIGHT), (30 * v, 60, 90)).save(data / "images" / f"{name}.jpg")
            # first image: the box reaches into the 20 px banner and past the right edge
            boxes.append(f"{name} 3 5 {WIDTH + 4 if k == 0 else 30} {HEIGHT if k == 0 else 25}")
            for level, label in (("variant", variant), ("family", family), ("manufacturer", maker)):
                for part in {split, "trainval" if split != "test" else "test"}:
                    rows.setdefault(f"images_{level}_{part}.txt", []).append(f"{name} {label}")
    for file, lines in rows.items():
        _write(data / file, lines)
    _write(data / "images_box.txt", boxes)
    _write(data / "variants.txt", list(VARIANTS))
    _write(data / "families.txt", list(dict.fromkeys(f for f, _ in VARIANTS.values())))
    _write(data / "manufacturers.txt", list(dict.fromkeys(m for _, m in VARIANTS.values())))
    return data.parent


@pytest.fixture
def fake_aircraft(tmp_path: Path) -> Path:
    return write_fake_aircraft(tmp_path)


def test_levels_classes_and_labels(fake_aircraft: Path) -> None:
    ds = FGVCAircraft(fake_aircraft, "trainval")
    assert ds.classes == list(VARIANTS) and len(ds) == 12 and ds.samples[0].path.name == "0034301.jpg"
    assert [s.label for s in ds.samples[::3]] == [0, 1, 2, 3]
    family = FGVCAircraft(fake_aircraft, "trainval", level="family")
    assert family.classes == ["Boeing 707", "F/A-18", "DHC-8"]
    assert Counter(s.label for s in family.samples) == {0: 3, 1: 3, 2: 6}
    maker = FGVCAircraft(fake_aircraft.parent, "test", level="manufacturer")  # parent folder accepted
    assert maker.classes == ["Boeing", "McDonnell Douglas", "de Havilland"]
    assert [s.label for s in maker.samples] == [0, 1, 2, 2]
    with pytest.raises(DatasetError, match="unknown level 'model'"):
        FGVCAircraft(fake_aircraft, level="model")


def test_splits(fake_aircraft: Path) -> None:
    assert len(FGVCAircraft(fake_aircraft, "test")) == 4
    train = FGVCAircraft(fake_aircraft, "train", val_fraction=0.34)  # carved from trainval by default
    val = FGVCAircraft(fake_aircraft, "val", val_fraction=0.34)
    assert len(train) == 8 and Counter(s.label for s in val.samples) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert len(FGVCAircraft(fake_aircraft, "train", val_fraction=0.0)) == 12
    official = FGVCAircraft(fake_aircraft, "val", official_val=True)
    assert [s.path.name for s in official.samples] == [
        "0034303.jpg",
        "0034307.jpg",
        "0034311.jpg",
        "0034315.jpg",
    ]
    assert len(FGVCAircraft(fake_aircraft, "train", official_val=True)) == 8
    assert len(FGVCAircraft(fake_aircraft, "trainval", max_images=5)) == 5
    assert len(build_dataset("fgvc_aircraft", fake_aircraft, "test")) == 4


def test_boxes_and_banner_crop(fake_aircraft: Path) -> None:
    ds = FGVCAircraft(fake_aircraft, "trainval")
    # 1-based inclusive (3, 5, x2, y2) -> continuous (2, 4, x2, y2)
    torch.testing.assert_close(ds.samples[0].box, torch.tensor([2.0, 4.0, 52.0, 60.0]))
    torch.testing.assert_close(ds.samples[1].box, torch.tensor([2.0, 4.0, 30.0, 25.0]))
    assert ds.raw(0)[0].size == (WIDTH, HEIGHT - 20)
    item = ds[0]  # 48 x 40 after the crop: the box is clipped to it
    torch.testing.assert_close(item["box"], torch.tensor([2 / 48, 4 / 40, 1.0, 1.0]))
    torch.testing.assert_close(ds[1]["box"], torch.tensor([2 / 48, 4 / 40, 30 / 48, 25 / 40]))
    full = FGVCAircraft(fake_aircraft, "trainval", crop_banner=False)
    assert full.raw(0)[0].size == (WIDTH, HEIGHT)
    torch.testing.assert_close(full[1]["box"], torch.tensor([2 / 48, 4 / 60, 30 / 48, 25 / 60]))


def test_item_dict(fake_aircraft: Path) -> None:
    t = build_transform(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=True)
    ds = FGVCAircraft(fake_aircraft, "test", t)
    item = ds[-1]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 3
    assert item["parts"].shape == (0, 3) and bool(item["has_box"]) and int(item["index"]) == 3
    with pytest.raises(IndexError):
        ds[4]


def test_missing_files_are_named(fake_aircraft: Path) -> None:
    data = fake_aircraft / "data"
    (data / "images_variant_val.txt").unlink()
    with pytest.raises(DatasetError, match=r"images_variant_val\.txt: not found"):
        FGVCAircraft(fake_aircraft, "val", official_val=True)
    (data / "images" / "0034302.jpg").unlink()
    with pytest.raises(DatasetError, match=r"0034302\.jpg: not found"):
        FGVCAircraft(fake_aircraft, "trainval")
    (data / "families.txt").unlink()
    with pytest.raises(DatasetError, match=r"families\.txt: not found"):
        FGVCAircraft(fake_aircraft, "test", level="family")
    with pytest.raises(DatasetError, match=r"data: not found"):
        FGVCAircraft(data)


@pytest.mark.parametrize(
    ("file", "lineno", "text", "problem"),
    [
        ("images_box.txt", 2, "0034302 3 5 30", "expected 5 fields, got 4"),
        ("images_box.txt", 3, "0034303 3 5 x 25", "box '3 5 x 25' is not numeric"),
        ("images_box.txt", 4, "0034304 30 5 3 25", "invalid box 30 5 3 25"),
        ("images_box.txt", 5, "0034301 3 5 30 25", "duplicate image id 0034301"),
        ("images_variant_trainval.txt", 2, "0034302 737-800", "unknown class '737-800'"),
        (
            "images_variant_trainval.txt",
            3,
            "0034301 707-320",
            r"duplicate image id 0034301 \(first on line 1\)",
        ),
        ("images_variant_trainval.txt", 4, "0034305", "expected '<image id> <class name>'"),
        ("variants.txt", 3, "707-320", r"duplicate class '707-320' \(first on line 1\)"),
    ],
)
def test_malformed_line_names_file_and_line(
    fake_aircraft: Path, file: str, lineno: int, text: str, problem: str
) -> None:
    path = fake_aircraft / "data" / file
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{file}:{lineno}: {problem}"):
        FGVCAircraft(fake_aircraft, "trainval")


def test_box_missing_for_an_image(fake_aircraft: Path) -> None:
    box_file = fake_aircraft / "data" / "images_box.txt"
    box_file.write_text("\n".join(box_file.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(DatasetError, match=r"images_box\.txt: no box for image 0034301"):
        FGVCAircraft(fake_aircraft, "trainval")


def test_levels_are_registered_dataset_names(fake_aircraft: Path) -> None:
    """``data.name=fgvc_aircraft_family`` reaches the family level from the config and the CLI."""
    family = build_dataset("fgvc_aircraft_family", fake_aircraft, "trainval")
    variant = build_dataset("fgvc_aircraft", fake_aircraft, "trainval")
    assert family.classes == FGVCAircraft(fake_aircraft, "trainval", level="family").classes
    assert len(family.classes) < len(variant.classes)
