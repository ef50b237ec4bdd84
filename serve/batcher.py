"""Dynamic batching: requests queue up, one worker takes up to ``max_batch`` inputs, waiting at most ``window``
seconds after the first, and runs the model on one inference thread while the event loop keeps serving.

The model is read once per batch (``current()``), on the event loop, so a batch is computed by exactly one
checkpoint and every answer names the step of the model that computed it; a swap (an assignment on the event loop)
takes effect at the next batch. A request's inputs always stay in one batch (a request holds at most ``max_batch``).
Requests arrive tokenised (:meth:`ServedModel.check`); one checked by another model than the batch's (a swap in
between) is checked again by the batch's model on the inference thread, so no answer mixes two checkpoints.

The queue is a deque and the worker sleeps on one future that :meth:`Batcher.submit` resolves, with one timer for the
rest of the window: no task or timeout per queued request, and a full batch goes at once. The window is waited only
while requests keep arriving: once no new request came within a quarter of the window, what is queued goes, so a
lone request (an idle server) waits ``window / 4``, not the whole window.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from serve.metrics import ServeMetrics
from serve.model import RequestError, ServedModel

logger = logging.getLogger(__name__)

MAX_QUEUED_REQUESTS = 4096


@dataclass
class Job:
    kind: str
    texts: list[str]
    ids: list[list[int]]
    checked_by: ServedModel
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, current: Callable[[], ServedModel | None], max_batch: int, window: float,
                 metrics: ServeMetrics, threads: int = 0):  # fmt: skip
        self.current, self.max_batch, self.window, self.metrics = current, max_batch, window, metrics
        self.queue: deque[Job] = deque()
        self._wakeup: asyncio.Future | None = None
        # torch's thread settings are per thread: set them on the one thread that runs the model
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bertswarm-infer", initializer=_set_threads,
                                           initargs=(threads,))  # fmt: skip

    async def submit(self, kind: str, texts: list[str], ids: list[list[int]], checked_by: ServedModel
                     ) -> tuple[int, list]:  # fmt: skip
        """``(step, outputs)`` of one request; :class:`RequestError` if it cannot be answered."""
        if len(self.queue) >= MAX_QUEUED_REQUESTS:
            raise RequestError(503, f"more than {MAX_QUEUED_REQUESTS} requests queued; retry later")
        job = Job(kind, texts, ids, checked_by, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
        return await job.future

    async def _arrival(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        """Sleep until a request is submitted (or ``timeout`` s pass)."""
        self._wakeup = wakeup = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _resolve, wakeup)
        try:
            await wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    async def run(self) -> None:
        """The worker: forever take a batch, compute it, answer it."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                await self._arrival(loop, None)
            batch: list[Job] = []
            size, deadline = 0, loop.time() + self.window
            while True:
                while self.queue and size + len(self.queue[0].ids) <= self.max_batch:
                    job = self.queue.popleft()
                    if not job.future.done():  # not cancelled (client gone)
                        batch.append(job)
                        size += len(job.ids)
                remaining = deadline - loop.time()
                if self.queue or size >= self.max_batch or remaining <= 0:
                    break  # full (the next request starts the next batch), or the window is over
                arrived = len(self.queue)
                await self._arrival(loop, min(remaining, self.window / 4))
                if len(self.queue) == arrived:
                    break  # nobody else is coming soon: go with what is there
            if batch:
                await self._compute(batch, loop)

    async def _compute(self, batch: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        served = self.current()  # one model for the whole batch
        if served is None:
            for job in batch:
                job.future.set_exception(RequestError(503, "no checkpoint loaded yet"))
            return
        self.metrics.batch_size.observe(sum(len(job.ids) for job in batch))
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


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def model_threads(threads: int) -> int:
    """``--threads``, or for 0 one fewer than the CPUs this process may use (at least 1): the event loop needs a core
    of its own. torch's default (every core) makes its threads and the event loop take turns on a small machine (on
    2 cores a batch took several times longer with 2 threads than with 1 while requests were being served)."""
    if threads:
        return threads
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, available - 1)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(model_threads(threads))


def _infer(served: ServedModel, batch: list[Job]) -> list:
    """On the inference thread: one forward pass per kind of request in the batch; results in the batch's order."""
    results: list = [None] * len(batch)
    for kind in {job.kind for job in batch}:
        indices = []
        for i, job in enumerate(batch):
            if job.kind != kind:
                continue
            if job.checked_by is not served:  # a swap since it was checked: the batch's model checks it again
                try:
                    job.ids, job.checked_by = served.check(kind, job.texts), served
                except RequestError as e:
                    results[i] = e
                    continue
            indices.append(i)
        if not indices:
            continue
        try:
            outputs = served.infer_ids(kind, [row for i in indices for row in batch[i].ids])
        except RequestError as e:
            for i in indices:
                results[i] = e
            continue
        start = 0
        for i in indices:
            results[i] = outputs[start : start + len(batch[i].ids)]
            start += len(batch[i].ids)
    return results
