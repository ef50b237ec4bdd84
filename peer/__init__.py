"""bertswarm peer: train BERT with masked language modelling in a hivemind swarm.

Layers, lowest first; each imports only the ones below it (``tests/unit/test_layers.py`` checks):

- ``peer.errors`` — the one user-facing error type (and ``peer.store.atomic``, the one atomic write, a leaf that
  every layer may use);
- ``peer.run`` — what a run is: manifest, wire schema, presets, model builder;
- ``peer.data`` — text sources, embedded corpus, tokenizer, MLM batches;
- ``peer.store`` — atomic writes, local state, checkpoints;
- ``peer.swarm`` — everything that touches hivemind;
- the running peer on top: ``config``, ``cli``, ``join``, ``trainer``, ``progress``, ``telemetry``, ``hooks``,
  ``localswarm``. ``peer.testing`` (test-only fault hooks) is not shipped.
"""

__version__ = "0.1.0"
