"""``racnn serve``: predictions over HTTP, and a web page that shows where each scale looked.

FastAPI on uvicorn (``pip install 'racnn[serve]'``); see docs/serve.md. Endpoints:

- ``POST /predict``: one or more images as ``multipart/form-data``, field ``image`` (repeatable). The answer
  is the JSON of ``racnn predict --json``: one record per image with the top-k of every scale and of the
  fusion, and every box in the image's pixels.
- ``GET /info``: the model (classes, backbone, scales, input sizes, fusion) and the server's limits.
- ``GET /healthz``: ``{"status": "ok", "batches": n, "images": m, "forward_ms": {batch size: median ms}}``
  (what the model has run so far, and how long its forward passes took).
- ``GET /``: the page (one HTML file, no build step, nothing fetched from elsewhere).

Bad input (no image, a non-image, a truncated or corrupt file, a pixel bomb, an upload over the size limit) is
a 4xx answer ``{"error": "<one line>"}``, and the server goes on serving. Requests share one model: images are
decoded in worker threads while a :class:`Batcher` runs the model on what is waiting, one batch at a time.
"""

from __future__ import annotations

import asyncio
import io
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from PIL import Image

from .data.errors import DatasetError
from .data.io import ImageTooLarge, NotAnImage, load_image
from .inference import forward_probs, records
from .model import RACNN

Inputs = Any  # list[PIL.Image.Image] (decoded) or torch.Tensor (n x 3 x S x S, preprocessed)

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
except ImportError as e:  # pragma: no cover - the serve extra is not installed
    raise ImportError("racnn serve needs FastAPI and uvicorn: pip install 'racnn[serve]'") from e


@dataclass(frozen=True)
class ServeLimits:
    max_upload_bytes: int = 20 * 1024 * 1024  # a whole request
    max_pixels: int = 40_000_000  # per image, read from its header before it is decoded
    max_images: int = 32  # per request
    max_batch: int = 16  # images the model runs at once
    topk: int = 5


class BadInput(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Batcher:
    """Runs the model for every request, one batch at a time: a request puts its images in a queue and waits;
    the worker takes everything waiting (up to ``max_batch`` images), preprocesses them and runs one forward
    pass in its own thread, and hands each request its rows. No time is spent waiting for a batch to fill:
    while one batch runs, the next requests queue up, so the batch grows with the load and a lone request
    runs at once.

    Every torch operation of the server runs in one thread, preprocessing included, given by ``executor``
    (default: a thread of its own; ``racnn serve``: the process's main thread, :class:`MainThreadExecutor`).
    Each thread that runs torch operations gets its own OpenMP thread team, and on a CPU a second team slows
    the first: the recipe's model took 41 ms a forward pass in the main thread alone, 50 ms in another
    thread alone, and 112 ms in another thread once the main thread had built the model."""

    def __init__(
        self,
        model: RACNN,
        device: torch.device,
        max_batch: int,
        *,
        transform: Any = None,
        channels_last: bool = False,
        executor: Executor | None = None,
    ) -> None:
        self.model, self.device, self.max_batch = model, device, max_batch
        self.transform, self.channels_last = transform or model.transforms(), channels_last
        self.queue: asyncio.Queue[tuple[Inputs, asyncio.Future[Any]]] = asyncio.Queue()
        self.pool = executor or ThreadPoolExecutor(1, thread_name_prefix="racnn-model")
        self.task: asyncio.Task[None] | None = None
        self.batches, self.images = 0, 0  # run so far (GET /healthz)
        self.forward_s: dict[int, deque[float]] = {}  # the last forward passes' seconds, by batch size

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=True)

    async def run(self, x: Inputs) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The model's probabilities and views for ``x``: decoded RGB images (a list; preprocessed in the model's
        thread) or preprocessed ones (n x 3 x S x S)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            try:
                n = len(items[0][0])
                while n < self.max_batch and not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    n += len(items[-1][0])
                self.batches, self.images = self.batches + 1, self.images + n
                probs, views = await loop.run_in_executor(self.pool, self._forward, [x for x, _ in items])
            except Exception as e:  # these requests fail; the worker and the server go on
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for x, future in items:
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
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            out = forward_probs(self.model, x.to(self.device))
            self.forward_s.setdefault(len(x), deque(maxlen=256)).append(time.perf_counter() - t0)
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
                    future.set_exception(RuntimeError("the server is stopping"))
                    raise


def page() -> str:
    """The HTML page of ``GET /`` (``racnn/resources/serve.html``)."""
    return (resources.files("racnn") / "resources" / "serve.html").read_text(encoding="utf-8")


def create_app(
    model: RACNN,
    *,
    device: torch.device | str = "cpu",
    limits: ServeLimits | None = None,
    channels_last: bool = True,
    executor: Executor | None = None,
) -> FastAPI:
    """The web app serving ``model`` (a model that carries its classes: ``racnn.load_model``).
    ``channels_last``: run the convolutions in NHWC (on a CPU 1.4 times faster for the recipe's model).
    ``executor``: where the model runs (default: a thread of the batcher's own; see :class:`Batcher`)."""
    limits = limits or ServeLimits()
    device = torch.device(device)
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    state: dict[str, Batcher] = {}

    async def lifespan(app: FastAPI) -> Any:
        state["batcher"] = app.state.batcher = Batcher(
            model, device, limits.max_batch, channels_last=channels_last, executor=executor
        )
        state["batcher"].start()
        yield
        await state["batcher"].stop()

    app = FastAPI(title="racnn serve", description="RA-CNN predictions and attention", lifespan=lifespan)
    info = {
        "classes": model.classes or [str(i) for i in range(model.num_classes)],
        "backbone": model.cfg.backbone,
        "num_scales": model.cfg.num_scales,
        "scale_sizes": model.scale_sizes,
        "image_size": model.image_size,
        "crop_from": model.cfg.crop_from,
        "fusion": model.cfg.fusion,
        "outputs": model.keys,
        "max_upload_bytes": limits.max_upload_bytes,
        "max_pixels": limits.max_pixels,
        "max_images": limits.max_images,
        "topk": limits.topk,
    }

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, e: BadInput) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:  # never a crash: one line, a 500
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        batcher = state["batcher"]
        return {
            "status": "ok",
            "batches": batcher.batches,
            "images": batcher.images,
            "forward_ms": batcher.forward_ms(),
        }

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        return info

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        uploads = await _uploads(request, limits)
        images = [await run_in_threadpool(_decode, upload, data, limits) for upload, data in uploads]
        probs, views = await state["batcher"].run(images)
        names = [upload.filename or f"image {i}" for i, (upload, _) in enumerate(uploads)]
        sizes = [image.size for image in images]
        return JSONResponse(records(model, probs, views, names, sizes, topk=limits.topk))

    return app


async def _uploads(request: Request, limits: ServeLimits) -> list[tuple[UploadFile, bytes]]:
    """The request's ``image`` files and their bytes, or a :class:`BadInput` saying what is wrong."""
    mb = limits.max_upload_bytes / 2**20
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_upload_bytes:
        raise BadInput(413, f"the upload is {int(length) / 2**20:.1f} MB, over the limit of {mb:.0f} MB")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadInput(400, "send the images as multipart/form-data, each in a field named 'image'")
    # the body is counted as it arrives (a chunked upload has no Content-Length; the parser spools files
    # without a bound): past the limit the request stops there
    received = 0

    async def receive() -> Any:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limits.max_upload_bytes:
            raise BadInput(413, f"the upload is over the limit of {mb:.0f} MB")
        return message

    try:
        form = await Request(request.scope, receive).form(
            max_files=limits.max_images, max_fields=8, max_part_size=limits.max_upload_bytes
        )
    except BadInput:
        raise
    except Exception as e:  # the multipart parser's own complaint (too many files, a part too large, ...)
        text = str(getattr(e, "detail", None) or e or type(e).__name__)
        if "too many files" in text.lower():
            raise BadInput(413, f"more than {limits.max_images} images in one request") from None
        status = 413 if "large" in text.lower() or "exceed" in text.lower() else 400
        raise BadInput(status, f"bad upload: {text}") from None
    files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
    if not files:
        raise BadInput(400, "no image: send one or more files in the multipart field 'image'")
    uploads = []
    for f in files:
        data = await f.read()
        if not data:
            raise BadInput(400, f"{f.filename or 'image'}: empty file")
        uploads.append((f, data))
    return uploads


def _decode(upload: UploadFile, data: bytes, limits: ServeLimits) -> Image.Image:
    """One upload decoded (in a worker thread; PIL only, no torch): an upright RGB image."""
    name = upload.filename or "image"
    try:
        return load_image(io.BytesIO(data), name=name, max_pixels=limits.max_pixels, upright=True)
    except NotAnImage as e:
        raise BadInput(415, str(e)) from None
    except ImageTooLarge as e:
        raise BadInput(413, str(e)) from None
    except DatasetError as e:  # truncated, corrupt
        raise BadInput(400, str(e)) from None


def serve(
    model: RACNN,
    *,
    host: str,
    port: int,
    device: torch.device | str,
    limits: ServeLimits,
    channels_last: bool = True,
) -> None:
    """Run the app with uvicorn until Ctrl-C: the web server in a thread, the model in this (main) thread."""
    import uvicorn

    executor = MainThreadExecutor()
    app = create_app(model, device=device, limits=limits, channels_last=channels_last, executor=executor)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    web = threading.Thread(target=server.run, name="racnn-serve-http", daemon=True)
    web.start()
    try:
        executor.run_while(web.is_alive)
    except KeyboardInterrupt:
        server.should_exit = True
        web.join(timeout=10)
        return
    if not server.started:  # uvicorn said why (a port in use, an address it cannot bind) and stopped
        raise RuntimeError(f"could not serve on {host}:{port} (see the line above)")
