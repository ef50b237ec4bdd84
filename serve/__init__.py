"""``bertswarm-serve``: answer fill-mask and classification requests over HTTP with a run's newest checkpoint.

Modules: ``config`` (every setting once; the CLI is generated from it, as for the peer), ``cli`` (entry point, one
line and exit 2 for user errors), ``metrics`` (the Prometheus names, declared once), ``model`` (a verified checkpoint
in memory and its batched inference), ``source`` (where checkpoints come from: a checkpoint root or a coordinator's
URL), ``batcher`` (dynamic batching on one inference thread), ``app`` (the aiohttp app and the hot-reload watcher).
It imports only public modules of ``peer`` (never ``peer.testing``), like ``coordinator``.
"""
