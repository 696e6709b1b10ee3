"""Where an exported graph spends its time in onnxruntime: milliseconds per run by operator type, from
onnxruntime's own profiler, in the graph onnxruntime builds at load (its fusions applied: an int8 convolution
whose quantize/dequantize pairs were folded in shows as ``QLinearConv``; a pair left over shows as
``QuantizeLinear`` / ``DequantizeLinear``).

    python benchmarks/ort_profile.py release/model.onnx --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def profile(path: Path, *, threads: int, runs: int, warmup: int = 3) -> dict[str, object]:
    """``{"ms_per_run": the wall-clock mean over ``runs``, "ops": {op type: {"ms": per run, "nodes": n}}}``
    for batch-1 noise images of the graph's input size."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="racnn-ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        side = inp.shape[-1]
        x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
        for _ in range(warmup):
            session.run(None, {inp.name: x})
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, {inp.name: x})
        wall = (time.perf_counter() - start) / runs
        events = json.loads(Path(session.end_profiling()).read_text())
    total: collections.Counter[str] = collections.Counter()
    nodes: dict[str, set[str]] = collections.defaultdict(set)
    for e in events:  # one "<node>_kernel_time" event per node and run, warm-up runs included
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            total[op] += e["dur"]  # microseconds
            nodes[op].add(e["name"])
    n = warmup + runs
    ops = {op: {"ms": us / 1e3 / n, "nodes": len(nodes[op])} for op, us in total.most_common()}
    return {"ms_per_run": 1e3 * wall, "ops": ops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False)
    p.add_argument("models", nargs="+", type=Path, help="ONNX files (racnn export --format onnx)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default: 1)")
    p.add_argument("--runs", type=int, default=20, help="timed runs after 3 warm-up runs (default: 20)")
    p.add_argument("--top", type=int, default=8, help="operator types shown per model (default: 8)")
    args = p.parse_args(argv)
    for path in args.models:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
        got = profile(path, threads=args.threads, runs=args.runs)
        ops = got["ops"]
        assert isinstance(ops, dict)
        kernels = sum(v["ms"] for v in ops.values())
        print(f"{path}: {got['ms_per_run']:.1f} ms a run, batch 1, {args.threads} thread(s)")
        for op, v in list(ops.items())[: args.top]:
            print(f"  {op:<20} {v['ms']:7.2f} ms {100 * v['ms'] / kernels:5.1f}%  {v['nodes']:4d} nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
