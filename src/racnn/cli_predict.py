"""``racnn predict``: images, folders, glob patterns and lists to a table, JSON, or a resumable CSV / JSONL."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

CHECKPOINT_HELP = "best.pt / last.pt, or an exported folder (racnn export: safetensors or ONNX)"
SKIPPED_EXIT = 3  # the run finished, but --skip-bad-images left images out
SKIPPED_SHOWN = 20  # unreadable images named on stderr at the end with --out (the side file lists them all)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="top-5 per scale and fused, with attention boxes, for images, folders or lists",
        description="Classify images; boxes are given in each image's pixel coordinates. With --out the "
        "predictions stream into a CSV (path, size, the fused output's top-k classes and probabilities, the "
        "boxes) or JSON-lines file (the records of --json), one line per image; the same command run again "
        "after a stop continues where it stopped (one run at a time per file). Exit code: 0; 3 when "
        "--skip-bad-images skipped an image; 130 when interrupted; 1 or 2 on an error (with --json, what was "
        "classified before it is still a valid JSON array).",
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders (their images, recursively), glob patterns ('photos/**/*.jpg', quoted) "
        "or @list.txt (one path per line)",
    )
    p.add_argument(
        "--topk", type=int, default=5, help="classes per output, at least 1 (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--out", help="write the predictions to this .csv or .jsonl file instead of stdout (resumable)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="with --out: start the file again instead of continuing it"
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes decoding images (default: %(default)s; 0: none)",
    )
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable files instead of stopping at the first: exit code 3, and they are named on "
        "stderr at the end (with --out: the first 20, and all in OUT.skipped.txt)",
    )
    p.add_argument(
        "--tta", choices=["flip"], help="flip: average the probabilities of each image and its mirror image"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_exit(p)
    add_backend(p)
    p.set_defaults(func=cmd_predict)


def add_exit(p: argparse.ArgumentParser) -> None:
    """``--exit-confidence``, as predict, eval and serve take it."""
    p.add_argument(
        "--exit-confidence",
        type=float,
        metavar="P",
        help="early exit: the scales run in order and an image stops at the first whose fused prediction's "
        "top probability is at least P (0 <= P <= 1; each record says which scale answered). Choose P on "
        "validation: racnn eval --split val --exit-sweep. Default: every image runs every scale",
    )


def add_backend(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--device``, as predict, eval and serve take them (:func:`load_for_inference`)."""
    from .onnx_model import BACKENDS  # (numpy and torch; onnxruntime only once a model needs it)

    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="what runs the model: torch (eager PyTorch) or onnxruntime (an ONNX export, or a checkpoint "
        "exported on the fly, about a minute; about twice as fast on a CPU: docs/performance.md, Deployment). Default: "
        "onnxruntime for an ONNX export (a folder holding model.onnx), torch otherwise",
    )
    p.add_argument("--device", default="auto", help="torch backend: auto, cpu, cuda, ... (default: auto)")


def load_for_inference(a: argparse.Namespace) -> tuple[Any, Any]:
    """The model ``a.checkpoint`` names, run by ``a.backend``, and the device it runs on."""
    from .checkpoint import load_model
    from .runtime import resolve_device

    model = load_model(a.checkpoint, backend=a.backend)
    if model.backend == "onnxruntime":
        if a.device not in ("auto", "cpu"):
            raise ValueError(
                f"--device {a.device}: the onnxruntime backend runs on the CPU; pass --device cpu"
            )
        return model, model.device
    return model, resolve_device(a.device)


def cmd_predict(a: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .early_exit import check_exit_confidence
    from .predict_files import check_out, classify_files, expand_inputs

    if a.topk < 1:
        raise ValueError(f"--topk must be at least 1, got {a.topk}")
    check_exit_confidence(a.exit_confidence, a.tta)
    if a.out:
        if a.json:
            raise ValueError(
                "--json prints to stdout, --out writes a file (.jsonl: the same records): pass one"
            )
        check_out(a.out)  # before any work: a wrong --out is an error at once
    if a.batch_size < 1 or a.workers < 0:
        raise ValueError("--batch-size must be at least 1 and --workers at least 0")
    paths = expand_inputs(a.images)
    model, device = load_for_inference(a)
    sink, todo = _sink(a, model, paths)
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), unit="img", disable=a.no_progress or None)
    try:
        skipped = classify_files(
            model,
            todo,
            sink.write,
            topk=a.topk,
            tta=a.tta,
            exit_confidence=a.exit_confidence,
            batch_size=a.batch_size,
            workers=a.workers,
            device=device,
            skip_bad_images=a.skip_bad_images,
            progress=bar,
        )
    except KeyboardInterrupt:
        if not a.out:
            raise
        print(
            f"racnn predict: interrupted; {a.out} holds {sink.rows} complete rows; the same command continues "
            "it",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
        sink.close()
    if a.out:
        print(f"wrote {sink.rows} rows to {a.out}", file=sys.stderr)
    return _report_skipped(a, sink, skipped)


def _sink(a: argparse.Namespace, model: Any, paths: list[str]) -> tuple[Any, list[str]]:
    """Where the records go (the --out file, continued when it holds rows, or stdout) and the images left."""
    from .predict_files import PredictionFile, PrintJson, PrintTable

    if not a.out:
        return (PrintJson() if a.json else PrintTable(a.topk)), paths
    sink = PredictionFile(
        a.out,
        model,
        checkpoint=a.checkpoint,
        topk=a.topk,
        tta=a.tta,
        exit_confidence=a.exit_confidence,
        overwrite=a.overwrite,
    )
    todo = [p for p in paths if not sink.holds(p)]
    if sink.rows:
        print(
            f"racnn predict: continuing {a.out}, which holds {sink.rows} rows: {len(todo)} of the {len(paths)} "
            "images are left (--overwrite starts it again)",
            file=sys.stderr,
        )
    return sink, todo


def _report_skipped(a: argparse.Namespace, sink: Any, skipped: list[tuple[str, str]]) -> int:
    """Name the skipped images on stderr: with --out the first few (the file beside it lists them all),
    without it every one (there is no file to put them beside). The exit code says whether any were."""
    if not skipped:
        return 0
    shown = SKIPPED_SHOWN if a.out else len(skipped)
    for _, why in skipped[:shown]:
        print(f"skipped: {why}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"skipped: ... and {len(skipped) - shown} more", file=sys.stderr)
    listed = f"; listed in {sink.skipped(skipped)}" if a.out else ""
    print(f"racnn predict: skipped {len(skipped)} unreadable image(s){listed}", file=sys.stderr)
    return SKIPPED_EXIT
