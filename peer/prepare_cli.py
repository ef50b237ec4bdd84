"""``bertswarm-prepare``: turn text into a prepared dataset directory that ``bertswarm-peer --data DIR`` trains on.

The flags are generated from :class:`PrepareConfig` (the peer's generator, so ``--data``, ``--tokenizer``,
``--seq-len`` and ``--nsp`` mean what they mean to the peer). User errors print one line on stderr and exit 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from peer.cli import build_parser, parse_config, run_command, setup_logging
from peer.config import setting
from peer.errors import InputError, UserError

GROUPS = {"input": "what to prepare", "output": "the prepared dataset"}
DESCRIPTION = (
    "Prepare training text once (clean, de-duplicate, tokenise, pack into memory-mapped shards, hold out an "
    "evaluation split) into a directory that peers pass as --data. Re-running it resumes: finished shards are kept."
)


@dataclass
class PrepareConfig:
    data: list[str] = setting(
        "text to prepare: files, directories or globs of .txt / .jsonl (field 'text'), or hf:NAME[:CONFIG][:SPLIT] "
        "(streamed) (repeatable, required)",
        default_factory=list,
        metavar="PATH",
        group="input",
    )
    tokenizer: str | None = setting(
        "WordPiece vocab.txt or tokenizer.json (default: the shipped 8192-token uncased vocab)",
        default=None,
        metavar="PATH",
        group="input",
    )
    seq_len: int = setting("tokens per training sequence (the run's --seq-len)", default=128, group="input")
    nsp: bool = setting("pack next-sentence-prediction pairs (the run's --nsp)", default=False, group="input")
    output: str = setting("directory to write (created; re-running resumes)", default="", metavar="DIR",
                          group="output")  # fmt: skip
    workers: int = setting(
        "tokenising processes (default: one per CPU core)",
        default_factory=lambda: len(os.sched_getaffinity(0)),
        metavar="N",
        group="output",
    )
    shard_mb: float = setting("megabytes of text per shard", default=16.0, metavar="MB", group="output")
    heldout_fraction: float = setting(
        "share of documents held out for evaluation (chosen by a hash of their text)", default=0.02, group="output"
    )

    def validate(self) -> PrepareConfig:
        if not self.data:
            raise UserError("--data is required: pass the text files, directories, globs or hf: datasets to prepare")
        if not self.output:
            raise UserError("--output is required: pass the directory to write the prepared dataset to")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: must be a positive integer")
        if not 8 <= self.seq_len <= 512:
            raise UserError(f"--seq-len {self.seq_len}: must be between 8 and 512 (BERT position embeddings)")
        if not self.shard_mb > 0:
            raise UserError(f"--shard-mb {self.shard_mb}: must be > 0")
        if not 0.0 <= self.heldout_fraction < 0.5:
            raise UserError(f"--heldout-fraction {self.heldout_fraction}: must be in [0, 0.5), e.g. 0.02")
        return self


def _progress_bar():
    """A tqdm bar (stderr) of documents, tokens and tokens/s; tqdm is already a dependency of transformers."""
    from tqdm import tqdm

    bar = tqdm(unit=" docs", desc="preparing", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(stats, seconds: float) -> None:
        bar.update(stats.documents_read - bar.n)
        bar.set_postfix_str(f"{stats.tokens / 1e6:.1f}M tokens, {stats.tokens / max(seconds, 1e-9) / 1e3:.0f}k tok/s",
                            refresh=False)  # fmt: skip

    return bar, update


def run(cfg: PrepareConfig) -> None:
    from peer.data.prepare import prepare_dataset
    from peer.data.tokenizer import default_tokenizer, load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else default_tokenizer()
    except InputError as e:
        raise e.with_flag("--tokenizer") from None
    bar, update = _progress_bar()
    try:
        result = prepare_dataset(cfg.data, cfg.output, tokenizer, seq_len=cfg.seq_len, nsp=cfg.nsp,
                                 workers=cfg.workers, shard_chars=int(cfg.shard_mb * 1e6),
                                 heldout_fraction=cfg.heldout_fraction, progress=update)  # fmt: skip
    except InputError as e:
        raise e.with_flag("--data") from None
    except OSError as e:  # reading input is answered above; this is the output directory or the disk
        raise UserError(f"--output {cfg.output}: cannot write the dataset ({e.strerror or e}); pick a writable "
                        "directory with free space") from None  # fmt: skip
    finally:
        bar.close()
    index, stats = result.index, result.stats
    heldout_rows = index.heldout.rows if index.heldout else 0
    rate = stats.tokens / max(result.seconds, 1e-9) / 1e3
    print(f"bertswarm-prepare: {cfg.output}: {len(index.shards)} shards, {index.num_tokens} tokens, held-out "
          f"{heldout_rows} rows, fingerprint {index.fingerprint[:12]}; {stats.summary()}; {result.seconds:.1f}s "
          f"({rate:.0f}k tokens/s)", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser(PrepareConfig, "bertswarm-prepare", DESCRIPTION, GROUPS)
        cfg, _ = parse_config(argv, parser=parser, config_cls=PrepareConfig)
        setup_logging()
        run(cfg)

    return run_command("bertswarm-prepare", body, "interrupted (finished shards are kept; run it again to resume)")


if __name__ == "__main__":
    sys.exit(main())
