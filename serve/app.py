"""The HTTP server (aiohttp on uvloop) and the hot-reload watcher.

Routes: ``POST /v1/fill-mask`` and ``POST /v1/classify`` (body ``{"inputs": [text, ...]}``, answer
``{"step": N, "outputs": [...]}`` shaped as the matching ``transformers.pipeline`` returns), ``/healthz`` (the
process is up), ``/readyz`` (a checkpoint is loaded; 503 before), ``/metrics`` (Prometheus). Every error is a JSON
``{"error": "<one line>"}`` with a 4xx (5xx only for "not ready", "overloaded" and bugs).

The watcher polls the source every ``poll_seconds``; a checkpoint with a higher step is verified and loaded on its
own thread beside the serving model, then swapped in with one assignment on the event loop, which the batcher reads
once per batch: no request fails or mixes models during a swap, and the step only moves forward. A checkpoint that
fails verification (or belongs to another run) is refused with one WARNING and ``bertswarm_serve_reloads_total
{outcome="refused"}``, once per checkpoint; the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from peer.errors import UserError
from peer.store.errors import CheckpointError
from serve.batcher import Batcher
from serve.metrics import ServeMetrics
from serve.model import CLASSIFY, FILL_MASK, RequestError, ServedModel
from serve.source import Candidate, CheckpointSource

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20


class Server:
    def __init__(self, checkpoints: str, *, max_batch: int = 32, batch_window_ms: float = 5.0,
                 poll_seconds: float = 5.0, threads: int = 0):  # fmt: skip
        self.source = CheckpointSource(checkpoints)
        self.max_batch, self.poll_seconds = max_batch, poll_seconds
        self.metrics = ServeMetrics()
        self.served: ServedModel | None = None
        self.batcher = Batcher(lambda: self.served, max_batch, batch_window_ms / 1000, self.metrics, threads)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="bertswarm-load")
        self._refused: set[tuple[int, str]] = set()
        self._unreachable = False
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batch worker and the watcher (the first poll is immediate)."""
        self._tasks = [asyncio.create_task(self.batcher.run(), name="batcher"),
                       asyncio.create_task(self._watch(), name="watcher")]  # fmt: skip

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.batcher.close()
        self._loader.shutdown(wait=False, cancel_futures=True)

    # --- hot reload ------------------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # never let the watcher die: the old model keeps serving, the next poll retries
                logger.exception("checking for a new checkpoint failed")
            await asyncio.sleep(self.poll_seconds)

    async def poll(self) -> None:
        """One check: load and swap in a newer checkpoint if there is one (and it passes verification)."""
        loop = asyncio.get_running_loop()
        try:
            candidate = await loop.run_in_executor(self._loader, self.source.newest)
        except CheckpointError as e:
            if not self._unreachable:  # once per outage, not at every poll
                logger.warning("cannot read %s (%s); serving on, retrying every %gs", self.source.given, e.problem,
                               self.poll_seconds)  # fmt: skip
            self._unreachable = True
            return
        if self._unreachable:
            logger.info("%s is readable again", self.source.given)
        self._unreachable = False
        current = self.served
        if candidate is None or (current is not None and candidate.step <= current.step):
            return
        if (candidate.step, candidate.sha256) in self._refused:
            return
        expected = None if current is None else current.fingerprint
        started = time.perf_counter()
        try:
            new = await loop.run_in_executor(self._loader, self.source.load, candidate, expected)
        except CheckpointError as e:
            await self._refuse(candidate, e, loop)
            return
        if self.served is not None and new.step <= self.served.step:
            return  # cannot happen with one watcher, but the step must only move forward
        self.served = new  # the swap: the batcher reads this once per batch
        self.metrics.step.set(new.step)
        self.metrics.reloads.labels("loaded").inc()
        logger.info("serving checkpoint %s (step %d, %s) loaded in %.2f s", candidate.where, new.step, new.kind,
                    time.perf_counter() - started)  # fmt: skip

    async def _refuse(self, candidate: Candidate, error: CheckpointError, loop) -> None:
        if not await loop.run_in_executor(self._loader, self.source.still_published, candidate):
            self.metrics.reloads.labels("failed").inc()  # pruned or replaced meanwhile: the next poll sees the newest
            logger.info("checkpoint %s went away while loading; retrying at the next poll", candidate.where)
            return
        self._refused.add((candidate.step, candidate.sha256))
        self.metrics.reloads.labels("refused").inc()
        step = "none yet" if self.served is None else self.served.step
        logger.warning("refusing checkpoint %s (step %d): %s; still serving step %s", candidate.where, candidate.step,
                       error.problem, step)  # fmt: skip

    # --- HTTP ------------------------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/fill-mask", lambda request: self._predict(request, FILL_MASK))
        app.router.add_post("/v1/classify", lambda request: self._predict(request, CLASSIFY))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _predict(self, request: web.Request, kind: str) -> web.Response:
        started = time.perf_counter()
        try:
            texts = parse_inputs(await _read_body(request), self.max_batch)
            served = self.served
            if served is None:
                raise RequestError(503, "no checkpoint loaded yet; retry when /readyz answers 200")
            ids = served.check(kind, texts)
            step, outputs = await self.batcher.submit(kind, texts, ids, served)
            response = web.json_response({"step": step, "outputs": outputs})
        except RequestError as e:
            response = web.json_response({"error": str(e)}, status=e.status)
        self.metrics.requests.labels(kind, str(response.status)).inc()
        self.metrics.request_seconds.labels(kind).observe(time.perf_counter() - started)
        return response

    async def _healthz(self, _request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request) -> web.Response:
        served = self.served
        if served is None:
            return web.json_response({"error": f"no checkpoint loaded yet from {self.source.given}"}, status=503)
        return web.json_response({"step": served.step, "run_id": served.run_id, "kind": served.kind})

    async def _metrics(self, _request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _read_body(request: web.Request) -> object:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(413, f"body larger than {MAX_BODY_BYTES >> 20} MB; send fewer or shorter inputs") from None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f'body is not JSON ({e}); send {{"inputs": ["text", ...]}}') from None


def parse_inputs(body: object, max_inputs: int) -> list[str]:
    """The list of texts of a request body, or a :class:`RequestError` naming what is wrong."""
    usage = 'send {"inputs": ["text", ...]}'
    if not isinstance(body, dict) or "inputs" not in body:
        raise RequestError(400, f'body has no "inputs"; {usage}')
    if set(body) != {"inputs"}:
        unknown = sorted(set(body) - {"inputs"})
        raise RequestError(400, f"unknown field {unknown[0]!r} in body; {usage}")
    texts = body["inputs"]
    if not isinstance(texts, list):
        raise RequestError(400, f'"inputs" is a {type(texts).__name__}, not a list; {usage}')
    if not texts:
        raise RequestError(400, f'"inputs" is empty; {usage}')
    if len(texts) > max_inputs:
        raise RequestError(413, f'"inputs" has {len(texts)} texts, more than {max_inputs}; split the request')
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"inputs[{i}] is a {type(text).__name__}, not a string; {usage}")
        if not text.strip():
            raise RequestError(400, f"inputs[{i}] is empty; send text")
    return texts


async def serve(app: web.Application, host: str, port: int, shutdown_seconds: float) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner (for cleanup) and the bound port. A port in use is a user error."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_seconds)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(f"--port {port} on {host} is unavailable ({e.strerror}); pick a free port, or 0 for any, "
                        "or --host an address of this machine") from None  # fmt: skip
    return runner, site._server.sockets[0].getsockname()[1]
