"""What one run *is*, with no I/O: the run manifest every peer of a run shares (typed, bounded, fingerprinted), the
wire schema of bertswarm's DHT records, the model presets and the manifest → BERT builder. The lowest layer: it
imports nothing of bertswarm but ``peer.errors``, and nothing of hivemind."""
