"""One module per scenario; each exposes ``NAME``, ``TITLE`` and ``run(workdir, reps, quick) -> dict``."""

import importlib

NAMES = [
    "throughput",
    "averaging_round",
    "quality",
    "join",
    "slowlink",
    "dht",
    "scaling",
    "diloco",
    "data",
    "serve",
    "finetune",
    "robust",
    "attack",
    "stopping",
    "nat",
    "loss_head",
]


def load(name: str):
    return importlib.import_module(f"bench.scenarios.{name}")
