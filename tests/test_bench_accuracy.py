"""benchmarks/accuracy.py: the table, targets and files on fabricated metrics, and a micro end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from conftest import load_benchmark

acc = load_benchmark("accuracy")


def fake_metrics(s1: float = 0.70, **kw: Any) -> dict[str, Any]:
    m = {
        "acc_s1": s1,
        "acc_s2": s1 + 0.03,
        "acc_s3": s1 + 0.01,
        "acc_s12": s1 + 0.05,
        "acc_s123": s1 + 0.08,
        "loc_iou_mean": 0.55,
        "loc_acc_iou50": 0.62,
        "loc_centre_hit": 0.9,
        "head_hit_s2": 0.75,
        "box_side_s1": 0.6,
        "box_side_std_s1": 0.08,
        "box_side_s2": 0.5,
        "box_side_std_s2": 0.05,
        "best_epoch": 3,
        "wall_time_s": 100.0,
    }
    return {**m, **kw}


def result(**kw: Any) -> dict[str, Any]:
    variants = {"source": fake_metrics(**kw), "previous": fake_metrics(0.68)}
    return acc.build_result(
        {"acc_s1": 0.66, "wall_time_s": 30.0, "best_epoch": 4},
        variants,
        main="source",
        wall_time_s=250.0,
        info={"quick": True, "dataset": "fake", "machine": {"cpu": "x", "cores": 2}, "commit": "abc"},
    )


def test_result_has_the_required_keys_and_the_main_variant_on_top() -> None:
    r = result()
    assert set(acc.REQUIRED_KEYS) <= set(r)
    assert r["baseline"] == 0.66 and r["acc_s1"] == 0.70 and r["box_side_mean_s1"] == 0.6
    assert r["box_side_std_s2"] == 0.05 and r["wall_time_s"] == 250.0
    assert r["variants"]["previous"]["acc_s1"] == 0.68 and r["variants"]["previous"]["baseline"] == 0.66
    assert r["baseline_run"]["wall_time_s"] == 30.0
    with pytest.raises(ValueError, match="main variant"):
        acc.build_result({"acc_s1": 0.5}, {"previous": fake_metrics()}, main="source", wall_time_s=1, info={})


def test_targets() -> None:
    t = result()["targets"]
    assert all(v["met"] for v in t.values()), t
    assert t["fused_vs_baseline"]["value"] == pytest.approx(0.12)
    t = result(acc_s123=0.70, acc_s2=0.69, acc_s3=0.68, loc_acc_iou50=0.5, head_hit_s2=0.6)["targets"]
    assert not any(t[k]["met"] for k in ("fused_vs_baseline", "scale2_vs_scale1", "scale3_vs_scale1"))
    assert not t["iou50"]["met"] and not t["head_hit_s2"]["met"]
    collapsed = result(box_side_s1=0.25, box_side_std_s1=0.001, box_side_s2=0.99)["targets"]
    assert not collapsed["no_collapse_s1"]["met"] and not collapsed["no_collapse_s2"]["met"]
    assert collapsed["no_collapse_s1"]["value"] == [0.25, 0.001]
    missing = result(head_hit_s2=math.nan)
    assert missing["head_hit_s2"] is None and not missing["targets"]["head_hit_s2"]["met"]


def test_markdown_and_files(tmp_path: Path) -> None:
    r = result(head_hit_s2=math.nan)
    table = acc.markdown_table(r)
    assert table.splitlines()[0].startswith("| metric | crop_from=source (main) | crop_from=previous")
    assert "| baseline (backbone alone, scale-1 size) | 66.0% | 66.0% |" in table
    assert "| RA-CNN fused 1+2+3 | 78.0% | 76.0% |" in table
    assert "| box side, scale 1 (mean) | 0.600 | 0.600 |" in table and "n/a" in table
    js, md = acc.write_results(r, tmp_path / "res", "accuracy_test")
    loaded = json.loads(js.read_text())  # standard JSON: NaN became null
    assert loaded["head_hit_s2"] is None and loaded["acc_s123"] == pytest.approx(0.78)
    text = md.read_text()
    assert "QUICK smoke run" in text and "NOT met: head_hit_s2" in text and "commit: `abc`" in text


def test_configs() -> None:
    cfg = acc.racnn_config("data/x", "source", quick=True, extra=["train.batch_size=8"])
    assert cfg.model.crop_from == "source" and cfg.data.image_size > cfg.model.input_size
    assert cfg.train.epochs == 4 and cfg.train.batch_size == 8 and cfg.data.root == "data/x"
    base = acc.baseline_config(cfg)
    assert base.model.num_scales == 1 and base.schedule.mode == "joint" and base.train.epochs == 4
    assert base.data.image_size == cfg.model.input_size
    assert (base.optim, base.data.crop_scale_min, base.data.augment) == (
        cfg.optim,
        cfg.data.crop_scale_min,
        cfg.data.augment,
    )
    assert acc.racnn_config("d", "previous").data.image_size == 224
    full = acc.racnn_config("d", "source")
    assert full.train.epochs > 4 and full.schedule.converge_tol == 0.0


@pytest.mark.slow
def test_micro_run_end_to_end(fake_cub: Path, tmp_path: Path) -> None:
    tiny = ["model.backbone=tiny", "model.pretrained=false", "model.input_size=32", "data.image_size=48"]
    tiny += ["model.apn_grid=2", "model.apn_hidden=8", "schedule.apn_init_steps=2", "data.num_workers=0"]
    tiny += ["schedule.max_steps_per_epoch=2", "train.batch_size=4", "data.val_fraction=0.25"]
    args = ["--data", str(fake_cub), "--quick", "--crop-from", "source", "--runs", str(tmp_path / "runs")]
    args += ["--results", str(tmp_path / "res"), "--figures", str(tmp_path / "fig"), "--threads", "1"]
    assert acc.main([*args, "--set", *tiny]) == 0
    r = json.loads((tmp_path / "res" / "accuracy_cub_quick.json").read_text())
    for key in acc.REQUIRED_KEYS[:-1]:
        assert r[key] is not None and 0.0 <= r[key] <= 1.0, key
    assert r["wall_time_s"] > 0 and r["quick"] is True and r["variants"]["source"]["best_epoch"] >= 1
    assert (tmp_path / "res" / "accuracy_cub_quick.md").is_file()
    pngs = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    assert "accuracy_cub_quick_derivative_map.png" in pngs and len(pngs) >= 2
    assert all(p.stat().st_size < 300_000 for p in (tmp_path / "fig").glob("*.png"))
