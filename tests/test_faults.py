"""Runs that survive faults: SIGKILL and Ctrl-C at any moment, then ``--resume`` ends exactly like an
uninterrupted run (deterministic mode); checkpoints are never half-written; a non-finite loss stops the run
naming epoch and step and keeps the last good checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_MODEL, interrupt_epoch
from racnn.checkpoint import atomic_write, load_checkpoint
from racnn.cli import main
from racnn.config import Config, load_config
from racnn.training import phases
from racnn.training.trainer import Trainer

TINY = [
    *TINY_MODEL,
    "data.val_fraction=0.25",
    "train.batch_size=4",
    "apn.init_steps=2",
    "schedule.classify_epochs=1",
    "schedule.attend_epochs=1",
    "apn.lr=0.01",
    "runtime.deterministic=true",
]
TIMING = ("time_s", "images_per_s")


def _records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _same_run(a: Path, b: Path) -> None:
    """Same test metrics, same epoch records (but timings), same final weights."""
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    assert _records(a) == _records(b)
    wa, wb = (load_checkpoint(r / "last.pt")["model"] for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _epochs_done(run: Path) -> int:
    try:
        return int(load_checkpoint(run / "last.pt")["progress"]["schedule"]["epoch"])
    except Exception:  # not written yet
        return -1


def _train_cmd(cub: Path, out: Path) -> list[str]:
    keys = [*TINY, "train.epochs=8", "data.num_workers=1"]
    train = ["train", "--data", str(cub), "--out", str(out), "--no-progress", "--set", *keys]
    return [sys.executable, "-m", "racnn", *train]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}


def _interrupt_after_first_epoch(cmd: list[str], out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` once ``out/last.pt`` holds a finished epoch, wait for the end."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Python turns it into Ctrl-C
    )
    deadline = time.monotonic() + 120
    while _epochs_done(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigkill_or_ctrl_c_then_resume_ends_like_an_uninterrupted_run(fake_cub: Path, tmp_path: Path) -> None:
    full = subprocess.run(_train_cmd(fake_cub, tmp_path / "full"), capture_output=True, text=True, env=_env())
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _interrupt_after_first_epoch(
        _train_cmd(fake_cub, tmp_path / "k"), tmp_path / "k", signal.SIGKILL
    )
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 1 <= _epochs_done(tmp_path / "k") < 8
    stray = tmp_path / "k" / ".last.pt.x1y2.tmp"  # what a write killed half-way leaves
    stray.write_bytes(b"half a checkpoint")
    resume = ["-m", "racnn", "train", "--resume", "--no-progress"]
    done = subprocess.run(
        [sys.executable, *resume, "--out", str(tmp_path / "k")], capture_output=True, env=_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not stray.exists()
    _same_run(tmp_path / "full", tmp_path / "k")

    stopped = _interrupt_after_first_epoch(
        _train_cmd(fake_cub, tmp_path / "c"), tmp_path / "c", signal.SIGINT
    )
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    # a loader worker cut off mid-transfer may write a traceback of its own to the same pipe, even in the
    # middle of a line: the message is searched for anywhere in stderr
    expected = r"racnn train: interrupted; \S+ holds the run after epoch \d+; " + re.escape(
        f"continue with: racnn train --out {tmp_path / 'c'} --resume"
    )
    assert re.search(expected, stopped.stderr), stopped.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, *resume, "--out", str(tmp_path / "c")], capture_output=True, env=_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(tmp_path / "full", tmp_path / "c")


def _config(root: Path, *extra: str) -> Config:
    return load_config(None, [*TINY, f"data.root={root}", "data.num_workers=0", "train.epochs=3", *extra])


def test_resume_drops_log_lines_of_an_epoch_missing_from_last_pt(fake_cub: Path, tmp_path: Path) -> None:
    """Killed between logging an epoch and saving last.pt: the epoch is redone and logged once."""
    cfg = _config(fake_cub)
    Trainer(cfg, tmp_path / "full", progress=False).fit()
    run = Trainer(cfg, tmp_path / "run", progress=False)
    interrupt_epoch(run, 3)
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    run.close()  # what the end of a killed process does: the lock goes
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "phase": "classify", "loss": 1.0}\n')  # logged, then killed before the save
    Trainer(Config(), tmp_path / "run", resume=True, progress=False).fit()
    _same_run(tmp_path / "full", tmp_path / "run")


def test_a_write_that_fails_half_way_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"the good one")

    def half(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_bytes() == b"the good one" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def _nan_on_call(monkeypatch: pytest.MonkeyPatch, name: str, call: int) -> None:
    """Make ``phases.<name>`` (a loss function) return NaN on its ``call``-th call."""
    real, calls = getattr(phases, name), {"n": 0}

    def patched(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == call else out

    monkeypatch.setattr(phases, name, patched)


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_last_good_state(
    fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # 9 training images, batch 4: 3 steps per epoch; epoch 2 is an attention phase (loss = L_rank), whose
    # second step starts with p_t's 13th call (three scales a step): a NaN there reaches L_rank alone.
    _nan_on_call(monkeypatch, "true_class_prob", 13)
    out = tmp_path / "run"
    args = ["train", "--data", str(fake_cub), "--out", str(out), "--no-progress", "--set", *TINY]
    assert main([*args, "data.num_workers=0", "train.epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "epoch 2 (attend), step 2: the loss is not finite" in err
    assert f"{out / 'last.pt'} keeps the last good state (epoch 1)" in err
    state = load_checkpoint(out / "last.pt")
    assert state["progress"]["schedule"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in _records(out)] == [0, 1]
    monkeypatch.undo()  # the cause is gone: the run continues from its last good state
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert [r["epoch"] for r in _records(out)] == [0, 1, 2, 3]


def test_nan_in_apn_initialisation_names_it(
    fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on_call(monkeypatch, "box_regression_loss", 3)  # 2 APNs: the 3rd call is step 2
    trainer = Trainer(_config(fake_cub, "train.log_every=1"), tmp_path / "run", progress=False)
    with pytest.raises(FloatingPointError, match=r"APN initialisation, step 2: .* \(the start of the run\)"):
        trainer.fit()
    assert not load_checkpoint(tmp_path / "run" / "last.pt")["progress"]["apn_init_done"]


def test_ctrl_c_exits_130_saying_how_to_resume(
    fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real, calls = Trainer.train_epoch, {"n": 0}

    def ctrl_c_in_second_epoch(self: Trainer, phase: str) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, phase)

    monkeypatch.setattr(Trainer, "train_epoch", ctrl_c_in_second_epoch)
    out = tmp_path / "run"
    args = ["train", "--data", str(fake_cub), "--out", str(out), "--no-progress", "--set", *TINY]
    assert main([*args, "data.num_workers=0", "train.epochs=3"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        f"racnn train: interrupted; {out / 'last.pt'} holds the run after epoch 1; "
        f"continue with: racnn train --out {out} --resume"
    )
    assert load_checkpoint(out / "last.pt")["progress"]["schedule"]["epoch"] == 1
