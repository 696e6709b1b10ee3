"""The APN's search update (apn.update=search) and the measurement of what the attention phases add (the final
classifiers with the APNs' initial state: the ``*_init`` figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark
from racnn.attention import box_candidates
from racnn.checkpoint import load_checkpoint
from racnn.losses import box_regression_loss
from racnn.model import RACNNOutput, build_model
from racnn.training import search
from racnn.training.phases import APN_INIT, ATTEND, ATTEND_SEARCH, CLASSIFY, attend_phase
from racnn.training.schedule import PhaseSchedule
from racnn.training.search import chain_probs, search_targets
from racnn.training.state import initial_apns
from racnn.training.trainer import Trainer
from test_training import _same, _snapshot, run_schedule, tiny_config


def test_box_candidates_are_the_box_and_its_neighbours_inside_the_bounds() -> None:
    box = torch.tensor([[0.5, 0.5, 0.2], [0.3, 0.7, 0.3], [0.5, 0.5, 0.5]])
    c = box_candidates(box, shift=0.1, zoom=1.25, min_side=0.25, max_side=0.9)
    assert c.shape == (3, 7, 3)
    assert torch.equal(c[:, 0], box)
    # image 0: centre moved by a tenth of its side (0.04) left, right, up, down; side times and over 1.25
    want = torch.tensor(
        [
            [0.46, 0.5, 0.2],
            [0.54, 0.5, 0.2],
            [0.5, 0.46, 0.2],
            [0.5, 0.54, 0.2],
            [0.5, 0.5, 0.25],
            [0.5, 0.5, 0.16],
        ]
    )
    torch.testing.assert_close(c[0, 1:], want)
    # image 1: the box touches the left and bottom edges: a move out of the image stays at the edge
    torch.testing.assert_close(c[1, 1, :2], torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(c[1, 4, :2], torch.tensor([0.3, 0.7]))
    # image 2: the whole image, side 1 > max_side 0.9: the larger candidate is clamped to 0.45
    assert float(c[2, 5, 2]) == pytest.approx(0.45)
    half = c[..., 2]
    assert bool(((half >= 0.125 - 1e-6) & (half <= 0.5)).all())
    inside = (c[..., :2] - half[..., None] >= -1e-6) & (c[..., :2] + half[..., None] <= 1 + 1e-6)
    assert bool(inside[:, 1:].all())


def _rigged(monkeypatch: pytest.MonkeyPatch, scale2_logit: float):
    """A 3-scale tiny model whose scale 2 answers, on any crop, a true-class logit that grows with the crop's
    mean of channel 0 (the image is bright on its right half), and a forward output made by hand: the
    current boxes, scale 1's p_t from ``scale2_logit``-free logits."""
    torch.manual_seed(0)
    model = build_model(tiny_config(Path(".")).model, num_classes=2).eval()
    real = model.forward_scale

    def forward_scale(s: int, x: torch.Tensor) -> torch.Tensor:
        if s != 1:
            return real(s, x)
        z = 10 * (x[:, 0].mean(dim=(1, 2)) - 0.5)  # bright crops: class 0
        return torch.stack([z, -z], dim=1)

    monkeypatch.setattr(model, "forward_scale", forward_scale)
    images = torch.zeros(2, 3, 32, 32)
    images[:, 0, :, 16:] = 1.0  # channel 0 bright on the right half
    box = torch.tensor([[0.5, 0.5, 0.25], [0.5, 0.5, 0.25]])
    crop = torch.zeros(2, 3, 32, 32)
    logits = {
        "s1": torch.tensor([[2.0, 0.0], [2.0, 0.0]]),  # p_t(1) = 0.88 for class 0
        "s2": torch.tensor([[scale2_logit, 0.0], [scale2_logit, 0.0]]),
        "s3": torch.zeros(2, 2),
    }
    out = RACNNOutput(logits, [box, box.clone()], [crop, crop], views=[box, box.clone()])
    return model, images, out


def test_search_moves_towards_the_box_the_finer_scale_ranks_best(monkeypatch: pytest.MonkeyPatch) -> None:
    model, images, out = _rigged(monkeypatch, scale2_logit=0.0)  # p_t(2) = 0.5: the hinge is active
    cfg = tiny_config(Path("."), **{"apn.update": "search", "apn.search_shift": 0.1, "apn.search_zoom": 1.2})
    targets, stats = search_targets(model, images, out, torch.tensor([0, 0]), cfg)
    cands = box_candidates(out.boxes[0], shift=0.1, zoom=1.2, min_side=0.25, max_side=1.0)
    # the right-shifted box sees the most of the bright half (the larger box sees as much, but no more)
    torch.testing.assert_close(targets[0], cands[:, 2])
    assert float(stats["search_moved_s1"]) == 1.0 and float(stats["search_gain_s1"]) > 0
    assert float(stats["search_grow_s1"]) == 0.0
    # for class 1 (as confident at scale 1) the bright half is evidence against: the box moves left
    out.logits["s1"] = out.logits["s1"].flip(1)
    targets, _ = search_targets(model, images, out, torch.tensor([1, 1]), cfg)
    torch.testing.assert_close(targets[0], cands[:, 1])


def test_search_keeps_a_box_whose_hinge_is_quiet_or_whose_gain_is_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    y = torch.tensor([0, 0])
    model, images, out = _rigged(monkeypatch, scale2_logit=4.0)  # p_t(2) = 0.98 >= p_t(1) + 0.05
    cfg = tiny_config(Path("."), **{"apn.update": "search"})
    targets, stats = search_targets(model, images, out, y, cfg)
    assert torch.equal(targets[0], out.boxes[0]) and float(stats["search_moved_s1"]) == 0.0
    model, images, out = _rigged(monkeypatch, scale2_logit=0.0)
    cfg = tiny_config(Path("."), **{"apn.update": "search", "apn.search_min_gain": 0.9})
    targets, _ = search_targets(model, images, out, y, cfg)
    assert torch.equal(targets[0], out.boxes[0])


def test_the_schedule_runs_the_attention_phase_that_apn_update_names() -> None:
    cfg = tiny_config(Path("."), **{"apn.update": "search", "schedule.converge_tol": 0})
    assert attend_phase(cfg) is ATTEND_SEARCH and attend_phase(tiny_config(Path("."))) is ATTEND
    s = PhaseSchedule(cfg.schedule, epochs=5, attend=attend_phase(cfg))
    assert run_schedule(s, lambda phase: 1.0) == [
        APN_INIT,
        CLASSIFY,
        ATTEND_SEARCH,
        CLASSIFY,
        ATTEND_SEARCH,
        CLASSIFY,
    ]
    assert s.planned_epochs(ATTEND_SEARCH) == s.planned_epochs(ATTEND) == 2


@pytest.mark.parametrize("kind", ["fc", "map"])
def test_a_search_epoch_changes_only_the_apns(fake_cub: Path, tmp_path: Path, kind: str) -> None:
    cfg = tiny_config(fake_cub, **{"apn.update": "search", "model.apn_kind": kind})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m = trainer.model
    before_init = _snapshot([m.apns])
    trainer.train_steps(APN_INIT)  # (a map APN has no tanh units to probe: the log has no saturation)
    assert not _same(before_init, _snapshot([m.apns]))
    init = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert init["phase"] == "apn_init" and ("apn_saturation_s1" in init) == (kind == "fc")
    classifier, apn = _snapshot([m.backbones, m.heads, m.fusions]), _snapshot([m.apns])
    trainer.schedule.start_epoch(ATTEND_SEARCH)
    rec = trainer.train_epoch(ATTEND_SEARCH)
    assert rec["steps"] > 0 and 0 <= rec["search_moved_s1"] <= 1 and rec["search"] >= 0
    assert _same(classifier, _snapshot([m.backbones, m.heads, m.fusions]))  # BatchNorm statistics too
    assert not _same(apn, _snapshot([m.apns]))
    trainer.close()


def _live_and_anchor(score: str = "pair", moved: tuple[int, ...] = (0, 1)):
    """A 3-scale tiny model whose APNs ``moved`` have moved since ``anchor`` (a copy of them) was taken."""
    torch.manual_seed(0)
    cfg = tiny_config(Path("."), **{"apn.update": "search", "apn.search_score": score})
    model = build_model(cfg.model, num_classes=3).eval()
    with torch.no_grad():
        for apn in model.apns:
            apn.fc2.weight.mul_(20)  # boxes that follow what the APN sees (a fresh tiny APN barely does)
    anchor = search.epoch_anchor(model)
    with torch.no_grad():
        for s in moved:
            model.apns[s].fc2.bias.add_(torch.tensor([0.3, -0.2, 0.4]))  # other centres and sides
    return cfg, model, anchor


@pytest.mark.parametrize("score", ["pair", "total"])
def test_an_anchored_search_looks_around_the_anchors_boxes_on_the_anchors_views(
    monkeypatch: pytest.MonkeyPatch, score: str
) -> None:
    """APN 1 has moved since the anchor, APN 2 has not: the targets are searched around the anchor's boxes
    (with the anchor's finer APNs), and APN 2 regresses on the crop the anchor's APN 1 cuts, so its box is the
    anchor's own there, not the one the live APN 1's crop gives."""
    cfg, model, anchor = _live_and_anchor(score, moved=(0,))
    images, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = model(images)
    with search.apns_of(model, anchor):
        ref = model(images)
    assert not torch.allclose(out.boxes[0], ref.boxes[0], atol=1e-3)  # APN 1 did move
    assert not torch.allclose(out.boxes[1], ref.boxes[1], atol=1e-3)  # and so did scale 2's view
    seen = []
    real = search.search_targets

    def spy(model, images, out, y, cfg):
        got = real(model, images, out, y, cfg)
        seen.append((out, [a is b for a, b in zip(model.apns, anchor, strict=True)], got[0]))
        return got

    monkeypatch.setattr(search, "search_targets", spy)
    terms = search.search_loss(model, images, out, y, cfg, anchor=anchor)
    ((got, ran_anchor, targets),) = seen
    assert all(ran_anchor)  # the finer APNs of a total score are the anchor's too
    a, m = cfg.apn, model.cfg
    for s in range(2):
        torch.testing.assert_close(got.boxes[s], ref.boxes[s], atol=1e-5, rtol=0)  # kernels: batch layouts
        cands = box_candidates(
            got.boxes[s].float(), shift=a.search_shift, zoom=a.search_zoom, min_side=m.box_min_side,
            max_side=m.box_max_side,
        )  # fmt: skip
        gap = (cands - targets[s][:, None]).abs().amax(2).amin(1)  # B: distance to the nearest candidate
        assert bool((gap < 1e-5).all()), s
    # what is regressed: the live APN 1 on the image, APN 2 (unchanged) on the anchor's crop: its box there
    want = box_regression_loss(out.boxes[0].float(), targets[0]) + box_regression_loss(
        ref.boxes[1].float(), targets[1]
    )
    torch.testing.assert_close(terms["search"].detach(), want.detach(), atol=1e-5, rtol=0)
    live = box_regression_loss(out.boxes[0].float(), targets[0]) + box_regression_loss(
        out.boxes[1].float(), targets[1]
    )
    assert abs(float(live.detach()) - float(want.detach())) > 1e-4  # (the live crop's box would differ)
    assert float(terms["search"].detach()) > 0  # an image that keeps its box pulls back to the anchor's
    assert model.apns is not anchor and not any(p.requires_grad for p in anchor.parameters())


def test_an_anchor_needs_the_search_update() -> None:
    with pytest.raises(ValueError, match=r"apn\.search_anchor needs apn\.update=search"):
        tiny_config(Path("."), **{"apn.search_anchor": True})  # (the default update is the gradient's)


def test_an_anchor_equal_to_the_apns_searches_as_the_plain_update() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(Path("."), **{"apn.update": "search"})  # all 6 neighbours: no random draw
    model = build_model(cfg.model, num_classes=3).eval()
    images, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    out = model(images)
    plain = search.search_loss(model, images, out, y, cfg)
    anchored = search.search_loss(model, images, out, y, cfg, anchor=search.epoch_anchor(model))
    assert plain.keys() == anchored.keys()
    for k in plain:  # the anchor's own forward: kernels may round differently from the first one
        torch.testing.assert_close(anchored[k], plain[k], atol=1e-5, rtol=0, msg=k)


def test_an_anchored_search_epoch_keeps_its_anchor_and_moves_the_apns(
    fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(fake_cub, **{"apn.update": "search", "apn.search_anchor": True})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m, anchors = trainer.model, []
    real = search.search_loss

    def spy(*args, anchor=None, **kw):
        anchors.append((anchor, _snapshot([anchor]) if anchor is not None else None))
        return real(*args, anchor=anchor, **kw)

    monkeypatch.setattr("racnn.training.phases.search_loss", spy)
    before = _snapshot([m.apns])
    trainer.schedule.start_epoch(ATTEND_SEARCH)
    rec = trainer.train_epoch(ATTEND_SEARCH)
    assert rec["steps"] == len(anchors) > 1 and rec["search"] > 0
    first = anchors[0][0]
    assert first is not None and all(a is first for a, _ in anchors)  # one anchor for the whole epoch
    assert all(_same(before, snap) for _, snap in anchors)  # taken at the start, never stepped
    assert not _same(before, _snapshot([m.apns]))
    trainer.close()


@pytest.mark.parametrize("update", ["gradient", "search"])
def test_the_test_reports_the_initial_boxes_under_the_final_classifiers(
    fake_cub: Path, tmp_path: Path, update: str
) -> None:
    cfg = tiny_config(fake_cub, **{"apn.update": update, "train.epochs": 3, "schedule.warmup_epochs": 1})
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        metrics = trainer.fit()
        init = trainer.state.apn_init
        assert init is not None and not _same(list(init.values()), _snapshot([trainer.model.apns]))
        learned = _snapshot([trainer.model.apns])
        with initial_apns(trainer.model, init):
            assert _same(list(init.values()), _snapshot([trainer.model.apns]))
        assert _same(learned, _snapshot([trainer.model.apns]))  # restored
    for key in ("acc_s2", "acc_s3", "acc_s123", "pt_s2", "pt_s3", "head_hit_s2", "loc_acc_iou50"):
        assert f"{key}_init" in metrics, key
    assert 0 < metrics["pt_s2"] < 1 and 0 < metrics["pt_s2_init"] < 1
    assert metrics["box_side_s1_init"] != metrics["box_side_s1"]  # other boxes, not a copy
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["acc_s2_init"] == metrics["acc_s2_init"]
    # the initial state is part of the resumable state
    assert set(load_checkpoint(tmp_path / "run" / "last.pt")["apn_init"]) == set(init)


def test_the_attend_probe_compares_learned_and_initial_boxes(fake_cub: Path, tmp_path: Path) -> None:
    probe = load_benchmark("attend_probe")
    cfg = tiny_config(fake_cub, **{"train.epochs": 2, "schedule.warmup_epochs": 1})
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        trainer.fit()
    out = tmp_path / "probe.jsonl"
    args = [
        str(tmp_path / "run" / "last.pt"),
        "--out",
        str(tmp_path / "p"),
        "--epochs",
        "1",
        "--json",
        str(out),
    ]
    assert probe.main([*args, "--set", "apn.update=search", "apn.lr=0.01"]) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["set"] == ["apn.update=search", "apn.lr=0.01"] and "search_moved_s1" in line["train"]
    assert set(line["learned_minus_initial"]) == set(line["learned"]) and "pt_s2" in line["learned"]
    with pytest.raises(SystemExit, match="exists"):
        probe.main(args)


def test_learned_vs_init_evaluates_the_final_classifiers_with_both_boxes(
    fake_cub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark("learned_vs_init")
    overrides = {
        "apn.update": "search",
        "train.epochs": 3,
        "schedule.warmup_epochs": 1,
        "train.select": "last",
    }
    cfg = tiny_config(fake_cub, **overrides)  # the test's model is last.pt's
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        metrics = trainer.fit()
    out = tmp_path / "cmp.json"
    assert bench.main([str(tmp_path / "run"), "--split", "test", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["runs"][str(tmp_path / "run")]
    for k in ("acc_s2", "pt_s2", "head_hit_s2", "box_side_s1"):  # the run's own test figures, both boxes
        assert r["learned"][k] == pytest.approx(metrics[k], abs=1e-6), k
        assert r["initial"][k] == pytest.approx(metrics[f"{k}_init"], abs=1e-6), k
    assert "mean +- std" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no last\.pt"):
        bench.main([str(tmp_path)])


def test_the_search_chain_reproduces_the_forward_on_the_box_itself() -> None:
    """``chain_probs`` on a candidate equal to the current box gives the forward's own p_t at every finer
    scale (the finer APNs re-run on the same view): the machinery of the total score, on a real tiny model."""
    torch.manual_seed(0)
    model = build_model(tiny_config(Path(".")).model, num_classes=3).eval()
    images, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    out = model(images)
    box = out.boxes[0].float()
    m = model.cfg
    moved = box_candidates(box, shift=0.1, zoom=1.2, min_side=m.box_min_side, max_side=m.box_max_side)[:, 2]
    cands = torch.stack([box, box, moved], 1)
    q = chain_probs(model, 0, images, model.scale_input(images), out, y, cands, depth=2)
    assert q.shape == (2, 3, 2)
    torch.testing.assert_close(q[:, 1], q[:, 0], atol=1e-5, rtol=0)  # PROB_TOL: kernels differ across batches
    assert not torch.allclose(q[:, 2], q[:, 0], atol=1e-5)  # a moved box shows the finer scales another view
    torch.testing.assert_close(
        chain_probs(model, 0, images, model.scale_input(images), out, y, cands, depth=1)[..., 0], q[..., 0]
    )


def test_the_total_score_weighs_what_a_box_costs_the_finer_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """APN 1's candidates judged by p_t(2) alone (``pair``) and by the hinges of (1, 2) and (2, 3) together
    (``total``): the candidate that pleases scale 2 most but drops scale 3 wins the pair score only."""
    torch.manual_seed(0)
    model = build_model(tiny_config(Path(".")).model, num_classes=2).eval()
    images, y = torch.zeros(1, 3, 32, 32), torch.tensor([0])
    box = torch.tensor([[0.5, 0.5, 0.25]])
    logits = {"s1": torch.tensor([[2.0, 0.0]]), "s2": torch.zeros(1, 2), "s3": torch.zeros(1, 2)}
    out = RACNNOutput(logits, [box, box.clone()], [torch.zeros(1, 3, 32, 32)] * 2, views=[box, box.clone()])
    # p_t(1) = 0.88, current p_t(2) = p_t(3) = 0.5; candidates 1 and 2 raise p_t(2), only 2 keeps scale 3 up
    apn1 = torch.tensor([[0.5, 0.5], [0.95, 0.1], [0.9, 0.9], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])

    def fake_chain(model, s, images, x, out, y, cands, *, depth):  # B x 7 x depth
        return (apn1 if s == 0 else torch.full((7, 2), 0.5))[None, :, :depth]

    monkeypatch.setattr(search, "chain_probs", fake_chain)
    pick = lambda score: search_targets(  # noqa: E731
        model, images, out, y, tiny_config(Path("."), **{"apn.update": "search", "apn.search_score": score})
    )[0][0]
    m = model.cfg
    cands = box_candidates(box, shift=0.1, zoom=1.15, min_side=m.box_min_side, max_side=m.box_max_side)
    torch.testing.assert_close(pick("pair"), cands[:, 1])
    torch.testing.assert_close(pick("total"), cands[:, 2])
