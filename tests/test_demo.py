"""The embedded synthetic dataset, ``racnn demo`` (shortened), ``racnn visualize`` and ``racnn plot``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from racnn.cli import main
from racnn.data import build_dataset
from racnn.data.synthetic import PATTERNS, SyntheticBirds


def test_synthetic_is_deterministic_and_seeded() -> None:
    a, b = SyntheticBirds(split="test", seed=3), SyntheticBirds(split="test", seed=3)
    c = SyntheticBirds(split="test", seed=4)
    img_a, box_a, parts_a = a.raw(5)
    img_b, box_b, _ = b.raw(5)
    assert np.array_equal(np.asarray(img_a), np.asarray(img_b)) and torch.equal(box_a, box_b)
    assert not np.array_equal(np.asarray(img_a), np.asarray(c.raw(5)[0]))
    # the detail (head) lies on the object
    x0, y0, x1, y1 = box_a.tolist()
    hx, hy, vis = parts_a[0].tolist()
    assert vis == 1 and x0 < hx < x1 and y0 < hy < y1


def test_synthetic_splits_and_interface() -> None:
    train = build_dataset("synthetic", None, "train")
    val = build_dataset("synthetic", None, "val")
    test = build_dataset("synthetic", None, "test", max_images=40)
    assert len(train) + len(val) == 1600 and len(test) == 40
    assert train.num_classes == 8 == len(set(s.label for s in train.samples))
    item = test[0]
    assert item["image"].shape == (3, 224, 224) and item["parts"].shape == (1, 3) and bool(item["has_box"])


def test_the_detail_is_unreadable_small_and_readable_zoomed() -> None:
    """Same object, two patterns: at 64 px the images differ far less than the zoomed heads do."""
    ds = SyntheticBirds(split="test")
    # two test images of the same colour and different pattern, rendered at their own positions
    i, j = 0, 1
    assert ds.samples[i].label // len(PATTERNS) == ds.samples[j].label // len(PATTERNS)
    heads = []
    for k in (i, j):
        img, _, parts = ds.raw(k)
        hx, hy = parts[0, :2].tolist()
        head = img.crop((round(hx) - 6, round(hy) - 6, round(hx) + 6, round(hy) + 6))
        heads.append(
            (np.asarray(head.resize((48, 48))).astype(float), np.asarray(head.resize((2, 2))).astype(float))
        )
    zoomed = np.abs(heads[0][0] - heads[1][0]).mean()
    small = np.abs(heads[0][1] - heads[1][1]).mean()  # ~ what 64 px of a 160 px image leaves of the head
    assert zoomed > 2 * small


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    for name in ("metrics.json", "attention.png", "curves.png", "best.pt", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    keys = ["acc_s1", "acc_s2", "acc_s3", "acc_s12", "acc_s123", "loc_iou_mean", "loc_acc_iou50"]
    for k in [*keys, "box_side_s1", "box_side_s2"]:
        assert 0.0 <= m[k] <= 1.0
    # even the short run puts the scale-2 box on the small detail far more often than chance (~0.3)
    assert m["head_hit_s2"] > 0.6
    assert Image.open(out / "attention.png").size[0] > 600
    assert "scale 2 vs scale 1" in capsys.readouterr().out


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    from racnn.checkpoint import model_record, save_checkpoint
    from racnn.config import load_config
    from racnn.model import build_model

    cfg = load_config(
        None,
        [
            "model.backbone=tiny",
            "model.pretrained=false",
            "model.input_size=32",
            "data.image_size=48",
            "model.apn_hidden=8",
            "model.apn_grid=2",
        ],
    )
    path = tmp_path / "best.pt"
    save_checkpoint(
        model_record(build_model(cfg.model, num_classes=3), cfg, ["alpha", "beta", "gamma"]), path
    )
    return path


def test_visualize_writes_a_picture(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths = []
    for k, size in enumerate([(60, 40), (30, 50)]):
        p = tmp_path / f"im{k}.png"
        Image.new("RGB", size, (40 * k, 100, 200)).save(p)
        paths.append(str(p))
    out = tmp_path / "vis.png"
    assert main(["visualize", "--checkpoint", str(tiny_checkpoint), *paths, "--out", str(out)]) == 0
    w, h = Image.open(out).size
    assert w > h > 300  # two rows


def test_plot_curves_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"phase": "apn_init", "epoch": 0, "loss": 0.1}]
    for e, ph in enumerate(["classify", "classify", "attend"], 1):
        lines.append(
            {
                "epoch": e,
                "phase": ph,
                "loss": 3.0 / e,
                "cls": 3.0 / e,
                "rank": 0.1,
                "val_acc_s1": 0.2 * e,
                "val_acc_s2": 0.25 * e,
            }
        )
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["plot", str(run)]) == 0
    assert Image.open(run / "curves.png").size[0] > 500
    assert main(["plot", str(tmp_path / "nothing")]) != 0
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("{broken\n")
    assert main(["plot", str(run)]) != 0
    assert "metrics.jsonl:1: not JSON" in capsys.readouterr().err
