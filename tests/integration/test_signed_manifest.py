"""A forged manifest and a second run in the DHT change nothing for a volunteer who joins through a live peer: it
adopts the manifest signed by the run's creator, says what it ignored, and pins the creator's key."""

from __future__ import annotations

import json

import pytest

from peer import join
from peer.config import PeerConfig
from peer.swarm import dht as swarm_dht
from peer.swarm import identity, records

from .conftest import Swarm


@pytest.mark.swarm
@pytest.mark.timeout(180)
def test_forged_manifests_and_other_runs_change_nothing_for_a_joiner(tmp_path, small_corpus):
    swarm = Swarm(tmp_path, small_corpus)
    attacker = None
    try:
        creator = swarm.start("creator")
        creator.wait_for_join_address(timeout=60)

        # an attacker in the same DHT: a copy of the run's manifest with its own settings, signed with its own key
        # (a valid DHT record under its own subkey), and a second run registered next to it
        cfg = PeerConfig(join=[creator.join_address], state_dir=str(tmp_path / "attacker"), client_mode=True)
        attacker = swarm_dht.start_dht(cfg.validate(), records.registry_validators())
        found = join.wait_for_run(attacker, None, 30, bootstrap=join.bootstrap_peer_ids(cfg.join))
        real = found.manifest
        own_key = identity.load_identity_key(cfg.identity_path)
        for run in (real.model_copy(update={"lr": 0.5}), real.model_copy(update={"run_id": "evil"})):
            subkey = records.install_run_validators(attacker, run.run_id)
            records.publish_manifest(attacker, records.sign_manifest(run, own_key), subkey)
        assert sorted(records.discover_runs(attacker)) == ["bertswarm", "evil"]

        joiner = swarm.start("joiner", join=creator)  # no --run-id
        swarm.wait_until("the joiner to step", lambda: swarm.epoch(joiner) >= 1, timeout=90)
        log = joiner.log_tail(400)
        assert f"run bertswarm, manifest {real.fingerprint[:12]}" in log
        assert "ignored 1 copy of its manifest not signed by its creator" in log
        assert "the swarm hosts runs bertswarm, evil; joining bertswarm, the run of the peer you joined through" in log
        pins = json.loads((joiner.state_dir / join.TRUST_FILE).read_text())
        assert pins == {"bertswarm": found.signed.creator}
        assert "Traceback" not in log
    finally:
        if attacker is not None:
            swarm_dht.stop_dht(attacker)
        swarm.close()
