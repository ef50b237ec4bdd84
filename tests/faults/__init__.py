"""Fault and bad-input suite: volunteers crash, lie and leave. ``python -m tests.faults --repeat N`` runs every
scenario N times and writes ``docs/reliability.md``; ``tests/faults/test_faults.py`` runs each once under pytest."""
