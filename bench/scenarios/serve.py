"""Scenario: ``bertswarm-serve`` (the product's server, ``python -m serve``, real HTTP on 127.0.0.1).

(a) Throughput: 32 concurrent aiohttp clients, one masked sentence per request, against the server's dynamic batching
÷ a plain ``transformers.pipeline("fill-mask")`` loop answering the same sentences one at a time in this process
(no HTTP), with p50/p99 latency of both: the issue's figure, on the tiny preset (the product's default). Two more
rows, never in its place: the same ratio on the mini preset (more arithmetic per request), and the server ÷ the same
pipeline served one request at a time over the same HTTP stack (aiohttp on uvloop, the same clients), the
like-for-like anchor. (b) Load test: clients send requests for 60 s (15 s with --quick) while a new checkpoint is
published every 10 s (3 s): failed requests, whether each client's answers carry steps that only move forward, and
the lag from a checkpoint's publication to the first answer with its step.

Checkpoints are written with the product's writer (``peer.store.checkpoint.write_checkpoint``, the shipped
tokenizer); nothing is downloaded. The arms are interleaved (their order rotates every repetition). The clients run in
this process, on the same cores as the server: their cost is part of the figure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

from bench.common import ROOT, free_port

NAME = "serve"
TITLE = "10. Serving: dynamic batching vs a pipeline loop, and hot reload under load"
ARMS = ("serve", "pipeline", "load", "pipeline_http", "serve_mini", "pipeline_mini")
PRESET_OF = {"serve_mini": "mini", "pipeline_mini": "mini"}  # every other arm: tiny

_WORDS = ("function", "value", "file", "module", "list", "server", "model", "request", "answer", "checkpoint")


def config(quick: bool) -> dict:
    return dict(clients=32, requests=320 if quick else 4000, warmup=64, load_clients=8, load_s=15 if quick else 60,
                publish_every_s=3 if quick else 10, poll_s=1.0, max_batch=32, batch_window_ms=5.0)  # fmt: skip


def texts(n: int) -> list[str]:
    """``n`` masked sentences of varied length (the same ones for every arm)."""
    out = []
    for i in range(n):
        words = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(4 + i % 12)]
        words.insert(i % len(words), "[MASK]")
        out.append("the " + " ".join(words) + ".")
    return out


def _tiny(preset: str = "tiny") -> SimpleNamespace:
    from peer.config import PeerConfig
    from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
    from peer.run.manifest import from_config

    tok = default_tokenizer()
    cfg = PeerConfig(preset=preset).validate()
    manifest = from_config(cfg, f"bench-serve-{preset}", tokenizer_fingerprint(tok), tok.get_vocab_size())
    return SimpleNamespace(tok=tok, manifest=manifest)


def publish(root: Path, tiny: SimpleNamespace, epoch: int) -> Path:
    """A checkpoint of ``epoch`` (other weights at every step) with the product's writer; returns its directory."""
    from peer.run.model import build_model
    from peer.store.checkpoint import write_checkpoint

    model = build_model(tiny.manifest.model, nsp=False, seed=epoch)
    return write_checkpoint(root, model, tiny.tok, tiny.manifest, epoch=epoch, samples_seen=epoch, eval_metrics={})


class Server:
    """One ``python -m serve`` process (or, with ``anchor``, :func:`pipeline_server`'s); stopped and reaped by its
    PID."""

    def __init__(self, checkpoints: Path, log: Path, cfg: dict, anchor: bool = False):
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 (closed in stop)
        if anchor:
            command = ["-m", __name__, str(checkpoints), str(free_port())]
        else:
            command = ["-m", "serve", "--checkpoints", str(checkpoints), "--port", str(free_port()), "--poll-seconds",
                       str(cfg["poll_s"]), "--max-batch", str(cfg["max_batch"]), "--batch-window-ms",
                       str(cfg["batch_window_ms"])]  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=self._out,
                                     stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        self.url = None
        deadline = time.monotonic() + 60
        while self.url is None:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bertswarm-serve did not start:\n{log.read_text()[-2000:]}")
            else:
                time.sleep(0.05)

    def wait_ready(self, step: int, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as response:
                    if json.load(response)["step"] >= step:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"step {step} not served within {timeout}s:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._out.close()


async def _post(session, url: str, text: str) -> tuple[int, int | None]:
    """(HTTP status, step of the answer); status 0 for a connection error or timeout."""
    import aiohttp

    try:
        async with session.post(url + "/v1/fill-mask", json={"inputs": [text]}) as response:
            body = await response.json(content_type=None)
            return response.status, body.get("step") if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return 0, None


async def _closed_loop(url: str, inputs: list[str], clients: int) -> tuple[float, list[tuple[float, int]]]:
    """``clients`` concurrent clients send ``inputs`` (one per request) until all are answered: (wall s, [(latency s,
    status)])."""
    import aiohttp

    pending = iter(inputs)
    records: list[tuple[float, int]] = []

    async def client(session):
        for text in pending:
            started = time.perf_counter()
            status, _ = await _post(session, url, text)
            records.append((time.perf_counter() - started, status))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return time.perf_counter() - started, records


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve_arm(root: Path, log: Path, cfg: dict, inputs: list[str], anchor: bool = False) -> dict:
    """The closed-loop clients against ``python -m serve`` on ``root`` (or against :func:`pipeline_server` on the
    checkpoint ``root`` with ``anchor``)."""
    server = Server(root, log, cfg, anchor)
    try:
        server.wait_ready(1)
        asyncio.run(_closed_loop(server.url, inputs[: cfg["warmup"]], cfg["clients"]))
        wall, records = asyncio.run(_closed_loop(server.url, inputs, cfg["clients"]))
    finally:
        server.stop()
    ok = [latency for latency, status in records if status == 200]
    return {"requests_per_s": len(ok) / wall, "p50_s": _quantile(ok, 0.5), "p99_s": _quantile(ok, 0.99),
            "failed": len(records) - len(ok), "requests": len(records), "wall_s": wall}  # fmt: skip


def pipeline_arm(checkpoint: Path, cfg: dict, inputs: list[str]) -> dict:
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(checkpoint), tokenizer=str(checkpoint), device=-1)
    for text in inputs[: cfg["warmup"]]:
        fill(text)
    latencies = []
    started = time.perf_counter()
    for text in inputs:
        t0 = time.perf_counter()
        fill(text)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return {"requests_per_s": len(inputs) / wall, "p50_s": _quantile(latencies, 0.5),
            "p99_s": _quantile(latencies, 0.99), "wall_s": wall}  # fmt: skip


def pipeline_server(checkpoint: str, port: int) -> None:
    """The like-for-like anchor: ``transformers.pipeline("fill-mask")`` behind the server's HTTP stack (aiohttp on
    uvloop, the same body and answer), one request at a time on one thread while the event loop reads the next
    requests. Run as ``python -m bench.scenarios.serve CHECKPOINT PORT``; SIGTERM stops it."""
    from concurrent.futures import ThreadPoolExecutor

    import uvloop
    from aiohttp import web
    from transformers import pipeline

    fill = pipeline("fill-mask", model=checkpoint, tokenizer=checkpoint, device=-1)
    model_thread = ThreadPoolExecutor(1)

    async def predict(request: web.Request) -> web.Response:
        texts = (await request.json())["inputs"]
        outputs = await asyncio.get_running_loop().run_in_executor(model_thread, lambda: [fill(t) for t in texts])
        return web.json_response({"step": 1, "outputs": outputs})

    async def ready(_request) -> web.Response:
        return web.json_response({"step": 1})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/fill-mask", predict)
        app.router.add_get("/readyz", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(f"pipeline anchor on http://127.0.0.1:{port}", flush=True)
        await stop.wait()
        await runner.cleanup()
        model_thread.shutdown()

    uvloop.run(main())


def load_arm(root: Path, log: Path, cfg: dict, inputs: list[str], tiny: SimpleNamespace) -> dict:
    """Clients for ``load_s`` while a new checkpoint appears every ``publish_every_s`` (the last one at least that long
    before the end)."""
    publish(root, tiny, 1)
    server = Server(root, log, cfg)
    try:
        server.wait_ready(1)
        published: dict[int, float] = {}  # step -> monotonic time its write (and `latest`) completed
        stop = threading.Event()

        def publisher():
            start = time.monotonic()
            step = 1
            while (step * cfg["publish_every_s"]) + cfg["publish_every_s"] <= cfg["load_s"]:
                if stop.wait(max(0.0, start + step * cfg["publish_every_s"] - time.monotonic())):
                    return
                step += 1
                publish(root, tiny, step)
                published[step] = time.monotonic()

        thread = threading.Thread(target=publisher, name="publisher", daemon=True)
        thread.start()
        try:
            answers = asyncio.run(_open_loop(server.url, inputs, cfg["load_clients"], cfg["load_s"]))
        finally:
            stop.set()
            thread.join(timeout=60)
    finally:
        server.stop()
    return summarize_load(answers, published)


async def _open_loop(url: str, inputs: list[str], clients: int, seconds: float) -> list[list[tuple[float, int, int]]]:
    """Per client, in order: (monotonic time of the answer, status, step or -1)."""
    import aiohttp

    deadline = time.monotonic() + seconds

    async def client(session, k: int):
        answers, i = [], k
        while time.monotonic() < deadline:
            status, step = await _post(session, url, inputs[i % len(inputs)])
            answers.append((time.monotonic(), status, -1 if step is None else step))
            i += clients
        return answers

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        return list(await asyncio.gather(*(client(session, k) for k in range(clients))))


def summarize_load(answers: list[list[tuple[float, int, int]]], published: dict[int, float]) -> dict:
    """Failed requests, per-client monotonicity of steps and publish → first-answer lags (pure)."""
    flat = [a for client in answers for a in client]
    failed = sum(1 for _, status, _ in flat if status != 200)
    forward = all(
        all(b >= a for a, b in zip(steps, steps[1:], strict=False))
        for steps in ([step for _, status, step in client if status == 200] for client in answers)
    )
    lags, unseen = [], 0
    for step, at in sorted(published.items()):
        seen = [t for t, status, s in flat if status == 200 and s >= step and t >= at]
        if seen:
            lags.append(min(seen) - at)
        else:
            unseen += 1
    times = [t for t, _, _ in flat]
    wall = max(times) - min(times) if len(times) > 1 else None
    return {"requests": len(flat), "failed": failed, "forward_only": forward, "lags_s": lags, "unseen": unseen,
            "published": len(published), "requests_per_s": len(flat) / wall if wall else None}  # fmt: skip


def _values(raw: dict, arm: str, key: str) -> list:
    return [r.get(key) if "error" not in r else None for r in raw[arm]]


def _ratio(a, b):
    return a / b if a is not None and b else None


def build_rows(raw: dict, cfg: dict) -> list[dict]:
    """The report's rows from the per-repetition figures of each arm (pure; a failed repetition is None). The rows
    of the extra arms (mini preset, pipeline over HTTP) come only when ``raw`` has them."""
    load = raw["load"]
    serve_rate, pipe_rate = _values(raw, "serve", "requests_per_s"), _values(raw, "pipeline", "requests_per_s")
    forward = [None if "error" in r else float(r["forward_only"]) for r in load]
    lag_median = [statistics.median(r["lags_s"]) if "error" not in r and r["lags_s"] else None for r in load]
    lag_max = [max(r["lags_s"]) if "error" not in r and r["lags_s"] else None for r in load]
    clients, load_clients = cfg["clients"], cfg["load_clients"]
    return _throughput_rows(raw, serve_rate, pipe_rate, clients) + [
        {
            "metric": "bertswarm-serve failed requests (throughput arm)",
            "values": _values(raw, "serve", "failed"),
            "goal": "<= 0",
        },  # fmt: skip
        {"metric": "load test: failed requests", "values": _values(raw, "load", "failed"), "goal": "<= 0"},
        {"metric": "load test: steps only move forward per client (1 = yes)", "values": forward, "goal": ">= 1"},
        {"metric": "load test: publish → first answer with the new step (median)", "values": lag_median, "unit": "s"},
        {"metric": "load test: publish → first answer with the new step (max)", "values": lag_max, "unit": "s"},
        {
            "metric": "load test: published checkpoints never answered with",
            "values": _values(raw, "load", "unseen"),
            "goal": "<= 0",
        },  # fmt: skip
        {
            "metric": f"load test: requests/s ({load_clients} clients)",
            "values": _values(raw, "load", "requests_per_s"),
            "unit": "requests/s",
        },  # fmt: skip
    ]


def _throughput_rows(raw: dict, serve_rate: list, pipe_rate: list, clients: int) -> list[dict]:
    rows = [
        {
            "metric": f"bertswarm-serve ({clients} clients, dynamic batching) ÷ pipeline loop (requests/s)",
            "values": [_ratio(s, p) for s, p in zip(serve_rate, pipe_rate, strict=True)],
            "goal": ">= 2.0",
        },
        {"metric": f"bertswarm-serve requests/s ({clients} clients)", "values": serve_rate, "unit": "requests/s"},
        {"metric": "pipeline loop requests/s (one at a time)", "values": pipe_rate, "unit": "requests/s"},
        {"metric": "bertswarm-serve latency p50", "values": _values(raw, "serve", "p50_s"), "unit": "s"},
        {"metric": "bertswarm-serve latency p99", "values": _values(raw, "serve", "p99_s"), "unit": "s"},
        {"metric": "pipeline loop latency p50 (one call)", "values": _values(raw, "pipeline", "p50_s"), "unit": "s"},
        {"metric": "pipeline loop latency p99 (one call)", "values": _values(raw, "pipeline", "p99_s"), "unit": "s"},
    ]
    if raw.get("pipeline_http"):
        http_rate = _values(raw, "pipeline_http", "requests_per_s")
        rows += [
            {
                "metric": "bertswarm-serve ÷ the pipeline served over the same HTTP stack one request at a time "
                "(requests/s, like-for-like)",
                "values": [_ratio(s, p) for s, p in zip(serve_rate, http_rate, strict=True)],
            },
            {"metric": f"pipeline over HTTP requests/s ({clients} clients)", "values": http_rate, "unit": "requests/s"},
            {"metric": "pipeline over HTTP latency p99", "values": _values(raw, "pipeline_http", "p99_s"), "unit": "s"},
        ]
    if raw.get("serve_mini") and raw.get("pipeline_mini"):
        mini_serve = _values(raw, "serve_mini", "requests_per_s")
        mini_pipe = _values(raw, "pipeline_mini", "requests_per_s")
        rows += [
            {
                "metric": f"mini preset: bertswarm-serve ({clients} clients) ÷ pipeline loop (requests/s)",
                "values": [_ratio(s, p) for s, p in zip(mini_serve, mini_pipe, strict=True)],
            },
            {"metric": "mini preset: bertswarm-serve requests/s", "values": mini_serve, "unit": "requests/s"},
            {"metric": "mini preset: pipeline loop requests/s", "values": mini_pipe, "unit": "requests/s"},
            {
                "metric": "mini preset: bertswarm-serve latency p99",
                "values": _values(raw, "serve_mini", "p99_s"),
                "unit": "s",
            },  # fmt: skip
        ]
    return rows


def run(workdir, reps: int, quick: bool) -> dict:
    workdir = Path(workdir)
    cfg = config(quick)
    tiny = _tiny()
    root = workdir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = publish(root, tiny, 1)
    mini_root = workdir / "checkpoints-mini"
    mini_root.mkdir()
    mini_checkpoint = publish(mini_root, _tiny("mini"), 1)
    inputs = texts(cfg["requests"])
    raw: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for rep in range(reps):
        for arm in ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]:
            log = workdir / f"{arm}-{rep}.log"
            try:
                if arm in ("serve", "serve_mini"):
                    result = serve_arm(mini_root if arm == "serve_mini" else root, log, cfg, inputs)
                elif arm in ("pipeline", "pipeline_mini"):
                    result = pipeline_arm(mini_checkpoint if arm == "pipeline_mini" else checkpoint, cfg, inputs)
                elif arm == "pipeline_http":
                    result = serve_arm(checkpoint, log, cfg, inputs, anchor=True)
                else:
                    load_root = workdir / f"load-{rep}"
                    load_root.mkdir()
                    result = load_arm(load_root, log, cfg, inputs, tiny)
            except Exception:
                result = {"error": traceback.format_exc()}
                print(result["error"], file=sys.stderr, flush=True)
            result["loadavg_1m_after"] = os.getloadavg()[0]
            raw[arm].append(result)
    notes = [
        f"Tiny preset checkpoint (product writer, shipped tokenizer). Throughput: {cfg['requests']} requests of one "
        f"masked sentence (5-17 words) from {cfg['clients']} concurrent aiohttp clients in the benchmark process "
        f"(latency measured by the client, so HTTP and JSON are included), after {cfg['warmup']} warm-up requests; "
        f"server `--max-batch {cfg['max_batch']} --batch-window-ms {cfg['batch_window_ms']:g}`. The pipeline loop "
        "calls `transformers.pipeline('fill-mask')` (top 5, as the server) on the same sentences in this process, "
        "no HTTP, with torch's default intra-op threads; the server runs its model on `--threads 0` (one fewer than "
        "the CPUs: 1 here). The clients run in this process and share the machine with the server.",
        "Extra rows (no goal; the goal's row stays the tiny preset ÷ the in-process loop): the same ratio on the mini "
        "preset, and the server ÷ the pipeline served one request at a time over the same HTTP stack (aiohttp on "
        "uvloop, a model thread, the same clients: `python -m bench.scenarios.serve CHECKPOINT PORT`).",
        f"Load test: {cfg['load_clients']} clients, each sending its next request as soon as the last is answered, for "
        f"{cfg['load_s']} s; a checkpoint every {cfg['publish_every_s']} s (the last at least that long before the "
        f"end), written by this process with the product's writer; the server polls every {cfg['poll_s']:g} s "
        "(`--poll-seconds`; the default is 5), so the lag includes up to one poll interval plus verifying and loading. "
        "A failed request is any answer other than 200 or a connection error; 'forward' checks each client's "
        "answers in order.",
    ]
    return {"config": cfg, "rows": build_rows(raw, cfg), "raw": raw, "notes": notes}


if __name__ == "__main__":
    pipeline_server(sys.argv[1], int(sys.argv[2]))
