"""racnn.batcher: what waits runs as one batch, a failing batch fails only its requests, the queue's bound, and
the main-thread executor that runs the model under ``racnn serve``."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

pytest.importorskip("fastapi", reason="racnn serve needs the serve extra: pip install 'racnn[serve]'")
import racnn.batcher as batching
from racnn import serve
from test_serve import _model


def test_the_batcher_runs_what_waits_as_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a batch runs, the requests that arrive queue up; the next batch takes them all (one forward
    pass), and each request gets its own rows back."""
    release, calls = threading.Event(), []
    real = batching.forward_probs

    def slow(model, batch, **options):  # the first batch waits until released
        calls.append(len(batch))
        if len(calls) == 1:
            release.wait(10)
        return real(model, batch, **options)

    monkeypatch.setattr(batching, "forward_probs", slow)
    model = _model().eval()
    xs = [torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(n)) for n in (1, 2, 1, 3)]

    async def scenario() -> list:
        batcher = batching.Batcher(model, torch.device("cpu"), max_batch=16)
        batcher.start()
        first = asyncio.create_task(batcher.run(xs[0]))
        await asyncio.sleep(0.2)  # the first batch is running (and blocked)
        rest = [asyncio.create_task(batcher.run(x)) for x in xs[1:]]
        await asyncio.sleep(0.2)
        release.set()
        out = await asyncio.gather(first, *rest)
        await batcher.stop()
        return out

    out = asyncio.run(scenario())
    assert calls == [1, 6]  # the three waiting requests ran as one batch of 2 + 1 + 3 images
    for x, (probs, views) in zip(xs, out, strict=True):
        want, want_views = real(model, x)
        assert all(torch.allclose(probs[k], want[k], atol=1e-5) for k in want)
        assert len(views) == 2 and torch.allclose(views[0], want_views[0], atol=1e-5)


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    model = _model().eval()

    async def scenario() -> tuple[list, object]:
        batcher = batching.Batcher(model, torch.device("cpu"), max_batch=16)
        batcher.start()
        # two requests of different sides cannot be stacked into one batch: both fail, nothing hangs
        bad = await asyncio.gather(
            batcher.run(torch.zeros(1, 3, 48, 48)),
            batcher.run(torch.zeros(1, 3, 40, 40)),
            return_exceptions=True,
        )
        good = await asyncio.wait_for(batcher.run(torch.zeros(2, 3, 48, 48)), 30)
        await batcher.stop()
        return bad, good

    bad, (probs, views) = asyncio.run(scenario())
    assert any(isinstance(b, Exception) for b in bad)
    assert probs["s123"].shape == (2, 3) and len(views) == 2


def test_the_batcher_queue_bound_is_at_least_1_or_none() -> None:
    """max_queue agrees with ServeLimits: at least 1; None (not 0) means no bound."""
    model = _model().eval()
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_queue must be at least 1"):
            batching.Batcher(model, torch.device("cpu"), max_batch=4, max_queue=bad)
        with pytest.raises(ValueError, match="max_queue must be at least 1"):
            serve.ServeLimits(max_queue=bad)
    unbounded = batching.Batcher(model, torch.device("cpu"), max_batch=4)
    assert unbounded.max_queue is None and unbounded.admit(10_000).n == 10_000
    bounded = batching.Batcher(model, torch.device("cpu"), max_batch=4, max_queue=2)
    slot = bounded.admit(2)
    with pytest.raises(batching.BadInput) as refused:
        bounded.admit(1)
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "1"
    slot.release()
    assert bounded.admit(1).n == 1


def test_main_thread_executor_fails_a_call_and_goes_on_but_stops_on_ctrl_c() -> None:
    """An error in one call fails that request only; Ctrl-C during a call fails it and stops the loop
    (``racnn serve`` then shuts the web server down), instead of being swallowed as a request error."""
    ex = batching.MainThreadExecutor()

    def interrupted() -> None:
        raise KeyboardInterrupt

    bad, ok, stop = ex.submit(lambda: 1 / 0), ex.submit(lambda: 42), ex.submit(interrupted)
    later = ex.submit(lambda: 7)
    checks = iter(range(10))  # a bound, so a swallowed Ctrl-C fails the test instead of hanging it
    with pytest.raises(KeyboardInterrupt):
        ex.run_while(lambda: next(checks, None) is not None)
    assert isinstance(bad.exception(), ZeroDivisionError) and ok.result() == 42
    assert isinstance(stop.exception(), batching.BadInput) and stop.exception().status == 503  # type: ignore[union-attr]
    assert not later.done()
