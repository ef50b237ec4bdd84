"""Dynamic batching: requests queue up, one worker takes up to ``max_batch`` inputs, waiting at most ``window``
seconds after the first, and runs the model on one inference thread while the event loop keeps serving.

The model is read once per batch (``current()``), on the event loop, so a batch is computed by exactly one
checkpoint and every answer names the step of the model that computed it; a swap (an assignment on the event loop)
takes effect at the next batch. A request's inputs always stay in one batch (a request holds at most ``max_batch``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from serve.metrics import ServeMetrics
from serve.model import RequestError, ServedModel

logger = logging.getLogger(__name__)

MAX_QUEUED_REQUESTS = 4096


@dataclass
class Job:
    kind: str
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, current: Callable[[], ServedModel | None], max_batch: int, window: float,
                 metrics: ServeMetrics):  # fmt: skip
        self.current, self.max_batch, self.window, self.metrics = current, max_batch, window, metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue(MAX_QUEUED_REQUESTS)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bertswarm-infer")

    async def submit(self, kind: str, texts: list[str]) -> tuple[int, list]:
        """``(step, outputs)`` of one request; :class:`RequestError` if it cannot be answered."""
        job = Job(kind, texts, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise RequestError(503, f"more than {MAX_QUEUED_REQUESTS} requests queued; retry later") from None
        return await job.future

    async def run(self) -> None:
        """The worker: forever take a batch, compute it, answer it."""
        loop = asyncio.get_running_loop()
        carried: Job | None = None
        while True:
            batch = [carried or await self.queue.get()]
            carried = None
            size, deadline = len(batch[0].texts), loop.time() + self.window
            while size < self.max_batch:
                if self.queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    job = self.queue.get_nowait()
                if size + len(job.texts) > self.max_batch:
                    carried = job  # the first of the next batch
                    break
                batch.append(job)
                size += len(job.texts)
            await self._compute([job for job in batch if not job.future.done()], loop)

    async def _compute(self, batch: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        served = self.current()  # one model for the whole batch
        if not batch:
            return
        if served is None:
            for job in batch:
                job.future.set_exception(RequestError(503, "no checkpoint loaded yet"))
            return
        self.metrics.batch_size.observe(sum(len(job.texts) for job in batch))
        try:
            results = await loop.run_in_executor(self.executor, _infer, served, batch)
        except Exception as e:  # a bug or an out-of-memory: every request of the batch gets a 500, the worker goes on
            logger.exception("inference failed")
            results = [RequestError(500, f"inference failed ({type(e).__name__}); see the server's log")] * len(batch)
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result((served.step, result))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _infer(served: ServedModel, batch: list[Job]) -> list:
    """On the inference thread: one forward pass per kind of request in the batch; results in the batch's order."""
    results: list = [None] * len(batch)
    for kind in {job.kind for job in batch}:
        indices = [i for i, job in enumerate(batch) if job.kind == kind]
        texts = [text for i in indices for text in batch[i].texts]
        try:
            outputs = served.infer(kind, texts)
        except RequestError as e:
            for i in indices:
                results[i] = e
            continue
        start = 0
        for i in indices:
            results[i] = outputs[start : start + len(batch[i].texts)]
            start += len(batch[i].texts)
    return results
