"""Serving benchmark: latency and throughput of ``racnn serve`` against the model's own forward pass.

Starts ``racnn serve`` as a user does (its own process, on a free port), then sends one-image ``POST
/predict`` requests from 1 client and from 8 concurrent clients (threads, each sending its next request when
its last one is answered). The reference is the server's own forward passes in the same run (``GET
/healthz`` reports their median by batch size): on a shared VM the same pass can take a quarter longer in one
process than in another, so a forward timed here would not be the server's. Prints and writes (``--json``):
p50/p95 latency per client count, throughput in images per second, and the two targets of docs/serve.md: p50
at one client <= 1.3 x the batch-1 forward (the server's whole overhead: upload, decode, preprocessing, JSON),
and throughput at 8 clients >= 2 x that of one client, next to what batching could give at best (the model's
own images per second at its best batch size, over batch 1). Then it sends 2,000 requests in a row and prints
the server's resident memory (its ``process_resident_memory_bytes`` in ``GET /metrics``) after the first 100 of
them and after all: the third target, a ratio <= 1.1 (no memory that grows with the requests served), written
with its two RSS figures and whether it is met as ``memory`` in the JSON.

    python benchmarks/serve.py --json benchmarks/results/serve_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from bench_machine import cpu_name  # benchmarks/ is on sys.path when this script runs
from prometheus_client.parser import text_string_to_metric_families

import racnn
from racnn.checkpoint import model_record, save_checkpoint
from racnn.config import Config
from racnn.onnx_model import BACKENDS
from racnn.runtime import place_batch, place_model

ROOT = Path(__file__).resolve().parents[1]
MEMORY_TARGET = 1.1  # the most RSS after all the requests in a row may be, over RSS after the first ones
DEFAULT_IMAGES = ROOT.parent / "shared/datasets/cub200-subset/CUB_200_2011/images"


def recipe_model(num_classes: int = 200) -> tuple[racnn.RACNN, Config]:
    """The model of the accuracy recipe (three MobileNetV2 scales at 224 px cropped from a 448 px image) with
    random weights: the timing does not depend on them."""
    torch.manual_seed(0)
    model = racnn.create_model(
        "mobilenet_v2",
        num_classes=num_classes,
        input_size=224,
        crop_from="source",
        apn_grid=4,
        apn_hidden=256,
        image_size=448,
        classes=[f"class {i}" for i in range(num_classes)],
    )
    cfg = Config()
    cfg.model, cfg.data.image_size = model.cfg, model.image_size
    return model, cfg


def forward_time(model: racnn.RACNN, image: bytes, *, iters: int) -> float:
    """Median seconds of the model's forward pass on one preprocessed image (inference mode, NHWC as
    ``racnn serve`` runs it by default)."""
    import io

    from PIL import Image

    x = model.transforms()(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    place_model(model.eval(), "cpu", channels_last=True)  # as racnn serve runs it
    x = place_batch(x, "cpu", channels_last=True)
    times = []
    with torch.inference_mode():
        for i in range(iters + 3):
            t0 = time.perf_counter()
            model(x)
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, name: str, data: bytes) -> float:
    """One ``POST /predict`` of one image; returns its latency in seconds."""
    boundary = "racnnbench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        f"{url}/predict", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{name}: the server answered {r.status}")
    return time.perf_counter() - t0


def load_clients(url: str, images: list[tuple[str, bytes]], clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``requests`` one-image requests in turn (images taken in order)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def client(c: int) -> None:
        for r in range(requests):
            name, data = images[(c * requests + r) % len(images)]
            latencies[c].append(_request(url, name, data))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(x for per in latencies for x in per)
    return {
        "clients": clients,
        "requests": len(lat),
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "images_per_s": len(lat) / wall,
        "wall_s": wall,
    }


def memory(url: str, images: list[tuple[str, bytes]], requests: int, first: int) -> dict[str, Any]:
    """The server's resident memory after ``first`` and after ``requests`` one-image requests in a row, their
    ratio and whether it meets the target (at most :data:`MEMORY_TARGET`)."""
    rss = {}
    for i in range(requests):
        _request(url, *images[i % len(images)])
        if i + 1 in (first, requests):
            rss[i + 1] = _rss(url)
    ratio = rss[requests] / rss[first]
    return {
        "requests": requests,
        "first": first,
        "rss_mb_after_first": rss[first] / 2**20,
        "rss_mb_after_all": rss[requests] / 2**20,
        "ratio": ratio,
        "target": MEMORY_TARGET,
        "met": ratio <= MEMORY_TARGET,
    }


def _rss(url: str) -> float:
    """The server's resident memory in bytes, as its ``GET /metrics`` reports it."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_resident_memory_bytes":
                return sample.value
    raise RuntimeError(
        "GET /metrics has no process_resident_memory_bytes (it is read from /proc: Linux only)"
    )


def run_server(
    checkpoint: Path, threads: int, log: Path, extra: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``racnn serve`` on a free port (``extra``: more of its flags), once it answers. Its log goes to ``log``:
    a pipe nobody reads would block the server once full (an access-log line per request)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "racnn", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    cmd += extra or []
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"racnn serve exited: {log.read_text()}") from None
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("racnn serve did not start in 120 s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--checkpoint", help="model to serve (default: the accuracy recipe's model, random weights)"
    )
    p.add_argument(
        "--images", default=str(DEFAULT_IMAGES), help="folder of JPEGs sent (default: %(default)s)"
    )
    p.add_argument("--requests", type=int, default=40, help="requests per client (default: %(default)s)")
    p.add_argument("--many", type=int, default=8, help="the concurrent client count (default: %(default)s)")
    p.add_argument("--iters", type=int, default=30, help="timed forward passes (default: %(default)s)")
    p.add_argument(
        "--memory-requests",
        type=int,
        default=2000,
        help="requests in a row for the memory measurement (default: %(default)s)",
    )
    p.add_argument(
        "--memory-first",
        type=int,
        default=100,
        help="the memory after this many of them is the reference (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads, here and in the server (0: all cores)"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="racnn serve's --backend (default: its own: onnxruntime for an ONNX export, torch otherwise)",
    )
    p.add_argument("--exit-confidence", type=float, help="racnn serve's --exit-confidence (default: none)")
    p.add_argument("--max-batch", type=int, help="racnn serve's --max-batch (default: the server's)")
    p.add_argument("--json", help="write the results to this file")
    return p.parse_args(argv)


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/healthz") as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not 0 < args.memory_first < args.memory_requests:
        raise SystemExit("--memory-first must be between 0 and --memory-requests")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    paths = sorted(Path(args.images).rglob("*.jpg"))[:64]
    if not paths:
        raise SystemExit(f"{args.images}: no .jpg images to send")
    images = [(p.name, p.read_bytes()) for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
            model = racnn.load_model(checkpoint, backend=args.backend, threads=threads)
        else:
            model, cfg = recipe_model()
            checkpoint = Path(tmp) / "model.pt"
            save_checkpoint(model_record(model, cfg, model.classes or []), checkpoint)
        # the same pass in this process, for reference (on a shared VM two processes can differ by a quarter)
        here = forward_time(model, images[0][1], iters=args.iters)
        extra = ["--backend", args.backend] if args.backend else []
        extra += ["--exit-confidence", str(args.exit_confidence)] if args.exit_confidence is not None else []
        extra += ["--max-batch", str(args.max_batch)] if args.max_batch is not None else []
        proc, url = run_server(checkpoint, threads, Path(tmp) / "serve.log", extra)
        try:
            for _ in range(3):
                _request(url, *images[0])  # warm-up
            one = load_clients(url, images, 1, args.requests)
            alone = _health(url)["forward_ms"]  # the server's own forward passes so far: batch 1
            many = load_clients(url, images, args.many, args.requests)
            health = _health(url)
            mem = memory(url, images, args.memory_requests, args.memory_first)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    forward = alone["1"] / 1e3
    # what batching could give at best: the model's own images per second at the batch sizes it ran
    per_size = {int(n): int(n) * 1e3 / ms for n, ms in health["forward_ms"].items()}
    best = max(per_size, key=lambda n: per_size[n])
    res = {
        "model": f"{model.cfg.backbone}, {model.cfg.num_scales} scales, {model.scale_sizes} px, image {model.image_size} px",
        "backend": model.backend,
        "exit_confidence": args.exit_confidence,
        "max_batch": args.max_batch,
        "forward_batch1_s": forward,
        "forward_batch1_s_this_process": here,
        "server_forward_ms": health["forward_ms"],
        "model_throughput_ratio": per_size[best] * forward,
        "model_best_batch": best,
        "one_client": one,
        "many_clients": many,
        "batches": {k: health[k] for k in ("batches", "images")},
        "memory": mem,
        "p50_over_forward": one["p50_s"] / forward,
        "throughput_ratio": many["images_per_s"] / one["images_per_s"],
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": threads,
            "torch": torch.__version__,
        },
        # (paths relative to where it ran: no machine's absolute path in the results)
        "command": " ".join(
            ["python", "benchmarks/serve.py"]
            + [
                os.path.relpath(a) if os.path.isabs(a) else a
                for a in (sys.argv[1:] if argv is None else argv)
            ]
        ),
    }
    res["targets"] = {
        "p50_at_one_client": {"rule": "p50 <= 1.3 x batch-1 forward", "value": round(res["p50_over_forward"], 3),
                              "met": res["p50_over_forward"] <= 1.3},
        "throughput_at_many": {"rule": f"throughput at {args.many} clients >= 2 x one client",
                               "value": round(res["throughput_ratio"], 3), "met": res["throughput_ratio"] >= 2.0},
        "memory_after_many_requests": {
            "rule": f"RSS after {mem['requests']} requests in a row <= {MEMORY_TARGET} x after the first "
                    f"{mem['first']}",
            "value": round(mem["ratio"], 3), "met": mem["met"]},
    }  # fmt: skip
    print(f"model: {res['model']}; {threads} threads; {res['machine']['cpu']}")
    print(
        f"the server's batch-1 forward: {1e3 * forward:.1f} ms ({1 / forward:.1f} images/s; this process: "
        f"{1e3 * here:.1f} ms); its best batch ({best}): {per_size[best]:.1f} images/s, "
        f"{res['model_throughput_ratio']:.2f} x batch 1 (the most batching could give)"
    )
    for row in (one, many):
        print(
            f"{row['clients']} client(s): p50 {1e3 * row['p50_s']:.1f} ms, p95 {1e3 * row['p95_s']:.1f} ms, "
            f"{row['images_per_s']:.1f} images/s ({row['requests']} requests)"
        )
    print(f"server: {health['images']} images in {health['batches']} batches; forward ms by batch size: "
          f"{health['forward_ms']}")  # fmt: skip
    print(f"memory: RSS {mem['rss_mb_after_first']:.1f} MB after {mem['first']} requests in a row, "
          f"{mem['rss_mb_after_all']:.1f} MB after {mem['requests']}: {mem['ratio']:.3f} x")  # fmt: skip
    for name, t in res["targets"].items():
        print(f"{'met' if t['met'] else 'NOT met'}: {name} ({t['rule']}; {t['value']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
