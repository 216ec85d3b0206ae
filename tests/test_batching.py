"""The model replica's batcher: an idle model starts at once; arrivals during a batch form the next one."""

from __future__ import annotations

import asyncio

import pytest

from serving.model_server import Batcher


class Model:
    """Records each batch; a batch blocks until released, like a generate call in flight."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return [x * 10 for x in items]


async def in_flight(batcher: Batcher, item: int) -> asyncio.Task:
    """Submit ``item`` and let the event loop start its batch."""
    task = asyncio.create_task(batcher.submit(item))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return task


def test_a_lone_request_runs_alone_and_arrivals_during_it_share_the_next_batch():
    async def scenario():
        model = Model()
        batcher = Batcher(model.run, max_batch_size=3)
        first = await in_flight(batcher, 1)
        assert model.batches == [[1]]  # started without waiting for company
        rest = [asyncio.create_task(batcher.submit(x)) for x in (2, 3, 4, 5)]
        await asyncio.sleep(0)
        model.release.set()
        results = await asyncio.gather(first, *rest)
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert results == [10, 20, 30, 40, 50]
    assert batches == [[1], [2, 3, 4], [5]]  # capped at max_batch_size, in arrival order


def test_a_failed_batch_is_retried_one_by_one_so_only_the_offender_fails():
    async def scenario():
        model = Model()
        model.release.set()
        batcher = Batcher(model.run, max_batch_size=8)
        mixed = await asyncio.gather(batcher.submit(2), batcher.submit(-1), batcher.submit(4), return_exceptions=True)
        good = await batcher.submit(3)
        return model.batches, mixed, good

    batches, mixed, good = asyncio.run(scenario())
    assert mixed[0] == 20 and isinstance(mixed[1], ValueError) and mixed[2] == 40
    assert batches == [[2, -1, 4], [2], [-1], [4], [3]]  # the failed batch, then each of its requests alone
    assert good == 30


def test_a_caller_that_gave_up_is_not_computed():
    async def scenario():
        model = Model()
        batcher = Batcher(model.run, max_batch_size=8)
        first = await in_flight(batcher, 1)
        gone = asyncio.create_task(batcher.submit(2))
        kept = asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0)
        gone.cancel()
        model.release.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return model.batches, await first, await kept

    batches, first, kept = asyncio.run(scenario())
    assert (first, kept) == (10, 30)
    assert batches == [[1], [3]]
