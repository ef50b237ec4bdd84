"""``bertswarm-serve`` as a user runs it (``python -m serve``, real HTTP on 127.0.0.1): not ready until a checkpoint
appears, every 4xx, a new checkpoint swapped in while clients hammer the server (no failed request, steps only move
forward), a corrupted checkpoint refused while the old one keeps serving, a coordinator-style URL source, and a
graceful SIGTERM. Checkpoints come from the product's writer (tiny preset, shipped tokenizer); nothing is downloaded.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from peer.config import PeerConfig
from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
from peer.run.manifest import from_config
from peer.run.model import build_model
from peer.store.checkpoint import write_checkpoint

REPO = Path(__file__).resolve().parents[2]
TEXT = "the [MASK] of the function."


@pytest.fixture(scope="module")
def tiny():
    tok = default_tokenizer()
    manifest = from_config(PeerConfig().validate(), "test", tokenizer_fingerprint(tok), tok.get_vocab_size())
    return SimpleNamespace(tok=tok, manifest=manifest)


def publish(root: Path, tiny, epoch: int) -> Path:
    model = build_model(tiny.manifest.model, nsp=False, seed=epoch)  # other weights at every step
    return write_checkpoint(root, model, tiny.tok, tiny.manifest, epoch=epoch, samples_seen=epoch, eval_metrics={})


class Served:
    """One ``python -m serve`` process; always stopped and reaped by its PID."""

    def __init__(self, tmp_path: Path, checkpoints: str, *extra: str):
        self.log = tmp_path / "serve.log"
        self._out = open(self.log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "--checkpoints", checkpoints, "--port", "0", "--poll-seconds", "0.2",
             *extra],
            cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        self.url = None
        deadline = time.monotonic() + 40
        while self.url is None:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", self.log.read_text())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.log.read_text()}")
            else:
                time.sleep(0.05)

    def request(self, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict | str]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def wait_for_step(self, step: int, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            status, body = self.request("/readyz")
            if status == 200 and body["step"] >= step:
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"step {step} not served within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def metric(self, line_start: str) -> float:
        _, text = self.request("/metrics")
        return float(next(line for line in text.splitlines() if line.startswith(line_start)).split()[-1])

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(timeout=10)
        self._out.close()
        return code


@pytest.fixture()
def server_of(tmp_path):
    started = []

    def start(checkpoints, *extra):
        started.append(Served(tmp_path, str(checkpoints), *extra))
        return started[-1]

    yield start
    for served in started:
        served.stop(signal.SIGKILL)


@pytest.mark.timeout(90)
def test_serve_swap_under_load_refuse_corrupt_and_stop(tmp_path, tiny, server_of):
    root = tmp_path / "ckpt"
    root.mkdir()
    server = server_of(root)
    assert server.request("/healthz")[0] == 200
    assert server.request("/readyz")[0] == 503  # no checkpoint yet: fine, not ready
    status, body = server.request("/v1/fill-mask", {"inputs": [TEXT]})
    assert status == 503 and "no checkpoint loaded yet" in body["error"]

    publish(root, tiny, 1)
    server.wait_for_step(1, timeout=30)
    status, body = server.request("/v1/fill-mask", {"inputs": [TEXT, "a [MASK] here"]})
    assert status == 200 and body["step"] == 1 and len(body["outputs"]) == 2
    assert all(len(o) == 5 and set(o[0]) == {"score", "token", "token_str", "sequence"} for o in body["outputs"])

    # every 4xx, each with a one-line JSON reason
    cases = [
        ("/v1/fill-mask", None, b"{not json", 400, "body is not JSON"),
        ("/v1/fill-mask", {"text": "a"}, None, 400, 'body has no "inputs"'),
        ("/v1/fill-mask", {"inputs": "a [MASK]"}, None, 400, "not a list"),
        ("/v1/fill-mask", {"inputs": [1]}, None, 400, "not a string"),
        ("/v1/fill-mask", {"inputs": []}, None, 400, '"inputs" is empty'),
        ("/v1/fill-mask", {"inputs": [""]}, None, 400, "inputs[0] is empty"),
        ("/v1/fill-mask", {"inputs": ["no mask here"]}, None, 422, "has no [MASK] token"),
        ("/v1/fill-mask", {"inputs": ["word " * 600 + "[MASK]"]}, None, 422, "tokens long; the model takes at most"),
        ("/v1/fill-mask", {"inputs": [TEXT] * 33}, None, 413, "more than 32; split the request"),
        ("/v1/classify", {"inputs": ["a text"]}, None, 409, "needs a sequence-classification checkpoint"),
    ]
    for path, body, raw, status, reason in cases:
        got_status, got = server.request(path, body, raw)
        assert (got_status, reason in got["error"], "\n" in got["error"]) == (status, True, False), (path, body, got)

    # a new checkpoint while 4 clients hammer the server: no failure, steps never go back, the new step within 10 s
    results: dict[int, list] = {i: [] for i in range(4)}
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            results[i].append(server.request("/v1/fill-mask", {"inputs": [TEXT] * (1 + i)}))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.5)
        publish(root, tiny, 2)
        took = server.wait_for_step(2, timeout=10)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    answered = [r for rs in results.values() for r in rs]
    print(f"{len(answered)} requests during the swap; step 2 served {took:.2f}s after it was published")
    assert [r for r in answered if r[0] != 200] == []
    for rs in results.values():
        steps = [body["step"] for _, body in rs]
        assert steps == sorted(steps) and steps[-1] == 2 and all(len(body["outputs"]) == len(rs[0][1]["outputs"])
                                                                 for _, body in rs)  # fmt: skip
    assert server.metric('bertswarm_serve_reloads_total{outcome="loaded"}') == 2

    # a corrupted checkpoint (sha256 mismatch) is refused once; step 2 keeps serving
    staged = publish(tmp_path / "staging", tiny, 3)
    weights = staged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x01
    weights.write_bytes(bytes(data))
    os.rename(staged, root / staged.name)
    os.symlink(staged.name, root / ".tmp-latest-test")
    os.replace(root / ".tmp-latest-test", root / "latest")
    deadline = time.monotonic() + 15
    while server.metric('bertswarm_serve_reloads_total{outcome="refused"}') < 1:
        assert time.monotonic() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(1)  # several more polls: still one warning
    status, body = server.request("/v1/fill-mask", {"inputs": [TEXT]})
    assert status == 200 and body["step"] == 2
    warnings = [line for line in server.log.read_text().splitlines() if " WARNING " in line and "refusing" in line]
    assert len(warnings) == 1 and "model.safetensors is corrupt" in warnings[0], warnings
    assert server.metric("bertswarm_serve_checkpoint_step") == 2
    assert server.metric('bertswarm_serve_requests_total{code="200",endpoint="fill-mask"}') >= len(answered)
    assert server.metric("bertswarm_serve_batch_size_count") >= 1

    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.log.read_text()


@pytest.mark.timeout(60)
def test_serve_from_a_url(tmp_path, tiny, server_of):
    """A root served over HTTP (as a static server serves it; the coordinator's /checkpoints answers the same)."""
    root = tmp_path / "ckpt"
    publish(root, tiny, 4)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=static.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        server = server_of(f"http://127.0.0.1:{static.server_address[1]}")
        server.wait_for_step(4, timeout=30)
        status, body = server.request("/v1/fill-mask", {"inputs": [TEXT]})
        assert status == 200 and body["step"] == 4
        assert server.stop(signal.SIGINT) == 0
    finally:
        static.shutdown()
        static.server_close()
        thread.join(timeout=5)
