"""``racnn predict`` over many images.

The arguments (files, folders, glob patterns, ``@list`` files) become a list of image files; DataLoader workers
decode them, the model classifies them batch by batch, and each batch's records go out at once: to stdout (a
table, or a JSON array) or into a CSV or JSON-lines file, one complete line per image. Nothing is kept in
memory but the list of paths, and a file run that is stopped continues where it stopped: the rows it holds
are read back (a line cut by a kill is dropped) and only the other images are classified, whatever names the
images had (``photos/a.jpg``, ``./photos/a.jpg``, an absolute path or a symlink: the file's real path is what
is compared). A file is written only by the run that created it or by a rerun with the same settings, which
``<out>.racnn-predict.json`` beside it records, and by one run at a time (``<out>.lock``); anything else is
refused.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import DatasetError, load_image
from .data.imagefolder import IMAGE_EXTENSIONS
from .early_exit import check_exit_confidence
from .evaluation import check_tta
from .filelock import LockHeld, hold_lock
from .inference import check_topk, evaluating, format_predictions, forward_probs, records
from .model import RACNN
from .runtime import place_batch

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
_EXTENSIONS = ", ".join(IMAGE_EXTENSIONS)

Records = list[dict[str, Any]]


class PredictionFileError(ValueError):
    """An ``--out`` that this run may not write: another kind of file, one written with other settings, or
    one that another process is writing."""


# ------------------------------------------------------------------------------------------------ inputs


def expand_inputs(args: Sequence[str]) -> list[str]:
    """The image files that ``args`` name, in order, each once (by :func:`same_file`, under the first name
    given). An argument is a file (taken whatever its extension), a folder (its images, recursively, sorted:
    the dataset loaders' extensions, hidden files and folders left out), a glob pattern (its matching images
    and the images of its matching folders; ``**`` crosses folders) or ``@list.txt`` (one file or folder per
    line, relative to the current folder as on the command line; blank lines and ``#`` comments skipped). A
    missing path, a folder without images, a pattern that matches none or a list naming a missing file is
    an error naming it."""
    paths: dict[str, str] = {}  # an ordered set: a file named twice (by any name) is classified once
    for arg in args:
        for path in _expand(arg):
            paths.setdefault(same_file(path), path)
    return list(paths.values())


def same_file(path: str, base: str | None = None) -> str:
    """What identifies the file ``path`` names (relative to ``base``, default the current folder): its
    absolute path with ``.``, ``..`` and symlinks resolved, so ``photos/a.jpg``, ``./photos/a.jpg`` and
    ``/home/me/photos/a.jpg`` are one file."""
    return os.path.realpath(os.path.join(base, path) if base else path)


def _expand(arg: str) -> list[str]:
    path = Path(arg)
    if arg.startswith("@") and not path.exists():  # a file literally named "@..." is a file
        return _listed(Path(arg[1:]))
    if path.is_dir():
        return _folder_images(path)
    if path.exists():
        return [arg]
    if glob.has_magic(arg):
        found = []
        for match in sorted(glob.glob(arg, recursive=True)):
            if Path(match).is_dir():
                found += _folder_images(Path(match), required=False)
            elif _is_image(Path(match).name):
                found.append(match)
        if not found:
            raise FileNotFoundError(f"{arg}: the pattern matches no image ({_EXTENSIONS})")
        return found
    raise FileNotFoundError(f"{arg}: no such file or folder")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_images(folder: Path, *, required: bool = True) -> list[str]:
    """The images under ``folder``, sorted by path; none is an error when ``required``."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if _is_image(f)]
    if required and not found:
        raise FileNotFoundError(f"{folder}: no images ({_EXTENSIONS}) in this folder or below")
    return sorted(found)


def _listed(list_file: Path) -> list[str]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{list_file}: list file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{list_file}: cannot read the list ({e})") from None
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if Path(entry).is_dir():
            found += _folder_images(Path(entry))
        elif Path(entry).is_file():
            found.append(entry)
        else:
            raise FileNotFoundError(f"{list_file}:{n}: {entry}: no such file")
    if not found:
        raise ValueError(f"{list_file}: the list names no image")
    return found


class ImageFiles(Dataset):
    """``paths`` read upright (EXIF orientation) and preprocessed by ``transform``. Item ``i`` is ``(i,
    tensor, (width, height))``, or ``(i, None, message)`` for a file that cannot be read: whether that stops
    the run is the main process's decision, after the rows of the images before it are written."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, Any]:
        try:
            image = load_image(self.paths[i], upright=True)
        except DatasetError as e:
            return i, None, str(e)
        return i, self.transform(image), image.size


def _as_list(items: list[Any]) -> list[Any]:
    """The DataLoader's collate: the items as they are (the main process stacks the readable ones)."""
    return items


def classify_files(
    model: RACNN,
    paths: Sequence[str],
    write: Callable[[Records], None],
    *,
    topk: int = 5,
    tta: str | None = None,
    exit_confidence: float | None = None,
    batch_size: int = 16,
    workers: int = 0,
    device: torch.device | str | None = None,
    skip_bad_images: bool = False,
    progress: tqdm | None = None,
) -> list[tuple[str, str]]:
    """Classify the image files ``paths`` in batches of ``batch_size`` (decoded by ``workers`` DataLoader
    processes; 0: here) and pass each batch's records (:func:`racnn.predict`'s) to ``write``, in order.
    An unreadable file is a :class:`DatasetError` naming it, raised once the records of the files before it
    are written; with ``skip_bad_images`` it is left out instead. Returns the skipped (path, reason)
    pairs. ``progress``: a tqdm bar advanced by each image done. ``exit_confidence``: early exit, as
    :func:`racnn.predict`."""
    check_topk(topk)
    check_tta(tta)
    check_exit_confidence(exit_confidence, tta)
    loader = DataLoader(
        ImageFiles(paths, model.transforms()),
        batch_size=batch_size,
        num_workers=workers if len(paths) > batch_size else 0,  # one batch: no process to start
        collate_fn=_as_list,
    )
    skipped: list[tuple[str, str]] = []
    with evaluating(model, device) as device:
        for items in loader:
            good = [(i, x, size) for i, x, size in items if x is not None]
            bad = [(i, message) for i, x, message in items if x is None]
            if bad and not skip_bad_images:
                first = bad[0][0]  # the images before it are written, then the run stops
                good = [item for item in good if item[0] < first]
            if good:
                x = place_batch(torch.stack([x for _, x, _ in good]), device)
                probs, views = forward_probs(model, x, tta=tta, exit_confidence=exit_confidence)
                names = [paths[i] for i, _, _ in good]
                sizes = [size for _, _, size in good]
                write(records(model, probs, views, names, sizes, topk=topk, tta=tta))
            if bad and not skip_bad_images:
                raise DatasetError(f"{bad[0][1]}; --skip-bad-images skips unreadable files")
            skipped += [(paths[i], message) for i, message in bad]
            if progress is not None:
                progress.update(len(items))
    return skipped


# ----------------------------------------------------------------------------------------------- stdout


class PrintTable:
    """Records as :func:`racnn.inference.format_predictions` tables on ``stream``, batch by batch."""

    def __init__(self, topk: int, stream: TextIO | None = None) -> None:
        self.topk, self.stream = topk, stream or sys.stdout

    def write(self, recs: Records) -> None:
        # a file name that is not UTF-8 (os.walk's surrogate escapes) is shown as Python shows it: \udcff
        text = format_predictions(recs, self.topk).encode("utf-8", "backslashreplace").decode("utf-8")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class PrintJson:
    """Records as one JSON array on ``stream`` (what ``json.dumps(records, indent=2)`` prints), streamed."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream, self.opened = stream or sys.stdout, False

    def write(self, recs: Records) -> None:
        for rec in recs:
            self.stream.write(",\n" if self.opened else "[\n")
            self.stream.write(textwrap.indent(json.dumps(rec, indent=2), "  "))
            self.opened = True
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n]\n" if self.opened else "[]\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------------ files


def check_out(out: str | Path) -> str:
    """The format (``csv`` or ``jsonl``) of the ``--out`` path, or an error naming it."""
    path = Path(out)
    if path.is_dir():
        raise PredictionFileError(f"{path}: is a folder; --out takes a .csv or .jsonl file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PredictionFileError(f"{path}: --out must end in .csv (a table) or .jsonl (JSON lines)")
    return fmt


def csv_columns(model: RACNN, topk: int, *, early_exit: bool = False) -> list[str]:
    """The CSV's columns: the image and its size, the answer's top-1 class and probability and its classes
    2..k (the fused output of every scale; with early exit, the output that answered), then each scale's box
    (the input of the next scale) in the image's pixels; with ``early_exit``, then ``answered_by`` and
    ``scales_run``."""
    cols = ["path", "width", "height", "class", "prob"]
    for rank in range(2, min(topk, model.num_classes) + 1):
        cols += [f"class_{rank}", f"prob_{rank}"]
    for s in range(1, model.cfg.num_scales):
        cols += [f"box{s}_{c}" for c in ("x0", "y0", "x1", "y1")]
    return cols + (["answered_by", "scales_run"] if early_exit else [])


def csv_row(rec: dict[str, Any], boxes: int, *, early_exit: bool = False) -> list[Any]:
    """One record as a row of :func:`csv_columns` (probabilities to 6 decimals): the classes of the output that
    answered, the boxes the image ran and empty cells for the others (``boxes``: the columns' count)."""
    row: list[Any] = [rec["image"], rec["width"], rec["height"]]
    for entry in rec["top"][rec["answered_by"]]:
        row += [entry["class"], f"{entry['prob']:.6f}"]
    for box in rec["boxes"]:
        row += box["xyxy_px"]
    row += [""] * 4 * (boxes - len(rec["boxes"]))
    return row + ([rec["answered_by"], rec["scales_run"]] if early_exit else [])


def checkpoint_stamp(checkpoint: str | Path) -> list[Any]:
    """What tells a checkpoint from a retrained one at the same path: its files' names, sizes and times."""
    path = Path(checkpoint)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class PredictionFile:
    """A CSV or JSONL file of the predictions of ``model`` (loaded from ``checkpoint``), appended one complete
    line per image (a single ``write`` each, so a kill leaves at most a cut last line, which the next run
    drops). The settings that shape the rows (checkpoint, top-k, TTA, columns) are kept in
    ``<path>.racnn-predict.json``; an existing file is continued only when that file says the same, and its
    rows are read back (:meth:`holds`: whether an image has its row). ``overwrite``: start the file again
    whatever it holds. One run at a time: the object holds ``<path>.lock`` (an exclusive ``flock``, released
    by :meth:`close` or the end of the process, however it ends); another gets an error naming the PID.
    Unreadable images skipped by this run are listed in ``<path>.skipped.txt``.

    A row names its image as given when the path is absolute or the run is in the folder where the file was
    started (``base`` in the settings file); from another folder a relative path is written relative to
    ``base``, so that every row of the file reads from one folder. A file name that is not UTF-8 (os.walk's
    surrogate escapes) is written as its bytes in a CSV and with ``\\udcXX`` escapes in JSON lines."""

    def __init__(
        self,
        path: str | Path,
        model: RACNN,
        *,
        checkpoint: str | Path | None,
        topk: int = 5,
        tta: str | None = None,
        exit_confidence: float | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.boxes = len(model.scale_keys) - 1
        self.format = check_out(self.path)
        self.settings: dict[str, Any] = {
            "written_by": "racnn predict",
            "format": self.format,
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "checkpoint_stamp": checkpoint_stamp(checkpoint) if checkpoint else None,
            "topk": topk,
            "tta": tta,
            "output": model.keys[-1],  # the CSV's classes: the fused output of every scale (or the answer)
            "exit_confidence": exit_confidence,
        }
        if self.format == "csv":
            self.settings["columns"] = csv_columns(model, topk, early_exit=exit_confidence is not None)
        self.meta = self.path.with_name(self.path.name + ".racnn-predict.json")
        self.skipped_list = self.path.with_name(self.path.name + ".skipped.txt")
        self.lock_file = self.path.with_name(self.path.name + ".lock")
        self.base = os.getcwd()  # the folder the rows' relative paths start from (the file's, once read)
        self.done: set[str] = set()  # the rows' images, by same_file
        self.rows = 0
        if self.path.exists() and not overwrite and not self.meta.exists():
            raise self._not_ours()  # another program's file: not even a lock file beside it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = self._hold_lock()
        try:
            self._open(overwrite)
        except BaseException:
            self._lock.close()  # refused: the next run may try at once
            raise

    def _hold_lock(self) -> BinaryIO:
        try:
            return hold_lock(self.lock_file)
        except LockHeld as e:
            raise PredictionFileError(
                f"{self.path}: being written by {e.who}, another racnn predict ({self.lock_file.name} is its "
                "lock); wait for it to end or pass another --out"
            ) from None

    def _open(self, overwrite: bool) -> None:
        if self.path.exists() and not overwrite:
            self._check_settings()
            self._read_back()
        else:
            self._write_meta()  # first: a file beside a settings file of ours is ours
            self.path.write_bytes(b"")
        # from another folder, relative paths are written relative to the file's base
        self.rebase = os.path.realpath(self.base) != os.path.realpath(os.getcwd())
        self.skipped_list.unlink(missing_ok=True)  # this run's list, written when it skips one
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        if self.format == "csv" and self.path.stat().st_size == 0:
            self._append([self._csv_line(self.settings["columns"])])

    def holds(self, path: str) -> bool:
        """Whether the file has a row of the image ``path`` (relative to the current folder), by whatever
        name the row gives it."""
        return same_file(path) in self.done

    def _refuse(self, why: str) -> PredictionFileError:
        return PredictionFileError(f"{self.path}: {why}; pass another --out, or --overwrite to replace it")

    def _not_ours(self) -> PredictionFileError:
        return self._refuse(f"exists and was not written by racnn predict (no {self.meta.name})")

    def _check_settings(self) -> None:
        try:
            theirs = json.loads(self.meta.read_text())
        except FileNotFoundError:
            raise self._not_ours() from None
        except (OSError, ValueError) as e:
            raise self._refuse(f"{self.meta.name} is unreadable ({e})") from None
        for key, ours in self.settings.items():
            if theirs.get(key) != ours:
                what = (
                    "the checkpoint's files changed since"
                    if key == "checkpoint_stamp"
                    else f"{key} {json.dumps(theirs.get(key))} there, {json.dumps(ours)} in this run"
                )
                raise self._refuse(f"written by racnn predict with other settings ({what})")
        self.base = theirs.get("base") or self.base  # (a file of an older racnn has none: this folder)

    def _write_meta(self) -> None:
        tmp = self.meta.with_name(self.meta.name + ".tmp")
        tmp.write_text(json.dumps(self.settings | {"base": self.base}, indent=2) + "\n")
        os.replace(tmp, self.meta)

    def _read_back(self) -> None:
        """Drop a cut last line (a run killed while writing it), then collect the images of the rows."""
        complete = 0
        with self.path.open("rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    complete += len(line)
        if complete < self.path.stat().st_size:
            os.truncate(self.path, complete)
        with self.path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            if self.format == "csv":
                self._read_csv(f)
            else:
                self._read_jsonl(f)

    def _read_csv(self, f: TextIO) -> None:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is not None and header != self.settings["columns"]:
            raise self._refuse("its header is not this run's columns")
        for row in reader:
            if len(row) != len(header or []):
                raise self._refuse(f"line {reader.line_num} is not a row of {len(header or [])} columns")
            self.done.add(same_file(row[0], self.base))
            self.rows += 1

    def _read_jsonl(self, f: TextIO) -> None:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                image = rec["image"]
            except (ValueError, TypeError, KeyError):
                raise self._refuse(f"line {n} is not a prediction record") from None
            self.done.add(same_file(image, self.base))
            self.rows += 1

    @staticmethod
    def _csv_line(row: list[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        return buf.getvalue()

    @staticmethod
    def _json_line(rec: dict[str, Any]) -> str:
        """The record as one line of UTF-8 JSON: a path that is not UTF-8 text (surrogate escapes) makes
        the line ASCII, its odd bytes ``\\udcXX`` escapes (which ``json.loads`` reads back as they were)."""
        try:
            rec["image"].encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(rec) + "\n"
        return json.dumps(rec, ensure_ascii=False) + "\n"

    def _append(self, lines: list[str]) -> None:
        """Each line with one ``write`` of its whole bytes (O_APPEND): complete, or cut only by a kill."""
        for line in lines:
            data = line.encode("utf-8", errors="surrogateescape")  # a CSV row's non-UTF-8 path: its bytes
            while data:  # a short write (a signal, a full pipe) goes on where it stopped
                data = data[os.write(self.fd, data) :]

    def write(self, recs: Records) -> None:
        if self.rebase:
            recs = [r | {"image": _relative_to(r["image"], self.base)} for r in recs]
        if self.format == "csv":
            early = self.settings["exit_confidence"] is not None
            lines = [self._csv_line(csv_row(r, self.boxes, early_exit=early)) for r in recs]
        else:
            lines = [self._json_line(r) for r in recs]
        self._append(lines)
        self.rows += len(recs)

    def skipped(self, pairs: list[tuple[str, str]]) -> Path:
        """List ``pairs`` (path, reason) in ``<path>.skipped.txt``, one tab-separated line each."""
        text = "".join(f"{p}\t{why}\n" for p, why in pairs)
        self.skipped_list.write_text(text, encoding="utf-8", errors="surrogateescape")
        return self.skipped_list

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self._lock.close()  # closing the file releases the flock


def _relative_to(path: str, base: str) -> str:
    """``path`` (relative to the current folder, or absolute: kept) relative to the folder ``base``."""
    return path if os.path.isabs(path) else os.path.relpath(os.path.abspath(path), base)
