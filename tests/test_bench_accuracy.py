"""benchmarks/accuracy.py: the table, targets and files on fabricated metrics, and a micro end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from conftest import load_benchmark
from racnn.config import FUSIONS

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
        "view_in_object_s2": 0.8,
        "view_in_object_s3": 0.7,
        "box_side_s1": 0.6,
        "box_side_std_s1": 0.08,
        "box_side_s2": 0.5,
        "box_side_std_s2": 0.05,
        "best_epoch": 3,
        "wall_time_s": 100.0,
        # the same classifiers with the initial boxes
        "acc_s2_init": s1 + 0.01,
        "acc_s3_init": s1 - 0.01,
        "acc_s123_init": s1 + 0.06,
        "pt_s2": 0.60,
        "pt_s2_init": 0.55,
        "pt_s3": 0.62,
        "pt_s3_init": 0.50,
        "head_hit_s2_init": 0.65,
        "loc_acc_iou50_init": 0.55,
    }
    for kind in FUSIONS:
        m[f"acc_s123_{kind}"] = s1 + 0.08 if kind == "concat" else s1 + 0.06
        m[f"acc_s12_{kind}"] = s1 + 0.05
    return {**m, **kw}


def result(**kw: Any) -> dict[str, Any]:
    racnn = {0: fake_metrics(**kw), 1: fake_metrics(0.72, **kw), 2: fake_metrics(0.68, **kw)}
    baselines = {s: {"acc_s1": 0.66 + 0.01 * s, "wall_time_s": 30.0} for s in (0, 1, 2)}
    return acc.build_result(
        baselines,
        racnn,
        ensemble3=0.69,
        fusion="concat",
        wall_time_s=250.0,
        info={"quick": True, "dataset": "fake", "machine": {"cpu": "x", "cores": 2}, "commit": "abc"},
    )


def test_result_holds_seed_means_stds_and_every_fusion() -> None:
    r = result()
    assert set(acc.REQUIRED_KEYS) <= set(r)
    assert r["seeds"] == [0, 1, 2] and r["fusion"] == "concat" and r["ensemble3"] == 0.69
    assert r["baseline"] == pytest.approx(0.67) and r["baseline_std"] == pytest.approx(0.01)
    assert r["acc_s1"] == pytest.approx(0.70) and r["std"]["acc_s1"] == pytest.approx(0.02)
    assert r["acc_s123"] == pytest.approx(0.78) and r["acc_s123_std"] == pytest.approx(0.02)
    for kind in FUSIONS:
        assert r[f"acc_s123_{kind}"] is not None and r[f"acc_s12_{kind}"] is not None
    assert r["box_side_mean_s1"] == pytest.approx(0.6) and r["box_side_std_s2"] == pytest.approx(0.05)
    assert r["wall_time_s"] == 250.0
    assert r["per_seed"]["1"]["acc_s1"] == 0.72 and r["per_seed"]["2"]["baseline"] == pytest.approx(0.68)
    assert r["view_in_object_s3"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="seeds"):
        acc.build_result(
            {0: {}}, {1: fake_metrics()}, ensemble3=None, fusion="concat", wall_time_s=1, info={}
        )
    assert acc.mean_std([None, math.nan]) == (None, None, 0) and acc.mean_std([0.5, None]) == (0.5, 0.0, 1)
    assert r["n"]["acc_s1"] == 3


def test_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acc, "FUSED_FLOOR", 0.75)  # the fabricated runs' fused mean is 0.78
    t = result()["targets"]
    assert all(v["met"] for v in t.values()), t
    assert t["fused_vs_baseline"]["value"] == pytest.approx(0.11)
    assert t["fused_vs_ensemble"]["value"] == pytest.approx(0.09)
    t = result(acc_s123=0.70, acc_s2=0.69, acc_s3=0.68, loc_acc_iou50=0.5, head_hit_s2=0.6)["targets"]
    assert not any(t[k]["met"] for k in ("fused_vs_baseline", "scale2_vs_scale1", "scale3_vs_scale1"))
    assert not t["iou50"]["met"] and not t["head_hit_s2"]["met"]
    collapsed = result(box_side_s1=0.25, box_side_std_s1=0.001, box_side_s2=0.99)["targets"]
    assert not collapsed["no_collapse_s1"]["met"] and not collapsed["no_collapse_s2"]["met"]
    assert collapsed["no_collapse_s1"]["value"] == [0.25, 0.001]
    # issue 18: the learned boxes against the initial ones under the same classifiers
    assert t["learned_vs_init_s2"]["value"] == pytest.approx(-0.02)  # acc_s2 0.69 against 0.71
    t = result()["targets"]
    assert t["learned_vs_init_s2"]["value"] == pytest.approx(0.02)
    assert t["head_hit_s2_vs_init"]["value"] == pytest.approx([0.10, 0.75])
    stuck = result(acc_s2_init=0.725, pt_s2_init=0.60, head_hit_s2_init=0.72)["targets"]
    assert not stuck["learned_vs_init_s2"]["met"] and not stuck["pt_s2_vs_init"]["met"]
    assert not stuck["head_hit_s2_vs_init"]["met"] and stuck["learned_vs_init_s3"]["met"]
    assert not result(acc_s123=0.74)["targets"]["fused_no_loss"]["met"]
    missing = result(head_hit_s2=math.nan)
    assert missing["head_hit_s2"] is None and not missing["targets"]["head_hit_s2"]["met"]
    assert missing["n"]["head_hit_s2"] == 0
    assert "(0 of 3 seeds)" in acc.markdown_table(missing)


def test_markdown_and_files(tmp_path: Path) -> None:
    r = result(head_hit_s2=math.nan)
    table = acc.markdown_table(r)
    assert table.splitlines()[0] == "| metric | mean ± std (3 seeds) | seed 0 | seed 1 | seed 2 |"
    assert "| baseline (backbone alone, scale-1 size) | 67.0% ± 1.0 | 66.0% | 67.0% | 68.0% |" in table
    assert "| RA-CNN fused 1+2+3, concat **(the recipe's)** | 78.0% ± 2.0 |" in table
    assert "| ensemble of 3 baselines (probabilities averaged) | 69.0% |" in table
    assert "| box side, scale 1 (mean) | 0.600 ± 0.000 |" in table and "n/a" in table
    js, md = acc.write_results(r, tmp_path / "res", "accuracy_test")
    loaded = json.loads(js.read_text())  # standard JSON: NaN became null
    assert loaded["head_hit_s2"] is None and loaded["acc_s123"] == pytest.approx(0.78)
    text = md.read_text()
    assert "QUICK smoke run" in text and "NOT met: head_hit_s2" in text and "commit: `abc`" in text


def test_configs() -> None:
    cfg = acc.racnn_config("data/x", quick=True, extra=["train.batch_size=8"])
    assert cfg.model.crop_from == "source" and cfg.data.image_size > cfg.model.input_size
    assert cfg.train.epochs == 4 and cfg.train.batch_size == 8 and cfg.data.root == "data/x"
    assert cfg.train.select == "last"  # no selection on 75 validation images
    base = acc.baseline_config(cfg)
    assert base.model.num_scales == 1 and base.schedule.mode == "joint" and base.train.epochs == 4
    assert base.data.image_size == cfg.model.input_size
    assert (base.optim, base.data.crop_scale_min, base.data.augment, base.train.select) == (
        cfg.optim,
        cfg.data.crop_scale_min,
        cfg.data.augment,
        cfg.train.select,
    )
    assert acc.seeded(base, 2).train.seed == 2 and base.train.seed == 0
    full = acc.racnn_config("d")
    assert full.train.epochs > 4 and full.schedule.converge_tol == 0.0


@pytest.mark.slow
def test_micro_run_end_to_end(fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["model.backbone=tiny", "model.pretrained=false", "model.input_size=32", "data.image_size=48"]
    tiny += ["model.apn_grid=2", "model.apn_hidden=8", "apn.init_steps=2", "data.num_workers=0"]
    tiny += ["schedule.max_steps_per_epoch=2", "train.batch_size=4", "data.val_fraction=0.25"]
    runs = tmp_path / "runs"
    args = ["--data", str(fake_cub), "--quick", "--seeds", "0", "1", "--jobs", "2", "--runs", str(runs)]
    args += ["--results", str(tmp_path / "res"), "--figures", str(tmp_path / "fig")]
    assert acc.main([*args, "--set", *tiny]) == 0
    r = json.loads((tmp_path / "res" / "accuracy_cub_quick.json").read_text())
    for key in [k for k, _, kind in acc.ROWS if kind == "pct" and k != "head_hit_s2"]:
        assert r[key] is not None and 0.0 <= r[key] <= 1.0, key
    assert r["seeds"] == [0, 1] and r["std"]["acc_s123"] is not None and r["quick"] is True
    assert r["per_seed"]["1"]["wall_time_s"] > 0
    assert (tmp_path / "res" / "accuracy_cub_quick.md").is_file()
    for name in ("racnn_seed0", "racnn_seed1", "baseline_seed0", "baseline_seed1"):
        assert (runs / name / "metrics.json").is_file() and (runs / f"{name}.log").is_file()
    pngs = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    assert "accuracy_cub_quick_derivative_map.png" in pngs and len(pngs) >= 2
    assert all(p.stat().st_size < 300_000 for p in (tmp_path / "fig").glob("*.png"))
    # run again: every finished run is reused, nothing trains, the same table comes out
    capsys.readouterr()
    assert acc.main([*args, "--figures", "", "--set", *tiny]) == 0
    assert capsys.readouterr().out.count("finished before, reused") == 4
    again = json.loads((tmp_path / "res" / "accuracy_cub_quick.json").read_text())
    assert again["acc_s123"] == r["acc_s123"] and again["ensemble3"] == r["ensemble3"]
    # a run folder holding another config, or a run of other code, is never reused nor replaced
    with pytest.raises(SystemExit, match="racnn_seed0: holds a run of another config"):
        acc.main([*args, "--figures", "", "--set", *tiny, "train.batch_size=2"])
    (runs / "racnn_seed0.commit").write_text("0123abc\n")
    with pytest.raises(SystemExit, match="racnn_seed0: holds a run of commit 0123abc, not of this one"):
        acc.main([*args, "--figures", "", "--set", *tiny])


def test_baselines_from_an_earlier_result(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(result()))
    runs, ensemble = acc.earlier_baselines(earlier, [0, 2])
    assert (
        ensemble == 0.69
        and runs[0]["acc_s1"] == pytest.approx(0.66)
        and runs[2]["acc_s1"] == pytest.approx(0.68)
    )
    assert runs[0]["reused"] == str(earlier)
    with pytest.raises(SystemExit, match=r"earlier\.json: not a result of this benchmark with seeds"):
        acc.earlier_baselines(earlier, [0, 5])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match=r"bad\.json"):
        acc.earlier_baselines(tmp_path / "bad.json", [0])
