"""``racnn serve``: predictions over HTTP, and a web page that shows where each scale looked.

FastAPI on uvicorn (``pip install 'racnn[serve]'``); see docs/serve.md. Endpoints:

- ``POST /predict``: one or more images as ``multipart/form-data``, field ``image`` (repeatable). The answer
  is the JSON of ``racnn predict --json``: one record per image with the top-k of every scale and of the
  fusion, and every box in the image's pixels.
- ``GET /info``: the model (classes, backbone, scales, input sizes, fusion) and the server's limits.
- ``GET /healthz``: ``{"status": "ok", "batches": n, "images": m, "forward_ms": {batch size: median ms}}``
  (what the model has run so far, and how long its forward passes took): the liveness probe.
- ``GET /readyz``: ``{"status": "ready"}``, or a 503 once the server drains (the readiness probe).
- ``GET /metrics``: Prometheus metrics (:class:`Metrics`).
- ``GET /``: the page (one HTML file, no build step, nothing fetched from elsewhere).

Bad input (no image, a non-image, a truncated or corrupt file, a pixel bomb, an upload over the size limit) is
a 4xx answer ``{"error": "<one line>"}``, and the server goes on serving. Requests share one model: images are
decoded in worker threads while a :class:`racnn.batcher.Batcher` runs the model on what is waiting, one batch at a time.
Overload is refused at once: past ``max_queue`` waiting images a request gets a 503 with ``Retry-After``; one
that waited ``timeout_s`` gets a 504; under ``racnn serve`` a connection past ``max_connections`` gets uvicorn's
own 503. On SIGTERM or a first Ctrl-C the server drains (:class:`racnn.drain.Drain`).
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from PIL import Image, ImageDraw

from .batcher import BadInput, Batcher, MainThreadExecutor, Slot
from .data.errors import DatasetError
from .data.io import ImageTooLarge, NotAnImage, load_image
from .drain import Drain, Draining, check_seconds
from .early_exit import check_exit_confidence
from .inference import records
from .model import RACNN
from .runtime import place_model

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        ProcessCollector,
        generate_latest,
    )
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # pragma: no cover - the serve extra is not installed
    raise ImportError(
        "racnn serve needs FastAPI, uvicorn and prometheus_client: pip install 'racnn[serve]'"
    ) from e

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: the drain's lines sit among its lines

# After the drain deadline, the time its 503s have to go out; then, once the listening socket is closed, the time
# uvicorn gives the connections still open to close before it cancels what runs on them.
ANSWER_GRACE_S = 2.0


@dataclass(frozen=True)
class ServeLimits:
    max_upload_bytes: int = 20 * 1024 * 1024  # a whole request
    max_pixels: int = 40_000_000  # per image, read from its header before it is decoded
    max_images: int = 32  # per request
    max_batch: int = 16  # images the model runs at once
    topk: int = 5
    max_queue: int = 64  # images received and not yet in a forward pass; past it a request gets a 503
    timeout_s: float = 30.0  # from a request's upload being in to its answer; past it a 504
    # connections served at once, idle keep-alive ones included (racnn serve: uvicorn's limit_concurrency; past
    # it uvicorn answers 503); None: max_queue + max_batch + 16 (:attr:`connections`)
    max_connections: int | None = None
    # early exit (racnn.early_exit): an image stops at the first scale whose fused prediction is this confident;
    # None: every image runs every scale
    exit_confidence: float | None = None

    def __post_init__(self) -> None:
        check_exit_confidence(self.exit_confidence)
        for name in ("max_upload_bytes", "max_pixels", "max_images", "max_batch", "topk", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")
        check_seconds("timeout_s", self.timeout_s, positive=True)

    @property
    def images_per_request(self) -> int:
        """The most images one request may send: a request must fit in the queue."""
        return min(self.max_images, self.max_queue)

    @property
    def connections(self) -> int:
        """The most connections served at once: ``max_connections``, by default one for every image the queue and
        a forward pass hold and 16 more (probes, the page, uploads in progress). Each may hold an upload of up to
        ``max_upload_bytes`` before its request is admitted: this bounds the memory of uploads."""
        return self.max_connections or self.max_queue + self.max_batch + 16


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own (two apps in one process count apart):

    - ``racnn_requests_total{path, status}``: HTTP answers (``path`` is the route, ``other`` for unknown paths);
    - ``racnn_request_seconds{path}``: their latency, from arrival to the last byte of the answer;
    - ``racnn_images_total``, ``racnn_batch_size``: images the model ran, and per forward pass;
    - ``racnn_forward_seconds``: the forward passes (model and softmax; the ``forward_ms`` of ``/healthz``);
    - ``racnn_queue_depth``: images received and not yet in a forward pass (bounded by ``max_queue``);
    - ``process_*``: the server process's memory, CPU time and open files (``prometheus_client``'s own)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = r = CollectorRegistry()
        seconds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
        self.requests = Counter(
            "racnn_requests", "HTTP answers by path and status", ["path", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "racnn_request_seconds", "HTTP request latency by path", ["path"], buckets=seconds, registry=r
        )
        self.images = Counter("racnn_images", "images the model has run", registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram("racnn_batch_size", "images per forward pass", buckets=sizes, registry=r)
        self.forward_seconds = Histogram(
            "racnn_forward_seconds", "forward pass time (model and softmax)", buckets=seconds, registry=r
        )
        self.queue_depth = Gauge(
            "racnn_queue_depth", "images received and not yet in a forward pass", registry=r
        )
        ProcessCollector(registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)


def page() -> str:
    """The HTML page of ``GET /`` (``racnn/resources/serve.html``)."""
    return (resources.files("racnn") / "resources" / "serve.html").read_text(encoding="utf-8")


@functools.cache
def favicon() -> bytes:
    """``GET /favicon.ico``: a 32 px PNG of three nested boxes in the page's scale colours (browsers ask for
    it; without it their console shows a 404)."""
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for inset, colour in ((1, "#ffd400"), (7, "#00c8ff"), (12, "#ff4fa0")):
        draw.rectangle((inset, inset, 31 - inset, 31 - inset), outline=colour, width=3)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


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
    ``executor``: where the model runs (default: a thread of the batcher's own; see :class:`Batcher`).
    ``app.state.drain`` (:class:`Drain`) starts its graceful shutdown; ``app.state.metrics`` (:class:`Metrics`).
    ``limits.max_connections`` is not the app's to enforce: :func:`serve` gives it to uvicorn. With a
    non-torch backend the decoders' threads run torch's preprocessing; :func:`serve` limits torch to one
    thread for that (an app served otherwise keeps the process's setting: ``torch.set_num_threads(1)``)."""
    limits = limits or ServeLimits()
    device = torch.device(device)
    channels_last &= model.backend == "torch"  # (onnxruntime takes NCHW arrays)
    model = place_model(model.eval(), device, channels_last=channels_last)
    state: dict[str, Batcher] = {}
    metrics, drain = Metrics(limits.max_batch), Drain()
    metrics.queue_depth.set_function(lambda: state["batcher"].queued if "batcher" in state else 0)

    async def lifespan(app: FastAPI) -> Any:
        state["batcher"] = app.state.batcher = Batcher(
            model,
            device,
            limits.max_batch,
            channels_last=channels_last,
            executor=executor,
            max_queue=limits.max_queue,
            metrics=metrics,
            exit_confidence=limits.exit_confidence,
        )
        state["batcher"].start()
        drain.bind()
        yield
        await state["batcher"].stop()

    app = FastAPI(title="racnn serve", description="RA-CNN predictions and attention", lifespan=lifespan)
    app.state.metrics, app.state.drain = metrics, drain
    app.add_middleware(Measure, metrics=metrics, paths=lambda: {route.path for route in app.routes})  # type: ignore[attr-defined]
    app.add_middleware(Draining, drain=drain)  # type: ignore[arg-type]
    info = {
        "classes": model.classes or [str(i) for i in range(model.num_classes)],
        "backbone": model.cfg.backbone,
        "num_scales": model.cfg.num_scales,
        "scale_sizes": model.scale_sizes,
        "image_size": model.image_size,
        "crop_from": model.cfg.crop_from,
        "fusion": model.cfg.fusion,
        "outputs": model.keys,
        "backend": model.backend,
        "exit_confidence": limits.exit_confidence,
        "max_upload_bytes": limits.max_upload_bytes,
        "max_pixels": limits.max_pixels,
        "max_images": limits.images_per_request,
        "topk": limits.topk,
        "max_queue": limits.max_queue,
        "timeout_seconds": limits.timeout_s,
        "max_connections": limits.connections,
    }

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, e: BadInput) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)  # the router's 404 and 405, in the same JSON as the rest
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path  # as sent: one line
        allowed = f" (allowed: {e.headers['Allow']})" if e.headers and "Allow" in e.headers else ""
        error = f"{str(e.detail).lower()}: {request.method} {path}{allowed}"
        return JSONResponse({"error": error}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:  # never a crash: one line, a 500
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page()

    @app.get("/favicon.ico")
    async def get_favicon() -> Response:
        return Response(favicon(), media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        batcher = state["batcher"]
        return {
            "status": "ok",
            "batches": batcher.batches,
            "images": batcher.images,
            "forward_ms": batcher.forward_ms(),
        }

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if drain.started:
            return JSONResponse({"error": "the server is shutting down"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        return info

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        # received after the drain began: another instance (or this one restarted) answers it
        if request.scope.get("racnn.draining", drain.started):
            await _discard_upload(request, limits)
            raise BadInput(503, "the server is shutting down; retry", retry_after=1)
        return await drain.guard(_predict(request))

    async def _predict(request: Request) -> JSONResponse:
        batcher = state["batcher"]
        try:  # a full queue refuses at once, without parsing or decoding the upload
            batcher.refuse_if_full()
        except BadInput:
            await _discard_upload(request, limits)
            raise
        uploads = await _uploads(request, limits)
        slot = batcher.admit(len(uploads))
        try:  # the deadline runs from here: the upload is in, the images wait for a decoder and the model
            images, (probs, views) = await asyncio.wait_for(_run(uploads, slot), limits.timeout_s)
        except asyncio.TimeoutError:
            raise BadInput(
                504, f"no answer within {limits.timeout_s:g} s: the server is busy; retry later"
            ) from None
        finally:
            slot.release()
        names = [upload.filename or f"image {i}" for i, (upload, _) in enumerate(uploads)]
        sizes = [image.size for image in images]
        return JSONResponse(records(model, probs, views, names, sizes, topk=limits.topk))

    transform = model.transforms()
    # With onnxruntime, torch only preprocesses: the decoders then also preprocess (the model's thread would
    # otherwise do it for the whole batch between two forward passes). With torch, every torch operation
    # stays in the model's thread (Batcher).
    preprocess = model.backend != "torch"

    def _prepare(upload: UploadFile, data: bytes) -> tuple[Image.Image, torch.Tensor | None]:
        image = _decode(upload, data, limits)
        return image, transform(image) if preprocess else None

    async def _run(uploads: list[tuple[UploadFile, bytes]], slot: Slot) -> tuple[list[Image.Image], Any]:
        got = [await run_in_threadpool(_prepare, upload, data) for upload, data in uploads]
        images = [image for image, _ in got]
        x = torch.stack([t for _, t in got]) if preprocess else images  # type: ignore[misc]
        return images, await state["batcher"].run(x, slot)

    return app


class Measure:
    """ASGI middleware: counts every HTTP answer by path and status and times it (:class:`Metrics`). ``paths``:
    the app's routes; any other path counts as ``other``, so a scan of random URLs adds no series."""

    def __init__(self, app: Any, metrics: Metrics, paths: Callable[[], set[str]]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500  # 500: the app failed before it answered

        async def measured_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, measured_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths() else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - t0)


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
            max_files=limits.images_per_request, max_fields=8, max_part_size=limits.max_upload_bytes
        )
    except BadInput:
        raise
    except Exception as e:  # the multipart parser's own complaint (too many files, a part too large, ...)
        text = str(getattr(e, "detail", None) or e or type(e).__name__)
        if "too many files" in text.lower():
            raise BadInput(413, f"more than {limits.images_per_request} images in one request") from None
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


async def _discard_upload(request: Request, limits: ServeLimits) -> None:
    """Read the upload of a request about to be refused, and drop it, chunk by chunk: a server that closes a
    connection while the upload still arrives makes the client's system reset it, and the client sees no
    answer. Not when the client waits for ``100 Continue`` (it has sent nothing), nor past the upload limit."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_upload_bytes:
                return
    except ClientDisconnect:  # gone: the answer goes nowhere
        return


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
    drain_seconds: float = 30.0,
) -> None:
    """Run the app with uvicorn: the web server in a thread, the model in this (main) thread. At most
    ``limits.connections`` connections are served at once (uvicorn's ``limit_concurrency``: past it, a request
    gets uvicorn's own 503), so uploads hold at most that many times ``limits.max_upload_bytes``.

    SIGTERM or a first Ctrl-C drains (:class:`Drain`): the listening socket stays open while requests received
    before the signal are in progress, ``/readyz`` answers 503, ``/healthz`` 200, a new ``POST /predict`` a 503
    with ``Retry-After`` and ``Connection: close``. Once every request received before the signal is answered,
    or at the latest ``drain_seconds`` after it (those still running then get a 503), the listening socket
    closes and this returns. A forward pass cannot be interrupted: one in progress then ends first (this
    thread runs it). A second Ctrl-C stops at once (``KeyboardInterrupt``); a second SIGTERM changes nothing."""
    import uvicorn

    check_seconds("drain_seconds", drain_seconds)
    if model.backend != "torch":
        # torch only preprocesses, in the decoders' threads (create_app): one core each, no OpenMP team of
        # its own beside onnxruntime's threads
        torch.set_num_threads(1)
    executor = MainThreadExecutor()
    app = create_app(model, device=device, limits=limits, channels_last=channels_last, executor=executor)
    drain: Drain = app.state.drain
    # uvicorn refuses a request when the open connections, the one it came on included, reach limit_concurrency
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        limit_concurrency=limits.connections + 1,
        timeout_graceful_shutdown=ANSWER_GRACE_S,  # once drained: only answers still being sent remain
    )
    server = uvicorn.Server(config)
    web = threading.Thread(target=server.run, name="racnn-serve-http", daemon=True)
    signalled: list[int] = []
    stopping: list[asyncio.Task[None]] = []

    def begin_drain(name: str) -> None:  # in the web server's event loop
        log.info("%s: draining for at most %g s (Ctrl-C again to stop at once)", name, drain_seconds)
        drain.start(drain_seconds)
        stopping.append(asyncio.get_running_loop().create_task(stop_when_drained()))

    async def stop_when_drained() -> None:
        # the deadline's 503s go out at once; ANSWER_GRACE_S more is the backstop for a request that ignores it
        if await drain.wait(drain_seconds + ANSWER_GRACE_S):
            log.info("drained: every request received before the signal is answered; closing")
        else:
            log.warning("drain deadline passed with %d request(s) still unanswered; closing", drain.active)
        server.should_exit = True  # uvicorn closes the listening socket and the idle connections

    def on_signal(sig: int, frame: Any) -> None:  # in this thread, between two Python instructions
        if signalled:
            if sig == signal.SIGINT:
                raise KeyboardInterrupt
            return
        signalled.append(sig)
        try:
            loop = drain.loop
            if loop is None:  # not started yet: uvicorn stops right after its startup
                raise RuntimeError("no event loop yet")
            loop.call_soon_threadsafe(begin_drain, signal.Signals(sig).name)
        except RuntimeError:  # no loop, or it has closed
            server.should_exit = True

    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()  # signals can only be set up there
    previous = {sig: signal.signal(sig, on_signal) for sig in handled} if in_main else {}
    web.start()
    try:
        executor.run_while(web.is_alive)
    except KeyboardInterrupt:  # the second Ctrl-C: requests in flight are dropped
        server.should_exit = server.force_exit = True
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:  # uvicorn said why (a port in use, an address it cannot bind) and stopped
        raise RuntimeError(f"could not serve on {host}:{port} (see the line above)")
