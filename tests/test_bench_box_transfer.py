"""benchmarks/box_transfer.py: the cross-view targets, the moves relative to the APN's box, a run end to end
in both modes (halves of the split; fitted on the training split), and the views and predictors of a
trained model, where the APN regressed for no step proposes its own boxes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from racnn.training.trainer import Trainer
from test_training import tiny_config

bench = load_benchmark("box_transfer")


def test_a_views_target_is_the_grid_box_best_on_its_other_view() -> None:
    """Image 0 (views 0, 1): box 1 wins on view 1, so view 0 takes box 1; box 0 is best on view 0 but not
    better than the APN's own p_t there (0.6 < 0.7), so view 1 keeps its APN box."""
    grid = torch.tensor([[0.3, 0.5, 0.3], [0.3, 0.4, 0.2]])
    box = torch.tensor([[0.5, 0.5, 0.25], [0.5, 0.5, 0.25]])
    own = torch.tensor([0.7, 0.5])  # the APN's p_t on view 0 and view 1
    on_grid = torch.tensor([[[0.6, 0.1], [0.2, 0.9]]])  # image x view x box
    got = bench.cross_view_targets(own, on_grid, box, grid)
    assert got[0].tolist() == pytest.approx([0.3, 0.4, 0.2])  # chosen on view 1 (0.9 > 0.5)
    assert got[1].tolist() == pytest.approx([0.5, 0.5, 0.25])  # view 0's best (0.6) does not beat 0.7
    on_grid[0, 0, 0] = 0.8  # now it does: view 1 takes box 0, mirrored (x -> 1 - x)
    assert bench.cross_view_targets(own, on_grid, box, grid)[1].tolist() == pytest.approx([0.7, 0.5, 0.3])


def test_moves_and_moved_are_inverse_and_keep_the_box_inside() -> None:
    ref = torch.tensor([[0.5, 0.5, 0.2], [0.3, 0.6, 0.25]])
    box = torch.tensor([[0.45, 0.55, 0.15], [0.35, 0.6, 0.3]])
    torch.testing.assert_close(bench.moved(bench.moves(box, ref), ref, 0.25, 1.0), box)  # float32 tolerance
    far = bench.moved(torch.tensor([[5.0, -5.0, 3.0]]), ref[:1], 0.25, 1.0)  # clamped: the whole image
    torch.testing.assert_close(far, torch.tensor([[0.5, 0.5, 0.5]]))


@pytest.mark.parametrize("fit", [[], ["--fit-split", "train"], ["--fit-split", "train", "--fit-images", "3"]])
def test_a_trained_run_end_to_end(fake_cub: Path, tmp_path: Path, fit: list[str]) -> None:
    cfg = tiny_config(fake_cub, **{"train.epochs": 3, "schedule.warmup_epochs": 1, "train.select": "last"})
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        trainer.fit()
    out = tmp_path / "transfer.json"
    args = [str(tmp_path / "run"), "--split", "test", "--json", str(out)]
    assert bench.main([*args, *fit]) == 0
    r = json.loads(out.read_text())["runs"][str(tmp_path / "run")]
    if "--fit-images" in fit:
        assert r["fitted_images"] == 3
    lr = cfg.apn.lr
    for k in ("own", "oracle", "global", "ridge_10", f"apn_{lr:g}", f"apn_{10 * lr:g}", "global_fitted"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["move_side"] > 0 and abs(r["move_dx"]) < 5 and abs(r["move_dy"]) < 5
    with pytest.raises(SystemExit, match=r"no last\.pt"):
        bench.main([str(tmp_path)])
    with pytest.raises(SystemExit):  # --fit-images without --fit-split
        bench.main([str(tmp_path / "run"), "--fit-images", "3"])


def test_the_views_and_a_predictor_fitted_in_no_step(fake_cub: Path, tmp_path: Path) -> None:
    """Each image and its mirror, the targets inside the image; the APN regressed for no step proposes its
    own boxes, and a global move of zero (every target the APN's box) keeps them."""
    cfg = tiny_config(fake_cub, **{"train.epochs": 2, "schedule.warmup_epochs": 1})
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        trainer.fit()
        model, data = trainer.model.eval().requires_grad_(False), trainer.val_set
        grid = bench.box_grid([0.5, 1.0], 2, model.cfg.box_min_side, model.cfg.box_max_side)
        views = bench.Views(model, data, grid)
        assert len(views.x) == 2 * len(data) and torch.equal(views.x[1], views.x[0].flip(-1))
        lo, hi = views.target[:, :2] - views.target[:, 2:], views.target[:, :2] + views.target[:, 2:]
        assert bool((lo >= -1e-6).all()) and bool((hi <= 1 + 1e-6).all())
        every = torch.arange(len(views.x))
        got = bench.judge(model, views, every[::2], views, every[1::2], apn_lr=cfg.apn.lr, steps=0, seed=0)
        move = bench.moves(views.target[::2], views.box[::2]).mean(0)  # the common move of the fitted views
        assert got["move_side"] == pytest.approx(float(move[2].exp()))
        assert (got["move_dx"], got["move_dy"]) == pytest.approx((float(move[0]), float(move[1])))
        views.target = views.box.clone()
        got = bench.predictors(model, views, every, apn_lr=cfg.apn.lr, steps=0, seed=0)
        torch.testing.assert_close(got[f"apn_{cfg.apn.lr:g}"](views.maps, views.box), views.box)
        torch.testing.assert_close(got["global"](views.maps, views.box), views.box)
