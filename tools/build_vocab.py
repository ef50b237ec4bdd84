"""Regenerate the shipped WordPiece vocabulary ``peer/assets/vocab.txt`` from the default corpus.

Deterministic: on the same installed Python and packages (same default corpus, see ``vocab.meta.json``) it rewrites
byte-identical files. Run from the repository root:

    .venv/bin/python tools/build_vocab.py            # rewrite peer/assets/vocab.txt and vocab.meta.json
    .venv/bin/python tools/build_vocab.py --check    # exit 1 if the shipped vocabulary differs from a rebuild

The vocabulary is trained on the training split only (``split_heldout``), so held-out perplexity is not flattered.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import tokenizers

from peer.data.corpus import corpus_fingerprint, split_heldout
from peer.data.embedded import default_corpus
from peer.data.tokenizer import (
    DEFAULT_VOCAB_PATH,
    DEFAULT_VOCAB_SIZE,
    build_tokenizer,
    tokenizer_fingerprint,
    vocab_tokens,
)

META_PATH = DEFAULT_VOCAB_PATH.with_name("vocab.meta.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokens in the vocabulary")
    parser.add_argument("--output", type=Path, default=DEFAULT_VOCAB_PATH, help="vocab.txt to write")
    parser.add_argument("--check", action="store_true", help="only compare a rebuild with --output; exit 1 if unequal")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    documents = default_corpus()
    train, _ = split_heldout(documents)
    tokenizer = build_tokenizer(train, vocab_size=args.vocab_size)
    vocab_text = "".join(f"{token}\n" for token in vocab_tokens(tokenizer))
    meta = {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "corpus_fingerprint": corpus_fingerprint(documents),
        "corpus_documents": len(documents),
        "corpus_train_documents": len(train),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
    }
    elapsed = time.perf_counter() - started

    if args.check:
        shipped = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        same = shipped == vocab_text
        print(f"{args.output}: {'matches' if same else 'DIFFERS FROM'} a rebuild ({elapsed:.1f} s)")
        return 0 if same else 1

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(vocab_text, encoding="utf-8")
    if args.output == DEFAULT_VOCAB_PATH:
        META_PATH.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {meta['vocab_size']} tokens, fingerprint {meta['tokenizer_fingerprint']}")
    print(f"corpus: {len(documents)} documents ({len(train)} for training), built in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
