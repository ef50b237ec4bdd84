"""Join authorisation on a live swarm (``--allow``): a peer off the creator's allowlist is refused in one line with
exit code 2; an outsider that ignores the refusal (modified code) never gets into a group, never downloads state and
never contributes a part; the creator edits the list while the run goes on, and a peer it adds joins, a peer it
removes stops with exit code 2."""

from __future__ import annotations

import time

import pytest
from hivemind.p2p import P2P

from peer.swarm import identity

from .conftest import Swarm
from .test_doctor import doctor

REJECTED = "bertswarm_peer_rejected_contributions_total"


def _new_peer_id(state_dir) -> str:
    """Give a peer its identity before it starts (as a volunteer would run it once and send its id to the creator)."""
    state_dir.mkdir(parents=True)
    P2P.generate_identity(str(state_dir / "identity.key"))
    key = identity.load_identity_key(state_dir / "identity.key")
    return identity.peer_id_of_public_key(key.get_public_key()).to_base58()


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_only_peers_on_the_allowlist_take_part(tmp_path, small_corpus):
    swarm = Swarm(tmp_path, small_corpus)
    try:
        member, stranger = _new_peer_id(tmp_path / "member"), _new_peer_id(tmp_path / "stranger")
        allow = tmp_path / "allow.txt"
        allow.write_text(f"# the run's volunteers\n{member}\n")
        creator = swarm.start("creator", "--allow", str(allow))
        creator.wait_for_join_address(timeout=60)
        joined = swarm.start("member", join=creator)
        # the doctor tells the stranger before it tries (with its own peer id, not the doctor's throw-away one)
        diagnosis = doctor("--join", creator.join_address, "--state-dir", str(tmp_path / "stranger"))
        assert diagnosis.returncode == 1
        assert stranger in diagnosis.stdout and "is not on its allowlist" in diagnosis.stdout
        refused = swarm.start("stranger", join=creator)
        assert refused.wait(timeout=90) == 2
        lines = [line for line in refused.log_tail(50).splitlines() if line.strip()]
        assert "is restricted to its creator's allowlist and this peer" in lines[-1], lines[-5:]
        assert stranger in lines[-1] and "Traceback" not in refused.log_tail(200)
        swarm.peers.remove(refused)

        # an outsider running modified code: it ignores the refusal and tries to lead, join and download. Its
        # gradients are NaN, so any part of it that reached an all-reduce would be counted as non_finite.
        hostile = {"BERTSWARM_TEST_IGNORE_ALLOWLIST": "1", "BERTSWARM_TEST_NONFINITE_GRADS": "1"}
        outsider = swarm.start("outsider", join=creator, env=hostile)
        members = (creator, joined)
        swarm.wait_until("the outsider to be refused by the members",
                         lambda: sum(swarm.metric(p, REJECTED, 'reason="not_member"') for p in members) >= 2,
                         timeout=90)  # fmt: skip
        start = swarm.epoch(creator)
        swarm.wait_until("two more global steps of the members", lambda: swarm.epoch(creator) >= start + 2, timeout=90)
        for peer in members:
            assert swarm.metric(peer, REJECTED, 'reason="non_finite"') == 0, f"the outsider's part reached {peer.name}"
            assert swarm.metric(peer, "bertswarm_peer_averaging_rounds_total", 'outcome="success"') >= 1
            assert "Traceback" not in peer.log_tail(400)
        assert _count(swarm, outsider, "bertswarm_peer_averaging_rounds_total", 'outcome="success"') == 0

        # the creator adds the stranger while the run goes on: it joins now
        allow.write_text(f"{member}\n{stranger}\n")
        swarm.wait_until("the creator to publish the new list", lambda: "allowlist version" in creator.log_tail(100),
                         timeout=30)  # fmt: skip
        admitted = swarm.start("stranger", join=creator)
        swarm.wait_until("the admitted peer to step", lambda: swarm.epoch(admitted) >= 1, timeout=90)

        # ... and removes the member: it stops with one line, exit code 2
        allow.write_text(f"{stranger}\n")
        assert joined.wait(timeout=60) == 2
        last = [line for line in joined.log_tail(50).splitlines() if line.strip()][-1]
        assert "this peer" in last and member in last and "not on it" in last, last
        swarm.peers.remove(joined)
        time.sleep(0.5)
        assert creator.proc.poll() is None and admitted.proc.poll() is None
    finally:
        swarm.close()


def _count(swarm: Swarm, peer, name: str, labels: str) -> float:
    """A labelled counter that may not have been incremented yet (then it is not exported)."""
    try:
        return swarm.metric(peer, name, labels)
    except KeyError:
        return 0.0
