"""``make demo``: a local swarm of peers plus the coordinator on embedded defaults; at the end, a fill-mask
prediction from the newest published checkpoint."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from peer.localswarm import LocalPeer, follow

SENTENCE = "the function returns a [MASK] of the input."


def run_demo(peers: int, seconds: float, workdir: Path, checkpoint_every: int) -> int:
    started: list[LocalPeer] = []
    checkpoints = workdir / "checkpoints"
    try:
        first = LocalPeer("peer-0", workdir, ["--metrics-port", "9400"])
        started.append(first)
        address = first.wait_for_join_address(timeout=120)
        print(f"demo: swarm started; join it from this machine with:\n  bertswarm-peer --join {address} "
              "--state-dir <a new dir>", flush=True)  # fmt: skip
        for i in range(1, peers):
            started.append(LocalPeer(f"peer-{i}", workdir, ["--join", address, "--metrics-port", str(9400 + i)]))
        started.append(LocalPeer("coordinator", workdir, ["--join", address, "--checkpoint-dir", str(checkpoints),
                                                          "--checkpoint-every", str(checkpoint_every)],
                                 module="coordinator"))  # fmt: skip
        print(f"demo: {peers} peers and the coordinator for {seconds:.0f}s; logs in {workdir}/*.log; peer metrics "
              "on http://127.0.0.1:9400/metrics (and :9401, ...), swarm metrics and status on "
              "http://127.0.0.1:9500/metrics and /status", flush=True)  # fmt: skip
        follow(first.log_path, seconds, started, also=started[-1].log_path)
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        codes = [process.stop() for process in started]
    print(f"demo: everyone left (exit codes {codes})", flush=True)
    fill_mask(checkpoints)
    return 0 if all(code == 0 for code in codes) else 1


def fill_mask(checkpoints: Path) -> None:
    from peer.store.checkpoint import latest_path

    latest = latest_path(checkpoints)
    if latest is None:
        print("demo: no checkpoint was published (run longer: make demo DEMO_SECONDS=300)", flush=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    fill = pipeline("fill-mask", model=str(latest), tokenizer=str(latest))
    print(f"demo: fill-mask with {latest.name}: {SENTENCE!r} -> {format_guesses(fill(SENTENCE))}", flush=True)


def format_guesses(predictions: list[dict]) -> str:
    """``token (probability)`` per guess, in percent to two significant digits: after the demo's few minutes from
    scratch every guess is far below 0.1% (a fixed ``.3f`` printed them all as 0.000)."""
    return ", ".join(f"{p['token_str']} ({100 * p['score']:.2g}%)" for p in predictions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.demo", description="Run the local demo swarm.")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--workdir", type=Path, default=Path("demo-state"))
    parser.add_argument("--checkpoint-every", type=int, default=10)
    args = parser.parse_args(argv)
    return run_demo(args.peers, args.seconds, args.workdir, args.checkpoint_every)


if __name__ == "__main__":
    sys.exit(main())
