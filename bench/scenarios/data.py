"""Scenario 9: prepared data (``bertswarm-prepare``, ``--data DIR``). Three measurements, each a ratio within one run:

1. Preparation throughput (tokens/s) with 1 and 2 workers ÷ the anchor, a plain ``tokenizers`` ``encode_batch`` loop
   over the same documents, one thread; goal ≥ 0.9 per worker. The corpus is generated offline from the embedded
   corpus (each document's words reshuffled with a seeded generator, so documents are unique and de-duplication keeps
   them). Every arm runs in its own process with the tokenizer's thread pool off, arms interleaved.
2. A real peer's start-up (process start → its first trained micro-batch, from its Prometheus metrics) and its main
   process's peak RSS (``VmHWM``) with prepared datasets of 10 MB, 1 GB and 5 GB of shards; goal for 5 GB ÷ 10 MB:
   ≤ 1.1 for both. The shards are synthesised (random token rows in the layout ``bertswarm-prepare`` writes, 8 MB
   each, real sha256 and index): preparing 5 GB of text would take hours on 2 cores and measures nothing new here.
3. The time a training step waits for its batch ÷ the step's time (tiny model, forward, backward and AdamW step on
   the same batches, one thread), over the 1 GB dataset's stream; goal ≤ 1 %.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, free_port
from peer.localswarm import LocalPeer

NAME = "data"
TITLE = "9. Prepared data: preparation throughput, peer start-up and memory vs dataset size, batch wait"

SEQ_LEN = 128
SHARD_BYTES = 8 * 2**20  # what bertswarm-prepare's default shard_chars gives (~4M uint16 tokens)
SIZES = {"10MB": 10 * 2**20, "1GB": 2**30, "5GB": 5 * 2**30}
CORPUS_BYTES = 24 * 2**20  # text for the preparation arms
PREP_SHARD_CHARS = 2_000_000  # ~12 shards of that text, so 2 workers have work to share
THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


# --- the corpus and the datasets ------------------------------------------------------------------------------------


def write_corpus(path: Path, target_bytes: int) -> int:
    """A ``.jsonl`` of unique documents made from the embedded corpus; returns its size in bytes."""
    from peer.data import embedded

    sources = [doc.split() for doc in embedded.default_corpus() if len(doc.split()) >= 8]
    rng = random.Random(13)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            words = list(rng.choice(sources))
            rng.shuffle(words)
            line = json.dumps({"text": " ".join(words)}) + "\n"
            f.write(line)
            size += len(line.encode())
    return size


def synthesise_dataset(path: Path, total_bytes: int) -> None:
    """A prepared dataset of ``total_bytes`` of uint16 shards in ``bertswarm-prepare``'s layout (random rows)."""
    from peer.data import shards
    from peer.data.tokenizer import TokenizerInfo, default_tokenizer, tokenizer_fingerprint

    tokenizer = default_tokenizer()
    info = TokenizerInfo.of(tokenizer)
    path.mkdir(parents=True)
    rng = np.random.default_rng(7)
    rows_per_shard = max(1, SHARD_BYTES // (2 * SEQ_LEN))
    entries, remaining, number = [], total_bytes, 0
    while remaining > 0:
        rows = max(1, min(rows_per_shard, remaining // (2 * SEQ_LEN)))
        array = rng.integers(info.first_regular_id, info.vocab_size, size=(rows, SEQ_LEN), dtype=np.uint16)
        array[:, 0], array[:, -1] = info.cls_id, info.sep_id
        name = shards.train_shard_name(number)
        np.save(path / name, array)
        entries.append(shards.ShardEntry(name=name, rows=rows, tokens=rows * (SEQ_LEN - 2),
                                         sha256=shards.file_sha256(path / name)))  # fmt: skip
        remaining -= array.nbytes
        number += 1
    index = shards.DatasetIndex(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=info.vocab_size,
                                seq_len=SEQ_LEN, nsp=False, dtype="uint16", shards=entries, heldout=None,
                                stats={"synthesised": 1})  # fmt: skip
    (path / shards.INDEX_NAME).write_text(index.to_json())


# --- 1. preparation throughput --------------------------------------------------------------------------------------

_PREP_ARM = r"""
import json, sys, time
from pathlib import Path
arm, corpus, out = sys.argv[1], sys.argv[2], sys.argv[3]
from peer.data.tokenizer import default_tokenizer
tokenizer = default_tokenizer()
if arm == "anchor":
    documents = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(documents), 1000):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch(documents[i : i + 1000], add_special_tokens=False))
    seconds = time.perf_counter() - started
else:
    from peer.data.prepare import prepare_dataset
    result = prepare_dataset([corpus], out, tokenizer, seq_len=128, workers=int(arm), shard_chars=int(sys.argv[4]))
    tokens, seconds = result.stats.tokens, result.seconds
print(json.dumps({"tokens": tokens, "seconds": seconds}))
"""


def prep_arm(arm: str, corpus: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **THREAD_ENV)
    done = subprocess.run([sys.executable, "-c", _PREP_ARM, arm, str(corpus), str(out), str(PREP_SHARD_CHARS)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"preparation arm {arm} failed:\n{done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["tokens_per_s"] = figures["tokens"] / figures["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return figures


# --- 2. peer start-up and memory ------------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peer_arm(workdir: Path, name: str, dataset: Path) -> dict:
    port = free_port()
    args = ["--data", str(dataset), "--threads", "1", "--save-every", "0", "--log-every", "1", "--run-id", name,
            "--seq-len", str(SEQ_LEN), "--metrics-port", str(port)]  # fmt: skip
    started = time.monotonic()
    peer = LocalPeer(name, workdir, args)
    try:
        deadline = started + 180
        while True:
            if not peer.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"peer on {dataset.name} trained nothing:\n{peer.log_tail()}")
            try:
                samples = _metric(peer.metrics(port), "bertswarm_peer_samples_total")
            except OSError:
                samples = None
            if samples:
                break
            time.sleep(0.1)
        return {"startup_s": time.monotonic() - started, "peak_rss_mib": _peak_rss_mib(peer.proc.pid)}
    finally:
        peer.stop()
        shutil.rmtree(workdir / name, ignore_errors=True)


# --- 3. batch wait ÷ step time --------------------------------------------------------------------------------------


def batch_wait(dataset: Path, batches: int) -> dict:
    import torch

    from bench.workload import make_manifest
    from peer.data.shards import PreparedDataset
    from peer.data.stream import ShardStream
    from peer.data.tokenizer import TokenizerInfo, default_tokenizer
    from peer.run.model import build_model, pretraining_loss
    from peer.run.presets import PRESETS

    torch.set_num_threads(1)
    info = TokenizerInfo.of(default_tokenizer())
    stream = ShardStream(PreparedDataset.open(dataset), info, batch_size=PRESETS["tiny"].batch_size, seed=1,
                         me=b"bench")  # fmt: skip
    run = make_manifest("bench-data", "tiny", SEQ_LEN)
    model = build_model(run.model, nsp=False, seed=run.init_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    waits, steps = [], []
    for _ in range(batches):
        t0 = time.perf_counter()
        batch = next(stream)
        t1 = time.perf_counter()
        loss = pretraining_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        waits.append(t1 - t0)
        steps.append(time.perf_counter() - t0)
    return {"wait_s": statistics.mean(waits), "step_s": statistics.mean(steps), "max_wait_s": max(waits),
            "ratio": sum(waits) / sum(steps)}  # fmt: skip


# --- the scenario ---------------------------------------------------------------------------------------------------


def run(workdir, reps: int, quick: bool) -> dict:
    workdir = Path(workdir)
    sizes = {"10MB": SIZES["10MB"], "1GB": 64 * 2**20} if quick else SIZES
    corpus = workdir / "corpus.jsonl"
    corpus_bytes = write_corpus(corpus, 4 * 2**20 if quick else CORPUS_BYTES)
    datasets = {}
    for label, size in sizes.items():
        datasets[label] = workdir / f"prepared-{label}"
        synthesise_dataset(datasets[label], size)
    raw: dict[str, list] = {"anchor": [], "prep_1": [], "prep_2": [], "batch_wait": []}
    raw.update({f"peer_{label}": [] for label in sizes})
    prep_order = ["anchor", "1", "2"]
    peer_order = list(sizes)
    for rep in range(reps):
        for arm in prep_order[rep % 3 :] + prep_order[: rep % 3]:
            figures = prep_arm(arm, corpus, workdir / "prep-out")
            raw["anchor" if arm == "anchor" else f"prep_{arm}"].append(figures)
            print(f"  rep {rep + 1} prep {arm}: {figures['tokens_per_s']:.0f} tokens/s", flush=True)
        for label in peer_order[rep % len(peer_order) :] + peer_order[: rep % len(peer_order)]:
            figures = peer_arm(workdir, f"peer{rep}{label}", datasets[label])
            raw[f"peer_{label}"].append(figures)
            print(f"  rep {rep + 1} peer {label}: start-up {figures['startup_s']:.1f}s, "
                  f"peak RSS {figures['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
        raw["batch_wait"].append(batch_wait(datasets[list(sizes)[1]], 50 if quick else 100))
        print(f"  rep {rep + 1} batch wait ÷ step: {raw['batch_wait'][-1]['ratio']:.4f}", flush=True)
    for path in datasets.values():
        shutil.rmtree(path, ignore_errors=True)
    big = list(sizes)[-1]
    rows = build_rows(raw, big)
    notes = [
        f"Preparation: {corpus_bytes / 2**20:.0f} MiB of generated text (embedded corpus documents with their words "
        f"reshuffled, seed 13), tiny vocabulary, seq_len 128, shards of {PREP_SHARD_CHARS / 1e6:.0f}M characters; "
        "each arm a fresh process with TOKENIZERS_PARALLELISM=false and RAYON_NUM_THREADS=1. The anchor times "
        "`encode_batch` alone (documents already in memory); the preparation arms time everything "
        "(reading, cleaning, de-duplication, hashing, tokenising, packing, writing shards and their sha256).",
        f"Start-up and memory: `bertswarm-peer --data DIR` alone (a new swarm), 1 thread, from process start to its "
        f"first trained micro-batch (`bertswarm_peer_samples_total` > 0); peak RSS is the main process's VmHWM then. "
        f"Datasets: {', '.join(sizes)} of synthesised uint16 shards of {SHARD_BYTES >> 20} MiB (random token rows "
        "in bertswarm-prepare's layout, real sha256 and index.json).",
        "Batch wait: `ShardStream` over the 1 GB dataset (its first shard verified at open), tiny model on the same "
        "batches (forward, backward, AdamW step), 1 thread; wait = time in `next(stream)`.",
    ]
    return {"config": {"seq_len": SEQ_LEN, "sizes": sizes, "corpus_bytes": corpus_bytes}, "rows": rows, "raw": raw,
            "notes": notes}  # fmt: skip


def build_rows(raw: dict, big: str) -> list[dict]:
    """The report's rows (pure; unit-tested): ratios taken within each repetition."""

    def per_rep(key: str, field: str) -> list:
        return [f.get(field) for f in raw.get(key, [])]

    def ratio(a: list, b: list, scale: float = 1.0) -> list:
        return [x / (scale * y) if x is not None and y else float("nan") for x, y in zip(a, b, strict=False)]

    anchor = per_rep("anchor", "tokens_per_s")
    rows = [
        {"metric": "preparation, 1 worker ÷ tokenizers encode_batch (tokens/s)", "goal": ">= 0.9",
         "values": ratio(per_rep("prep_1", "tokens_per_s"), anchor)},
        {"metric": "preparation, 2 workers ÷ (2 × tokenizers encode_batch) (tokens/s per worker)", "goal": ">= 0.9",
         "values": ratio(per_rep("prep_2", "tokens_per_s"), anchor, 2.0)},
        {"metric": "tokenizers encode_batch, one thread", "unit": "tokens/s", "values": anchor},
        {"metric": f"peer start-up, {big} ÷ 10MB prepared dataset", "goal": "<= 1.1",
         "values": ratio(per_rep(f"peer_{big}", "startup_s"), per_rep("peer_10MB", "startup_s"))},
        {"metric": f"peer peak RSS, {big} ÷ 10MB prepared dataset", "goal": "<= 1.1",
         "values": ratio(per_rep(f"peer_{big}", "peak_rss_mib"), per_rep("peer_10MB", "peak_rss_mib"))},
    ]  # fmt: skip
    for key in [k for k in raw if k.startswith("peer_")]:
        label = key.removeprefix("peer_")
        rows.append({"metric": f"peer start-up, {label}", "unit": "s", "values": per_rep(key, "startup_s")})
        rows.append({"metric": f"peer peak RSS, {label}", "unit": "MiB", "values": per_rep(key, "peak_rss_mib")})
    rows += [
        {"metric": "batch wait ÷ training step time", "goal": "<= 0.01", "values": per_rep("batch_wait", "ratio")},
        {"metric": "batch wait, longest single batch", "unit": "s", "values": per_rep("batch_wait", "max_wait_s")},
        {"metric": "training step (tiny, 1 thread)", "unit": "s", "values": per_rep("batch_wait", "step_s")},
    ]
    return rows
