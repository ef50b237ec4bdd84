"""Crash-test worker for ``peer.store.checkpoint``: write epoch 1, then SIGKILL itself inside the write of epoch 2.

    python -m tests.unit.checkpoint_kill_worker BASE SOURCE KILL_AT...

For each KILL_AT, a child forked from this process (which imported and loaded everything once: an import of torch
and transformers per kill point cost most of the test's time) writes ``epoch-000001`` under ``BASE/at-NN``
completely, then ``epoch-000002`` with ``keep=1`` (so the write also prunes epoch 1), killing itself with SIGKILL just
before the KILL_AT-th write step (1-based). Write steps are the calls of
``os.mkdir/write/fsync/rename/symlink/replace/unlink/rmdir`` and of the safetensors and tokenizer writers.
``KILL_AT 0`` kills nowhere and prints the steps, in order, as a JSON list of names. The worker prints one JSON line
per kill point: ``{"step": N, "returncode": ..., "out": ...}`` (returncode as ``subprocess`` gives it: -9 for SIGKILL).

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


def run_one(root: Path, kill_at: int, tensors, config, tokenizer, run) -> None:
    """In a forked child: the two writes, killed at ``kill_at``; exits 0 having printed the steps when not killed."""

    def write(epoch: int) -> None:
        checkpoint.write_state_checkpoint(
            root, tensors, config, tokenizer, run, epoch=epoch, samples_seen=100 * epoch, eval_metrics={}, keep=1
        )

    write(1)
    switch = KillSwitch(kill_at)
    switch.install()
    write(2)
    sys.stdout.write(json.dumps(switch.steps) + "\n")


def main() -> None:
    base, source, kill_points = Path(sys.argv[1]), Path(sys.argv[2]), [int(a) for a in sys.argv[3:]]
    tensors, meta = load_checkpoint(source, None)
    config = json.loads((source / checkpoint.CONFIG_FILE).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(source)
    run = {key: meta[key] for key in ("run_id", "fingerprint", "manifest")}
    for kill_at in kill_points:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its stdout and stderr go to the pipe
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            code = 0
            try:
                run_one(base / f"at-{kill_at:02d}", kill_at, tensors, config, tokenizer, run)
            except BaseException as e:  # reported through the pipe, as a crash of the child
                sys.stderr.write(f"{e!r}\n")
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        os.close(write)
        with os.fdopen(read, "r", errors="replace") as pipe:
            out = pipe.read()
        _, status = os.waitpid(pid, 0)
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"step": kill_at, "returncode": returncode, "out": out}), flush=True)


if __name__ == "__main__":
    main()
