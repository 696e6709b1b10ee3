"""Fusion kinds (racnn.fusion): values, the fitted weights, every kind in every evaluation, the configured one
in the model's outputs, checkpoints that predate the weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from racnn.checkpoint import load_model, model_record, save_checkpoint
from racnn.config import FUSIONS, ModelConfig
from racnn.evaluation import evaluate
from racnn.fusion import cross_fitted_correct, fit_model_weights, fit_weights, fuse
from racnn.model import build_model
from racnn.training.trainer import Trainer
from test_training import tiny_config

K = 5


def _model(**kw):
    torch.manual_seed(0)
    base = {"backbone": "tiny", "pretrained": False, "input_size": 32, "apn_grid": 2, "apn_hidden": 16}
    return build_model(ModelConfig(**(base | kw)), num_classes=K)


def test_each_kind_has_its_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    z = [torch.randn(4, K, generator=gen) for _ in range(3)]
    concat = torch.randn(4, K, generator=gen)
    logp = torch.stack([t.log_softmax(1) for t in z])
    assert torch.equal(fuse("concat", z, concat=concat), concat)
    mean_prob = fuse("mean_prob", z)
    assert torch.allclose(mean_prob.exp(), logp.exp().mean(0), atol=1e-6)
    assert torch.allclose(mean_prob.exp().sum(1), torch.ones(4), atol=1e-6)  # a distribution already
    assert torch.allclose(fuse("mean_logprob", z), logp.mean(0), atol=1e-6)
    uniform = torch.full((3,), 1 / 3)
    assert torch.allclose(fuse("weighted", z, weights=uniform), fuse("mean_logprob", z), atol=1e-6)
    one_hot = torch.tensor([0.0, 2.0, 0.0])  # all the weight on scale 2: its prediction, sharpened
    assert torch.equal(fuse("weighted", z, weights=one_hot).argmax(1), z[1].argmax(1))
    with pytest.raises(ValueError, match="unknown fusion 'vote'"):
        fuse("vote", z)
    with pytest.raises(ValueError, match="needs the concat"):
        fuse("concat", z)


def _scales_with_one_informative(m: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three scales' log-probabilities on m images: scale 2 knows the label, scales 1 and 3 are noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (m,), generator=gen)
    noise = [torch.randn(m, K, generator=gen) * 2 for _ in range(3)]
    noise[1] = noise[1] + 4 * torch.nn.functional.one_hot(y, K)
    return torch.stack([t.log_softmax(1) for t in noise]), y


def test_fitted_weights_find_the_scale_that_generalises() -> None:
    logp, y = _scales_with_one_informative()
    w = fit_weights(logp, y)
    assert w.shape == (3,) and (w >= 0).all()
    assert w[1] > 3 * w[0] and w[1] > 3 * w[2]
    # the weighted fusion beats the unweighted one on images it was not fitted on
    test_logp, test_y = _scales_with_one_informative(seed=1)
    acc = lambda kind, **kw: float((fuse(kind, list(test_logp), **kw).argmax(1) == test_y).float().mean())  # noqa: E731
    assert acc("weighted", weights=w) > acc("mean_logprob") + 0.05
    # cross-fitting: each fold judged by weights fitted on the other folds: about as good as scale 2 alone,
    # better than the unweighted mean
    correct = cross_fitted_correct(logp, y)
    alone = int((logp[1].argmax(1) == y).sum())
    unweighted = int((logp.mean(0).argmax(1) == y).sum())
    assert alone - 3 <= correct <= len(y) and correct > unweighted + 5


def test_cross_fitting_never_judges_an_image_by_weights_fitted_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from racnn import fusion

    logp, y = _scales_with_one_informative(m=20)
    fitted_on: list[set[tuple[float, ...]]] = []
    real = fusion.fit_weights

    def spy(lp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fitted_on.append({tuple(row.tolist()) for row in lp[0]})  # the images (scale 1's rows) of this fit
        return real(lp, target)

    monkeypatch.setattr(fusion, "fit_weights", spy)
    fusion.cross_fitted_correct(logp, y, folds=5)
    assert len(fitted_on) == 5
    for f, rows in enumerate(fitted_on):
        held = [tuple(logp[0, i].tolist()) for i in range(20) if i % 5 == f]
        assert len(rows) == 16 and not rows.intersection(held)


def test_fitting_degenerate_splits_keeps_uniform_weights() -> None:
    logp, y = _scales_with_one_informative(m=1)
    assert torch.isfinite(fit_weights(logp, y)).all()
    empty = fit_weights(torch.zeros(3, 0, K), torch.zeros(0, dtype=torch.long))
    assert torch.allclose(empty, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("kind", FUSIONS)
def test_the_configured_kind_drives_the_fused_outputs(kind: str) -> None:
    model = _model(fusion=kind).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model(x)
    variants = model.fusion_variants(out)
    assert set(variants) == {f"{key}_{k}" for key in ("s12", "s123") for k in FUSIONS}
    for key in ("s12", "s123"):
        assert torch.allclose(out.logits[key], variants[f"{key}_{kind}"])
        assert torch.equal(out.trained_logits[key], out.concat[key])  # the concat heads are always trained
    assert model.forward_head(model.forward_features(x)).logits.keys() == out.logits.keys()


def test_every_evaluation_reports_every_kind() -> None:
    model = _model(fusion="mean_prob")
    batches = [
        {"image": torch.randn(4, 3, 32, 32), "label": torch.arange(4) % K, "has_box": torch.zeros(4)}
        for _ in range(2)
    ]
    metrics = evaluate(model, batches, progress=False)
    for key in ("s12", "s123"):
        for kind in FUSIONS:
            assert 0.0 <= metrics[f"acc_{key}_{kind}"] <= 1.0
        assert metrics[f"acc_{key}"] == metrics[f"acc_{key}_mean_prob"]


def test_fit_model_weights_sets_the_buffer_and_reports_cross_fitted_accuracy() -> None:
    model = _model(fusion="weighted")
    logp, y = _scales_with_one_informative()
    before = model.fusion_weights.clone()
    metrics = fit_model_weights(model, logp, y)
    assert not torch.equal(model.fusion_weights, before)
    assert model.fusion_weights[0, 2] == 0  # the 1+2 fusion never weighs scale 3
    assert metrics["acc_s123_weighted"] == cross_fitted_correct(logp, y) / len(y)
    assert metrics["acc_s123"] == metrics["acc_s123_weighted"]  # the model's own fusion is the weighted one
    assert set(fit_model_weights(_model(fusion="concat"), logp, y)) == {
        "acc_s12_weighted",
        "acc_s123_weighted",
    }


def test_a_checkpoint_without_fusion_weights_loads_with_uniform_ones(tmp_path: Path) -> None:
    from racnn.config import Config

    cfg = Config()
    cfg.model = ModelConfig(backbone="tiny", pretrained=False, input_size=32, apn_grid=2, apn_hidden=16)
    model = build_model(cfg.model, num_classes=K)
    record = model_record(model, cfg, [f"c{i}" for i in range(K)])
    del record["model"]["fusion_weights"]  # as written before the weighted fusion existed
    record["config"]["model"].pop("fusion")
    save_checkpoint(record, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.cfg.fusion == "concat"
    assert torch.allclose(loaded.fusion_weights[1], torch.full((3,), 1 / 3))
    assert torch.allclose(loaded.fusion_weights[0], torch.tensor([0.5, 0.5, 0.0]))


def test_the_weighted_fusion_needs_a_validation_split(fake_cub: Path, tmp_path: Path) -> None:
    from racnn.config import ConfigError

    cfg = tiny_config(fake_cub, **{"model.fusion": "weighted", "data.val_fraction": 0.0})
    with pytest.raises(ConfigError, match=r"model\.fusion=weighted fits its weights on the validation split"):
        Trainer(cfg, tmp_path / "run", progress=False)


def test_training_fits_the_weights_on_validation_and_logs_every_kind(fake_cub: Path, tmp_path: Path) -> None:
    cfg = tiny_config(fake_cub, **{"model.fusion": "weighted", "train.select": "last"})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    metrics = trainer.fit()
    trainer.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "epoch" in r and r.get("phase") != "apn_init"]
    for rec in epochs:
        for kind in FUSIONS:
            assert f"val_acc_s123_{kind}" in rec
        assert rec["val_acc_s123"] == rec["val_acc_s123_weighted"]  # cross-fitted, as the configured fusion
    # train.select=last: the tested model is the last epoch's, with the weights fitted at its validation
    assert metrics["best_epoch"] == epochs[-1]["epoch"] == cfg.train.epochs
    best = load_model(tmp_path / "run" / "best.pt")
    assert torch.equal(best.fusion_weights, trainer.model.fusion_weights)
    assert not torch.allclose(best.fusion_weights[1], torch.full((3,), 1 / 3))
    for kind in FUSIONS:
        assert not math.isnan(metrics[f"acc_s123_{kind}"])
