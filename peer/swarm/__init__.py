"""Everything that touches hivemind: starting the DHT and its p2pd, join addresses, bertswarm's DHT records, the
swarm optimizer, the guards against faulty and lying peers, and ``hivemind_compat`` — the one module that patches or
reads hivemind internals, checked against the hivemind versions it was verified with. ``addresses`` validates
multiaddrs without importing hivemind, so a bad ``--join`` is answered before anything heavy loads."""
