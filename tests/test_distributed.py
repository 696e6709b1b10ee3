"""Multi-process training (torchrun, gloo on CPU): 2 processes give what 1 process gives with the same global
batch; the pieces that make it so (synchronised BatchNorm, per-image augmentation seeds, shards, batch split);
TensorBoard output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from racnn.backbones import backbone_preprocessing
from racnn.checkpoint import load_checkpoint
from racnn.config import ConfigError, load_config
from racnn.training import ddp, distributed, loaders
from racnn.training.trainer import Trainer

TINY = [
    *TINY_MODEL,
    "data.num_workers=0",
    "apn.init_steps=2",
    "schedule.classify_epochs=1",
    "schedule.attend_epochs=1",
    "apn.lr=0.01",
]


def _noise_images(cub: Path) -> Path:
    """Replace the fake tree's flat images by noise: features then vary in space (no arg-max ties)."""
    rng = np.random.default_rng(0)
    for path in sorted((cub / "images").rglob("*.jpg")):
        w, h = Image.open(path).size
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return cub


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_two_processes_match_one_process_with_the_same_global_batch(fake_cub: Path, tmp_path: Path) -> None:
    """12 training images, global batch 4: 3 steps per epoch of 4 images (1 process) or 2 + 2 (2 processes
    over gloo, BatchNorm synchronised); test images sharded 2 + 1. Same numbers up to rounding."""
    cub = _noise_images(fake_cub)
    keys = [*TINY, "data.augment=false", "data.val_fraction=0", "train.batch_size=4", "train.epochs=3"]
    train = ["-m", "racnn", "train", "--data", str(cub), "--no-progress", "--set", *keys]
    one = subprocess.run(
        [sys.executable, *train, "--out", str(tmp_path / "one")], capture_output=True, text=True, env=_env()
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [*torchrun, *train, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes)

    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert m1.keys() == m2.keys() and m2["num_images"] == 3
    for k, v in m1.items():
        assert v == (pytest.approx(m2[k], rel=1e-4, abs=1e-5) if isinstance(v, float) else m2[k]), k
    logs = [
        [json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    assert (
        [r["phase"] for r in logs[0]]
        == [r["phase"] for r in logs[1]]
        == [
            "apn_init",
            "classify",
            "attend",
            "classify",
        ]
    )
    for a, b in zip(*logs, strict=True):
        for k in ("loss", "rank", "train_acc_s1", "train_acc_s123", "steps"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["phase"], k)
    w1, w2 = (load_checkpoint(tmp_path / r / "last.pt")["model"] for r in ("one", "two"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-3, atol=1e-4, msg=k)


def _bn_worker(rank: int, init_file: str) -> None:
    """One of 2 ranks: AllReduceBatchNorm on half the batch == BatchNorm on the whole (values, grads, stats)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        x = torch.randn(6, 4, 5, 5) * 3 + 1  # the whole batch, the same on both ranks
        w = torch.randn(6, 4, 5, 5)  # weights of the loss
        ref = torch.nn.BatchNorm2d(4)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        bn = ddp._to_all_reduce_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))[0]
        bn.load_state_dict(ref.state_dict())
        xr = x.clone().requires_grad_()
        expected = ref(xr)
        (expected * w).sum().backward()
        half = slice(3 * rank, 3 * rank + 3)
        xs = x[half].clone().requires_grad_()
        y = bn(xs)
        (y * w[half]).sum().backward()  # each rank's share of the same total loss
        grads = [p.grad.clone() for p in bn.parameters()]
        for g in grads:
            dist.all_reduce(g)  # what DDP does (it also divides by 2: here the loss is a sum, not a mean)
        torch.testing.assert_close(y, expected[half], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs.grad, xr.grad[half], rtol=1e-4, atol=1e-5)
        for g, p in zip(grads, ref.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_mean, ref.running_mean)
        torch.testing.assert_close(bn.running_var, ref.running_var)
    finally:
        dist.destroy_process_group()


def test_all_reduce_batchnorm_matches_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_bn_worker, args=(str(tmp_path / "rendezvous"),), nprocs=2, join=True)


def test_augmentation_does_not_depend_on_the_process_count(fake_cub: Path) -> None:
    """Each image's random crop and flip come from (seed, epoch, index): 2 shards see what 1 process sees."""
    cub = _noise_images(fake_cub)  # a crop of a flat image is the same flat image
    cfg = load_config(None, [*TINY, f"data.root={cub}", "data.augment=true", "train.batch_size=4"])
    data = loaders.make_dataset(cfg, "train", backbone_preprocessing("tiny"), train=True)

    def images(world: int, rank: int) -> dict[int, torch.Tensor]:
        loader = loaders.make_loader(data, cfg, train=True, world_size=world, rank=rank)
        loader.sampler.set_epoch(3)
        return {int(i): im for b in loader for i, im in zip(b["index"], b["image"], strict=True)}

    one, two = images(1, 0), {**images(2, 0), **images(2, 1)}
    assert one.keys() == two.keys()
    assert all(torch.equal(one[i], two[i]) for i in one)
    again = images(1, 0)  # the same epoch again: the same crops (a resumed run sees them too)
    assert all(torch.equal(one[i], again[i]) for i in one)
    loader = loaders.make_loader(data, cfg, train=True)
    loader.sampler.set_epoch(4)
    other = {int(i): im for b in loader for i, im in zip(b["index"], b["image"], strict=True)}
    assert any(not torch.equal(one[i], other[i]) for i in one)  # another epoch, other crops


def test_evaluation_shards_cover_every_image_once(fake_cub: Path) -> None:
    cfg = load_config(None, [*TINY, f"data.root={fake_cub}", "train.batch_size=2"])
    data = loaders.make_dataset(cfg, "trainval", backbone_preprocessing("tiny"), train=False)
    seen = [
        int(i)
        for r in range(5)
        for b in loaders.make_loader(data, cfg, world_size=5, rank=r)
        for i in b["index"]
    ]
    assert sorted(seen) == list(range(len(data)))


def test_global_batch_must_split_evenly_and_env_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, ["train.batch_size=6"])
    assert loaders.per_rank_batch(cfg, 3) == 2
    with pytest.raises(ConfigError, match=r"train.batch_size=6 is the batch of all 4 processes"):
        loaders.per_rank_batch(cfg, 4)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_from_os() == distributed.DistEnv() and distributed.DistEnv().main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = distributed.env_from_os()
    assert (env.rank, env.world_size, env.local_rank, env.main, env.active) == (3, 4, 1, False, True)


def test_tensorboard_scalars_and_pictures_without_changing_the_run(fake_cub: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    keys = [
        *TINY,
        f"data.root={fake_cub}",
        "data.val_fraction=0.25",
        "train.epochs=2",
        "runtime.deterministic=true",
    ]
    with_tb = Trainer(load_config(None, [*keys, "train.tensorboard=true"]), tmp_path / "tb", progress=False)
    metrics = with_tb.fit()
    with_tb.close()
    plain = Trainer(load_config(None, keys), tmp_path / "plain", progress=False).fit()
    assert metrics == plain  # pictures and scalars draw no random numbers
    assert not (tmp_path / "plain" / "tb").exists()
    events = EventAccumulator(str(tmp_path / "tb" / "tb")).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/acc_s1", "val/acc_s123", "test/acc_s1"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert tags["images"] == ["attention"] and [e.step for e in events.Images("attention")] == [1, 2]
