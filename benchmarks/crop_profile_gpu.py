"""Where the crop-and-zoom's time goes on a GPU (docs/performance.md, "The crop-and-zoom on the GPU").

Times eager ``crop_zoom``, ``crop_zoom_compiled``, the reference, and ``torch.compile`` with CUDA graphs
(``mode="reduce-overhead"``), each on its own (not interleaved as in ``speed.py``), forward + backward of the
box gradient at 16 x 3 x 448 -> 224, then prints the torch profiler's tables of the compiled crop (host and
GPU time per op). Run from the repository root on a CUDA machine: ``python benchmarks/crop_profile_gpu.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from racnn.attention import crop_zoom, crop_zoom_compiled, crop_zoom_reference


def main() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(16, 3, 448, 448, generator=gen).to(dev)
    box = torch.tensor([[0.5, 0.5, 0.3]]).repeat(16, 1) + 0.1 * (torch.rand(16, 3, generator=gen) - 0.5)
    box, upstream = box.to(dev), torch.randn(16, 3, 224, 224, generator=gen).to(dev)
    graphs = torch.compile(crop_zoom, mode="reduce-overhead")

    def step(fn: Callable[..., torch.Tensor], grad: bool = True) -> Callable[[], None]:
        def go() -> None:
            bx = box.detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = fn(image, bx, 224)
            if grad:
                y.backward(upstream)

        return go

    def median_ms(f: Callable[[], None], n: int = 30) -> float:
        for _ in range(5):
            f()
        times = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    variants = {
        "eager": step(crop_zoom),
        "compiled": step(crop_zoom_compiled),
        "compiled, forward only": step(crop_zoom_compiled, grad=False),
        "eager, forward only": step(crop_zoom, grad=False),
        "reference": step(crop_zoom_reference),
        "reduce-overhead (CUDA graphs)": step(graphs),
    }
    for name, f in variants.items():
        print(f"{name:<32}{median_ms(f):8.3f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            variants["compiled"]()
        torch.cuda.synchronize()
    for key in ("cpu_time_total", "cuda_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
