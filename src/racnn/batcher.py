"""The model's side of ``racnn serve``: requests put their images in a bounded queue, and one worker runs the
model on what is waiting, one batch at a time, in one thread (:class:`Batcher`; ``racnn serve`` runs it in
the process's main thread, :class:`MainThreadExecutor`). The web app (:mod:`racnn.serve`) decodes, admits
and answers; this module knows nothing of HTTP beyond the :class:`BadInput` it raises when the queue is full
or the server stops.
"""

from __future__ import annotations

import asyncio
import math
import queue
import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from .inference import forward_probs
from .model import RACNN
from .runtime import place_batch

if TYPE_CHECKING:
    from .serve import Metrics

Inputs = Any  # list[PIL.Image.Image] (decoded) or torch.Tensor (n x 3 x S x S, preprocessed)


class BadInput(Exception):
    """A request the server refuses: HTTP ``status``, a one-line message and any headers of the answer
    (``retry_after``: seconds, for a 503)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = {} if retry_after is None else {"Retry-After": str(retry_after)}


class Slot:
    """``n`` images counted in the batcher's queue, from the moment their request is admitted until the batcher
    takes them into a batch or the request ends (:meth:`release`, called by both, counts them once)."""

    def __init__(self, batcher: Batcher, n: int) -> None:
        self.batcher, self.n = batcher, n

    def release(self) -> None:
        self.batcher.queued -= self.n
        self.n = 0


class Batcher:
    """Runs the model for every request, one batch at a time: a request puts its images in a queue and waits;
    the worker takes everything waiting (up to ``max_batch`` images), preprocesses them and runs one forward
    pass in its own thread, and hands each request its rows. No time is spent waiting for a batch to fill:
    while one batch runs, the next requests queue up, so the batch grows with the load and a lone request
    runs at once.

    With the torch backend every torch operation of the server runs in one thread, preprocessing included,
    given by ``executor`` (default: a thread of its own; ``racnn serve``: the process's main thread,
    :class:`MainThreadExecutor`); with onnxruntime the decoders preprocess and hand it tensors (create_app).
    Each thread that runs torch operations gets its own OpenMP thread team, and on a CPU a second team slows
    the first: the recipe's model took 41 ms a forward pass in the main thread alone, 50 ms in another
    thread alone, and 112 ms in another thread once the main thread had built the model.

    The queue is bounded: :meth:`admit` counts a request's images in ``queued`` (received, not yet in a
    forward pass) or refuses it with a 503 when ``max_queue`` (at least 1, as :class:`ServeLimits` has it;
    ``None``: no bound) would be passed, so latency and memory stop growing with the load. A request that has
    gone (its deadline passed) leaves the queue unrun."""

    def __init__(
        self,
        model: RACNN,
        device: torch.device,
        max_batch: int,
        *,
        transform: Any = None,
        channels_last: bool = False,
        executor: Executor | None = None,
        max_queue: int | None = None,
        metrics: Metrics | None = None,
        exit_confidence: float | None = None,
    ) -> None:
        self.exit_confidence = exit_confidence
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be at least 1 (None: no bound), not {max_queue}")
        self.model, self.device, self.max_batch = model, device, max_batch
        self.transform, self.channels_last = transform or model.transforms(), channels_last
        self.queue: asyncio.Queue[tuple[Inputs, asyncio.Future[Any], Slot | None]] = asyncio.Queue()
        self.pool = executor or ThreadPoolExecutor(1, thread_name_prefix="racnn-model")
        self.task: asyncio.Task[None] | None = None
        self.batches, self.images = 0, 0  # run so far (GET /healthz)
        self.forward_s: dict[int, deque[float]] = {}  # the last forward passes' seconds, by batch size
        self.max_queue, self.queued, self.metrics = max_queue, 0, metrics
        self.s_per_image = 0.0  # the last forward pass's seconds per image: the Retry-After estimate

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=True)

    def admit(self, n: int) -> Slot:
        """Count ``n`` images in the queue, or refuse them when they do not fit (:meth:`refuse_if_full`)."""
        self.refuse_if_full(n)
        self.queued += n
        return Slot(self, n)

    def refuse_if_full(self, n: int = 1) -> None:
        """A 503 with ``Retry-After`` when ``n`` more images would not fit in the queue."""
        if self.max_queue is not None and self.queued + n > self.max_queue:
            wait = max(1, math.ceil(self.queued * self.s_per_image))  # the queue's work at the last pace
            raise BadInput(
                503,
                f"the server is busy: {self.queued} images wait for the model, the queue holds "
                f"{self.max_queue}; retry in {wait} s",
                retry_after=wait,
            )

    async def run(
        self, x: Inputs, slot: Slot | None = None
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The model's probabilities and views for ``x``: decoded RGB images (a list; preprocessed in the model's
        thread) or preprocessed ones (n x 3 x S x S). ``slot``: their place in the queue (:meth:`admit`)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future, slot))
        return await future

    def _take(self, item: tuple[Inputs, asyncio.Future[Any], Slot | None]) -> bool:
        """Take ``item`` out of the queue; whether its request still waits for it (not gone on a timeout)."""
        if item[2] is not None:
            item[2].release()
        return not item[1].done()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue.get()
            if not self._take(item):
                continue
            items, n = [item], len(item[0])
            try:
                while n < self.max_batch and not self.queue.empty():
                    item = self.queue.get_nowait()
                    if self._take(item):
                        items.append(item)
                        n += len(item[0])
                self.batches, self.images = self.batches + 1, self.images + n
                if self.metrics is not None:
                    self.metrics.images.inc(n)
                    self.metrics.batch_size.observe(n)
                probs, views = await loop.run_in_executor(self.pool, self._forward, [x for x, _, _ in items])
            except Exception as e:  # these requests fail; the worker and the server go on
                for _, future, _ in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for x, future, _ in items:
                rows = slice(start, start + len(x))
                start += len(x)
                if not future.done():  # the client may have gone
                    future.set_result(({k: v[rows] for k, v in probs.items()}, [v[rows] for v in views]))

    def _forward(self, inputs: list[Inputs]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        with torch.inference_mode():
            x = torch.cat(
                [
                    i if isinstance(i, torch.Tensor) else torch.stack([self.transform(im) for im in i])
                    for i in inputs
                ]
            )
            t0 = time.perf_counter()
            x = place_batch(x, self.device, channels_last=self.channels_last)
            out = forward_probs(self.model, x, exit_confidence=self.exit_confidence)
            seconds = time.perf_counter() - t0
            self.forward_s.setdefault(len(x), deque(maxlen=256)).append(seconds)
            self.s_per_image = seconds / len(x)
            if self.metrics is not None:
                self.metrics.forward_seconds.observe(seconds)
            return out

    def forward_ms(self) -> dict[int, float]:
        """The median of the last forward passes (model and softmax, no preprocessing), in ms, by batch size."""
        return {n: round(1e3 * statistics.median(t), 2) for n, t in sorted(self.forward_s.items()) if t}


class MainThreadExecutor(Executor):
    """Runs what is submitted in the thread that calls :meth:`run_while` (``racnn serve``: the main thread,
    which built the model; the web server runs in another thread, with no torch work of its own)."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Future[Any], Callable[[], Any]]] = queue.Queue()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.calls.put((future, lambda: fn(*args, **kwargs)))
        return future

    def run_while(self, alive: Callable[[], bool]) -> None:
        """Run the submitted calls, in order, as long as ``alive()`` (checked every 0.2 s when idle)."""
        while alive():
            try:
                future, call = self.calls.get(timeout=0.2)
            except queue.Empty:
                continue
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except Exception as e:  # the request fails; the server goes on
                    future.set_exception(e)
                except BaseException:  # Ctrl-C during a forward pass: this request fails, the server stops
                    future.set_exception(BadInput(503, "the server is stopping; retry", retry_after=1))
                    raise
