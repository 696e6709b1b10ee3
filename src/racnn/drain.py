"""Graceful shutdown of ``racnn serve``: the app's side (:class:`Drain`: readiness off, new work refused, the
requests received before answered or, past the deadline, answered 503) and the requests' side
(:class:`Draining`, ASGI middleware that counts them and closes keep-alive connections once draining)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Any

from .batcher import BadInput


def check_seconds(name: str, value: float, *, positive: bool = False) -> float:
    """``value`` if it is a finite number of seconds, 0 or more (``positive``: more than 0), else a one-line
    ``ValueError`` (``inf`` and ``nan`` pass a plain comparison and fail later, in a timer)."""
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        bound = "more than 0" if positive else "0 or more"
        raise ValueError(f"{name} must be a finite number of seconds, {bound}, not {value}")
    return value


class Drain:
    """Graceful shutdown, the app's side. Once :meth:`start` is called (``racnn serve``: on SIGTERM or a first
    Ctrl-C) ``GET /readyz`` answers 503, a new ``POST /predict`` gets a 503 with ``Retry-After``, and every
    answer carries ``Connection: close``; ``GET /healthz`` and the rest answer as before. The requests received
    before go on, and those still running ``seconds`` later are answered 503 (:meth:`guard`), never dropped.
    :meth:`wait` returns once they are all answered: the moment ``racnn serve`` closes its listening socket.

    The requests in progress are counted by the :class:`Draining` middleware (:meth:`enter`, :meth:`leave`)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = False
        self.active = 0  # requests received before the drain began and not yet answered
        self.expired: asyncio.Future[None] | None = None  # done at the drain deadline
        self.answered: asyncio.Future[None] | None = None  # done once draining and ``active`` is 0

    def bind(self) -> None:
        """At the app's startup, in its event loop."""
        self.loop, self.started, self.active = asyncio.get_running_loop(), False, 0
        self.expired, self.answered = self.loop.create_future(), self.loop.create_future()

    def start(self, seconds: float) -> None:
        """Begin draining; call it in the app's event loop (``loop.call_soon_threadsafe`` from elsewhere)."""
        if self.started or self.loop is None:
            return
        self.started = True
        self.loop.call_later(check_seconds("the drain time", seconds), _settle, self.expired)
        if self.active == 0:
            _settle(self.answered)

    def enter(self) -> bool:
        """A request arrives: whether it counts as received before the drain (then :meth:`leave` when answered)."""
        if self.started:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1
        if self.started and self.active == 0:
            _settle(self.answered)

    async def wait(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` s, until draining and every request received before is answered; whether
        they are."""
        if self.answered is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self.answered), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def guard(self, work: Awaitable[Any]) -> Any:
        """``work``'s result, or a 503 if the drain deadline comes first (``work`` is then cancelled)."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait([task, self.expired], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[list-item]
        finally:  # also when this request is cancelled: its work stops with it
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise BadInput(
            503,
            "the server shut down before this request was answered (drain deadline); retry",
            retry_after=1,
        )


def _settle(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class Draining:
    """ASGI middleware, the requests' side of :class:`Drain`: counts the requests received before the drain
    began until they are answered, marks those received after (``scope["racnn.draining"]``), and once draining
    adds ``Connection: close`` to the answers (all but the 500 of an unexpected error, sent from outside it), so
    that no keep-alive connection waits idle for the listening socket to close: each is closed after the
    answer to its next request."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = self.drain.enter()
        scope["racnn.draining"] = not counted

        async def closing_send(message: Any) -> None:
            if message["type"] == "http.response.start" and self.drain.started:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive, closing_send)
        finally:
            if counted:
                self.drain.leave()
