"""``apn.attend_holdout``: the attention phases learn on a share of the training split the classifiers do not
train on until the budget's last attention epoch has run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import interrupt_epoch
from racnn.config import Config, ConfigError, ScheduleConfig
from racnn.training import loaders
from racnn.training.phases import ATTEND, CLASSIFY
from racnn.training.schedule import PhaseSchedule
from racnn.training.trainer import Trainer
from test_training import tiny_config


class _Labels:
    def __init__(self, labels: list[int]) -> None:
        self.samples = [type("S", (), {"label": y})() for y in labels]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> int:
        return i


def test_the_held_out_share_is_per_class_seeded_and_disjoint() -> None:
    labels = [0] * 10 + [1] * 20 + [2] * 5 + [3]  # class 3: one image, kept for the classifiers
    data = _Labels(labels)
    fitted, held = loaders.holdout_split(data, 0.2, seed=0)
    assert sorted(fitted + held) == list(range(len(labels))) and not set(fitted) & set(held)
    assert Counter(labels[i] for i in held) == {0: 2, 1: 4, 2: 1}
    assert loaders.holdout_split(data, 0.2, seed=0) == (fitted, held)
    assert loaders.holdout_split(data, 0.2, seed=1)[1] != held  # another seed, another draw


def test_an_attention_epoch_of_the_held_out_share_is_as_long_as_one_of_the_split() -> None:
    data = _Labels([0] * 10 + [1] * 20)
    cfg = tiny_config(Path("."), **{"apn.attend_holdout": 0.2})
    held = loaders.share_positions(data, cfg, "held_out")
    fitted = loaders.share_positions(data, cfg, "fitted")
    assert held is not None and fitted is not None
    assert len(held) == 30 and Counter(held) == dict.fromkeys(held, 5)
    assert len(fitted) == 24 and not set(fitted) & set(held)
    assert loaders.share_positions(data, cfg, "all") is None
    with pytest.raises(ValueError, match="images must be one of"):
        loaders.share_positions(data, cfg, "val")


def test_a_selected_share_draws_as_a_loader_of_that_subset_would() -> None:
    """One loader serves every share: narrowed to positions, its sampler yields the indices and augmentation
    seeds a sampler over the subset of those positions would (the order of the subset's positions, each
    place's seed; repeats get seeds of their own), and back to the whole split, the whole split's."""
    from torch.utils.data import DistributedSampler, Subset

    data = _Labels(list(range(12)))
    positions = [3, 7, 1, 3, 7, 1]
    fresh = lambda d: loaders.SeededSampler(DistributedSampler(d, num_replicas=1, rank=0, seed=5), 5)  # noqa: E731
    sampler, subset = fresh(data), fresh(Subset(data, positions))
    for epoch in (0, 3):
        sampler.select(positions)
        sampler.set_epoch(epoch)
        subset.set_epoch(epoch)
        assert [(positions[p], s) for p, s in subset] == list(sampler)
    assert len({s for _, s in sampler}) == len(positions)
    whole = fresh(data)
    whole.set_epoch(3)
    sampler.select(None)
    assert list(sampler) == list(whole) and len(sampler) == 12


def test_a_split_too_small_or_without_labels_is_refused() -> None:
    with pytest.raises(ConfigError, match="holds out no image"):
        loaders.holdout_split(_Labels([0, 1, 2]), 0.2, seed=0)
    with pytest.raises(ConfigError, match=r"no \.samples"):
        loaders.holdout_split(list(range(10)), 0.2, seed=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"apn.attend_holdout": 1.0}, r"apn\.attend_holdout must be in \[0, 1\)"),
        ({"apn.attend_holdout": 0.2, "schedule.mode": "joint"}, "needs schedule.mode=alternate"),
    ],
)
def test_bad_holdout_settings_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(Path("."), **overrides)


@pytest.mark.parametrize(
    ("warmup", "classify", "attend", "epochs"),
    [(2, 2, 1, 16), (1, 1, 2, 7), (0, 3, 1, 6), (1, 1, 2, 6), (0, 2, 1, 1), (3, 1, 1, 2), (2, 2, 2, 11)],
)
def test_attention_ahead_matches_the_schedule_it_runs(
    warmup: int, classify: int, attend: int, epochs: int
) -> None:
    cfg = ScheduleConfig(warmup_epochs=warmup, classify_epochs=classify, attend_epochs=attend, converge_tol=0)
    sched = PhaseSchedule(cfg, epochs)
    kinds, ahead = [], []
    while (phase := sched.next_phase()) is not None:
        if phase.steps is not None:
            sched.end_steps(phase)
            continue
        ahead.append(sched.attention_ahead())
        sched.start_epoch(phase)
        kinds.append(phase.name)
        sched.end_epoch(1.0)
    last = max((i for i, k in enumerate(kinds) if k == "attend"), default=-1)
    assert sched.last_attention_epoch() == last
    assert ahead == [i < last for i in range(len(kinds))]


def test_classifiers_never_see_the_held_out_images_while_attention_is_ahead(
    fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 warm-up, then (classify, attend) twice, then a classification epoch after the last attention one
    cfg = tiny_config(
        fake_cub,
        **{"apn.attend_holdout": 0.4, "train.epochs": 6, "schedule.warmup_epochs": 1, "apn.init_steps": 1},
    )
    seen: list[tuple[int, str, set[int]]] = []
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        real = trainer._step

        def spy(phase, forward, batch, anchor=None):
            seen.append((trainer.schedule.epoch, phase.name, set(batch["index"].tolist())))
            return real(phase, forward, batch, anchor)

        monkeypatch.setattr(trainer, "_step", spy)
        trainer.fit()
        fitted, held = (set(p) for p in loaders.holdout_split(trainer.train_set, 0.4, cfg.train.seed))
    assert held and fitted
    by_epoch: dict[tuple[int, str], set[int]] = {}
    for epoch, name, idx in seen:
        by_epoch.setdefault((epoch, name), set()).update(idx)
    phases = [(e, n) for e, n in by_epoch if n != "apn_init"]
    assert phases == [
        (0, "warmup"),
        (1, "classify"),
        (2, "attend"),
        (3, "classify"),
        (4, "attend"),
        (5, "classify"),
    ]
    for (epoch, name), idx in by_epoch.items():
        if name == "apn_init":  # (one step: a batch of every image's loader)
            assert len(idx) == cfg.train.batch_size
            continue
        want = held if name == "attend" else fitted if epoch < 4 else fitted | held
        assert idx == want, (epoch, name)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    read = [r["images"] for r in log if "images" in r]
    assert read == ["fitted", "fitted", "held_out", "fitted", "held_out", "all"]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_run_reads_the_shares_of_an_uninterrupted_one(
    fake_cub: Path, tmp_path: Path, workers: int
) -> None:
    # resumed before the first attention epoch (the search draws candidates at random) and the switch to
    # every image, with and without loader workers
    cfg = tiny_config(
        fake_cub,
        **{
            "apn.attend_holdout": 0.4,
            "train.epochs": 6,
            "schedule.warmup_epochs": 1,
            "runtime.deterministic": "true",
            "apn.update": "search",
            "apn.search_candidates": 2,
            "data.num_workers": workers,
        },
    )
    full = Trainer(cfg, tmp_path / "full", progress=False).fit()
    stopped = Trainer(cfg, tmp_path / "stopped", progress=False)
    interrupt_epoch(stopped, 3)  # stopped before the first attention epoch: it and the switch to all resume
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    stopped.close()
    assert Trainer(Config(), tmp_path / "stopped", resume=True, progress=False).fit() == full


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.epochs": 5}, "ends on an attention epoch"),
        ({"data.val_fraction": 0.0}, "without a validation split"),
        ({"apn.attend_holdout": 0.1}, "holds out no image"),
        ({"data.skip_bad_images": True}, "with data.skip_bad_images"),
    ],
)
def test_a_run_that_would_misuse_the_holdout_is_refused_before_its_folder(
    fake_cub: Path, tmp_path: Path, overrides: dict, message: str
) -> None:
    settings = {"apn.attend_holdout": 0.4, "train.epochs": 6, "schedule.warmup_epochs": 1} | overrides
    with pytest.raises(ConfigError, match=message):
        Trainer(tiny_config(fake_cub, **settings), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_one_loader_with_persistent_workers_reads_only_the_selected_share(
    fake_cub: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(fake_cub, **{"apn.attend_holdout": 0.4, "train.epochs": 6, "schedule.warmup_epochs": 1})
    cfg.data.num_workers = 1
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        fitted, held = loaders.holdout_split(trainer.train_set, 0.4, cfg.train.seed)
        loader, pids = trainer._train_loader(0, "fitted"), set()
        for epoch, images, want in [
            (0, "fitted", fitted),
            (1, "held_out", held),
            (2, "all", None),
            (3, "held_out", held),
        ]:
            assert trainer._train_loader(epoch, images) is loader
            seen = [i for batch in loader for i in batch["index"].tolist()]
            assert set(seen) == set(want if want is not None else range(len(trainer.train_set))), images
            assert len(seen) == len(
                loaders.share_positions(trainer.train_set, cfg, images) or trainer.train_set
            )
            next(iter(loader))  # an epoch left after one batch: nothing of it may reach the next
            pids.add(tuple(w.pid for w in loader._iterator._workers))
        assert len(pids) == 1  # the same worker throughout


def test_without_a_holdout_every_phase_reads_every_image(fake_cub: Path, tmp_path: Path) -> None:
    with Trainer(tiny_config(fake_cub), tmp_path / "run", progress=False) as trainer:
        assert trainer._images(ATTEND) == trainer._images(CLASSIFY) == "all"
