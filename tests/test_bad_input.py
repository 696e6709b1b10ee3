"""Bad input gives a one-line error naming the file (and line) and what was expected, or, with
``--skip-bad-images``, is skipped and counted: image modes, corrupt, truncated and missing images, metadata
lines, labels out of range, checkpoints of another model. (CUB metadata errors: see test_data_cub.py.)"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL
from racnn.checkpoint import load_checkpoint, model_record, save_checkpoint
from racnn.cli import main
from racnn.config import load_config
from racnn.data import CUB200, DatasetError, load_image
from racnn.data import base as data_base
from racnn.data.base import AnnotatedImageDataset, Sample, check_labels
from racnn.model import build_model
from racnn.training import loaders

TINY = [
    *TINY_MODEL,
    "train.batch_size=4",
    "train.epochs=1",
    "apn.init_steps=1",
]


def _one_line(err: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------ image files
@pytest.mark.parametrize(
    ("mode", "suffix", "colour"),
    [
        ("L", ".jpg", 120),  # greyscale
        ("CMYK", ".jpg", (0, 255, 255, 0)),  # CMYK JPEG: red
        ("RGBA", ".png", (0, 0, 255, 0)),  # fully transparent blue: white
        ("LA", ".png", (0, 0)),  # greyscale with alpha, transparent: white
        ("I;16", ".png", 65535),  # 16-bit greyscale, rescaled
        ("P", ".gif", 3),
    ],
)
def test_every_image_mode_loads_as_rgb(tmp_path: Path, mode: str, suffix: str, colour: object) -> None:
    path = tmp_path / f"image{suffix}"
    Image.new(mode, (12, 8), colour).save(path)  # type: ignore[arg-type]
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 8)
    pixel = np.asarray(image)[4, 6]
    if mode == "CMYK":
        assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60
    if mode in ("RGBA", "LA"):
        assert (pixel == 255).all()  # transparent on white


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_unreadable_image_names_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "bird.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"GIF89a not really" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(DatasetError) as e:
        load_image(path)
    assert str(e.value).startswith(f"{path}: cannot read image (") and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- loaders and training
def _break_images(cub: Path, names: list[str]) -> list[Path]:
    paths = [next((cub / "images").rglob(name)) for name in names]
    for p in paths:
        p.write_bytes(p.read_bytes()[:40])  # a truncated JPEG
    return paths


def _cfg(cub: Path, *extra: str) -> object:
    return load_config(None, [*TINY, f"data.root={cub}", *extra])


def test_worker_errors_are_one_line_and_name_the_file(fake_cub: Path) -> None:
    (bad,) = _break_images(fake_cub, ["img_101.jpg"])
    cfg = _cfg(fake_cub, "data.num_workers=1", "data.val_fraction=0")
    data = loaders.make_dataset(cfg, "train", build_model(cfg.model, num_classes=3).preprocessing, train=True)
    with pytest.raises(DatasetError) as e:
        list(loaders.make_loader(data, cfg, train=True))
    assert str(e.value).startswith(f"{bad}: cannot read image") and "\n" not in str(e.value)


def test_skipping_replaces_in_training_and_drops_in_evaluation(fake_cub: Path) -> None:
    _break_images(fake_cub, ["img_101.jpg", "img_107.jpg"])  # both in trainval
    cfg = _cfg(fake_cub, "data.num_workers=0", "data.val_fraction=0", "data.skip_bad_images=true")
    prep = build_model(cfg.model, num_classes=3).preprocessing
    train = loaders.make_loader(loaders.make_dataset(cfg, "train", prep, train=True), cfg, train=True)
    batches = list(train)
    assert [len(b["label"]) for b in batches] == [4, 4, 4]  # 12 images: shapes and steps as planned
    assert train.bad_images == 2 and int(sum(b["bad"].sum() for b in batches)) == 2
    trainval = loaders.make_dataset(cfg, "trainval", prep, train=False)
    evaluation = loaders.make_loader(trainval, cfg)
    assert sum(len(b["label"]) for b in evaluation) == 10 and evaluation.bad_images == 2


def test_each_unreadable_image_is_reported_once_however_often_it_is_met(
    fake_cub: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every validation builds a fresh loader (fresh workers): the warning must still come once per file."""
    monkeypatch.setattr(data_base, "_reported", set())
    bad = _break_images(fake_cub, ["img_101.jpg", "img_107.jpg"])
    cfg = _cfg(fake_cub, "data.num_workers=1", "data.val_fraction=0", "data.skip_bad_images=true")
    prep = build_model(cfg.model, num_classes=3).preprocessing
    trainval = loaders.make_dataset(cfg, "trainval", prep, train=False)
    with caplog.at_level(logging.WARNING, logger="racnn.data"):
        for _ in range(3):
            loader = loaders.make_loader(trainval, cfg)
            assert sum(len(b["label"]) for b in loader) == 10 and loader.bad_images == 2
    warned = [r.getMessage() for r in caplog.records if r.name == "racnn.data"]
    assert len(warned) == 2 and all(any(str(p) in m for m in warned) for p in bad)


def test_train_stops_on_a_bad_image_or_skips_and_counts_it(
    fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    bad = _break_images(fake_cub, ["img_101.jpg", "img_115.jpg"])  # training and test images
    args = ["train", "--data", str(fake_cub), "--no-progress", "--set", *TINY, "data.val_fraction=0"]
    assert main([*args, "data.num_workers=1", "--out", str(tmp_path / "stop")]) == 2
    err = _one_line(capsys.readouterr().err)  # the loader worker's traceback is cut to its message
    assert err.startswith(f"racnn train: error: {bad[0]}: cannot read image (")

    with caplog.at_level(logging.WARNING, logger="racnn.data"):
        assert main([*args, "data.num_workers=0", "--out", str(tmp_path / "skip"), "--skip-bad-images"]) == 0
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bad_images"] == 1  # counted per epoch
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert metrics["bad_images"] == 1 and metrics["num_images"] == 2  # the test split: 3 images, 1 bad
    warned = [r.getMessage() for r in caplog.records if r.name == "racnn.data"]
    assert any(str(bad[0]) in m for m in warned) and any(str(bad[1]) in m for m in warned)


def test_missing_image_at_load_time_names_it(fake_cub: Path) -> None:
    ds = CUB200(fake_cub, "trainval")
    ds.samples[3].path.unlink()
    with pytest.raises(DatasetError, match=rf"{ds.samples[3].path}: cannot read image \(No such file"):
        ds[3]


# ------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("102", r"images\.txt:2: expected 2 fields, got 1"),
        ("102 /etc/passwd", r"images\.txt:2: image path '/etc/passwd' escapes .*images"),
        ("102 a/../../../x.jpg", r"images\.txt:2: image path 'a/../../../x.jpg' escapes"),
    ],
)
def test_metadata_errors_reach_the_command_line_as_one_line(
    fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, problem: str
) -> None:
    lines = (fake_cub / "images.txt").read_text().splitlines()
    lines[1] = line
    (fake_cub / "images.txt").write_text("\n".join(lines) + "\n")
    args = ["train", "--data", str(fake_cub), "--out", str(tmp_path / "o"), "--no-progress", "--set", *TINY]
    assert main(args) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("racnn train: error: ") and re.search(problem, err), err


class _Listed(AnnotatedImageDataset):
    def __init__(self, samples: list[Sample], classes: list[str]) -> None:
        super().__init__(None)
        self.samples, self.classes = samples, classes


def test_label_out_of_range_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = _Listed([Sample(tmp_path / "a.jpg", 0), Sample(tmp_path / "b.jpg", 1)], ["x", "y"])
    check_labels(ok)
    bad = _Listed([Sample(tmp_path / "a.jpg", 0), Sample(tmp_path / "b.jpg", 2)], ["x", "y"])
    with pytest.raises(
        DatasetError, match=rf"{tmp_path / 'b.jpg'}: label 2 is out of range \(expected 0\.\.1"
    ):
        check_labels(bad)
    negative = _Listed([Sample(tmp_path / "c.jpg", -1)], ["x"])
    with pytest.raises(DatasetError, match=r"c\.jpg: label -1 is out of range"):
        check_labels(negative)
    # every dataset a run builds is checked
    import racnn.data as data

    monkeypatch.setitem(data.DATASETS, "listed", lambda *a, **k: bad)
    cfg = load_config(None, ["data.name=listed", f"data.root={tmp_path}"])
    prep = build_model(load_config(None, TINY).model, num_classes=2).preprocessing
    with pytest.raises(DatasetError, match="label 2 is out of range"):
        loaders.make_dataset(cfg, "train", prep, train=False)


# ----------------------------------------------------------------------------------------- checkpoints
def _checkpoint(path: Path, classes: list[str], *extra: str, weights_of: list[str] | None = None) -> Path:
    cfg = load_config(None, [*TINY, *extra])
    source = load_config(None, [*TINY, *(weights_of or extra)])
    model = build_model(source.model, num_classes=len(classes))
    save_checkpoint(model_record(model, cfg, classes), path)
    return path


def test_eval_with_a_checkpoint_of_another_class_count(
    fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path / "five.pt", list("abcde"))
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(fake_cub), "--device", "cpu"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{ckpt}: trained on 5 classes (tiny), but {fake_cub} (test) has 3 classes" in err
    renamed = _checkpoint(tmp_path / "three.pt", list("abc"))
    assert main(["eval", "--checkpoint", str(renamed), "--data", str(fake_cub), "--device", "cpu"]) == 2
    assert "has other class names" in _one_line(capsys.readouterr().err)


def test_weights_of_another_model_name_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path / "best.pt", list("abc"), weights_of=["model.apn_hidden=8"])
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["predict", "--checkpoint", str(ckpt), str(image)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{ckpt}: weights do not fit a tiny RA-CNN with 3 classes" in err


@pytest.mark.parametrize("change", ["classes", "weights"])
def test_resume_with_a_last_pt_that_does_not_fit(
    fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(fake_cub), "--out", str(out), "--no-progress"]
    assert main([*args, "--set", *TINY, "data.num_workers=0", "train.epochs=0"]) == 0
    state = load_checkpoint(out / "last.pt")  # written when the run starts
    if change == "classes":
        state["classes"] = state["classes"][:2]
    else:  # weights of another model under this run's config
        other = build_model(load_config(None, [*TINY, "model.apn_hidden=8"]).model, num_classes=3)
        state["model"] = other.state_dict()
    save_checkpoint(state, out / "last.pt")
    before = (out / "last.pt").read_bytes()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = _one_line(capsys.readouterr().err)
    expected = (
        "saved for 2 classes, but" if change == "classes" else "does not fit a tiny RA-CNN with 3 classes"
    )
    assert f"{out / 'last.pt'}: {expected}" in err
    assert (out / "last.pt").read_bytes() == before  # nothing lost


def test_eval_skips_and_counts_bad_images_when_asked(
    fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (bad,) = _break_images(fake_cub, ["img_110.jpg"])  # a test image
    ckpt = _checkpoint(tmp_path / "best.pt", ["003.Bird_3", "007.Bird_7", "012.Bird_12"])
    args = ["eval", "--checkpoint", str(ckpt), "--data", str(fake_cub), "--device", "cpu"]
    assert main([*args, "--json", str(tmp_path / "m.json")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the cleared progress bar
    assert last.startswith(f"racnn eval: error: {bad}: cannot read image (")
    assert main([*args, "--json", str(tmp_path / "m.json"), "--skip-bad-images"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 2 and metrics["bad_images"] == 1
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
