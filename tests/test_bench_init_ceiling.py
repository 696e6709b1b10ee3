"""benchmarks/init_ceiling.py on a tiny model and the fake CUB tree: the APN row is the model's own
evaluation, the target rows are the initialisation's boxes (scale-2 side = apn.init_side)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from conftest import load_benchmark
from racnn.checkpoint import model_record, save_checkpoint
from racnn.config import load_config
from racnn.evaluation import evaluate
from racnn.model import build_model
from racnn.training import loaders

ceiling = load_benchmark("init_ceiling")
KEYS = ["model.backbone=tiny", "model.pretrained=false", "model.input_size=32", "model.apn_grid=2"]
KEYS += ["model.apn_hidden=8", "model.crop_from=source", "data.image_size=48", "apn.init_side=0.5"]
KEYS += ["apn.init_box=region,peak", "apn.init_response=cam"]  # class maps: true and predicted rows differ


def test_init_ceiling_rows(fake_cub: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [*KEYS, f"data.root={fake_cub}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3)
    ckpt = tmp_path / "best.pt"
    save_checkpoint(model_record(model, cfg, ["a", "b", "c"]), ckpt)
    res = ceiling.main([str(ckpt), "--data", str(fake_cub), "--split", "test"])
    # data.image_size 48 > input_size 32: also the same rule on scale 1's map of the 48 px image
    assert list(res) == ["APN boxes", "targets, true class", "targets, predicted", "targets, full-size map"]
    data = loaders.make_dataset(cfg, "test", model.preprocessing, train=False)
    own = evaluate(model.eval(), torch.utils.data.DataLoader(data, batch_size=16), head_parts=data.head_parts)
    for key in ("loc_acc_iou50", "loc_iou_mean", "box_side_s1", "head_hit_s2"):
        assert math.isclose(res["APN boxes"][key], own[key], abs_tol=1e-6), key
    for row in ("targets, true class", "targets, predicted", "targets, full-size map"):
        assert math.isclose(res[row]["box_side_s2"], 0.5, abs_tol=1e-6)  # the peak square's side
        assert 0.25 - 1e-6 <= res[row]["box_side_s1"] <= 1.0 + 1e-6  # the region box within the bounds
        assert 0.0 <= res[row]["loc_iou_mean"] <= 1.0


def test_init_ceiling_set_measures_other_targets(fake_cub: Path, tmp_path: Path) -> None:
    """``--set`` swaps the initialisation measured on the same model: the channel sum ignores the class, so
    the true-class and predicted rows agree, and the peak square takes the new side."""
    cfg = load_config(None, [*KEYS, f"data.root={fake_cub}"])
    torch.manual_seed(0)
    ckpt = tmp_path / "best.pt"
    save_checkpoint(model_record(build_model(cfg.model, num_classes=3), cfg, ["a", "b", "c"]), ckpt)
    args = [str(ckpt), "--data", str(fake_cub), "--split", "test"]
    res = ceiling.main(
        [*args, "--set", "apn.init_response=sum", "apn.init_box=aolm,peak", "apn.init_side=0.7"]
    )
    true, pred = res["targets, true class"], res["targets, predicted"]
    assert math.isclose(true["box_side_s2"], 0.7, abs_tol=1e-6)
    for key in ("loc_acc_iou50", "loc_iou_mean", "box_side_s1", "head_hit_s2"):
        assert math.isclose(true[key], pred[key], abs_tol=1e-9) or (
            math.isnan(true[key]) and math.isnan(pred[key])
        )
