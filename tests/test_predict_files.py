"""racnn predict over many images: folder, glob and @list inputs, CSV and JSONL files (rows, columns, the same
decisions as racnn.predict), resume after an interrupt, a cut line or a kill (no duplicate rows, whatever the
images are called and wherever the command runs), one run at a time per file, files it must not touch,
unreadable images and file names that are not UTF-8, JSON on stdout that stays valid, and flip TTA."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import racnn
from conftest import assert_same_prediction
from racnn.checkpoint import model_record, save_checkpoint
from racnn.cli import main
from racnn.config import Config
from racnn.predict_files import PredictionFile, PredictionFileError, expand_inputs

CLASSES = ["alder", "birch", "cedar"]
# the CSV of the tiny model: top-3 of 3 classes, the boxes of scales 1 and 2
COLUMNS = ["path", "width", "height", "class", "prob", "class_2", "prob_2", "class_3", "prob_3"]
COLUMNS += [f"box{s}_{c}" for s in (1, 2) for c in ("x0", "y0", "x1", "y1")]


def _model() -> racnn.RACNN:
    torch.manual_seed(0)
    return racnn.create_model(
        "tiny", num_classes=3, input_size=32, apn_grid=2, apn_hidden=8, classes=CLASSES, image_size=32
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    cfg = Config()
    cfg.model, cfg.data.image_size = _model().cfg, 32
    path = tmp_path / "best.pt"
    save_checkpoint(model_record(_model(), cfg, CLASSES), path)
    return path


def _photos(root: Path, n: int = 7) -> list[Path]:
    """``n`` photos of several sizes and colours in two folders (and a subfolder), plus files to pass over."""
    paths = []
    for i in range(n):
        folder = root / ("day" if i % 2 else "night/late" if i % 3 == 0 else "night")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i}.{'png' if i == 4 else 'jpg'}")
        Image.new("RGB", (36 + 5 * i, 30 + 3 * i), (35 * i, 200 - 20 * i, 90)).save(paths[-1])
    (root / "notes.txt").write_text("not a photo")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "x.jpg")
    return sorted(paths, key=str)


def _predict(*args: object) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_files_folders_globs_and_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    photos = [str(p.relative_to(tmp_path)) for p in _photos(tmp_path / "photos")]
    assert expand_inputs(["photos"]) == photos  # recursive, sorted; no .txt, nothing hidden
    assert expand_inputs(["photos/day/"]) == [p for p in photos if "/day/" in p]
    assert expand_inputs(["photos/**/*.jpg"]) == [p for p in photos if p.endswith(".jpg")]
    assert expand_inputs(["photos/n*"]) == [p for p in photos if "/night/" in p]  # a matched folder's images
    Path("list.txt").write_text(f"# chosen by hand\n{photos[3]}\n\n  photos/day  \n{photos[3]}\n")
    listed = [photos[3]] + [p for p in photos if "/day/" in p and p != photos[3]]
    assert expand_inputs(["@list.txt"]) == listed  # each file once, in the order first named
    assert expand_inputs([photos[2], "photos"])[:2] == [photos[2], photos[0]]
    assert expand_inputs(["photos/notes.txt"]) == ["photos/notes.txt"]  # a file named: taken as it is
    # a file named twice by other names is one file, under the first name
    assert expand_inputs(["photos", str(tmp_path / "photos"), "./photos/day/../day"]) == photos


@pytest.mark.parametrize(
    ("make", "args", "needle"),
    [
        (lambda: Path("empty").mkdir(), ["empty"], "empty: no images (.jpg"),
        (None, ["photos/*.gif"], "photos/*.gif: the pattern matches no image"),
        (None, ["nowhere.jpg"], "nowhere.jpg: no such file or folder"),
        (lambda: Path("l.txt").write_text("photos/day/1.jpg\ngone.jpg\n"), ["@l.txt"], "l.txt:2: gone.jpg: no such"),
        (None, ["@none.txt"], "none.txt: list file not found"),
        (lambda: Path("l.txt").write_text("# nothing\n"), ["@l.txt"], "l.txt: the list names no image"),
        (None, ["photos", "--out", "p.txt"], "p.txt: --out must end in .csv"),
        (lambda: Path("d.csv").mkdir(), ["photos", "--out", "d.csv"], "d.csv: is a folder"),
        (lambda: Path("mine.csv").write_text("a,b\n1,2\n"), ["photos", "--out", "mine.csv"], "mine.csv: exists and"),
        (None, ["photos", "--out", "p.jsonl", "--json"], "--json prints to stdout"),
        (None, ["photos", "--out", "p.csv", "--topk", "0"], "--topk must be at least 1, got 0"),
        (None, ["photos", "--out", "p.jsonl", "--topk", "-2"], "--topk must be at least 1, got -2"),
        (None, ["photos", "--json", "--topk", "0"], "--topk must be at least 1"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_path(
    make, args: list[str], needle: str, checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos")
    if make:
        make()
    before = Path("mine.csv").read_bytes() if Path("mine.csv").exists() else None
    assert _predict("--checkpoint", checkpoint, *args) not in (0, 3)
    out, err = capsys.readouterr()
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert out == "" and not list(Path().glob("p.*")) and not list(Path().glob("*.lock"))  # nothing written
    if before is not None:
        assert Path("mine.csv").read_bytes() == before  # another command's file: untouched


def test_csv_and_jsonl_rows_columns_and_decisions(checkpoint: Path, tmp_path: Path, capsys) -> None:
    photos = _photos(tmp_path / "photos")
    out_csv, out_jsonl = tmp_path / "p.csv", tmp_path / "out" / "p.jsonl"  # a missing folder is made
    folder = ["--checkpoint", checkpoint, tmp_path / "photos"]
    # the CSV in batches of 2, decoded here; the JSONL in batches of 5, decoded by 2 worker processes
    assert _predict(*folder, "--out", out_csv, "--batch-size", 2, "--workers", 0) == 0
    assert _predict(*folder, "--out", out_jsonl, "--batch-size", 5, "--workers", 2) == 0
    assert f"wrote {len(photos)} rows" in capsys.readouterr().err
    with out_csv.open(newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = _csv(out_csv)
    recs = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    want = racnn.predict(_model(), photos, topk=5)  # one batch, in this process
    assert [r["path"] for r in rows] == [r["image"] for r in recs] == [str(p) for p in photos]
    for row, rec, w in zip(rows, recs, want, strict=True):
        assert set(rec) == set(w) and list(rec["top"]) == ["s1", "s2", "s3", "s12", "s123"]
        assert rec["tta"] is None and w["tta"] is None  # (the CSV's TTA: OUT.racnn-predict.json)
        assert (
            (int(row["width"]), int(row["height"]))
            == (rec["width"], rec["height"])
            == (w["width"], w["height"])
        )
        # batches of 2, 5 and all: the same decisions, probabilities within PROB_TOL
        assert_same_prediction(rec["top"], w["top"])
        cols = [("class", "prob"), ("class_2", "prob_2"), ("class_3", "prob_3")]
        fused = [{"class": row[c], "prob": float(row[p])} for c, p in cols]  # (6 decimals)
        assert_same_prediction({"s123": fused}, {"s123": w["top"]["s123"]})
        assert [float(row[f"box2_{c}"]) for c in ("x0", "y0", "x1", "y1")] == pytest.approx(
            w["boxes"][1]["xyxy_px"], abs=0.11
        )
    # stdout: the same records as one JSON array, and the table
    assert _predict("--checkpoint", checkpoint, "--json", tmp_path / "photos" / "day", "--workers", 0) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in printed] == [r["image"] for r in recs if "/day/" in r["image"]]
    assert _predict("--checkpoint", checkpoint, tmp_path / "photos" / "day" / "1.jpg") == 0
    assert "attention of scale 1" in capsys.readouterr().out


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Ctrl-C while the ``calls``-th batch is being written (those before it are in the file)."""
    real, seen = PredictionFile.write, {"n": 0}

    def write(self: PredictionFile, recs: list) -> None:
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt
        real(self, recs)

    monkeypatch.setattr(PredictionFile, "write", write)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_after_an_interrupt_and_a_cut_line(
    suffix: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    photos = _photos(tmp_path / "photos")
    out = tmp_path / f"p{suffix}"
    args = ["--checkpoint", checkpoint, tmp_path / "photos", "--out", out, "--batch-size", 2, "--workers", 0]
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        assert _predict(*args) == 130
    assert "holds 4 complete rows; the same command continues it" in capsys.readouterr().err
    with out.open("a") as f:  # a kill while a line was written: half a row
        f.write(f"{photos[5]},41,3" if suffix == ".csv" else f'{{"image": "{photos[5]}", "wid')
    assert _predict(*args) == 0
    left = f"continuing {out}, which holds 4 rows: {len(photos) - 4} of the {len(photos)} images are left"
    assert left in capsys.readouterr().err
    text = out.read_text()
    assert text.endswith("\n")
    done = (
        [r["path"] for r in _csv(out)]
        if suffix == ".csv"
        else [json.loads(x)["image"] for x in text.splitlines()]
    )
    assert done == [str(p) for p in photos]  # every image once, in order: no duplicate, no half row
    # run again: nothing left, nothing written twice
    assert _predict(*args) == 0
    assert out.read_text() == text


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_knows_an_image_by_any_name_from_any_folder(
    suffix: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Rows are matched on the image's real path: an absolute name, a relative one from another folder, a
    symlinked folder. Relative paths are written relative to the folder where the file was started."""
    monkeypatch.chdir(tmp_path)
    photos = _photos(tmp_path / "photos")
    names = [str(p.relative_to(tmp_path)) for p in photos]
    out = tmp_path / f"p{suffix}"
    opts = ["--checkpoint", checkpoint, "--out", out, "--batch-size", 2, "--workers", 0]

    def paths() -> list[str]:
        if suffix == ".csv":
            return [r["path"] for r in _csv(out)]
        return [json.loads(line)["image"] for line in out.read_text().splitlines()]

    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        assert _predict(*opts, tmp_path / "photos") == 130  # started here, with absolute paths: 2 rows
        (tmp_path / "elsewhere").mkdir()
        m.chdir(tmp_path / "elsewhere")
        _interrupt_after(m, 2)  # 2 batches more (the count goes on): 2 more rows
        assert _predict(*opts, "../photos") == 130
    assert f"{len(photos) - 2} of the {len(photos)} images are left" in capsys.readouterr().err
    assert paths() == [str(p) for p in photos[:2]] + names[2:4]  # relative to the file's folder
    assert _predict(*opts, "./photos/day/../../photos") == 0  # here again, by yet another name
    assert f"{len(photos) - 4} of the {len(photos)} images are left" in capsys.readouterr().err
    given = [f"photos/day/../../{name}" for name in names[4:]]  # (written as given: run here)
    assert paths() == [str(p) for p in photos[:2]] + names[2:4] + given  # each image once
    text = out.read_bytes()
    (tmp_path / "alias").symlink_to(tmp_path / "photos")
    assert _predict(*opts, "alias") == 0  # a symlinked folder: the same images, nothing left
    assert f"0 of the {len(photos)} images are left" in capsys.readouterr().err
    assert out.read_bytes() == text


@pytest.mark.slow
def test_resume_after_kill_9_leaves_no_duplicate_rows(checkpoint: Path, tmp_path: Path) -> None:
    """A real ``kill -9`` of ``racnn predict`` while it writes rows, then the same command again."""
    folder = tmp_path / "big"
    folder.mkdir()
    noise = torch.randint(
        0, 256, (900, 1200, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(noise.numpy()).save(buf, "JPEG", quality=95)  # slow to decode: the kill lands mid-run
    n = 80
    for i in range(n):
        (folder / f"{i:03d}.jpg").write_bytes(buf.getvalue())
    out = tmp_path / "p.csv"
    cmd = [
        sys.executable,
        "-m",
        "racnn",
        "predict",
        "--checkpoint",
        str(checkpoint),
        str(folder),
        "--out",
        str(out),
    ]
    cmd += ["--batch-size", "1", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:  # the header and 3 rows
            break
        time.sleep(0.002)
    if proc.poll() is None:  # killed after 3 rows, or wherever it got to on a very slow machine
        proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "racnn predict finished before it could be killed"
    assert _predict("--checkpoint", checkpoint, folder, "--out", out, "--workers", 0) == 0
    paths = [r["path"] for r in _csv(out)]
    assert paths == sorted(str(p) for p in folder.iterdir())  # each image once
    assert all(len(r) == len(COLUMNS) for r in csv.reader(out.open(newline="")))


def test_a_file_of_other_settings_is_refused_until_overwrite(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    _photos(tmp_path / "photos")
    out = tmp_path / "p.jsonl"
    args = ["--checkpoint", checkpoint, tmp_path / "photos", "--out", out, "--workers", 0]
    assert _predict(*args) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert _predict(*args, "--tta", "flip") != 0
    err = capsys.readouterr().err
    assert 'tta null there, "flip" in this run' in err and "--overwrite" in err
    assert _predict(*args, "--topk", "2") != 0  # another top-k: other rows
    assert out.read_bytes() == before
    assert _predict(*args, "--tta", "flip", "--overwrite") == 0
    assert out.read_bytes() != before and len(out.read_text().splitlines()) == 7
    assert {json.loads(line)["tta"] for line in out.read_text().splitlines()} == {"flip"}
    capsys.readouterr()
    assert _predict("--checkpoint", checkpoint, tmp_path / "photos" / "day", "--json", "--tta", "flip") == 0
    assert {rec["tta"] for rec in json.loads(capsys.readouterr().out)} == {"flip"}


def test_one_run_at_a_time_per_file(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """A second racnn predict on the same --out (another process, or another attempt in this one) is refused
    in one line naming the file and the PID that writes it; once that run ends the file is free."""
    _photos(tmp_path / "photos")
    out = tmp_path / "p.csv"
    holder = (
        "import sys; from racnn.checkpoint import load_model; from racnn.predict_files import PredictionFile; "
        "f = PredictionFile(sys.argv[1], load_model(sys.argv[2]), checkpoint=sys.argv[2]); "
        "print('holding', flush=True); sys.stdin.read(); f.close()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(out), str(checkpoint)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
        args = ["--checkpoint", checkpoint, tmp_path / "photos", "--out", out, "--workers", 0]
        assert _predict(*args) == 1
        err = capsys.readouterr().err.strip()
        assert f"{out}: being written by PID {proc.pid}, another racnn predict" in err, err
        assert len(err.splitlines()) == 1 and out.read_text().count("\n") == 1  # the holder's header only
    finally:
        proc.communicate("", timeout=60)
    assert proc.returncode == 0
    first = PredictionFile(out, _model(), checkpoint=checkpoint)  # two attempts in one process
    with pytest.raises(PredictionFileError, match=f"being written by PID {os.getpid()}"):
        PredictionFile(out, _model(), checkpoint=checkpoint)
    first.close()
    assert _predict(*args) == 0 and len(_csv(out)) == 7


def test_a_file_name_that_is_not_utf8_is_classified_and_written(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """os.walk gives a name that is not UTF-8 as surrogate escapes: the image is read, its CSV row holds the
    name's bytes, its JSON line a \\udcff escape (valid UTF-8 JSON), and a rerun finds it done."""
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (30, 20), (200, 40, 40)).save(folder / "a.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (24, 36), (40, 40, 200)).save(buf, "JPEG")
    with open(os.fsencode(folder) + b"/caf\xe9 \xff.jpg", "wb") as f:  # Latin-1 bytes, invalid in UTF-8
        f.write(buf.getvalue())
    odd = os.fsdecode(os.fsencode(folder) + b"/caf\xe9 \xff.jpg")
    assert expand_inputs([str(folder)]) == [str(folder / "a.jpg"), odd]
    for suffix in (".csv", ".jsonl"):
        out = tmp_path / f"p{suffix}"
        args = ["--checkpoint", checkpoint, folder, "--out", out, "--batch-size", 2, "--workers", 0]
        assert _predict(*args) == 0
        data = out.read_bytes()
        if suffix == ".csv":
            assert os.fsencode(odd) + b",24,36," in data
            assert [r["path"] for r in _csv_bytes(data)] == [str(folder / "a.jpg"), odd]
        else:
            recs = [json.loads(line) for line in data.decode("utf-8").splitlines()]  # valid UTF-8
            assert [(r["image"], r["width"], r["height"]) for r in recs][1] == (odd, 24, 36)
        assert _predict(*args) == 0 and out.read_bytes() == data  # read back: nothing left
        assert "0 of the 2 images are left" in capsys.readouterr().err
    assert _predict("--checkpoint", checkpoint, folder, "--json", "--workers", 0) == 0
    assert [r["image"] for r in json.loads(capsys.readouterr().out)] == [str(folder / "a.jpg"), odd]
    assert _predict("--checkpoint", checkpoint, odd) == 0  # the table: as Python writes the name
    assert "caf\\udce9 \\udcff.jpg  (24x36 px)" in capsys.readouterr().out


def _csv_bytes(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline="")))


def test_a_corrupt_image_stops_the_run_after_the_rows_before_it(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    photos = _photos(tmp_path / "photos")
    photos[4].write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "p.csv"
    args = ["--checkpoint", checkpoint, tmp_path / "photos", "--out", out, "--batch-size", 3, "--workers", 0]
    assert _predict(*args) not in (0, 3)
    err = capsys.readouterr().err.strip()
    assert (
        f"{photos[4]}: cannot read image" in err and "--skip-bad-images" in err and len(err.splitlines()) == 1
    )
    assert [r["path"] for r in _csv(out)] == [str(p) for p in photos[:4]]  # complete rows, up to it
    assert _predict(*args, "--skip-bad-images") == 3  # continues, and says that an image was skipped
    err = capsys.readouterr().err
    assert f"skipped: {photos[4]}: cannot read image" in err and "skipped 1 unreadable image(s)" in err
    assert [r["path"] for r in _csv(out)] == [str(p) for i, p in enumerate(photos) if i != 4]
    listed = (tmp_path / "p.csv.skipped.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{photos[4]}\t")


def _symmetric(side: int = 32) -> torch.Tensor:
    """A preprocessed image equal to its mirror image."""
    x = torch.randn(3, side, side, generator=torch.Generator().manual_seed(1))
    return (x + x.flip(2)) / 2


def test_flip_tta_averages_the_two_views_and_is_a_no_op_on_a_symmetric_image() -> None:
    model = _model()
    sym = _symmetric()
    plain, flipped = racnn.predict(model, [sym], topk=3), racnn.predict(model, [sym], topk=3, tta="flip")
    for key in plain[0]["top"]:
        assert [e["class"] for e in flipped[0]["top"][key]] == [e["class"] for e in plain[0]["top"][key]]
        for a, b in zip(flipped[0]["top"][key], plain[0]["top"][key], strict=True):
            assert a["prob"] == pytest.approx(b["prob"], abs=1e-6)
    assert plain[0]["tta"] is None and flipped[0]["tta"] == "flip"
    # any image: the mean of the two views' probabilities, each view run through the model on its own
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.eval()
        views = [model(v[None]).logits for v in (x, x.flip(2))]
    (tta,) = racnn.predict(model, [x], topk=3, tta="flip")
    (a,) = racnn.predict(model, [x], topk=3)
    assert list(tta["top"]) == list(views[0])
    for key, top in tta["top"].items():
        p, q = (v[key][0].softmax(0) for v in views)
        assert (p - q).abs().max() > 100 * 1e-6, key  # the views disagree far beyond the tolerance
        mean = ((p + q) / 2).tolist()
        assert {e["index"]: e["prob"] for e in top} == pytest.approx(dict(enumerate(mean)), abs=1e-6)
    assert tta["boxes"] == a["boxes"]  # the boxes shown are the image's own
    with pytest.raises(ValueError, match="unknown test-time augmentation 'rotate'"):
        racnn.predict(model, [x], tta="rotate")
    with pytest.raises(ValueError, match="topk must be at least 1, got 0"):
        racnn.predict(model, [x], topk=0)


def test_skipped_images_without_out_are_all_named_on_stderr(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """No --out, no file to list them beside: every skipped image is named on stderr (not only the first
    20), the JSON on stdout holds the others, and the exit code says that images were skipped."""
    photos = _photos(tmp_path / "photos")
    bad = [tmp_path / "photos" / f"bad{i:02d}.jpg" for i in range(24)]
    for path in bad:
        path.write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["--checkpoint", checkpoint, tmp_path / "photos", "--json", "--skip-bad-images", "--workers", 0]
    assert _predict(*args) == 3
    out, err = capsys.readouterr()
    assert [r["image"] for r in json.loads(out)] == [str(p) for p in photos]
    named = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(named) == len(bad) and "more" not in err  # every one, in order
    assert all(
        line.startswith(f"skipped: {p}: cannot read image") for line, p in zip(named, bad, strict=True)
    )
    assert err.splitlines()[-1] == "racnn predict: skipped 24 unreadable image(s)"
    assert not list(tmp_path.rglob("*.skipped.txt"))


def test_json_on_stdout_stays_valid_when_the_run_stops_on_an_error(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    photos = _photos(tmp_path / "photos")
    photos[4].write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["--checkpoint", checkpoint, tmp_path / "photos", "--json", "--batch-size", 3, "--workers", 0]
    assert _predict(*args) not in (0, 3)  # a failure, not "done" nor "done, some skipped"
    out, err = capsys.readouterr()
    assert [r["image"] for r in json.loads(out)] == [str(p) for p in photos[:4]]  # closed: the rows before
    assert err.startswith(f"racnn predict: error: {photos[4]}: cannot read image")
    assert len(err.strip().splitlines()) == 1
