"""Dynamic batching that never makes an idle model wait.

Ray Serve's ``@serve.batch`` waits ``batch_wait_timeout_s`` after a batch's first request for
more to arrive, so a lone request pays that wait in full; with the wait at zero it forms each
batch the moment one request arrives and queues it behind the running one, so under load the
batches stay at one. :class:`Batcher` forms a batch when the model becomes free instead: a
request to an idle model starts at once (after an optional ``wait_s``), and whatever arrives
while a batch runs goes into the next one, up to ``max_batch_size`` — the continuous batching
rule of vLLM's scheduler, at the granularity of a whole ``generate`` call.

No request can fail another: when a batch's call raises, its requests are run again one by one, so
only the one at fault gets the error and the others get their answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int = 8, wait_s: float = 0.0):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._queue: list[tuple[T, asyncio.Future]] = []
        self._busy = False

    async def submit(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._busy:
            self._busy = True  # set before the task starts, so concurrent submits start one drain only
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            if self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
                live = [(item, f) for item, f in batch if not f.done()]  # callers that gave up are not computed
                if not live:
                    continue
                try:
                    results = await self.run([item for item, _ in live])
                except Exception as exc:  # noqa: BLE001 - alone, the error is its caller's; in a batch, find whose
                    if len(live) == 1:
                        _settle(live[0][1], exception=exc)
                    else:
                        await self._one_by_one(live)
                    continue
                for (_, f), result in zip(live, results):
                    _settle(f, result)
        finally:
            self._busy = False

    async def _one_by_one(self, live: list[tuple[T, asyncio.Future]]) -> None:
        """A failed batch again, each request alone: only the offending ones get their error."""
        for item, f in live:
            if f.done():
                continue
            try:
                (result,) = await self.run([item])
            except Exception as exc:  # noqa: BLE001 - this request's own error
                _settle(f, exception=exc)
            else:
                _settle(f, result)


def _settle(future: asyncio.Future, result=None, exception: BaseException | None = None) -> None:
    """A caller's answer or error, unless it gave up waiting."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
