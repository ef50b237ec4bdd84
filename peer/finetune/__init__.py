"""Fine-tuning and evaluating the swarm's checkpoints (see the submodules)."""
