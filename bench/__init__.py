"""Side-by-side benchmarks of the swarm against single-process training and DDP (``python -m bench``).

Every claim is a ratio of arms measured in the same run on the same machine, interleaved, median of >= 3 repetitions.
Raw results go to ``bench/results/<scenario>.json``; ``docs/performance.md`` is generated from them.
"""
