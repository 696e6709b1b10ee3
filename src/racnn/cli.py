"""``racnn`` command line: thin argparse front-ends over the library. ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_analyze import add_analyze
from .cli_pictures import add_demo, add_plot, add_visualize
from .cli_predict import CHECKPOINT_HELP, add_backend, add_exit, add_predict, load_for_inference

if TYPE_CHECKING:
    from .model import RACNN

EPILOG = "Paper: Fu, Zheng, Mei, 'Look Closer to See Better', CVPR 2017."


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train RA-CNN with the alternating schedule",
        description="Train RA-CNN. Writes config.yaml, last.pt, best.pt, metrics.jsonl and, at the "
        "end, metrics.json (test evaluation) into --out.",
        epilog=EPILOG,
    )
    p.add_argument("--config", help="YAML config (see configs/); defaults apply to keys it leaves out")
    p.add_argument("--data", help="dataset folder (sets data.root)")
    p.add_argument("--out", default="runs/racnn", help="output folder (default: %(default)s)")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set train.epochs=2 model.backbone=tiny",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run that --out holds (its files are deleted once the new run's first checkpoint is "
        "written); without it a folder holding a run is refused",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable images (counted as bad_images in metrics.jsonl) instead of stopping",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(a: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .training.trainer import Trainer

    if a.resume:
        if a.config or a.overrides:
            print(
                "racnn train --resume: the run's own config is used; --config/--set are ignored",
                file=sys.stderr,
            )
        from .config import Config

        cfg, resume = Config(), True
    else:
        overrides = list(a.overrides) + ([f"data.root={a.data}"] if a.data else [])
        cfg, resume = load_config(a.config, overrides), False
    if a.resume and a.overwrite:
        raise ConfigError(
            "racnn train: --resume continues the run in --out, --overwrite replaces it; pass one"
        )
    trainer = Trainer(
        cfg,
        a.out,
        resume=resume,
        overwrite=a.overwrite,
        progress=not a.no_progress,
        skip_bad_images=a.skip_bad_images,
    )
    metrics = None
    try:
        metrics = trainer.fit()
    except (OSError, RuntimeError) as e:  # met while training (out of memory, a device): may be this rank's
        e.racnn_one_rank = True  # type: ignore[attr-defined]
        raise
    except KeyboardInterrupt:  # Ctrl-C: last.pt holds the last finished epoch (the unfinished one is dropped)
        pass
    finally:
        trainer.close()  # loader workers stop before the message, so it comes last
    if metrics is None:
        saved = trainer.state.saved_epoch
        done = f"after epoch {saved}" if saved else "at the start of the run"
        if trainer.main:
            print(
                f"racnn train: interrupted; {trainer.last} holds the run {done}; "
                f"continue with: racnn train --out {a.out} --resume",
                file=sys.stderr,
            )
        return 130
    if trainer.main:
        first, fused = trainer.model.scale_keys[0], trainer.model.keys[-1]  # scale 1; the last fusion
        print(json.dumps({k: metrics[k] for k in (f"acc_{first}", f"acc_{fused}") if k in metrics}))
        print(f"wrote {Path(a.out) / 'metrics.json'}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (paper table + localisation)",
        description="Top-1 and top-5 of every scale and fusion, mean per-class accuracy, scale-1 box IoU "
        "with the object box, box sides; --json adds each class's accuracy and the most confused pairs of the "
        "fused output. Accepts a .pt checkpoint or an exported folder.",
        epilog=EPILOG,
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "trainval"])
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--batch-size", type=int, default=32)
    add_exit(p)
    add_backend(p)
    p.add_argument("--max-images", type=int, help="evaluate only the first N images of the split")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images")
    p.add_argument(
        "--tta",
        choices=["flip"],
        help="test-time augmentation: flip averages the probabilities of each image and its mirror image "
        "(boxes and localisation: the original image's)",
    )
    p.add_argument(
        "--figures",
        metavar="DIR",
        help="write DIR/confusion.png: the fused output's confusion matrix, classes sorted by accuracy, "
        "the most confused pairs beside it",
    )
    p.add_argument(
        "--exit-sweep",
        action="store_true",
        help="choose --exit-confidence (use --split val): for each threshold, the share of answers that "
        "differ from the full model's, the mean scales run and top-1, and the threshold of the fewest scales "
        "that changes at most 0.5%% of the answers (one more pass of the model)",
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(a: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .config import apply_overrides
    from .data import DatasetError
    from .evaluation import accumulate, format_table, json_safe
    from .runtime import place_model
    from .training import loaders

    if a.exit_sweep and (a.exit_confidence is not None or a.tta):
        raise ValueError("--exit-sweep runs every scale: pass it without --exit-confidence and --tta")
    model, device = load_for_inference(a)
    if a.exit_sweep:  # before any pass: a model without stage graphs, or of one scale, is refused at once
        from .early_exit import model_stages

        if len(model.scale_keys) < 2:
            raise ValueError(f"{a.checkpoint}: a 1-scale model has no early exit to sweep")
        model_stages(model)
    cfg, classes = model.training_config, model.classes
    if cfg is None:
        raise CheckpointError(
            f"{a.checkpoint}: the export records no training config (exported by an older racnn), so the "
            "dataset cannot be read as it was trained; export it again from its checkpoint"
        )
    overrides = [f"data.root={a.data}", f"train.batch_size={a.batch_size}"]
    overrides += [f"data.max_images={a.max_images}"] if a.max_images else []
    overrides += ["data.skip_bad_images=true"] if a.skip_bad_images else []
    apply_overrides(cfg, overrides)
    dataset = loaders.make_dataset(cfg, a.split, model.preprocessing, train=False)
    if list(dataset.classes) != list(classes):
        n = len(dataset.classes)
        what = "other class names" if n == len(classes) else f"{n} classes"
        raise CheckpointError(
            f"{a.checkpoint}: trained on {len(classes)} classes ({cfg.model.backbone}), but {a.data} "
            f"({a.split}) has {what}; evaluate it on the dataset it was trained on"
        )
    loader = loaders.make_loader(dataset, cfg)
    head_parts = getattr(dataset, "head_parts", None)
    model = place_model(model, device)
    acc = accumulate(
        model, loader, device=device, head_parts=head_parts, tta=a.tta, exit_confidence=a.exit_confidence
    )
    if acc.n == 0:  # --skip-bad-images skipped every image: no figure means anything
        raise DatasetError(
            f"{a.data} ({a.split}): no image could be read ({loader.bad_images} unreadable, skipped); "
            "nothing to evaluate"
        )
    metrics: dict[str, Any] = acc.summary()
    report = acc.class_report(list(classes))
    metrics |= {"split": a.split, "tta": a.tta, "exit_confidence": a.exit_confidence}
    if a.split in ("val", "trainval") and model.cfg.num_scales > 1:
        print(
            f"note: acc_*_weighted on the {a.split} split is in-sample (the weighted fusion's weights were "
            "fitted on the validation split)",
            file=sys.stderr,
        )
    if a.skip_bad_images:
        metrics["bad_images"] = loader.bad_images
        print(f"skipped {loader.bad_images} unreadable image(s)", file=sys.stderr)
    tta = ", flip TTA" if a.tta else ""
    tta += f", early exit at {a.exit_confidence:g}" if a.exit_confidence is not None else ""
    print(format_table(metrics, title=f"RA-CNN on {a.split} ({len(dataset)} images{tta})"))
    for true, pred, n in report["most_confused"][:5]:
        print(f"confused: {n} x {true} taken for {pred}")
    if a.figures and acc.confusion is not None:  # (an image was counted: there is one)
        from .visualization import confusion_figure

        pairs = report["most_confused"][:20]  # beside the matrix; the JSON has more
        figure = confusion_figure(acc.confusion, list(classes), pairs, Path(a.figures) / "confusion.png")
        print(f"wrote {figure}")
    if a.exit_sweep:
        metrics |= _exit_sweep(model, loader, device, a.split)
    if a.json:
        per_class = {"per_class_acc": report["per_class_acc"], "most_confused": report["most_confused"]}
        Path(a.json).write_text(json.dumps(json_safe(metrics) | per_class, indent=2))
        print(f"wrote {a.json}")
    return 0


def _exit_sweep(model: Any, loader: Any, device: Any, split: str) -> dict[str, Any]:
    """Print and return every early-exit threshold's figures on ``loader`` and the one the rule chooses
    (:func:`racnn.early_exit.choose_exit_confidence`)."""
    from .early_exit import EXIT_MAX_DISAGREE, choose_exit_confidence
    from .evaluation import stage_predictions

    if split == "test":
        print(
            "note: choose the exit threshold on --split val; a threshold chosen on test flatters it",
            file=sys.stderr,
        )
    stages, labels = stage_predictions(model, loader, device=device, progress=sys.stderr.isatty())
    chosen, rows = choose_exit_confidence(stages, labels=labels)
    print(f"early exit on {split}: answers that differ from the full model's, mean scales run, top-1")
    for r in rows:
        mark = (
            "  <- the fewest scales that keep the full model's answers"
            if r["exit_confidence"] == chosen
            else ""
        )
        print(
            f"  {r['exit_confidence']:<5g} {100 * r['disagree']:5.1f}%  {r['scales_mean']:.2f}  "
            f"{100 * r['top1']:6.2f}%{mark}"
        )
    if chosen is None:
        print(f"no threshold changes at most {100 * EXIT_MAX_DISAGREE:g}% of the answers: run every scale")
    else:
        print(f"chosen: --exit-confidence {chosen:g}")
    return {"exit_sweep": rows, "exit_confidence_chosen": chosen}


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="predictions over HTTP and a web page that shows the attention (pip install 'racnn[serve]')",
        description="Serve a model: POST /predict (multipart field 'image', repeatable) answers with the JSON "
        "of racnn predict --json; GET / is a page that draws each scale's box, its zoomed view and the top-5 "
        "tables; GET /info, /healthz (liveness), /readyz (readiness) and /metrics (Prometheus). Binds to "
        "localhost unless --host says otherwise. SIGTERM or Ctrl-C drains: /readyz turns 503 and new "
        "predictions get a 503 while the requests received are answered, then it closes its socket and exits "
        "0; a second Ctrl-C stops at once. See docs/serve.md.",
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    add_exit(p)
    add_backend(p)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="per request (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="per image (default: %(default)s)")
    p.add_argument(
        "--max-batch", type=int, default=16, help="images the model runs at once (default: %(default)s)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="images received and not yet run by the model; past it POST /predict answers 503 with "
        "Retry-After at once (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        help="connections served at once, idle keep-alive ones and probes included; past it a request gets a "
        "503 at once. Uploads hold at most this many times --max-upload-mb of memory (default: --max-queue "
        "+ --max-batch + 16)",
    )
    p.add_argument(
        "--timeout-seconds",
        type=float,
        default=30.0,
        help="a request not answered this long after its upload is in gets a 504 (default: %(default)s)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM or Ctrl-C, how long the requests received may still run; those still running then "
        "get a 503. The process exits once they are answered: at the latest this long after the signal plus "
        "the rest of the forward pass in progress then, which cannot be interrupted (one batch; docs/serve.md "
        "gives the exact bound) (default: %(default)s)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC convolutions, faster on a CPU (default: on)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from .serve import ServeLimits, serve
    except ImportError as e:
        raise RuntimeError(str(e)) from None
    _check_serve_flags(a)  # before the model loads: a bad flag fails at once, in one line
    limits = ServeLimits(
        max_upload_bytes=int(a.max_upload_mb * 2**20),
        max_pixels=a.max_pixels,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        timeout_s=a.timeout_seconds,
        max_connections=a.max_connections,
        exit_confidence=a.exit_confidence,
    )
    model, device = load_for_inference(a)
    serve(
        model,
        host=a.host,
        port=a.port,
        device=device,
        limits=limits,
        channels_last=a.channels_last,
        drain_seconds=a.drain_seconds,
    )
    return 0


def _check_serve_flags(a: argparse.Namespace) -> None:
    """A ``ValueError`` naming the first flag of ``racnn serve`` out of range (``inf`` and ``nan`` included:
    they pass argparse's ``float`` and fail later, once the model has loaded)."""
    positive = {"--max-upload-mb": a.max_upload_mb, "--timeout-seconds": a.timeout_seconds}
    for flag, value in [*positive.items(), ("--drain-seconds", a.drain_seconds)]:
        if not (math.isfinite(value) and (value > 0 if flag in positive else value >= 0)):
            bound = "more than 0" if flag in positive else "0 or more"
            raise ValueError(f"{flag} must be a finite number, {bound}, not {value}")
    counts = {"--max-pixels": a.max_pixels, "--max-batch": a.max_batch, "--max-queue": a.max_queue}
    for flag, n in [*counts.items(), ("--max-connections", a.max_connections)]:
        if n is not None and n < 1:
            raise ValueError(f"{flag} must be at least 1, not {n}")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write release weights (model.safetensors + config.json) or an ONNX graph (model.onnx)",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--format",
        default="safetensors",
        choices=["safetensors", "onnx"],
        help="safetensors: weights + config.json; onnx: model.onnx with input 'images' of side "
        "data.image_size and a dynamic batch (needs pip install 'racnn[onnx]') (default: %(default)s)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="with --format onnx: model.onnx is statically quantized with onnxruntime's tools (int8 weights "
        "per channel, uint8 activations through the trunks and into the FC layers; the resize, crop and box "
        "arithmetic stay float), its activation ranges calibrated on --calibrate's images; same inputs, "
        "outputs and metadata, plus racnn.quantized, racnn.calibrated_on and racnn.calibration_images. On an "
        "x86 CPU with VNNI (docs/performance.md): 0.63 x the fp32 export's time at one thread, 0.15-0.46 point less "
        "accurate (two exports), a 3.6 x smaller file",
    )
    p.add_argument(
        "--calibrate",
        metavar="DATA",
        help="with --quantize: the dataset folder whose train split calibrates the int8 ranges (read as the "
        "model's training config reads its data, with the model's evaluation preprocessing)",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        metavar="N",
        help="with --quantize: calibrate on the first N images of DATA's train split, always the same ones "
        "(spread over the classes as eval's --max-images picks them; all of them when fewer) "
        "(default: 64)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    from .checkpoint import export_model, load_model

    _check_export_flags(a)  # before the model loads: a bad flag fails at once, in one line
    if a.format == "onnx":
        from .onnx_export import export_onnx, export_stages

        model = load_model(a.checkpoint, backend="torch")
        if a.quantize:
            return _export_int8(a, model)
        path = export_onnx(
            model, Path(a.out) / "model.onnx", image_size=model.image_size, classes=model.classes
        )
        stages = export_stages(model, a.out, image_size=model.image_size)
        print(f"wrote {path} and the stage graphs of early exit: {', '.join(p.name for p in stages)}")
        return 0
    out = export_model(a.checkpoint, a.out)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0


def _check_export_flags(a: argparse.Namespace) -> None:
    """A ``ValueError`` naming the first flag of ``racnn export`` that does not fit the others."""
    if a.quantize and a.format != "onnx":
        raise ValueError(f"--quantize {a.quantize} quantizes an ONNX graph: pass --format onnx")
    if a.quantize and not a.calibrate:
        raise ValueError(
            f"--quantize {a.quantize} needs --calibrate DATA: the dataset folder whose train images "
            "calibrate the int8 ranges"
        )
    if not a.quantize and (a.calibrate or a.calibration_images is not None):
        flag = "--calibrate" if a.calibrate else "--calibration-images"
        raise ValueError(f"{flag} calibrates a quantized export: pass --format onnx --quantize int8")
    if a.calibration_images is not None and a.calibration_images < 1:
        raise ValueError(f"--calibration-images must be at least 1, not {a.calibration_images}")


def _export_int8(a: argparse.Namespace, model: RACNN) -> int:
    """``racnn export --format onnx --quantize int8``: the calibration images are checked first (a bad folder
    fails before the export's minutes), the fp32 graphs go to a temporary folder, and ``OUT/model.onnx`` and
    early exit's ``OUT/stage_s*.onnx`` are their int8 versions (each stage calibrated on what the float
    stages before it give it)."""
    import tempfile

    from tqdm.auto import tqdm

    from .onnx_export import export_onnx, export_stages
    from .onnx_quantize import (
        DEFAULT_CALIBRATION_IMAGES,
        calibration_batches,
        quantize_onnx,
        stage_calibration,
    )

    wanted = a.calibration_images or DEFAULT_CALIBRATION_IMAGES
    n, batches = calibration_batches(model, a.calibrate, wanted)
    out = Path(a.out)
    with tempfile.TemporaryDirectory(prefix="racnn-export.") as tmp:
        fp32 = export_onnx(
            model, Path(tmp) / "model.onnx", image_size=model.image_size, classes=model.classes
        )
        stages = export_stages(model, tmp, image_size=model.image_size)
        print(f"calibrating on {n} images of {a.calibrate} (train split)", file=sys.stderr)
        graphs = [(fp32, lambda: batches)]
        graphs += [
            (f, lambda s=s: stage_calibration(model, s, calibration_batches(model, a.calibrate, wanted)[1]))
            for s, f in enumerate(stages)
        ]
        with tqdm(total=n * len(graphs), desc="calibrating", unit="img", leave=False, disable=None) as bar:
            for graph, feeds in graphs:

                def counted(feeds: Iterator[Any]) -> Iterator[Any]:
                    for batch in feeds:
                        yield batch
                        bar.update(len(batch["images"] if isinstance(batch, dict) else batch))  # run by now

                quantize_onnx(
                    graph, out / graph.name, counted(feeds()), calibrated_on=a.calibrate, num_images=n
                )
    names = ", ".join(f.name for f in stages)
    print(f"wrote {out / 'model.onnx'} and {names} (int8, calibrated on {n} images of {a.calibrate} train)")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_demo,
    _add_train,
    _add_eval,
    add_predict,
    _add_serve,
    add_visualize,
    add_plot,
    _add_export,
    add_analyze,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="racnn",
        description="RA-CNN: recurrent attention CNN for fine-grained "
        "image recognition (train, evaluate, predict, export).",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"racnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _usage_errors() as e:  # evaluated only once an exception is raised
        _report(args.command, e)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        _report(args.command, e)
        return 1
    except KeyboardInterrupt:
        print(f"racnn {args.command}: interrupted", file=sys.stderr)
        return 130


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The errors ``racnn`` exits 2 on: a config, a dataset, a checkpoint, missing weights, a non-finite loss,
    and a run folder's (that module only when the command loaded it: predict and serve leave training out)."""
    from .backbones import WeightsNotFoundError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DatasetError

    outputs = sys.modules.get("racnn.training.outputs")
    run_folder = (outputs.RunFolderError,) if outputs is not None else ()
    return (ConfigError, DatasetError, CheckpointError, WeightsNotFoundError, FloatingPointError, *run_folder)


def _report(command: str, e: BaseException) -> None:
    """The error as one line on stderr. Under torchrun an error that every rank meets (a config, a path, a
    dataset folder, a checkpoint, the run folder, a non-finite loss: all decided alike on every rank) is
    printed once, by rank 0; one that may be a single rank's (an unreadable image of its shard, marked so by
    the loader; a device or memory error while training) names the rank that printed it."""
    from .training.distributed import env_from_os

    try:
        env = env_from_os()
    except RuntimeError:  # malformed torchrun variables: the command reports them itself
        env = None
    if env is None or not env.active:
        print(f"racnn {command}: error: {e}", file=sys.stderr)
    elif getattr(e, "racnn_one_rank", False):
        print(f"racnn {command} (rank {env.rank}/{env.world_size}): error: {e}", file=sys.stderr)
    elif env.main:
        print(f"racnn {command}: error: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
