"""DHT records are strict and bounded: a lying peer cannot store absurd metrics."""

import time

import pytest
from pydantic.v1 import ValidationError

from peer import telemetry
from peer.run import schema
from peer.run.model import build_model, count_parameters
from peer.run.presets import PRESETS


def valid(**kw):
    base = dict(
        epoch=3,
        samples_per_second=12.5,
        samples_total=1000,
        loss=6.2,
        mini_steps=10,
        time=time.time(),
        client_mode=False,
    )
    base.update(kw)
    return base


def test_valid_metrics_record():
    assert schema.PeerMetrics(**valid()).epoch == 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("samples_per_second", 1e12),
        ("loss", float("nan")),
        ("loss", -1.0),
        ("epoch", -1),
        ("epoch", 2.5),
        ("samples_total", 10**18),
        ("client_mode", "no"),
    ],
)
def test_absurd_values_are_rejected(field, value):
    with pytest.raises(ValidationError):
        schema.PeerMetrics(**valid(**{field: value}))


def test_metric_names_follow_prometheus_conventions():
    registry = telemetry.PeerTelemetry().registry
    names = {m.name for m in registry.collect()}
    for required in (
        "bertswarm_peer_epoch",
        "bertswarm_peer_loss",
        "bertswarm_peer_samples_per_second",
        "bertswarm_peer_samples",
        "bertswarm_peer_averaging_rounds",
        "bertswarm_peer_swarm_size",
    ):
        assert required in names
    exposition = set()
    for metric in registry.collect():
        exposition.update(sample.name for sample in metric.samples)
    assert "bertswarm_peer_samples_total" in exposition
    assert "bertswarm_peer_averaging_rounds_total" in exposition
    assert all(n.startswith("bertswarm_") for n in exposition)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    p = PRESETS[name]
    if name in ("base", "large"):
        # build on the meta device: shapes without 1.3 GB of memory
        import torch

        with torch.device("meta"):
            model = build_model(_model(p), nsp=False, seed=0)
    else:
        model = build_model(_model(p), nsp=False, seed=0)
    params = count_parameters(model)
    expected = {"tiny": (1.0e6, 2.5e6), "mini": (5e6, 15e6), "base": (80e6, 120e6), "large": (280e6, 360e6)}[name]
    assert expected[0] < params < expected[1]


def _model(p):
    return dict(
        vocab_size=8192,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        intermediate_size=p.intermediate_size,
    )
