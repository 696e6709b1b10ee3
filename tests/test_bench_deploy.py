"""benchmarks/deploy.py end to end on a tiny model and a fake CUB tree: every variant gets its accuracy and its
timings, the ratios are computed from them, and the JSON, Markdown and figure are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, load_benchmark

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

deploy = load_benchmark("deploy")


def test_deploy_benchmark_writes_every_variant_and_the_ratios(fake_cub: Path, tmp_path: Path) -> None:
    from racnn.checkpoint import model_record, save_checkpoint
    from racnn.config import load_config
    from racnn.model import build_model

    overrides = [
        "model.crop_from=source",
        "data.image_size=40",
        "data.num_workers=0",
        "data.val_fraction=0.5",
    ]
    cfg = load_config(None, [*TINY_MODEL, *overrides])
    cfg.data.root = str(fake_cub)
    torch.manual_seed(0)
    ckpt = tmp_path / "best.pt"
    classes = ["003.Bird_3", "007.Bird_7", "012.Bird_12"]
    save_checkpoint(model_record(build_model(cfg.model, num_classes=3), cfg, classes), ckpt)
    out = tmp_path / "deploy.json"
    args = [str(ckpt), "--data", str(fake_cub), "--no-int8", "--threads", "1", "--batch", "1", "2"]
    args += ["--rounds", "1", "--time-images", "4", "--json", str(out), "--figure", str(tmp_path / "d.png")]
    assert deploy.main(args) == 0
    r = json.loads(out.read_text())
    assert set(r["accuracy"]) >= {"torch|full", "torch_channels_last|full", "ort_fp32|full"}
    # the same decisions but where two classes tie within the engines' rounding: one image at most here
    one = 1 / r["test_images"]
    assert abs(r["accuracy"]["ort_fp32|full"]["top1"] - r["accuracy"]["torch|full"]["top1"]) <= one + 1e-9
    assert r["exit_confidence"] in deploy.EXIT_GRID and "torch|exit" in r["accuracy"]  # chosen on validation
    # the threshold is the rule's on validation, and the test curve (every threshold from one staged run)
    # gives at it what the staged run itself gave
    _, *tried = r["exit_validation"]
    chosen = [t for t in tried if t["exit_confidence"] == r["exit_confidence"]]
    assert chosen and chosen[0]["disagree"] <= deploy.EXIT_MAX_DISAGREE
    keep = [t["scales_mean"] for t in tried if t["disagree"] <= deploy.EXIT_MAX_DISAGREE]
    assert chosen[0]["scales_mean"] == min(keep)
    (at,) = [c for c in r["exit_curve"] if c["exit_confidence"] == r["exit_confidence"]]
    staged = r["accuracy"]["ort_fp32|exit"]
    assert abs(at["top1"] - staged["top1"]) <= one + 1e-9
    assert at["scales_mean"] == pytest.approx(staged["scales_mean"], abs=one * 2)
    for name in ("torch", "ort_fp32", "backbone"):
        for b in (1, 2):
            assert r["times"][f"{name}|full|t1|b{b}"]["ms"] > 0
    ratio = r["ratios"]["t1"]
    want = r["times"]["ort_fp32|full|t1|b1"]["ms"] / r["times"]["torch|full|t1|b1"]["ms"]
    assert ratio["ort_fp32_over_eager"] == pytest.approx(want)
    assert ratio["best_variant"] is not None and ratio["best_over_backbone"] > 0
    assert ratio["int8_over_ort_fp32"] is None and r["exit_confidence_int8"] is None  # --no-int8
    assert out.with_suffix(".md").read_text().startswith("# Deployment benchmark")
    assert (tmp_path / "d.png").stat().st_size > 0
