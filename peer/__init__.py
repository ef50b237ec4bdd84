"""bertswarm peer: train BERT with masked language modelling in a hivemind swarm."""

__version__ = "0.1.0"
