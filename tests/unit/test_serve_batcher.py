"""``serve.batcher`` without a model or HTTP: concurrent requests share one model call, a full batch goes at once, a
lone request does not wait the whole window, a request checked by a model swapped out meanwhile is checked again by
the batch's model, and every answer names the step of the model that computed it."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.batcher import Batcher
from serve.metrics import ServeMetrics
from serve.model import RequestError


class FakeModel:
    """Answers each text with (step, its ids); ``check`` refuses the text "bad"."""

    def __init__(self, step: int):
        self.step, self.calls, self.checked = step, [], 0

    def check(self, kind: str, texts: list[str]) -> list[list[int]]:
        self.checked += 1
        if "bad" in texts:
            raise RequestError(422, "bad text")
        return [[self.step, len(text)] for text in texts]

    def infer_ids(self, kind: str, ids: list[list[int]]) -> list:
        self.calls.append(len(ids))
        return [(self.step, row) for row in ids]


def _run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def _with_batcher(current, window: float, body, max_batch: int = 4):
    batcher = Batcher(current, max_batch, window, ServeMetrics())
    worker = asyncio.create_task(batcher.run())
    try:
        return await body(batcher)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        batcher.close()


@pytest.mark.timeout(30)
def test_concurrent_requests_share_a_call_and_a_full_batch_goes_at_once():
    model = FakeModel(7)

    async def body(batcher):
        started = time.monotonic()
        texts = [["a"], ["bb", "cc"], ["d"], ["e"]]  # 5 inputs, max_batch 4: two calls, a request never split
        answers = await asyncio.gather(*(batcher.submit("fill-mask", t, model.check("fill-mask", t), model)
                                         for t in texts))  # fmt: skip
        return answers, time.monotonic() - started

    answers, took = _run(_with_batcher(lambda: model, 10.0, body))
    assert model.calls == [4, 1]
    assert [a[0] for a in answers] == [7] * 4 and [len(a[1]) for a in answers] == [1, 2, 1, 1]
    assert answers[1][1] == [(7, [7, 2]), (7, [7, 2])]
    assert took < 10.0 / 4 + 5  # the full batch went at once; the rest waited a quarter window, not the window


@pytest.mark.timeout(30)
def test_a_lone_request_waits_a_quarter_of_the_window_and_a_swap_rechecks():
    old, new = FakeModel(1), FakeModel(2)
    current = [old]

    async def body(batcher):
        started = time.monotonic()
        first = await batcher.submit("fill-mask", ["x"], old.check("fill-mask", ["x"]), old)
        lone = time.monotonic() - started
        ids = old.check("fill-mask", ["yy"])
        current[0] = new  # swapped after the check, before the batch
        second = await batcher.submit("fill-mask", ["yy"], ids, old)
        new.calls.clear()
        with pytest.raises(RequestError, match="bad text"):
            await batcher.submit("fill-mask", ["bad"], [[0]], old)  # checked by the old model only: refused now
        return first, lone, second

    first, lone, second = _run(_with_batcher(lambda: current[0], 2.0, body))
    assert first == (1, [(1, [1, 1])])
    assert 0.4 <= lone < 1.9  # window 2 s: nobody else came within 0.5 s, so it went
    assert second == (2, [(2, [2, 2])]) and new.checked == 2 and new.calls == []
