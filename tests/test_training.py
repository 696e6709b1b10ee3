"""Training: phases freeze the right parts, the schedule alternates and converges, runs resume exactly."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import interrupt_epoch
from racnn.checkpoint import load_checkpoint
from racnn.config import Config, ScheduleConfig, load_config
from racnn.localization import aolm_boxes, class_activation, peak_response_boxes, region_response_boxes
from racnn.losses import box_regression_loss, ranking_loss, true_class_prob
from racnn.model import build_model
from racnn.training import optim
from racnn.training.apn_init import apn_init_target, apn_saturation
from racnn.training.phases import APN_INIT, ATTEND, CLASSIFY, JOINT, WARMUP, Phase, set_phase
from racnn.training.schedule import PhaseSchedule
from racnn.training.trainer import Trainer


def tiny_config(root: Path, **extra: object) -> Config:
    overrides = [
        "model.backbone=tiny",
        "model.pretrained=false",
        "model.input_size=32",
        "model.apn_grid=2",
        "model.apn_hidden=16",
        "data.image_size=32",
        "data.num_workers=0",
        "data.val_fraction=0.25",
        "train.batch_size=4",
        "train.epochs=3",
        "apn.init_steps=2",
        f"data.root={root}",
        "schedule.classify_epochs=1",
        "schedule.attend_epochs=1",
        "apn.lr=0.01",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_the_trainer_runs_a_phase_by_its_fields_alone(fake_cub: Path, tmp_path: Path) -> None:
    """A phase is what its fields say: one defined here (the classification phase with the heads alone
    trained and the APN optimiser stepped) runs through the trainer's epoch, which never asks its name."""
    heads = dataclasses.replace(
        CLASSIFY,
        name="heads",
        title="heads only",
        trains=lambda cfg: frozenset({"head"}),
        optimizers=("apn",),
    )
    trainer = Trainer(tiny_config(fake_cub), tmp_path / "run", progress=False)
    m = trainer.model
    bb, head, apn = _snapshot([m.backbones]), _snapshot([m.heads, m.fusions]), _snapshot([m.apns])
    assert trainer.optimizers.stepped_by(heads) == [trainer.optimizers.apn]
    trainer.optimizers.apn.add_param_group({"params": list(m.heads.parameters()), "lr": 0.1})
    rec = trainer.train_epoch(heads)
    assert rec["steps"] > 0 and "lr" not in rec
    assert _same(bb, _snapshot([m.backbones])) and _same(apn, _snapshot([m.apns]))
    assert not _same(head, _snapshot([m.heads, m.fusions]))
    trainer.close()


def _snapshot(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_attention_phase_gradients_reach_every_apn_parameter_only() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(Path("."))
    model = build_model(cfg.model, num_classes=5)
    set_phase(model, ATTEND, cfg)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 5, (6,))
    out = model(x)
    probs = [true_class_prob(out.logits[f"s{i + 1}"], y) for i in range(3)]
    ranking_loss(probs, margin=1.0).backward()  # margin 1 keeps every hinge active
    for name, p in model.apns.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for module in (model.backbones, model.heads, model.fusions):
        assert all(p.grad is None for p in module.parameters())


def test_classification_phase_detaches_the_boxes() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(Path("."))
    model = build_model(cfg.model, num_classes=5)
    set_phase(model, CLASSIFY, cfg)
    out = model(torch.randn(4, 3, 32, 32), detach_boxes=True)
    sum(
        torch.nn.functional.cross_entropy(v, torch.zeros(4, dtype=torch.long)) for v in out.logits.values()
    ).backward()
    assert all(p.grad is None for p in model.apns.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbones.parameters())


@pytest.mark.parametrize("phase", [ATTEND, CLASSIFY])
def test_a_phase_epoch_changes_only_its_part(fake_cub: Path, tmp_path: Path, phase: str) -> None:
    trainer = Trainer(tiny_config(fake_cub), tmp_path / "run", progress=False)
    m = trainer.model
    classifier, apn = _snapshot([m.backbones, m.heads, m.fusions]), _snapshot([m.apns])
    trainer.schedule.start_epoch(phase)
    rec = trainer.train_epoch(phase)
    assert rec["steps"] > 0
    if phase == ATTEND:  # classifiers fixed, BatchNorm statistics included
        assert _same(classifier, _snapshot([m.backbones, m.heads, m.fusions]))
        assert not _same(apn, _snapshot([m.apns]))
    else:
        assert _same(apn, _snapshot([m.apns]))
        assert not _same(classifier, _snapshot([m.backbones, m.heads, m.fusions]))


def test_attention_levers_enter_the_attention_phase_only(fake_cub: Path, tmp_path: Path) -> None:
    """rank_quiet, the object prior and the soft box gradient: an attention epoch logs the share of active
    hinges and the prior's loss, and still changes the APNs alone; the prior's gradient reaches only APN 1."""
    keys = {"loss.rank_quiet": "true", "loss.prior_weight": 1.0, "model.mask_k_backward": 1.0}
    trainer = Trainer(tiny_config(fake_cub, **keys), tmp_path / "run", progress=False)
    m = trainer.model
    classifier, apn = _snapshot([m.backbones, m.heads, m.fusions]), _snapshot([m.apns])
    trainer.schedule.start_epoch(ATTEND)
    rec = trainer.train_epoch(ATTEND)
    assert 0.0 <= rec["rank_active"] <= 1.0 and rec["prior"] > 0
    assert _same(classifier, _snapshot([m.backbones, m.heads, m.fusions]))
    assert not _same(apn, _snapshot([m.apns]))
    trainer.schedule.start_epoch(CLASSIFY)
    assert "prior" not in trainer.train_epoch(CLASSIFY)  # the classifiers never see it
    trainer.close()
    # the prior alone: a gradient for APN 1, none for APN 2 (its box is not tied to the object)
    set_phase(m, ATTEND, trainer.cfg)
    m.zero_grad(set_to_none=True)
    out = m(torch.randn(4, 3, 32, 32), return_maps=True)
    box_regression_loss(out.boxes[0], aolm_boxes(out.maps[0], 0.25, 1.0)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.apns[0].parameters())
    assert all(p.grad is None for p in m.apns[1].parameters())


@pytest.mark.parametrize("backbones", [True, False])
def test_warmup_backbones_false_keeps_the_imagenet_backbones(
    fake_cub: Path, tmp_path: Path, backbones: bool
) -> None:
    """``schedule.warmup_backbones=false``: a warm-up epoch trains heads and fusion, and the backbones keep
    every tensor (BatchNorm statistics too); the default trains them as a classification epoch does."""
    cfg = tiny_config(fake_cub, **{"schedule.warmup_epochs": 1, "schedule.warmup_backbones": backbones})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m = trainer.model
    bb, heads, apn = _snapshot([m.backbones]), _snapshot([m.heads, m.fusions]), _snapshot([m.apns])
    trainer.schedule.start_epoch(WARMUP)
    assert trainer.train_epoch(WARMUP)["steps"] > 0
    assert _same(bb, _snapshot([m.backbones])) is not backbones
    assert not _same(heads, _snapshot([m.heads, m.fusions])) and _same(apn, _snapshot([m.apns]))
    trainer.schedule.start_epoch(CLASSIFY)  # the classification phase trains the backbones again
    trainer.train_epoch(CLASSIFY)
    assert not _same(bb, _snapshot([m.backbones]))


def run_schedule(s: PhaseSchedule, loss: Callable[[Phase], float]) -> list[Phase]:
    """The phases ``s`` runs, each epoch ending with the loss ``loss(phase)``, as the trainer runs them."""
    seen = []
    while (phase := s.next_phase()) is not None:
        if phase.steps is not None:
            s.end_steps(phase)
        else:
            s.start_epoch(phase)
            s.end_epoch(loss(phase))
        seen.append(phase)
    return seen


def test_schedule_alternates_and_plans() -> None:
    cfg = ScheduleConfig(warmup_epochs=1, classify_epochs=2, attend_epochs=1, converge_tol=0)
    s = PhaseSchedule(cfg, epochs=8)
    seen = run_schedule(s, lambda phase: 1.0)
    # the APN initialisation once, after the warm-up, before the first classification epoch
    assert seen == [WARMUP, APN_INIT, CLASSIFY, CLASSIFY, ATTEND, CLASSIFY, CLASSIFY, ATTEND, CLASSIFY]
    assert s.planned_epochs(CLASSIFY) == 5 and s.planned_epochs(ATTEND) == 2
    assert s.lr_epochs() == 6  # the classifiers' schedule: warm-up and classification epochs
    joint = PhaseSchedule(ScheduleConfig(mode="joint", converge_tol=0), epochs=3)
    assert run_schedule(joint, lambda phase: 1.0) == [APN_INIT, JOINT, JOINT, JOINT]
    assert joint.planned_epochs(JOINT) == joint.lr_epochs() == 3


def test_schedule_stops_when_both_phases_converge() -> None:
    s = PhaseSchedule(ScheduleConfig(classify_epochs=1, attend_epochs=1, converge_tol=0.05), epochs=100)
    losses = {CLASSIFY: iter([3.0, 2.0, 1.99]), ATTEND: iter([0.5, 0.499, 0.4985])}
    seen = run_schedule(s, lambda phase: next(losses[phase]))
    # classify converges on its 3rd phase (2.0 -> 1.99), attend already on its 2nd
    assert s.stopped == "converged" and seen[0] is APN_INIT and len(seen[1:]) == s.epoch == 5
    restored = PhaseSchedule(ScheduleConfig(), epochs=100)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


def test_apn_init_moves_boxes_towards_target_side(fake_cub: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        fake_cub,
        **{"apn.init_steps": 30, "apn.init_side": 0.4, "apn.init_lr": 0.01},
    )
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    x = torch.stack([trainer.train_set[i]["image"] for i in range(4)])
    with torch.no_grad():
        before = trainer.model(x).boxes[0][:, 2].mean() * 2
    trainer.train_steps(APN_INIT)
    with torch.no_grad():
        after = trainer.model.eval()(x).boxes[0][:, 2].mean() * 2
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["phase"] == "apn_init" and 0.0 <= rec["apn_saturation_s1"] <= 1.0
    with torch.no_grad():
        for apn in trainer.model.apns:
            apn.fc1.weight.zero_()
            apn.fc1.bias.fill_(0.5)
    assert set(apn_saturation(trainer.model, x).values()) == {0.0}  # tanh(0.5): unsaturated
    with torch.no_grad():
        trainer.model.apns[0].fc1.bias.fill_(-4.0)
    assert apn_saturation(trainer.model, x) == {"apn_saturation_s1": 1.0, "apn_saturation_s2": 0.0}
    assert abs(float(after) - 0.4) < abs(float(before) - 0.4)
    assert abs(float(after) - 0.4) < 0.1


def test_apn_init_region_targets_reach_the_apns(fake_cub: Path, tmp_path: Path) -> None:
    """``apn.init_box=peak,region``: APN 1 towards the peak square, APN 2 (and any further, the
    last kind repeats) towards the region box of its own scale's CAM."""
    keys = {
        "apn.init_box": "peak,region",
        "apn.init_response": "cam",
        "apn.init_threshold": 0.3,
    }
    trainer = Trainer(tiny_config(fake_cub, **keys), tmp_path / "run", progress=False)
    fmap, y = torch.randn(2, trainer.model.backbones[1].channels, 5, 5), torch.tensor([0, 1])
    m, cams = trainer.cfg.model, [class_activation(fmap, trainer.model.heads[s], y) for s in (0, 1)]
    want_region = region_response_boxes(cams[1], 0.3, m.box_min_side, m.box_max_side)
    assert torch.equal(apn_init_target(trainer.model, trainer.cfg, 1, fmap, y), want_region)
    want_peak = peak_response_boxes(cams[0], trainer.cfg.apn.init_side)
    assert torch.equal(apn_init_target(trainer.model, trainer.cfg, 0, fmap, y), want_peak)
    trainer.train_steps(APN_INIT)  # runs end to end with these targets
    assert trainer.schedule.apn_init_done


def test_fit_writes_outputs_and_resume_reproduces_the_run(fake_cub: Path, tmp_path: Path) -> None:
    cfg = tiny_config(fake_cub, **{"runtime.deterministic": "true"})
    full = Trainer(cfg, tmp_path / "full", progress=False).fit()
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics.json"):
        assert (tmp_path / "full" / name).is_file(), name
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase") for r in lines] == ["apn_init", "classify", "attend", "classify"]

    # the same run, stopped after its second epoch, then resumed from last.pt
    stopped = Trainer(cfg, tmp_path / "stopped", progress=False)
    interrupt_epoch(stopped, 3)  # stopped after its second epoch
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    stopped.close()  # as the process would end
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["progress"]["schedule"]["epoch"] == 2
    resumed = Trainer(Config(), tmp_path / "stopped", resume=True, progress=False).fit()
    assert resumed == full
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "stopped" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_use_fused_adam_and_step_like_the_plain_one(name: str) -> None:
    cfg = load_config(None, ["model.backbone=tiny", "model.pretrained=false", f"optim.name={name}"])
    model = build_model(cfg.model, num_classes=3)
    cls_opt, apn_opt = optim.make_optimizers(model, cfg)
    assert apn_opt.defaults["fused"] is True
    assert cls_opt.defaults.get("fused") is (True if name == "adamw" else None)
    apn = model.parameter_groups()["apn"]
    plain = [p.detach().clone().requires_grad_(True) for p in apn]
    grads = [torch.randn_like(p) for p in apn]
    ref = torch.optim.Adam(plain, lr=cfg.apn.lr, foreach=False)
    for _ in range(3):
        for p, q, g in zip(apn, plain, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        apn_opt.step()
        ref.step()
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(apn, plain, strict=True))


def test_resume_keeps_the_fused_flag_of_the_new_optimizer() -> None:
    """A checkpoint of an unfused Adam loads into a fused one and it stays fused (and steps)."""
    w = torch.nn.Parameter(torch.ones(4))
    old = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(4)
    old.step()
    new = torch.optim.Adam([w], lr=0.1, fused=True)
    new.load_state_dict(optim.keep_fused(new, old.state_dict()))
    assert new.param_groups[0]["fused"] is True and float(new.state[w]["step"]) == 1.0
    new.step()
    assert float(new.state[w]["step"]) == 2.0
    plain = torch.optim.Adam([w], lr=0.1)
    plain.load_state_dict(old.state_dict())
    assert plain.param_groups[0]["fused"] is None  # what load_state_dict alone would have done to `new`


def test_apn_init_full_size_reads_scale_1s_map_of_the_full_image(fake_cub: Path, tmp_path: Path) -> None:
    """``apn.init_full_size``: APN 1's initialisation target comes from scale 1's map of the loader's 64 px
    image (a finer grid than its 32 px input's); APN 2's stays on its own scale's map."""
    import contextlib

    from racnn.training.phases import apn_init_loss
    from racnn.training.step import train_step

    keys = {"model.crop_from": "source", "data.image_size": 64, "apn.init_box": "aolm,peak"}
    cfg = tiny_config(fake_cub, **keys, **{"apn.init_full_size": "true"})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3)
    set_phase(model, APN_INIT, cfg)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    with torch.no_grad():
        out = model(x, detach_crops=True, return_maps=True)
        full = model.trunk(0, x)
    assert full.shape[-1] > out.maps[0].shape[-1]  # the finer grid
    want = apn_init_loss(model, cfg, out, y, full_map=full)["box"]
    plain = apn_init_loss(model, cfg, out, y)["box"]
    opt = [torch.optim.SGD([p for p in model.apns.parameters()], lr=0.0)]
    terms, _ = train_step(model, model, x, y, APN_INIT, cfg, opt, autocast=contextlib.nullcontext())
    assert torch.allclose(terms["box"], want) and not torch.allclose(want, plain)
    cfg.apn.init_full_size = False  # off: the scale's own input map, as before
    terms, _ = train_step(model, model, x, y, APN_INIT, cfg, opt, autocast=contextlib.nullcontext())
    assert torch.allclose(terms["box"], plain)
