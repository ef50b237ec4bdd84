"""bertswarm coordinator: an optional observer that exports swarm metrics and publishes checkpoints.

It never contributes gradients, never decides anything for peers and never serves its state to joiners.
"""
