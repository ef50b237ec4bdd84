"""Each fault scenario once, in order, on one shared swarm (``Session``): the scenarios leave it healthy for the next,
so ``make test`` pays for one swarm start. ``python -m tests.faults`` repeats them and reports figures."""

from __future__ import annotations

import pytest

from tests.faults import scenarios
from tests.faults.bad_input import bad_inputs
from tests.faults.harness import SIZE, Session

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def session(tmp_path_factory, small_corpus):
    s = Session(tmp_path_factory.mktemp("faults"), small_corpus)
    try:
        s.start()
        yield s
    finally:
        s.close()


@pytest.fixture
def healthy(session):
    """Each scenario starts from SIZE live peers, even when the previous one failed half-way."""
    session.heal()
    assert len(session.live) >= SIZE
    return session


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))  # in order: each leaves the swarm ready for the next
def test_scenario(session, name):
    if name != "late_joiner":  # the late joiner itself brings the swarm back to SIZE after a crash
        session.heal()
    print(f"{name}: {scenarios.SCENARIOS[name](session)}")


@pytest.mark.timeout(400)
def test_bad_inputs(healthy, tmp_path):
    healthy.stop_coordinator()
    print(f"bad_inputs: {bad_inputs(healthy, tmp_path, healthy.swarm.corpus)}")
