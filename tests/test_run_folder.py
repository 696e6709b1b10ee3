"""No run is ever lost: a folder holding a run is refused (or replaced on request), the run folder is locked,
every path problem is one line naming the path, and under torchrun an error is printed once or names its
rank (racnn.training.outputs.RunFolder, racnn.cli)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL
from racnn.checkpoint import load_checkpoint
from racnn.cli import main
from racnn.config import Config
from racnn.training.outputs import RunFolder, RunFolderError

TINY = [*TINY_MODEL, "data.val_fraction=0.25", "train.batch_size=4", "apn.init_steps=1", "data.num_workers=0"]
TINY += ["schedule.classify_epochs=1", "train.epochs=2"]


def _train(cub: Path, out: Path, *flags: str, keys: tuple[str, ...] = ()) -> int:
    return main(
        ["train", "--data", str(cub), "--out", str(out), "--no-progress", *flags, "--set", *TINY, *keys]
    )


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_folder_holding_a_run_is_refused_and_kept(fake_cub: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _train(fake_cub, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _train(fake_cub, out) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(
        f"racnn train: error: {out}: holds a training run (last.pt, best.pt, metrics.jsonl)"
    )
    assert "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    assert main(["train", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "pass one" in _one_line(capsys.readouterr().err)


def test_overwrite_replaces_the_run_once_the_new_one_has_a_checkpoint(fake_cub: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(fake_cub, out) == 0
    (out / "notes.txt").write_text("mine")  # not a run output: never moved or deleted
    old_log = (out / "metrics.jsonl").read_text()
    assert _train(fake_cub, out, "--overwrite", keys=("train.epochs=1",)) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and (out / "metrics.jsonl").read_text() != old_log
    assert not (out / ".replaced").exists() and (out / "notes.txt").read_text() == "mine"


def test_an_overwrite_killed_before_its_first_checkpoint_gives_the_old_run_back(
    fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "run"
    assert _train(fake_cub, out) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def killed(self: RunFolder, state: dict) -> None:
        raise KeyboardInterrupt  # the process dies between moving the old run aside and its first save

    monkeypatch.setattr(RunFolder, "save_state", killed)
    assert _train(fake_cub, out, "--overwrite") == 130
    assert (out / ".replaced" / "last.pt").is_file()  # the old run waits aside
    monkeypatch.undo()
    capsys.readouterr()
    assert _train(fake_cub, out) == 2  # the next start moves it back, and refuses to replace it
    assert "holds a training run" in _one_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == {
        k: v for k, v in old.items() if k != ".lock"
    }
    assert not (out / ".replaced").exists()
    # the same stop, then --resume: it continues the old run (moved back first)
    monkeypatch.setattr(RunFolder, "save_state", killed)
    assert _train(fake_cub, out, "--overwrite") == 130
    monkeypatch.undo()
    assert not (out / "last.pt").exists() and (out / ".replaced" / "last.pt").is_file()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert not (out / ".replaced").exists() and (out / "metrics.json").is_file()


def test_path_problems_are_one_line_naming_the_path(
    fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert _train(fake_cub, a_file) == 2
    assert f"{a_file}: exists and is not a folder" in _one_line(capsys.readouterr().err)
    assert _train(fake_cub, a_file / "run") == 2  # a parent that cannot hold folders
    assert f"{a_file / 'run'}: cannot create the run folder (Not a directory)" in _one_line(
        capsys.readouterr().err
    )

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)  # an unwritable parent (the tests may run as root)
    assert _train(fake_cub, tmp_path / "locked" / "run") == 2
    assert "cannot create the run folder (Permission denied)" in _one_line(capsys.readouterr().err)


def test_a_full_disk_keeps_the_previous_checkpoint(
    fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "run"
    real_save, saves = torch.save, {"n": 0}

    def full_disk(obj: object, path: object, *args: object, **kwargs: object) -> None:
        saves["n"] += 1
        if saves["n"] == 4:  # last.pt at the start, after the APN init, best.pt and last.pt of epoch 1: fail
            with open(path, "wb") as f:  # type: ignore[arg-type]
                f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert _train(fake_cub, out) == 2
    line = _one_line(capsys.readouterr().err)
    assert (
        f"{out / 'last.pt'}: could not be written (No space left on device); the previous last.pt is kept"
        in line
    )
    state = load_checkpoint(out / "last.pt")  # intact: the APN initialisation's state
    assert state["progress"]["apn_init_done"] and state["progress"]["schedule"]["epoch"] == 0
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0  # and the run goes on


@pytest.mark.slow
def test_a_real_failed_write_is_one_line_naming_the_checkpoint(fake_cub: Path, tmp_path: Path) -> None:
    """The OS refuses the write (a file-size limit on the process, as a full disk would): torch.save fails
    inside its C++ writer; the user gets one line naming the file, and no half-written file is left."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    out = tmp_path / "run"
    proc = subprocess.run(
        [*_cmd(fake_cub, out), "--set", *TINY], capture_output=True, text=True, env=_env(), preexec_fn=limit
    )
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith(f"racnn train: error: {out / 'last.pt'}: could not be written (")
    assert not (out / "last.pt").exists() and not list(out.glob(".*.tmp"))


def test_the_lock_names_the_process_that_holds_it(tmp_path: Path) -> None:
    first = RunFolder(tmp_path / "run")
    first.lock()
    with pytest.raises(RunFolderError, match=rf"in use by PID {os.getpid()} "):
        RunFolder(tmp_path / "run").start(Config(), resume=False, log_bytes=0)
    first.unlock()
    second = RunFolder(tmp_path / "run")
    second.lock()  # free again
    second.unlock()


def _cmd(cub: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "racnn",
        "train",
        "--data",
        str(cub),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_processes_racing_on_one_folder(fake_cub: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    keys = ["--set", *TINY, "train.epochs=4"]
    procs = [
        subprocess.Popen([*_cmd(fake_cub, out), *keys], stderr=subprocess.PIPE, text=True, env=_env())
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2).strip()
    # the loser meets the lock (both running) or the finished run (it started late): one line either way
    assert len(err.splitlines()) == 1 and f"{out}: " in err
    assert "in use by PID" in err or "holds a training run" in err
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4]  # one run's lines, not two interleaved


@pytest.mark.slow
def test_kill_9_leaves_the_lock_file_but_not_the_lock(fake_cub: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([*_cmd(fake_cub, out), "--set", *TINY, "train.epochs=30"], env=_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if load_checkpoint(out / "last.pt")["progress"]["schedule"]["epoch"] >= 1:
                break
        except Exception:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("the run wrote no epoch in time")
    with pytest.raises(RunFolderError, match=f"in use by PID {proc.pid} "):  # this process: a second one
        RunFolder(out).lock()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (out / ".lock").read_text().strip() == str(proc.pid)  # the file stays; the kernel freed the lock
    done = subprocess.run(
        [*_cmd(fake_cub, out), "--resume"], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert (out / "metrics.json").is_file()


def test_demo_replaces_its_own_output_but_never_a_training_run(
    fake_cub: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert _train(fake_cub, run) == 0
    capsys.readouterr()
    assert main(["demo", "--out", str(run), "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{run}: holds a training run of racnn train, which racnn demo never replaces" in line
    demo = tmp_path / "demo"
    quick = ["--quick", "--no-progress", "--set", "train.epochs=1", "data.max_images=64", "apn.init_steps=2"]
    assert main(["demo", "--out", str(demo), *quick]) == 0
    assert (demo / ".racnn-demo").is_file() and (demo / "attention.png").is_file()
    capsys.readouterr()
    assert main(["demo", "--out", str(demo), *quick]) == 0  # the README's first command, run twice
    assert f"racnn demo: replacing the earlier demo output in {demo}" in capsys.readouterr().err
    assert main(["train", "--data", str(fake_cub), "--out", str(demo), "--overwrite", "--no-progress",
                 "--set", *TINY]) == 0  # fmt: skip
    assert not (demo / ".racnn-demo").exists()  # a training run now: the demo may not replace it
    assert main(["demo", "--out", str(demo), *quick]) == 2


def test_torchrun_errors_are_printed_once_or_name_their_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    missing = ["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--data", "."]
    monkeypatch.setenv("RANK", "1")
    assert main(missing) == 2
    assert capsys.readouterr().err == ""  # every rank meets it: rank 0 says it
    monkeypatch.setenv("RANK", "0")
    assert main(missing) == 2
    assert _one_line(capsys.readouterr().err).startswith("racnn eval: error: ")

    from racnn.data import DatasetError

    raised: list[DatasetError] = []

    class Trainer:  # a run whose fit() meets a dataset error
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.main = False

        def fit(self) -> None:
            raise raised[0]

        def close(self) -> None:
            pass

    monkeypatch.setattr("racnn.training.trainer.Trainer", Trainer)
    monkeypatch.setenv("RANK", "1")
    raised.append(DatasetError("CUB_200_2011/images.txt: not found"))  # every rank builds the test split
    assert main(["train", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ""
    one = DatasetError("x.jpg: not an image")
    one.racnn_one_rank = True  # as the loader marks an image of this rank's shard
    raised[0] = one
    assert main(["train", "--out", str(tmp_path / "o")]) == 2
    assert _one_line(capsys.readouterr().err) == "racnn train (rank 1/2): error: x.jpg: not an image"
