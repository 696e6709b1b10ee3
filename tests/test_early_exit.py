"""Early exit (racnn.early_exit): the staged model is the model, stage by stage; an image stops at the first
scale whose fused prediction is confident enough, and predict, eval and the CSV say which output answered."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import racnn
from conftest import assert_same_prediction
from racnn.cli import main
from racnn.early_exit import (
    EXIT_GRID,
    EXIT_MAX_DISAGREE,
    check_exit_confidence,
    choose_exit_confidence,
    exit_decisions,
    model_stages,
    staged_forward,
)
from test_cli import _seven_class_checkpoint, _seven_class_folder


def _model(num_scales: int = 3, fusion: str = "mean_logprob", crop_from: str = "previous") -> racnn.RACNN:
    torch.manual_seed(0)
    return racnn.create_model(
        "tiny",
        num_classes=5,
        num_scales=num_scales,
        crop_from=crop_from,
        input_size=32,
        zoom_size=24,
        apn_grid=2,
        apn_hidden=8,
        fusion=fusion,
        image_size=40,
    ).eval()


def _between(values: torch.Tensor) -> float:
    """A threshold in the middle of the widest gap between ``values`` (no value is near it on any CPU)."""
    v = values.sort().values
    i = int((v[1:] - v[:-1]).argmax())
    return float((v[i] + v[i + 1]) / 2)


@pytest.mark.parametrize("fusion", ["concat", "mean_prob", "mean_logprob", "weighted"])
@pytest.mark.parametrize(("num_scales", "crop_from"), [(2, "previous"), (3, "source"), (4, "previous")])
def test_the_stages_without_an_exit_are_the_model(fusion: str, num_scales: int, crop_from: str) -> None:
    model = _model(num_scales, fusion, crop_from)
    x = torch.randn(5, 3, 40, 40)
    with torch.no_grad():
        want = model(x)
    ran = staged_forward(model_stages(model), x, keys=model.keys, exit_confidence=2.0)  # nothing is that sure
    assert ran.scales_run.tolist() == [num_scales] * 5
    for k in model.keys:
        torch.testing.assert_close(ran.out.logits[k], want.logits[k], atol=1e-5, rtol=0)
    for got, w in zip(ran.out.views, want.views, strict=True):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=0)


def test_an_image_stops_at_the_first_confident_scale() -> None:
    model = _model()
    x = torch.randn(12, 3, 40, 40)
    with torch.no_grad():
        want = model(x)
    conf1 = want.logits["s1"].softmax(1).amax(1)
    p = _between(conf1)
    conf12 = want.logits["s12"].softmax(1).amax(1)
    ran = staged_forward(model_stages(model), x, keys=model.keys, exit_confidence=p)
    expect = torch.where(conf1 >= p, 1, torch.where(conf12 >= p, 2, 3))
    assert ran.scales_run.tolist() == expect.tolist() and 1 in expect.tolist() and 3 in expect.tolist()
    for k, needs in {"s1": 1, "s2": 2, "s12": 2, "s3": 3, "s123": 3}.items():
        rows = expect >= needs
        torch.testing.assert_close(ran.out.logits[k][rows], want.logits[k][rows], atol=1e-5, rtol=0)
        assert bool(ran.out.logits[k][~rows].isnan().all()), k  # what an image did not run is NaN
    assert ran.answer_keys(model.keys) == [["s1", "s12", "s123"][int(n) - 1] for n in expect]
    # the records: the outputs and boxes each image ran, which answered, and the answer's classes first
    recs = racnn.predict(model, list(x), exit_confidence=p, topk=2)
    for rec, n in zip(recs, expect.tolist(), strict=True):
        assert rec["scales_run"] == n and rec["answered_by"] == ["s1", "s12", "s123"][n - 1]
        needs = {"s1": 1, "s2": 2, "s12": 2, "s3": 3, "s123": 3}
        assert list(rec["top"]) == [k for k in model.keys if needs[k] <= n]
        assert len(rec["boxes"]) == n - 1  # the boxes that made the inputs of the scales it ran
    full = racnn.predict(model, list(x), topk=2)
    assert {r["scales_run"] for r in full} == {3} and {r["answered_by"] for r in full} == {"s123"}


def test_the_decisions_of_any_threshold_from_one_full_run_are_the_staged_runs() -> None:
    model = _model()
    x = torch.randn(12, 3, 40, 40)
    full = staged_forward(model_stages(model), x, keys=model.keys, exit_confidence=1.0)
    stage_probs = [full.out.logits[k].softmax(1) for k in ("s1", "s12", "s123")]
    confident = torch.cat([p.amax(1) for p in stage_probs[:2]])
    for p in (_between(confident), 0.0, 1.0):  # no image's confidence near the threshold (kernels differ)
        answers, ran = exit_decisions(stage_probs, p)
        staged = staged_forward(model_stages(model), x, keys=model.keys, exit_confidence=p)
        assert ran.tolist() == staged.scales_run.tolist()
        want = [staged.out.logits[k][i].argmax() for i, k in enumerate(staged.answer_keys(model.keys))]
        assert answers.tolist() == [int(a) for a in want]


def test_the_exit_threshold_is_the_fewest_scales_that_keep_the_full_models_answers() -> None:
    """Four images, two stages: the full model answers 0, 1, 1, 0. Threshold 0.6 stops images 0 and 1 at
    scale 1, where image 1 answers 0 (a disagreement); 0.8 stops image 0 alone (agrees); 0.95 none."""
    s1 = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.45, 0.55]])
    s12 = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    p, tried = choose_exit_confidence([s1, s12], [0.6, 0.8, 0.95], max_disagree=0.0)
    assert p == 0.8
    assert [t["disagree"] for t in tried] == [0.25, 0.0, 0.0]
    assert [t["scales_mean"] for t in tried] == [1.5, 1.75, 2.0]
    assert choose_exit_confidence([s1, s12], [0.6, 0.8], max_disagree=0.25)[0] == 0.6
    assert choose_exit_confidence([s1, s12], [0.6], max_disagree=0.1)[0] is None


def test_the_sweep_refuses_a_model_of_one_scale_and_stops_a_nan_image_as_the_staged_run() -> None:
    p = torch.tensor([[0.9, 0.1]])
    with pytest.raises(ValueError, match="at least 2 scales"):
        choose_exit_confidence([p])
    nan = torch.tensor([[float("nan"), float("nan")], [0.6, 0.4]])
    _, ran = exit_decisions([nan, torch.tensor([[0.5, 0.5], [0.2, 0.8]])], 0.7)
    assert ran.tolist() == [1, 2]  # staged_forward goes on only where the confidence is below the threshold


def test_stage_predictions_run_in_eval_mode_and_refuse_an_empty_loader() -> None:
    from racnn.evaluation import stage_predictions

    model = _model().train()
    x = torch.randn(6, 3, 40, 40)
    stages, labels = stage_predictions(model, [{"image": x, "label": torch.arange(6) % 5}])
    assert model.training  # its mode given back
    with torch.no_grad():
        want = model.eval()(x).logits
    assert labels.tolist() == [0, 1, 2, 3, 4, 0]
    for got, k in zip(stages, ("s1", "s12", "s123"), strict=True):
        torch.testing.assert_close(got, want[k].softmax(1), atol=1e-5, rtol=0)  # the eval-mode model's
    with pytest.raises(ValueError, match="no images"):
        stage_predictions(model, [])


def test_threshold_one_runs_every_scale_and_zero_scale_one_only() -> None:
    """At 1.0 no uncertain prediction stops: every record is the full model's; at 0.0 scale 1 answers all."""
    model = _model()
    images = list(torch.randn(6, 3, 40, 40))
    full = racnn.predict(model, images)
    for got, want in zip(racnn.predict(model, images, exit_confidence=1.0), full, strict=True):
        assert got["scales_run"] == 3 and got["answered_by"] == "s123"
        assert_same_prediction(got["top"], want["top"])  # the staged run is the model (PROB_TOL)
        for a, b in zip(got["boxes"], want["boxes"], strict=True):
            assert a["xyxy_px"] == pytest.approx(b["xyxy_px"], abs=0.11)  # (rounded to 0.1 px)
    for got, want in zip(racnn.predict(model, images, exit_confidence=0.0), full, strict=True):
        assert got["scales_run"] == 1 and got["answered_by"] == "s1" and list(got["top"]) == ["s1"]
        assert got["boxes"] == [] and got["top"]["s1"][0]["class"] == want["top"]["s1"][0]["class"]


def test_threshold_one_is_the_full_model_even_where_softmax_saturates() -> None:
    """A float32 softmax reaches 1.0 on confident logits: at threshold 1 such an image still runs every scale."""
    model = _model()
    with torch.no_grad():
        for head in model.heads:
            head.bias[0] = 100.0  # every scale sure of class 0
    x = torch.randn(3, 3, 40, 40)
    assert bool((model(x).logits["s1"].softmax(1).amax(1) == 1.0).all())
    ran = staged_forward(model_stages(model), x, keys=model.keys, exit_confidence=1.0)
    assert ran.scales_run.tolist() == [3, 3, 3]


def test_serve_with_early_exit_answers_where_each_image_stopped() -> None:
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from racnn import serve

    def jpeg(colour: tuple[int, int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (50, 40), colour).save(buf, "JPEG")
        return buf.getvalue()

    app = serve.create_app(_model(), limits=serve.ServeLimits(exit_confidence=0.0))
    with TestClient(app) as client:
        assert client.get("/info").json()["exit_confidence"] == 0.0
        files = [("image", (f"{i}.jpg", jpeg((60 * i, 90, 30)), "image/jpeg")) for i in range(3)]
        got = client.post("/predict", files=files)
    assert got.status_code == 200, got.text
    assert [(r["scales_run"], r["answered_by"], list(r["top"]), r["boxes"]) for r in got.json()] == [
        (1, "s1", ["s1"], [])
    ] * 3


def test_exit_confidence_must_be_a_probability_and_not_with_tta() -> None:
    for bad in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            check_exit_confidence(bad)
    with pytest.raises(ValueError, match="do not combine"):
        check_exit_confidence(0.9, "flip")
    check_exit_confidence(None, "flip")
    check_exit_confidence(1.0)


def test_predict_eval_and_the_csv_with_early_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trees = tmp_path / "trees"
    _seven_class_folder(trees)
    ckpt = _seven_class_checkpoint(tmp_path / "best.pt")
    model = racnn.load_model(ckpt)
    images = sorted((trees / "test").rglob("*.png"))
    with torch.no_grad():
        first = [r["top"]["s1"][0]["prob"] for r in racnn.predict(model, images)]
    p = _between(torch.tensor(first))
    base = ["--checkpoint", str(ckpt), "--exit-confidence", str(p)]
    assert main(["predict", *base, str(trees / "test"), "--json", "--workers", "0", "--no-progress"]) == 0
    recs = json.loads(capsys.readouterr().out)
    ran = [r["scales_run"] for r in recs]
    assert 1 in ran and max(ran) > 1
    # the CSV: the answer's classes, and empty cells for the boxes an image did not reach
    out = tmp_path / "preds.csv"
    args = ["predict", *base, str(trees / "test"), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main(args) == 0
    rows = list(csv.DictReader(out.open()))
    by_path = {r["image"]: r for r in recs}
    for row in rows:
        rec = by_path[row["path"]]
        assert row["class"] == rec["top"][rec["answered_by"]][0]["class"]
        assert (row["box1_x0"] == "") == (rec["scales_run"] == 1)
        assert (row["box2_x0"] == "") == (rec["scales_run"] < 3)
        assert (row["answered_by"], int(row["scales_run"])) == (rec["answered_by"], rec["scales_run"])
    capsys.readouterr()
    # the same file continued with another threshold is refused
    assert main([*args[:4], "0.99", *args[5:]]) == 1  # (PredictionFileError: a ValueError)
    assert "exit_confidence" in capsys.readouterr().err
    # eval: the last fusion's figure is the early-exit model's accuracy; the mean scales run and the shares
    js = tmp_path / "m.json"
    assert main(["eval", *base, "--data", str(trees), "--batch-size", "4", "--json", str(js)]) == 0
    assert "early exit:" in capsys.readouterr().out
    m = json.loads(js.read_text())
    right = [Path(r["image"]).parent.name == r["top"][r["answered_by"]][0]["class"] for r in recs]
    assert m["acc_s123"] == pytest.approx(sum(right) / len(right), abs=1e-9)
    assert m["exit_scales_mean"] == pytest.approx(sum(ran) / len(ran), abs=1e-6)  # (a float32 mean)
    shares = [m["exit_share_s1"], m["exit_share_s12"], m["exit_share_s123"]]
    assert shares == pytest.approx([ran.count(n) / len(ran) for n in (1, 2, 3)], abs=1e-6)
    assert m["exit_confidence"] == p
    # with flip TTA: refused in one line
    assert main(["eval", *base, "--data", str(trees), "--tta", "flip"]) == 1
    assert "do not combine" in capsys.readouterr().err
    # the sweep that chooses the threshold: every threshold of the grid, as the staged runs themselves answer
    sweep = ["eval", "--checkpoint", str(ckpt), "--data", str(trees), "--batch-size", "4", "--exit-sweep"]
    assert main([*sweep, "--json", str(js)]) == 0
    out = capsys.readouterr()
    m = json.loads(js.read_text())
    rows = m["exit_sweep"]
    assert [r["exit_confidence"] for r in rows] == list(EXIT_GRID)
    keep = [r for r in rows if r["disagree"] <= EXIT_MAX_DISAGREE]  # the rule, from the rows themselves
    want = (
        min(keep, key=lambda r: (r["scales_mean"], -r["exit_confidence"]))["exit_confidence"]
        if keep
        else None
    )
    assert m["exit_confidence_chosen"] == want
    assert (f"chosen: --exit-confidence {want:g}" if want is not None else "run every scale") in out.out
    assert "--split val" in out.err  # (this is the test split)
    one = 1 / len(recs)  # a staged run on another batch layout may flip an image that sits on a threshold
    for row in rows[::3]:
        js2 = tmp_path / "at.json"
        at = ["eval", "--checkpoint", str(ckpt), "--data", str(trees), "--exit-confidence"]
        assert main([*at, str(row["exit_confidence"]), "--batch-size", "4", "--json", str(js2)]) == 0
        got = json.loads(js2.read_text())
        assert got["acc_s123"] == pytest.approx(row["top1"], abs=one + 1e-9)
        assert got["exit_scales_mean"] == pytest.approx(row["scales_mean"], abs=2 * one + 1e-6)
    capsys.readouterr()
    assert main([*sweep, "--exit-confidence", "0.5"]) == 1
    assert "--exit-sweep runs every scale" in capsys.readouterr().err
