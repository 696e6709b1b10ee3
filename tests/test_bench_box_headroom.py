"""benchmarks/box_headroom.py: the grid of boxes, the cross-view choice (a box chosen on one view is judged on
the other, and the learned box stays where nothing beats it), the reach restriction, and a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from racnn.training.trainer import Trainer
from test_training import tiny_config

bench = load_benchmark("box_headroom")


def test_the_grid_keeps_every_box_inside_the_image_and_within_the_side_bounds() -> None:
    grid = bench.box_grid([0.1, 0.5, 1.0], 3, min_side=0.25, max_side=1.0)
    assert grid.shape == (9 + 9 + 1, 3)  # 0.1 clamped to 0.25; the whole image once
    lo, hi = grid[:, :2] - grid[:, 2:], grid[:, :2] + grid[:, 2:]
    assert bool((lo >= -1e-6).all()) and bool((hi <= 1 + 1e-6).all())
    assert sorted({round(2 * h, 6) for h in grid[:, 2].tolist()}) == [0.25, 0.5, 1.0]
    assert grid[-1].tolist() == [0.5, 0.5, 0.5]


def test_a_box_is_chosen_on_one_view_and_judged_on_the_other() -> None:
    """Image 0: box 1 looks best on view 0 but not on view 1 (noise); image 1: box 0 is best on both views.
    Box 0 is within reach of the learned box, box 1 is not."""
    grid = torch.tensor([[0.5, 0.5, 0.3], [0.2, 0.2, 0.1]])
    box = torch.tensor([[0.5, 0.5, 0.3], [0.5, 0.5, 0.3]])
    own = torch.tensor([[0.5, 0.5], [0.4, 0.4]])
    on_grid = torch.tensor([[[0.5, 0.9], [0.5, 0.1]], [[0.8, 0.2], [0.7, 0.2]]])  # N x view x C
    got = bench.summarise(own, on_grid, box, grid, [(0.1, 1.15)])
    assert got["pt_learned"] == pytest.approx(0.45)
    assert got["pt_best_in_sample"] == pytest.approx((0.9 + 0.5 + 0.8 + 0.7) / 4)
    # image 0: box 1 chosen on view 0 scores 0.1 on view 1; on view 1 box 0 ties with the learned box (kept)
    # image 1: box 0 wins on both views and scores 0.7 and 0.8 on the other
    assert got["pt_best_cross"] == pytest.approx((0.1 + 0.5 + 0.7 + 0.8) / 4)
    assert got["pt_cross_reach_0.1_1.15"] == pytest.approx((0.5 + 0.5 + 0.7 + 0.8) / 4)
    assert "pt_whole_image" not in got  # no box of this grid is the whole image


def test_a_trained_run_end_to_end(fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(fake_cub, **{"train.epochs": 3, "schedule.warmup_epochs": 1, "train.select": "last"})
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        trainer.fit()
    out = tmp_path / "headroom.json"
    args = [str(tmp_path / "run"), "--split", "test", "--sides", "0.5", "1", "--centres", "2"]
    assert bench.main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())["runs"][str(tmp_path / "run")]
    assert r["candidates"] == 5 and r["images"] > 0
    for k in (
        "pt_learned",
        "pt_best_cross",
        "pt_best_in_sample",
        "pt_cross_reach_0.3_1.45",
        "pt_whole_image",
    ):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["pt_best_in_sample"] >= r["pt_best_cross"] - 1e-6  # judged on the choosing view: never lower
    assert "mean +- std" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no last\.pt"):
        bench.main([str(tmp_path)])
