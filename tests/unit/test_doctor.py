"""``bertswarm-peer doctor``'s checks that need no swarm: versions, memory estimate, state dir, listen port, the
dial-back and clock verdicts from given probe results, the table, and the CLI dispatch (the live checks are in
``tests/integration/test_doctor.py``)."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from peer import cli, doctor
from peer.config import PeerConfig
from peer.run.manifest import from_config
from peer.run.model import build_model, count_parameters
from peer.run.presets import PRESET_NAMES
from peer.store.state import StateDir

PEER_ID = "QmczuXUNmjupofUkbQgc4u1jnpJLbXgygJx3K9KfmkC9Dr"
GIB = doctor.GIB


def manifest(**settings):
    return from_config(PeerConfig(**settings), "bertswarm", "0" * 64, 8192)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("nsp", [False, True])
def test_parameter_count_equals_the_built_model(preset, nsp):
    run = manifest(preset=preset, nsp=nsp)
    with torch.device("meta"):  # the real architecture, without allocating it
        model = build_model(run.model, nsp=nsp, seed=0)
    assert doctor.bert_parameters(run.model, nsp) == count_parameters(model)


def test_versions_of_this_environment_pass():
    for check in (doctor.check_python(), doctor.check_torch(), doctor.check_hivemind()):
        assert check.status == "ok", check


def test_another_hivemind_fails_with_the_pin_as_fix(monkeypatch):
    monkeypatch.setattr("importlib.metadata.version", lambda name: "1.1.11")
    check = doctor.check_hivemind()
    assert check.status == "fail" and "1.1.11" in check.detail
    assert "pip install 'hivemind==1.1.12'" in check.fix


def test_memory_fits_and_suggests_a_batch_size_when_it_does_not():
    cpu = doctor.Device("cpu")
    assert doctor.check_memory(PeerConfig(), manifest(), cpu, 16 * GIB).status == "ok"

    base = manifest(preset="base")
    estimate = doctor.estimate_memory(base.model, nsp=False, seq_len=base.seq_len, device=cpu)
    ram = estimate.needs(8) + estimate.per_sample // 2  # room for 8 samples, not for the preset's 32
    check = doctor.check_memory(PeerConfig(), base, cpu, ram)
    assert check.status == "fail" and "too little RAM" in check.detail
    assert "--batch-size 8" in check.fix and "--device cuda" in check.fix

    check = doctor.check_memory(PeerConfig(), manifest(preset="large"), cpu, 2 * GIB)
    assert check.status == "fail" and "smaller --preset" in check.fix


def test_memory_on_a_gpu_counts_gpu_memory_and_ram_apart():
    run = manifest(preset="base")
    roomy = doctor.Device("cuda", bf16=True, free=40 * GIB, total=80 * GIB)
    assert doctor.check_memory(PeerConfig(), run, roomy, 16 * GIB).status == "ok"
    small = doctor.Device("cuda", bf16=True, free=GIB, total=8 * GIB)
    check = doctor.check_memory(PeerConfig(join=[f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"]), run, small, 16 * GIB)
    assert check.status == "fail" and "GPU memory" in check.detail
    assert "join a run with a smaller preset" in check.fix  # a joiner cannot pick the preset
    assert doctor.check_memory(PeerConfig(), run, roomy, GIB // 4).status == "fail"  # hivemind's buffers in RAM


def test_state_dir_checks(tmp_path):
    run = manifest()
    missing = doctor.check_state_dir(PeerConfig(state_dir=str(tmp_path / "new" / "dir")), run)
    assert missing.status == "ok" and "will be created" in missing.detail
    assert not (tmp_path / "new").exists()  # the doctor creates nothing

    blocker = tmp_path / "file"
    blocker.write_text("x")
    under_file = doctor.check_state_dir(PeerConfig(state_dir=str(blocker / "state")), run)
    assert under_file.status == "fail" and "not a directory" in under_file.detail and under_file.fix

    held = StateDir(tmp_path / "held")  # what a running peer holds
    try:
        busy = doctor.check_state_dir(PeerConfig(state_dir=str(tmp_path / "held")), run)
    finally:
        held.close()
    assert busy.status == "fail" and "in use by another running peer" in busy.detail
    assert busy.fix == "give each peer its own state directory"
    free = doctor.check_state_dir(PeerConfig(state_dir=str(tmp_path / "held")), run)
    assert free.status == "ok" and "writable, not in use" in free.detail


def test_saved_state_is_read_from_its_header(tmp_path):
    run = manifest()
    state = tmp_path / "s" / "state.safetensors"
    state.parent.mkdir()
    cfg = PeerConfig(state_dir=str(state.parent))
    save_file({"model.x": torch.zeros(1)}, str(state), metadata={"fingerprint": run.fingerprint, "epoch": "7",
                                                                 "samples": "0"})  # fmt: skip
    assert "resumes the saved state of this run (step 7)" in doctor.check_state_dir(cfg, run).detail
    save_file({"model.x": torch.zeros(1)}, str(state), metadata={"fingerprint": "f" * 64, "epoch": "7", "samples": "0"})
    assert "of another run" in doctor.check_state_dir(cfg, run).detail
    state.write_bytes(b"not safetensors")
    corrupt = doctor.check_state_dir(cfg, run)
    assert corrupt.status == "fail" and "corrupt" in corrupt.detail and "move" in corrupt.fix


def test_a_listen_port_held_by_another_process_fails():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        check = doctor.check_listen(PeerConfig(listen=[f"/ip4/127.0.0.1/tcp/{port}"]))
        assert check is not None and check.status == "fail" and f"TCP port {port} is already in use" in check.detail
    assert doctor.check_listen(PeerConfig(listen=[f"/ip4/127.0.0.1/tcp/{port}"])) is None  # free again
    assert doctor.check_listen(PeerConfig(listen=["/ip4/127.0.0.1/tcp/0"])) is None


def probe(mine: list[str], reached_back: bool = True) -> doctor.Probe:
    return doctor.Probe([f"{a}/p2p/{PEER_ID}" for a in mine], [doctor.Ping(PEER_ID, 10.0, 10.02, 10.01, reached_back)])


def joining(host: str, **settings) -> PeerConfig:
    return PeerConfig(join=[f"/ip4/{host}/tcp/4000/p2p/{PEER_ID}"], **settings)


@pytest.mark.parametrize(
    "swarm_host, mine, status, words",
    [
        ("127.0.0.1", ["/ip4/127.0.0.1/tcp/5"], "ok", "reachable from this machine"),
        ("192.168.1.2", ["/ip4/127.0.0.1/tcp/5", "/ip4/192.168.1.3/tcp/5"], "ok", "reachable from your local network"),
        ("8.8.8.8", ["/ip4/127.0.0.1/tcp/5"], "fail", "loopback only"),
        ("8.8.8.8", ["/ip4/127.0.0.1/tcp/5", "/ip4/192.168.1.3/tcp/5"], "fail", "behind NAT"),
        ("8.8.8.8", ["/ip4/1.2.3.4/tcp/5"], "ok", "public address"),
    ],
)
def test_dial_back_classification(swarm_host, mine, status, words):
    check = doctor.classify_dial_back(joining(swarm_host, nat="off"), probe(mine))
    assert check.status == status and words in check.detail, check
    if status == "ok" and "public" not in words:
        assert "cannot be checked without a public peer" in check.detail  # says what it cannot know
    if status == "fail":
        assert "--announce" in check.fix and ("--client-mode" in check.fix or "--nat off" in check.fix), check.fix


@pytest.mark.parametrize("listen", [[], ["/ip4/192.168.1.3/tcp/0"]])
def test_behind_nat_the_peer_joins_in_client_mode_by_itself(listen):
    """What nat.plan decides for the peer (--nat auto): the doctor says the same, and does not fail the peer."""
    cfg = joining("8.8.8.8", listen=listen)
    check = doctor.classify_dial_back(cfg, probe(["/ip4/127.0.0.1/tcp/5", "/ip4/192.168.1.3/tcp/5"]))
    assert check.status == "ok" and "client mode (--nat auto)" in check.detail, check
    assert "behind NAT: client mode" in doctor._listen_detail(cfg, ["/ip4/192.168.1.3/tcp/5"]).detail


def test_behind_nat_with_holepunch_the_doctor_says_how_the_peer_is_reached(monkeypatch):
    from peer.swarm import nat

    monkeypatch.setattr(nat, "route_source", lambda target, family: "192.168.1.3")
    cfg = joining("8.8.8.8", listen=["/ip4/0.0.0.0/tcp/0"], nat="holepunch")
    check = doctor.classify_dial_back(cfg, probe(["/ip4/192.168.1.3/tcp/5"]))
    assert check.status == "ok" and "through the first public --join peer as a relay" in check.detail, check
    assert "4 public peers" in check.detail
    assert "--nat holepunch" in doctor._listen_detail(cfg, ["/ip4/192.168.1.3/tcp/5"]).detail


def test_dial_back_refused_and_client_mode():
    refused = doctor.classify_dial_back(joining("127.0.0.1"), probe(["/ip4/127.0.0.1/tcp/5"], reached_back=False))
    assert refused.status == "fail" and "could not open a stream back" in refused.detail
    client = doctor.classify_dial_back(joining("8.8.8.8", client_mode=True), probe(["/ip4/127.0.0.1/tcp/5"], False))
    assert client.status == "ok" and "outbound only" in client.detail


def test_clock_offsets():
    near = doctor.Probe([], [doctor.Ping(PEER_ID, 100.0, 100.2, 100.3)])
    check = doctor.check_clock(near)
    assert check.status == "ok" and "offset +0.200 s (+/-100 ms)" in check.detail
    far = doctor.Probe([], [doctor.Ping(PEER_ID, 100.0, 100.0, 101.5), doctor.Ping("other", 100.0, 100.0, 100.1)])
    check = doctor.check_clock(far)
    assert check.status == "fail" and "worst +1.500 s" in check.detail and check.fix == doctor.CLOCK_FIX
    refused = doctor.clock_error("local time must be within 3 seconds  of others(local: 100.00000, peer: 95.50000)")
    assert refused.status == "fail" and "offset -4.5 s" in refused.detail


def test_messages_split_into_problem_and_fix():
    assert doctor.split_fix("a: b; do c") == ("a: b", "do c")
    assert doctor.split_fix("clash: x; y. Drop these flags; or not") == ("clash: x; y", "drop these flags; or not")


def test_table_marks_fixes_and_colour():
    checks = [doctor.ok("python", "3.11"), doctor.fail("memory", "too little", "lower it"), doctor.skip("join")]
    plain = doctor.render(checks)
    assert plain.splitlines() == [
        "✓ python  3.11",
        "✗ memory  too little",
        "          fix: lower it",
        "– join    skipped (no --join)",
    ]
    assert "\033[" not in plain
    assert "\033[31m✗\033[0m" in doctor.render(checks, colour=True)
    assert doctor.render(checks, marks=doctor.ASCII_MARKS).splitlines()[1].startswith("x memory")


def test_cli_dispatches_doctor_and_bad_flags_are_one_line(capsys):
    assert cli.main(["doctor", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bertswarm-peer doctor: error: --preset 'huge'") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        cli.main(["doctor", "--help"])
    assert exited.value.code == 0
    assert "usage: bertswarm-peer doctor" in capsys.readouterr().out
