"""RA-CNN speed benchmark: the full model against its *limit* (the same backbones and heads alone, each fed a
ready input of its scale's size), the crop-and-zoom against the paper's literal formulation, peak memory,
and data-loading throughput against the training consumption rate. See docs/performance.md.

Variants are interleaved (round-robin, reversed every other round); figures are medians after warm-up. A
training step is ``racnn.training.step.train_step``, the one the trainer runs, in a phase. ``classify``: backbones, heads and fusion train, boxes
detached; the limit trains the same parameters on the cross-entropies of the same outputs. ``attend``: the
APNs train on the ranking loss; the limit back-propagates a cross-entropy through the same frozen backbones
into the inputs of scales 2..N (as into the crops), no optimiser step. Peak memory: a fresh subprocess per
variant, peak RSS (VmHWM) on CPU, ``max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from bench_machine import cpu_name
from speed_report import report, summary  # (benchmarks/ is on sys.path when a script here runs)

from racnn.attention import crop_zoom, crop_zoom_compiled, crop_zoom_gather, crop_zoom_reference
from racnn.backbones import backbone_preprocessing
from racnn.config import Config, ModelConfig, RuntimeConfig, load_config
from racnn.crop_cpp import crop_zoom_cpp
from racnn.losses import classification_losses, total_classification
from racnn.model import RACNN, RACNNFeatures, build_model
from racnn.runtime import autocast, place_batch, place_model
from racnn.training import loaders, optim
from racnn.training.phases import ATTEND, CLASSIFY, set_phase
from racnn.training.step import train_step

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/cub200-subset/CUB_200_2011"
CROPS = {"ours": crop_zoom, "gather": crop_zoom_gather, "reference": crop_zoom_reference}
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_KEYS = "config backbone scales input_size zoom_size image_size crop_from batch_size device precision"
CONFIG_KEYS += " channels_last compile ckpt compile_crop fused_optim set threads warmup iters"
FROM_MODEL = {
    "backbone": "backbone",
    "scales": "num_scales",
    "input_size": "input_size",
    "zoom_size": "zoom_size",
    "crop_from": "crop_from",
}
FROM_MODEL |= {"pretrained": "pretrained"}
FROM_RUNTIME = {"ckpt": "checkpoint_activations", "compile_crop": "compile_crop"}
# the phases --phases names: the training's own (the attention phase of the paper's gradient update)
PHASES = {p.name: p for p in (CLASSIFY, ATTEND)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    a = p.add_argument
    a("--config", default=None, help="YAML whose model and optim sections are the starting point (flags win)")
    a("--backbone", default=None, help="backbone of every scale (default mobilenet_v2, or --config's)")
    a("--scales", type=int, default=None, help="model.num_scales (default 3, or --config's)")
    a("--input-size", type=int, default=None, help="scale 1's input side (default 224, or --config's)")
    a("--zoom-size", type=int, default=None, help="input side of scales 2..N (default: --input-size)")
    a("--image-size", type=int, default=None, help="side of the loader's image (default --input-size)")
    a("--crop-from", choices=("previous", "source"), default=None, help="model.crop_from")
    a("--batch-size", type=int, default=16)
    a("--device", default="cpu", help="cpu | cuda | cuda:N")
    a("--precision", choices=tuple(AMP), default="fp32", help="autocast dtype (fp32: no autocast)")
    a("--channels-last", action="store_true", help="model and inputs in channels_last")
    a("--compile", action="store_true", help="torch.compile every backbone trunk (RA-CNN and limit)")
    a("--checkpoint-activations", dest="ckpt", action="store_true", default=None, help="(default: off)")
    a(
        "--compile-crop",
        action="store_true",
        default=None,
        help="runtime.compile_crop; the crop section times it too (torch.compile on CUDA, the C++ kernel on a CPU)",
    )
    a("--fused-optim", action="store_true", help="rebuild both optimisers with fused=True")
    a("--set", action="append", default=[], metavar="K=V", help="config override: model.apn_hidden=512")
    a("--pretrained", action="store_true", default=None, help="ImageNet weights (TORCH_HOME; default: off)")
    a("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    a("--phases", default="classify,attend", help="training phases to time")
    a("--warmup", type=int, default=2)
    a("--iters", type=int, default=7, help="timed iterations per variant")
    a("--crop-shape", default="16,448,224", help="crop benchmark: batch,input side,output side")
    a("--crop-iters", type=int, default=9)
    a("--data", default=str(DEFAULT_DATA), help="CUB_200_2011 folder for the loader ('' skips)")
    a("--workers", type=int, default=Config().data.num_workers, help="loader workers (data.num_workers)")
    a("--loader-batches", type=int, default=20)
    a("--skip", default="", help="sections to skip: train,infer,crop,memory,loader")
    a("--quick", action="store_true", help="smoke run: batch 4, input 160, 1 + 3 iterations, 1 thread")
    a("--json", default=None, help="write the results to this file")
    a("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # what the flags leave unset comes from the config's model section, else from these defaults
    cfg = load_config(args.config) if args.config else None
    m = cfg.model if cfg else ModelConfig(pretrained=False)
    r = cfg.runtime if cfg else RuntimeConfig()
    for section, keys in ((m, FROM_MODEL), (r, FROM_RUNTIME)):
        for arg, key in keys.items():
            setattr(args, arg, getattr(section, key) if getattr(args, arg) is None else getattr(args, arg))
    if args.quick:  # 1 thread unless told: robust on a shared machine (docs/performance.md)
        args.batch_size, args.input_size, args.warmup, args.iters = 4, 160, 1, 3
        args.zoom_size = None  # every scale at 160
        args.crop_iters, args.loader_batches, args.phases, args.threads = 3, 4, "classify", args.threads or 1
    args.image_size = args.image_size or args.input_size
    return args


# ----------------------------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(
    fns: dict[str, Callable[[], Any]], warmup: int, iters: int, dev: torch.device
) -> dict[str, list]:
    """Time every variant ``iters`` times after ``warmup`` rounds, round-robin; seconds per call."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(iters):
        for k in list(fns) if i % 2 == 0 else list(reversed(fns)):
            _sync(dev)
            t0 = time.perf_counter()
            fns[k]()
            _sync(dev)
            times[k].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _pair(racnn: list[float], limit: list[float], batch: int) -> dict[str, float]:
    """Medians, their ratio, and the median of the per-round ratios (robust to slow drifts in load)."""
    r, lim, paired = median(racnn), median(limit), median([a / b for a, b in zip(racnn, limit, strict=True)])
    return dict(racnn_s=r, limit_s=lim, ratio=r / lim, ratio_paired=paired, racnn_img_s=batch / r)


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model (``lscpu``), cores, torch version and threads, GPU name when on CUDA."""
    info = dict(
        cpu=cpu_name(), cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads()
    )
    return info | ({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The model and runtime options as config overrides, then the user's ``--set``."""

    def text(v: object) -> str:  # as YAML reads it back
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    keys = [f"model.{key}={text(getattr(args, arg))}" for arg, key in FROM_MODEL.items()]
    keys += [f"runtime.{key}={text(getattr(args, arg))}" for arg, key in FROM_RUNTIME.items()]
    return keys + args.set


class Bench:
    """The model, its optimisers, fixed inputs, and the step functions of RA-CNN and of its limit."""

    def __init__(self, args: argparse.Namespace, device: torch.device, *, limit_only: bool = False):
        torch.manual_seed(0)
        self.args, self.device = args, device
        tiny_apn = ["model.apn_hidden=1", "model.apn_grid=1"] if limit_only else []  # never allocate it
        self.cfg = cfg = load_config(args.config, model_overrides(args) + tiny_apn)
        self.n = cfg.model.num_scales
        self.model: RACNN = build_model(cfg.model, num_classes=200).to(device)
        self.model.compile_crop = cfg.runtime.compile_crop
        self.model.checkpoint_activations = cfg.runtime.checkpoint_activations
        if limit_only:  # the limit holds no APN
            self.model.apns = torch.nn.ModuleList()
        place_model(self.model, device, channels_last=args.channels_last)
        if args.compile:
            for bb in self.model.backbones:
                bb.features.compile()
        opts = optim.make_optimizers(self.model, cfg)
        if args.fused_optim:
            opts = tuple(type(o)(o.param_groups, **{**o.defaults, "fused": True}) for o in opts)
        self.optimizers = optim.run_optimizers(self.model, cfg, lr_epochs=1, given=opts)
        b = args.batch_size
        self.images = self._input(b, args.image_size)
        self.ready = [self._input(b, side) for side in self.model.scale_sizes]  # the limit's inputs
        self.labels = torch.randint(0, 200, (b,), device=device)

    def _input(self, b: int, size: int) -> torch.Tensor:
        x = torch.randn(b, 3, size, size, device=self.device)
        return place_batch(x, self.device, channels_last=self.args.channels_last)

    def autocast(self) -> AbstractContextManager[Any]:
        dtype = AMP[self.args.precision]
        return autocast(self.device, dtype is not None, dtype=dtype)

    def _limit_logits(self, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # the same trunks as RA-CNN, through RACNN.trunk so activation checkpointing applies alike
        pooled = [self.model.trunk(s, x).mean(dim=(2, 3)) for s, x in enumerate(inputs)]
        return self.model.forward_head(RACNNFeatures(pooled, [], [], [])).logits

    def racnn_step(self, phase: str) -> None:
        """One step of ``phase``: the training step itself (``racnn.training.step.train_step``)."""
        ph = PHASES[phase]
        set_phase(self.model, ph, self.cfg)
        opts = self.optimizers.stepped_by(ph)
        train_step(
            self.model, self.model, self.images, self.labels, ph, self.cfg, opts, autocast=self.autocast()
        )

    def limit_step(self, phase: str) -> None:
        """The limit's step of ``phase``: backbones and heads on ready inputs, no APN, crop or ranking loss."""
        set_phase(self.model, PHASES[phase], self.cfg)
        LIMITS[phase](self)

    def _limit_classify(self) -> None:
        """The cross-entropies of the ready inputs' outputs, and a step of the classifiers' optimiser."""
        with self.autocast():
            logits = self._limit_logits(self.ready)
        terms = classification_losses(logits, self.labels, label_smoothing=self.cfg.loss.label_smoothing)
        self.optimizers.cls.zero_grad(set_to_none=True)
        total_classification(terms, num_scales=self.n, fusion_weight=self.cfg.loss.fusion_weight).backward()
        self.optimizers.cls.step()

    def _limit_attend(self) -> None:
        """The cross-entropies of scales 2..N back-propagated into their inputs, as into the crops; no step."""
        inputs = [self.ready[0]] + [x.detach().requires_grad_(True) for x in self.ready[1:]]
        with self.autocast():
            logits = self._limit_logits(inputs)
        terms = classification_losses(logits, self.labels, label_smoothing=self.cfg.loss.label_smoothing)
        sum(terms[f"ce_{k}"] for k in self.model.scale_keys[1:]).backward()

    @torch.inference_mode()
    def infer(self, limit: bool) -> None:
        """Forward only: RA-CNN on the images, or the limit on its ready inputs."""
        with self.autocast():
            self._limit_logits(self.ready) if limit else self.model(self.images)


# each timed phase's limit step
LIMITS: dict[str, Callable[[Bench], None]] = {
    CLASSIFY.name: Bench._limit_classify,
    ATTEND.name: Bench._limit_attend,
}


# ----------------------------------------------------------------------------------------------- sections


def bench_train(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    phases = [p for p in args.phases.split(",") if p]
    fns: dict[str, Callable[[], Any]] = {}
    for ph in phases:
        fns[f"racnn_{ph}"] = lambda ph=ph: bench.racnn_step(ph)
        fns[f"limit_{ph}"] = lambda ph=ph: bench.limit_step(ph)
    t = interleave(fns, args.warmup, args.iters, bench.device)
    res: dict[str, Any] = {ph: _pair(t[f"racnn_{ph}"], t[f"limit_{ph}"], args.batch_size) for ph in phases}
    return res | {"samples_s": t}


def bench_infer(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    bench.model.eval()
    fns = {"racnn": lambda: bench.infer(False), "limit": lambda: bench.infer(True)}
    t = interleave(fns, args.warmup, args.iters, bench.device)
    return _pair(t["racnn"], t["limit"], args.batch_size) | {"samples_s": t}


def bench_crop(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Crop-and-zoom forward+backward on ``--crop-shape``. ``box``: only the box needs a gradient (scale 1:
    the image is data); ``img``: the image too (deeper scales); ``nograd``: classification phase."""
    gen = torch.Generator().manual_seed(0)
    b, s, o = (int(v) for v in args.crop_shape.split(","))
    image = torch.rand(b, 3, s, s, generator=gen).to(device)
    box = torch.tensor([[0.5, 0.5, 0.3]]).repeat(b, 1) + 0.1 * (torch.rand(b, 3, generator=gen) - 0.5)
    box, upstream = box.to(device), torch.randn(b, 3, o, o, generator=gen).to(device)

    def run(fn: Callable[..., torch.Tensor], image_grad: bool) -> Callable[[], None]:
        def go() -> None:
            im, bx = image.detach().requires_grad_(image_grad), box.detach().requires_grad_(True)
            fn(im, bx, o).backward(upstream)

        return go

    def forward_only() -> None:
        with torch.no_grad():
            crop_zoom(image, box, o)

    # the crop runtime.compile_crop runs on this device: torch.compile on CUDA, the C++ kernel on a CPU
    compiled = crop_zoom_compiled if device.type == "cuda" else crop_zoom_cpp
    ours = {"ours": crop_zoom} | ({"compiled": compiled} if args.compile_crop else {})
    fns = {f"{name}_box": run(fn, False) for name, fn in (CROPS | ours).items()}
    fns |= {f"{name}_img": run(fn, True) for name, fn in (ours | {"reference": crop_zoom_reference}).items()}
    t = interleave(fns | {"ours_nograd": forward_only}, 1 if args.quick else 2, args.crop_iters, device)
    m = {k: median(v) for k, v in t.items()}
    r = {"speedup": m["reference_box"] / m["ours_box"], "speedup_previous": m["gather_box"] / m["ours_box"]}
    r["speedup_image_grad"] = m["reference_img"] / m["ours_img"]
    if args.compile_crop:
        r["compiled_impl"] = "torch.compile" if device.type == "cuda" else "C++ kernel"
        r["speedup_compiled"] = m["reference_box"] / m["compiled_box"]
        r["speedup_compiled_image_grad"] = m["reference_img"] / m["compiled_img"]
    return r | {"median_s": m, "shape": [b, 3, s, s, o]}


def _peak_rss() -> int:
    """Peak resident set of this process (VmHWM, bytes); unlike ``ru_maxrss`` not inherited across exec."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_worker(args: argparse.Namespace) -> None:
    """Subprocess body: build one variant, run 3 steps, print its peak and post-import baseline as JSON."""
    device, baseline = torch.device(args.device), _peak_rss()
    variant, phase = args.memory_worker.split(":")
    bench = Bench(args, device, limit_only=variant == "limit")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = 0
    for _ in range(2 if args.quick else 3):
        (bench.racnn_step if variant == "racnn" else bench.limit_step)(phase)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
    print(json.dumps({"peak_bytes": peak, "baseline_bytes": baseline}))


def bench_memory(argv: list[str], args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for phase in [p for p in args.phases.split(",") if p]:
        row = {}
        for variant in ("racnn", "limit"):
            cmd = [sys.executable, __file__, *argv, "--memory-worker", f"{variant}:{phase}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row[variant] = json.loads(out.strip().splitlines()[-1])
        peak, net = ({v: row[v]["peak_bytes"] - k * row[v]["baseline_bytes"] for v in row} for k in (0, 1))
        ratios = {"ratio": peak["racnn"] / peak["limit"], "ratio_above_baseline": net["racnn"] / net["limit"]}
        res[phase] = row | ratios
    return res


def bench_loader(args: argparse.Namespace) -> dict[str, Any]:
    """Decoded, augmented training images per second through the training loader (``make_loader``)."""
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.num_workers = args.data, args.image_size, args.workers
    cfg.train.batch_size = args.batch_size
    data = loaders.make_dataset(cfg, "train", backbone_preprocessing(args.backbone), train=True)
    loader = loaders.make_loader(data, cfg, train=True)
    batches = (batch for _ in iter(int, 1) for batch in loader)  # endless
    next(batches)  # worker start-up and the first batch are not counted
    seen, t0 = 0, time.perf_counter()
    for _ in range(args.loader_batches):
        seen += len(next(batches)["label"])
    dt = time.perf_counter() - t0
    return {"images_per_s": seen / dt, "images": seen, "workers": args.workers, "dataset_size": len(data)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sections, print the table, write ``--json``; returns the results."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return {}
    device, skip, t0 = torch.device(args.device), set(args.skip.split(",")), time.perf_counter()
    res: dict[str, Any] = {
        "config": {k: getattr(args, k) for k in CONFIG_KEYS.split()},
        "machine": machine(device),
    }
    res["command"] = " ".join(["python benchmarks/speed.py", *argv])
    if not {"train", "infer"} <= skip:
        bench = Bench(args, device)
        if "train" not in skip:
            res["train"] = bench_train(bench, args)
        if "infer" not in skip:
            res["infer"] = bench_infer(bench, args)
        del bench
    if "crop" not in skip:
        res["crop"] = bench_crop(args, device)
    if "memory" not in skip:
        res["memory"] = bench_memory(argv, args)
    if "loader" not in skip and args.data:
        res["loader"] = bench_loader(args)
    res["summary"] = summary(res)
    res |= res["summary"] | {"wall_s": time.perf_counter() - t0}  # the headline keys at the top level too
    report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
