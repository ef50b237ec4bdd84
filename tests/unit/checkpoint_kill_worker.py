"""Crash-test worker for ``peer.store.checkpoint``: write epoch 1, then SIGKILL itself inside the write of epoch 2.

    python -m tests.unit.checkpoint_kill_worker ROOT KILL_AT SOURCE

Writes ``epoch-000001`` under ROOT completely, then ``epoch-000002`` with ``keep=1`` (so the write also prunes epoch
1), killing itself with SIGKILL just before the KILL_AT-th write step (1-based). Write steps are the calls of
``os.mkdir/write/fsync/rename/symlink/replace/unlink/rmdir`` and of the safetensors and tokenizer writers.
``KILL_AT 0`` kills nowhere and prints the steps, in order, as a JSON list of names.

The weights, config, tokenizer and run of SOURCE (a checkpoint written by the test) are reused through
``write_state_checkpoint``, so the worker imports no hivemind and builds no model; transformers is imported only to
write the tokenizer files (``save_pretrained``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from peer.data.tokenizer import load_tokenizer
from peer.store import checkpoint
from peer.store.load import load_checkpoint

OS_STEPS = ("mkdir", "write", "fsync", "rename", "symlink", "replace", "unlink", "rmdir")
MODULE_STEPS = ("save_file", "save_tokenizer")  # names bound in peer.store.checkpoint


class KillSwitch:
    def __init__(self, kill_at: int):
        self.kill_at, self.steps = kill_at, []

    def wrap(self, name: str, real):
        def step(*args, **kwargs):
            self.steps.append(name)
            if len(self.steps) == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return step

    def install(self) -> None:
        for name in OS_STEPS:
            setattr(os, name, self.wrap(name, getattr(os, name)))
        for name in MODULE_STEPS:
            setattr(checkpoint, name, self.wrap(name, getattr(checkpoint, name)))


def main() -> None:
    root, kill_at, source = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    tensors, meta = load_checkpoint(source, None)
    config = json.loads((source / checkpoint.CONFIG_FILE).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(source)
    run = {key: meta[key] for key in ("run_id", "fingerprint", "manifest")}

    def write(epoch: int) -> None:
        checkpoint.write_state_checkpoint(
            root, tensors, config, tokenizer, run, epoch=epoch, samples_seen=100 * epoch, eval_metrics={}, keep=1
        )

    write(1)
    switch = KillSwitch(kill_at)
    switch.install()
    write(2)
    sys.stdout.write(json.dumps(switch.steps) + "\n")


if __name__ == "__main__":
    main()
