"""The command line end to end: train (smoke keys of the README), eval, predict, export, errors, help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REAL_CUB, TINY_MODEL
from racnn.cli import main

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "configs" / "cub_mobilenet_v2_cpu.yaml"
EVAL_KEYS = [
    "acc_s1",
    "acc_s2",
    "acc_s3",
    "acc_s12",
    "acc_s123",
    "loc_iou_mean",
    "loc_acc_iou50",
    "box_side_s1",
    "box_side_s2",
]
SMOKE = ["model.backbone=tiny", "model.pretrained=false", "train.epochs=1", "data.max_images=32"]


def _check_metrics(m: dict[str, float]) -> None:
    for k in EVAL_KEYS:
        assert k in m, k
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0, (k, m[k])
    assert 0.25 - 1e-6 <= m["box_side_s1"] <= 1.0  # the configured lower bound holds


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's smoke run, through the installed console script, on real CUB images."""
    if not REAL_CUB.is_dir():
        pytest.skip("real CUB subset not available")
    out = tmp_path_factory.mktemp("run")
    cmd = [
        str(Path(sys.executable).parent / "racnn"),
        "train",
        "--config",
        str(CPU_CONFIG),
        "--data",
        str(REAL_CUB),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        *SMOKE,
    ]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "racnn", *cmd[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.cub
@pytest.mark.slow
def test_train_smoke_writes_everything(trained_run: Path) -> None:
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics.json"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    _check_metrics(metrics)
    assert metrics["num_images"] == 32


@pytest.mark.cub
@pytest.mark.slow
def test_eval_predict_export(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = trained_run / "best.pt"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(REAL_CUB),
                "--max-images",
                "16",
                "--json",
                str(tmp_path / "m.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "scale 1+2+3" in capsys.readouterr().out
    _check_metrics(json.loads((tmp_path / "m.json").read_text()))

    images = sorted((REAL_CUB / "images").glob("001.*/*.jpg"))[:2]
    assert main(["predict", "--checkpoint", str(ckpt), "--json", *map(str, images)]) == 0
    from_pt = json.loads(capsys.readouterr().out)
    assert len(from_pt) == 2
    rec = from_pt[0]
    assert set(rec["top"]) == {"s1", "s2", "s3", "s12", "s123"} and len(rec["top"]["s1"]) == 5
    probs = [e["prob"] for e in rec["top"]["s1"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    x0, y0, x1, y1 = rec["boxes"][0]["xyxy_px"]
    assert 0 <= x0 < x1 <= rec["width"] + 0.5 and 0 <= y0 < y1 <= rec["height"] + 0.5

    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "release")]) == 0
    assert {p.name for p in (tmp_path / "release").iterdir()} == {"model.safetensors", "config.json"}
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "release"), "--json", *map(str, images)]) == 0
    assert json.loads(capsys.readouterr().out) == from_pt
    assert main(["predict", "--checkpoint", str(ckpt), *map(str, images[:1])]) == 0
    assert "attention of scale 1" in capsys.readouterr().out


def test_fake_tree_train_then_resume_finished_run(
    fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "train",
        "--data",
        str(fake_cub),
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
        "--set",
        "model.backbone=tiny",
        "model.pretrained=false",
        "model.input_size=32",
        "data.image_size=32",
        "model.apn_hidden=8",
        "model.apn_grid=2",
        "train.epochs=1",
        "data.num_workers=0",
        "apn.init_steps=1",
    ]
    assert main(args) == 0
    first = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "top5_s123" in first  # (3 classes: always 1; a top-5 that can miss: the 7-class eval test)
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == first


SEVEN = ["ash", "beech", "elm", "fir", "larch", "oak", "yew"]  # more classes than top-5 reaches


def _seven_class_folder(root: Path, per_class: int = 2) -> list[tuple[Path, int]]:
    """An image folder of 7 classes (noise photos, lossless: eval and predict read the same pixels); returns
    the test images with their labels."""
    import torch

    gen, test = torch.Generator().manual_seed(3), []
    for label, cls in enumerate(SEVEN):
        for split, n in (("train", 1), ("test", per_class)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (30 + 3 * i, 40, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.png")
                if split == "test":
                    test.append((root / split / cls / f"{i}.png", label))
    return test


def _seven_class_checkpoint(path: Path, *overrides: str) -> Path:
    import torch

    from racnn.checkpoint import model_record, save_checkpoint
    from racnn.config import load_config
    from racnn.model import build_model

    cfg = load_config(None, [*TINY_MODEL, "data.num_workers=0", "data.name=imagefolder", *overrides])
    torch.manual_seed(0)
    save_checkpoint(model_record(build_model(cfg.model, num_classes=len(SEVEN)), cfg, SEVEN), path)
    return path


def test_eval_reports_top5_per_class_confusions_and_flip_tta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """7 classes, so that top-5 can miss: every figure against a count by hand over racnn.predict's
    decisions (the same model and pixels, one image at a time)."""
    from collections import Counter

    import racnn
    from racnn.checkpoint import load_model

    test = _seven_class_folder(tmp_path / "trees")
    ckpt = _seven_class_checkpoint(tmp_path / "best.pt")
    base = ["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "trees"), "--device", "cpu"]
    base += ["--batch-size", "4"]
    assert main([*base, "--json", str(tmp_path / "plain.json")]) == 0
    assert (
        main([*base, "--json", str(tmp_path / "tta.json"), "--tta", "flip", "--figures", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    assert "flip TTA" in out and "top-5" in out and "mean per-class accuracy" in out
    plain, tta = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("plain", "tta"))
    assert plain["tta"] is None and tta["tta"] == "flip"
    model = load_model(ckpt)
    for m, kind in ((plain, None), (tta, "flip")):
        recs = racnn.predict(model, [path for path, _ in test], topk=5, tta=kind)
        ranked = [[e["index"] for e in rec["top"]["s123"]] for rec in recs]
        hit1 = [top[0] == label for top, (_, label) in zip(ranked, test, strict=True)]
        hit5 = [label in top for top, (_, label) in zip(ranked, test, strict=True)]
        assert 0 < sum(hit5) < len(test)  # top-5 of 7 classes: a figure that can be wrong
        assert m["acc_s123"] == pytest.approx(sum(hit1) / len(test))
        assert m["top5_s123"] == pytest.approx(sum(hit5) / len(test))
        per_class = {
            c: sum(h for h, (_, lab) in zip(hit1, test, strict=True) if lab == k) / 2
            for k, c in enumerate(SEVEN)
        }
        assert m["per_class_acc"] == pytest.approx(per_class)
        assert m["mean_per_class_acc"] == pytest.approx(sum(per_class.values()) / len(SEVEN))
        confused = Counter(
            (SEVEN[label], SEVEN[top[0]])
            for top, (_, label) in zip(ranked, test, strict=True)
            if top[0] != label
        )
        assert {(t, p): n for t, p, n in m["most_confused"]} == dict(confused)
        assert [n for *_, n in m["most_confused"]] == sorted(confused.values(), reverse=True)
    with Image.open(tmp_path / "confusion.png") as figure:
        assert figure.format == "PNG"


def test_eval_of_no_readable_image_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = _seven_class_folder(tmp_path / "trees", per_class=1)
    for path, _ in test:
        path.write_bytes(b"\x89PNG not really")
    ckpt = _seven_class_checkpoint(tmp_path / "best.pt")
    args = ["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "trees"), "--device", "cpu"]
    assert main([*args, "--skip-bad-images", "--json", str(tmp_path / "m.json")]) == 2
    out, err = capsys.readouterr()
    want = f"racnn eval: error: {tmp_path / 'trees'} (test): no image could be read (7 unreadable, skipped)"
    assert err.strip().splitlines()[-1].startswith(want), err  # (after the log's warnings, one per image)
    assert out == "" and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--set", "model.backbon=tiny"], "unknown key 'model.backbon'"),
        (["train", "--set", "train.epochs=two"], "train.epochs must be a number"),
        (["train", "--set", "model.pretrained=1"], "model.pretrained must be bool"),
        (["train", "--config", "nope.yaml"], "nope.yaml: config file not found"),
        (
            ["train", "--data", "/no/such/dir", "--set", "model.backbone=tiny", "model.pretrained=false"],
            "/no/such/dir: dataset folder not found",
        ),
        (["eval", "--checkpoint", "missing.pt", "--data", "."], "missing.pt: checkpoint not found"),
        (["train", "--set", "model.backbone=vgg19", "model.pretrained=true"], "model.pretrained=false"),
    ],
)
def test_clear_one_line_errors(
    args: list[str],
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    if args[0] == "train" and "--data" not in args:
        args = [*args, "--data", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "o")] if args[0] == "train" else args) != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_predict_bad_image_names_it(
    trained_tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert main(["predict", "--checkpoint", str(trained_tiny_export), str(bad)]) != 0
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def trained_tiny_export(tmp_path: Path) -> Path:
    """An untrained tiny model saved as best.pt (predict only needs a model)."""
    from racnn.checkpoint import model_record, save_checkpoint
    from racnn.config import load_config
    from racnn.model import build_model

    cfg = load_config(
        None,
        [
            "model.backbone=tiny",
            "model.pretrained=false",
            "model.input_size=32",
            "data.image_size=32",
            "model.apn_hidden=8",
            "model.apn_grid=2",
        ],
    )
    path = tmp_path / "best.pt"
    save_checkpoint(model_record(build_model(cfg.model, num_classes=3), cfg, ["a", "b", "c"]), path)
    return path


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["predict"], ["export"]])
def test_help_everywhere(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: racnn" in capsys.readouterr().out


def test_imagefolder_train_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/custom-data.md: a folder of photos by class -> train -> predict."""
    from PIL import Image

    root = tmp_path / "photos"
    for split, n in (("train", 4), ("test", 2)):
        for k, cls in enumerate(("cup", "mug")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), (200 * k, 50, 90 + i)).save(root / split / cls / f"{i}.jpg")
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(root),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "data.name=imagefolder",
        "model.backbone=tiny",
        "model.pretrained=false",
        "model.input_size=32",
        "data.image_size=32",
        "model.apn_hidden=8",
        "model.apn_grid=2",
        "train.epochs=2",
        "data.num_workers=0",
        "apn.init_steps=1",
        "train.batch_size=4",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["loc_iou_mean"] is None  # no boxes in this layout
    capsys.readouterr()
    assert (
        main(["predict", "--checkpoint", str(out / "best.pt"), "--json", str(root / "test/mug/0.jpg")]) == 0
    )
    rec = json.loads(capsys.readouterr().out)[0]
    assert {e["class"] for e in rec["top"]["s1"]} == {"cup", "mug"}
