"""Shared fixtures: a tiny fake CUB-200-2011 tree and the location of the real subset in ../shared."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

REAL_CUB = Path(__file__).resolve().parents[1].parent / "shared/datasets/cub200-subset/CUB_200_2011"
# the tiny model every fast end-to-end test trains: 32 px inputs, a 16-unit APN on 2 x 2 features
TINY_MODEL = [
    "model.backbone=tiny",
    "model.pretrained=false",
    "model.input_size=32",
    "data.image_size=32",
    "model.apn_hidden=16",
    "model.apn_grid=2",
    "train.tensorboard=false",
]
SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared/weights"

CLASS_IDS = (12, 3, 7)  # written in this order; labels follow sorted ids: 3 -> 0, 7 -> 1, 12 -> 2
PART_NAMES = {1: "back", 2: "beak", 3: "left eye", 4: "right eye", 5: "tail"}
PER_CLASS = 5  # images per class: 4 train + 1 test


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script, not a package) as the module ``bench_<name>``."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:  # as when the script runs: its sibling modules import
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def interrupt_epoch(trainer: object, call: int) -> None:
    """Make ``trainer.train_epoch`` raise ``KeyboardInterrupt`` (Ctrl-C) on its ``call``-th call."""
    real, calls = trainer.train_epoch, {"n": 0}  # type: ignore[attr-defined]

    def train_epoch(phase: str) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(phase)

    trainer.train_epoch = train_epoch  # type: ignore[attr-defined]


def write_fake_cub(root: Path) -> Path:
    """Write a 3-class, 15-image CUB_200_2011 tree under ``root``; return the CUB_200_2011 folder."""
    cub = root / "CUB_200_2011"
    (cub / "parts").mkdir(parents=True)
    lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "boxes", "locs")}
    image_id = 100  # ids need not start at 1
    for cid in CLASS_IDS:
        folder = cub / "images" / f"{cid:03d}.Bird_{cid}"
        folder.mkdir(parents=True)
        for k in range(PER_CLASS):
            image_id += 1
            width, height = 40 + 6 * k, 32 + 4 * k
            mode = "L" if (cid, k) == (7, 0) else "RGB"  # one greyscale image
            Image.new(mode, (width, height), 90 + 10 * k).save(folder / f"img_{image_id}.jpg")
            lines["images"].append(f"{image_id} {folder.name}/img_{image_id}.jpg")
            lines["labels"].append(f"{image_id} {cid}")
            lines["split"].append(f"{image_id} {int(k < PER_CLASS - 1)}")
            # The first image's box overhangs the image by 2 px on the right and starts at x = -1.
            box_w = width + 3.0 if k == 0 else width / 2
            lines["boxes"].append(f"{image_id} {-1.0 if k == 0 else 4.0} 5.0 {box_w} {height / 2}")
            for pid in PART_NAMES:
                visible = int(pid != 5)
                lines["locs"].append(f"{image_id} {pid} {10.0 * visible + pid} {12.0 * visible} {visible}")
    files = {
        "images.txt": lines["images"],
        "image_class_labels.txt": lines["labels"],
        "train_test_split.txt": lines["split"],
        "bounding_boxes.txt": lines["boxes"],
        "classes.txt": [f"{cid} {cid:03d}.Bird_{cid}" for cid in CLASS_IDS],
        "parts/parts.txt": [f"{pid} {name}" for pid, name in PART_NAMES.items()],
        "parts/part_locs.txt": lines["locs"],
    }
    for name, content in files.items():
        (cub / name).write_text("\n".join(content) + "\n")
    return cub


@pytest.fixture
def fake_cub(tmp_path: Path) -> Path:
    return write_fake_cub(tmp_path)


@pytest.fixture(autouse=True)
def _one_thread():
    """Test tensors are tiny and gain nothing from threads, while 2 OpenMP threads on a busy 2-core machine
    stall (seen 100x slower); every test runs single-threaded and restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
