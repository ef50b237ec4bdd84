"""``bertswarm-peer doctor [peer flags]``: check in a few seconds whether a peer with these flags would work here.

Each check is a small function returning a :class:`Check` (name, ``ok``/``fail``/``skip``, what was found, and for a
failure the fix); :func:`render` prints them as a table (✓ ✗ –, colours on a terminal only). Exit code 0 when no check
failed, 1 when one did (one line on stderr names them), 2 for flags that are invalid anyway (``run_command``).

The doctor takes exactly the peer's flags and reuses the peer's own code for each step: ``hivemind_compat.
check_version``, ``PeerConfig.validate`` (addresses), ``run.manifest.from_config``, the state dir lock
(``store.state.StateDir``), ``swarm.dht.start_dht``, ``join.wait_for_run`` and ``join.check_compatible``. Its DHT node
uses the peer's ``--listen``, ``--announce``, ``--client-mode`` and ``--join`` but a throw-away identity (so it never
collides with a running peer's); it creates no state dir (in an existing one, the lock file a peer would create). With
``--join`` it is briefly a member of the swarm: it pings the bootstrap peer (and up to ``CLOCK_PEERS`` others) and reads
the run's signed manifest as a joining peer would; it publishes nothing and trains nothing.

hivemind 1.1.12 has no dial-back request: the bootstrap peer's "ping back" (``PingRequest(validate=True)``, what
hivemind itself checks at bootstrap) travels over the connection this node opened, so it proves that this node answers
inbound requests, not that a fresh dial to its address would reach it. The dial-back check adds what the addresses
tell (loopback, private, public, against the bootstrap peer's) and says what it cannot know.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import math
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from peer import __version__
from peer.cli import build_parser, parse_config, run_command, setup_logging
from peer.config import PeerConfig
from peer.errors import UserError
from peer.run.manifest import DEFAULT_RUN_ID, ModelSection, RunManifest, from_config
from peer.run.presets import PRESETS
from peer.swarm import addresses, nat
from peer.swarm.addresses import DEFAULT_LISTEN
from peer.swarm.nat import host_kind

PROG = "bertswarm-peer doctor"
DESCRIPTION = (
    "Check, in a few seconds, whether a peer with these flags would work on this machine: versions, device and memory "
    "for the preset, the state dir, p2pd and the listen address; with --join also the bootstrap peer, whether it can "
    "reach this node, the clock against the swarm and the run's manifest. Takes every bertswarm-peer flag; exit code "
    "0 when a peer would work, 1 when a check failed (its fix is printed under it)."
)
NO_JOIN = "skipped (no --join)"
CHECK_NAMES = ("python", "torch", "hivemind", "device", "memory", "state dir", "p2pd", "listen", "join", "dial-back",
               "clock", "manifest")  # fmt: skip
JOIN_TIMEOUT = 4.0  # seconds for p2pd and the bootstrap peer (a peer waits --startup-timeout; the doctor must be quick)
MANIFEST_TIMEOUT = 3.0  # seconds to find the run's manifest once joined (normally found at once)
PING_TIMEOUT = 2.0
CLOCK_PEERS = 8  # peers whose DHT time is compared: the --join peers first, then others from the routing table
CLOCK_TOLERANCE = 1.0  # seconds; hivemind refuses a bootstrap peer 3 s off, and averaging rounds need much less
GIB, MIB = 1024**3, 1024**2
PROCESS_RAM = GIB  # a tiny CPU peer's processes (main, DHT, two averagers, p2pd) held 1.0 GiB PSS, measured
CUDA_CONTEXT = GIB // 2
Run = RunManifest | None  # the run's manifest, once known


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "fail" or "skip"
    detail: str
    fix: str = ""


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


def skip(name: str, detail: str = NO_JOIN) -> Check:
    return Check(name, "skip", detail)


def from_error(name: str, error: Exception) -> Check:
    """A failed check from a one-line ``UserError`` (``"<problem>; <fix>"`` or ``"<problem>. <Fix>"``)."""
    detail, fix = split_fix(str(error))
    return fail(name, detail, fix or "see the message")


def split_fix(message: str) -> tuple[str, str]:
    sentence = re.search(r"\. (?=[A-Z])", message)
    if sentence:
        problem, fix = message[: sentence.start()], message[sentence.end() :]
    else:
        problem, _, fix = message.partition("; ")
    return problem, fix[:1].lower() + fix[1:]


class ChecksFailed(UserError):
    """At least one check failed: exit code 1 (2 stays for invalid flags)."""

    exit_code = 1


# --- versions ---------------------------------------------------------------------------------------------------------


def _requirement(package: str) -> str | None:
    """bertswarm's declared requirement on ``package`` (``"python"``: Requires-Python), None when not installed."""
    from importlib import metadata

    try:
        if package == "python":
            return metadata.metadata("bertswarm").get("Requires-Python")
        for line in metadata.requires("bertswarm") or ():
            if re.match(rf"{package}\s*[<>=!~ ]", line) and "extra ==" not in line:
                return line[len(package) :].strip()
    except metadata.PackageNotFoundError:
        return None
    return None


def _satisfies(version: str, spec: str | None) -> bool:
    if not spec:
        return True
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return SpecifierSet(spec).contains(Version(version.split("+")[0]), prereleases=True)


def check_python() -> Check:
    version, spec = ".".join(map(str, sys.version_info[:3])), _requirement("python")
    if not _satisfies(version, spec):
        return fail("python", f"{version}; bertswarm needs {spec}", f"install Python {spec} and reinstall bertswarm")
    return ok("python", f"{version}" + (f" (bertswarm needs {spec})" if spec else ""))


def check_torch() -> Check:
    from importlib import metadata

    spec = _requirement("torch")
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return fail("torch", "not installed", f"pip install 'torch{spec or ''}'")
    if not _satisfies(version, spec):
        return fail("torch", f"{version}; bertswarm needs {spec}", f"pip install 'torch{spec}'")
    return ok("torch", version + (f" (bertswarm needs {spec})" if spec else ""))


def check_hivemind() -> Check:
    from importlib import metadata

    from peer.swarm import hivemind_compat

    try:
        version = metadata.version("hivemind")
        hivemind_compat.check_version(version)
    except metadata.PackageNotFoundError:
        pin = hivemind_compat.CHECKED_VERSIONS[-1]
        return fail("hivemind", "not installed", f"pip install 'hivemind=={pin}'")
    except UserError as e:
        return from_error("hivemind", e)
    return ok("hivemind", f"{version}, the version bertswarm's workarounds were checked against (every peer runs it)")


# --- device and memory ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    bf16: bool = False
    free: int | None = None  # bytes free on the GPU
    total: int | None = None


def check_device(choice: str) -> tuple[Check, Device | None]:
    import torch

    if not torch.cuda.is_available():
        if choice == "cuda":
            return fail("device", "--device cuda, but torch sees no CUDA device (torch " + torch.__version__ + ")",
                        "use --device cpu, or install a CUDA build of torch and the NVIDIA driver"), None  # fmt: skip
        return ok("device", f"cpu (--device {choice}; no CUDA device visible to torch)"), Device("cpu")
    if choice == "cpu":
        return ok("device", f"cpu (--device cpu; a CUDA GPU is available: {torch.cuda.get_device_name(0)})"), Device(
            "cpu"
        )
    free, total = torch.cuda.mem_get_info(0)
    bf16 = torch.cuda.is_bf16_supported()
    name = torch.cuda.get_device_name(0)
    detail = f"cuda: {name}, {_gib(total)} ({'bf16 autocast' if bf16 else 'fp32: no bf16 on this GPU'})"
    return ok("device", detail), Device("cuda", bf16, free, total)


def bert_parameters(model: ModelSection, nsp: bool) -> int:
    """Parameters of ``BertForMaskedLM`` (``BertForPreTraining`` with NSP) for a manifest's model section, counted
    without building it (importing transformers' BERT takes seconds); checked against ``build_model`` by the tests."""
    h, inter, vocab = model.hidden_size, model.intermediate_size, model.vocab_size
    embeddings = (vocab + model.max_position_embeddings + model.type_vocab_size) * h + 2 * h
    layer = 4 * h * h + 2 * h * inter + 9 * h + inter  # attention q, k, v, out; feed-forward; two layer norms
    head = h * h + 3 * h + vocab  # transform + layer norm + decoder bias (the decoder weight is the word embeddings)
    pretraining = (h * h + h + 2 * h + 2) if nsp else 0  # pooler and the next-sentence classifier
    return embeddings + model.num_hidden_layers * layer + head + pretraining


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a peer needs where its model lives (the GPU, or RAM on a CPU) and in RAM besides, as a fixed part plus
    a part per sample of the micro-batch."""

    parameters: int
    model_fixed: int  # weights, gradients, two Adam/LAMB moments: 4 fp32 copies (+ the CUDA context on a GPU)
    ram_fixed: int  # hivemind's accumulated and averaged gradients and averaged weights (3 fp32 copies), processes
    per_sample: int  # activations of one sample's forward and backward

    def needs(self, batch: int) -> int:
        return self.model_fixed + batch * self.per_sample

    def largest_batch(self, free: int) -> int:
        return max(0, (free - self.model_fixed) // self.per_sample)


def estimate_memory(model: ModelSection, *, nsp: bool, seq_len: int, device: Device) -> MemoryEstimate:
    """Rough training memory: fp32 weights, gradients and optimizer moments, hivemind's averaging buffers, the
    processes, and the activations (per layer ``s·b·h·(34 + 5·a·s/h)`` bytes in 16-bit, after Korthikanti et al. 2022,
    doubled in fp32; plus the MLM logits over the whole vocabulary in fp32, with their softmax and gradient)."""
    parameters = bert_parameters(model, nsp)
    h, heads, layers = model.hidden_size, model.num_attention_heads, model.num_hidden_layers
    half = device.kind == "cuda" and device.bf16
    per_layer_token = h * (34 + 5 * heads * seq_len / h) * (1 if half else 2)
    per_sample = int(seq_len * (layers * per_layer_token + 12 * model.vocab_size + 8 * h * (2 if half else 4)))
    state, buffers = 16 * parameters, 12 * parameters + PROCESS_RAM
    if device.kind == "cuda":
        return MemoryEstimate(parameters, state + CUDA_CONTEXT, buffers, per_sample)
    return MemoryEstimate(parameters, state + buffers, 0, per_sample)


def check_memory(cfg: PeerConfig, run: RunManifest | None, device: Device | None, ram: int | None) -> Check:
    """The run's model at this peer's micro-batch against free GPU memory and available RAM."""
    if run is None or device is None:
        return skip("memory", f"not estimated: {'no usable device' if device is None else 'no valid run settings'}")
    batch = min(cfg.batch_size or PRESETS[run.preset].batch_size, run.target_batch_size)
    est = estimate_memory(run.model, nsp=run.nsp, seq_len=run.seq_len, device=device)
    what = f"{run.preset} ({est.parameters / 1e6:.1f}M parameters) at batch {batch} x {run.seq_len} tokens"
    model_free = device.free if device.kind == "cuda" else ram
    if model_free is None:
        return ok("memory", f"needs ~{_gib(est.needs(batch))} for {what}; free memory unknown on this system")
    where = "GPU memory" if device.kind == "cuda" else "RAM"
    found = [f"~{_gib(est.needs(batch))} of {where} ({_gib(model_free)} free)"]
    if est.ram_fixed and ram is not None:
        found.append(f"~{_gib(est.ram_fixed)} of RAM ({_gib(ram)} available)")
    detail = f"{what} needs {' and '.join(found)}"
    if est.ram_fixed and ram is not None and est.ram_fixed > ram:
        return fail("memory", f"too little RAM: {detail}", "close other programs or use a machine with more RAM")
    if est.needs(batch) <= model_free:
        return ok("memory", detail)
    fits = est.largest_batch(model_free)
    if fits >= 1:
        fix = f"pass --batch-size {fits} (the swarm's batch stays the same)"
    else:
        smaller = "join a run with a smaller preset" if cfg.join else "start with a smaller --preset"
        fix = f"even batch 1 does not fit: {smaller}"
    if device.kind == "cpu" and run.preset in ("base", "large"):
        fix += ", or train on a GPU (--device cuda)"
    return fail("memory", f"too little {where}: {detail}", fix)


def available_ram() -> int | None:
    """Bytes of RAM available to new processes (Linux: MemAvailable), None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# --- the state dir ----------------------------------------------------------------------------------------------------


def check_state_dir(cfg: PeerConfig, run: RunManifest | None) -> Check:
    """Writable and free (the peer's own lock, without creating a missing directory), and room for the state."""
    from peer.store.errors import StateError
    from peer.store.state import STATE_FILE, StateDir

    path = cfg.state_path
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path:
        try:
            StateDir(path).close()  # creates the directory's lock file, as a peer does, then lets it go
        except StateError as e:
            return from_error("state dir", e.with_flag("--state-dir"))
        found = f"{path}: writable, not in use"
    elif existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        found = f"{path}: will be created in {existing.resolve()}"
    else:
        why = "is not a directory" if not existing.is_dir() else "is not writable"
        return fail("state dir", f"--state-dir {path}: cannot be created, {existing} {why}",
                    "pass --state-dir with a directory you can write to")  # fmt: skip
    free = shutil.disk_usage(existing).free
    if run is None:
        return ok("state dir", f"{found}, {_gib(free)} free")
    # fp32 weights and two optimizer moments (DiLoCo: and the outer momentum); a save writes the new file next to
    # the old one before replacing it, so the free space must hold one more file
    need = 16 * bert_parameters(run.model, run.nsp)
    saved = _saved_state(path / STATE_FILE, run)
    if saved.startswith("!"):
        return fail("state dir", saved[1:], f"move {path / STATE_FILE} away; the peer then syncs from the swarm")
    detail = f"{found}, {_gib(free)} free (saving needs ~{_gib(need)}){saved}"
    if free < need:
        return fail("state dir", detail, "free disk space there, or pass --state-dir on a disk with more room")
    return ok("state dir", detail)


def _saved_state(state_file: Path, run: RunManifest) -> str:
    """What a peer would do with saved state (its header only); ``"!..."`` for a file a peer refuses."""
    if not state_file.exists():
        return ""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(state_file, framework="pt") as f:
            meta = f.metadata() or {}
        fingerprint, epoch = meta["fingerprint"], int(meta["epoch"])
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        return f"!{state_file}: local state is corrupt ({type(e).__name__}), a peer refuses to start"
    if fingerprint == run.fingerprint:
        return f"; resumes the saved state of this run (step {epoch})"
    return f"; its saved state is of another run (manifest {fingerprint[:12]}): a peer starts fresh, overwriting it"


# --- this peer's run settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    tokenizer_fingerprint: str
    vocab_size: int
    data_fingerprint: str | None
    manifest: RunManifest  # the manifest this peer would publish if it started the run


def load_inputs(cfg: PeerConfig) -> Inputs:
    """The tokenizer and a prepared dataset's fingerprint (plain ``--data`` text is not read), and the manifest built
    from the flags; ``UserError`` naming the flag."""
    from peer.data.shards import PreparedDataset, is_prepared
    from peer.data.tokenizer import default_tokenizer, load_tokenizer, tokenizer_fingerprint
    from peer.errors import InputError

    try:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else default_tokenizer()
    except InputError as e:
        raise e.with_flag("--tokenizer") from None
    data_fingerprint = None
    if len(cfg.data) == 1 and is_prepared(cfg.data[0]):
        try:
            data_fingerprint = PreparedDataset.open(cfg.data[0]).fingerprint
        except InputError as e:
            raise e.with_flag("--data") from None
    fingerprint, vocab = tokenizer_fingerprint(tokenizer), tokenizer.get_vocab_size()
    manifest = from_config(cfg, cfg.run_id or DEFAULT_RUN_ID, fingerprint, vocab, data_fingerprint)
    return Inputs(fingerprint, vocab, data_fingerprint, manifest)


# --- the network ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    """One validated DHT ping, timed in this node's DHT time (hivemind's ``get_dht_time``)."""

    peer: str
    sent: float = 0.0
    received: float = 0.0
    remote_time: float = 0.0  # the peer's DHT time when it answered; 0: it did not say
    reached_back: bool = False  # the peer pinged this node back before answering (hivemind's ``available``)
    error: str = ""

    @property
    def offset(self) -> float:
        return self.remote_time - (self.sent + self.received) / 2


@dataclass(frozen=True)
class Probe:
    addresses: list[str]  # this node's visible addresses (p2pd's identify: announced, else listened on)
    pings: list[Ping]


async def _probe(_dht, node, join_peers: list[str], timeout: float) -> Probe:
    """Runs in the DHT process: this node's visible addresses, and a validated ping of each ``--join`` peer and of a
    few other peers of the routing table. ``validate=True`` asks the peer to ping this node back first, as hivemind
    does for its bootstrap peers at start."""
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2
    from hivemind.utils import get_dht_time

    known = [PeerID.from_base58(peer) for peer in join_peers]
    others = [peer for peer in node.protocol.routing_table.peer_id_to_uid if peer not in known]

    async def ping(peer) -> Ping:
        request = dht_pb2.PingRequest(peer=node.protocol.node_info, validate=True)
        sent = get_dht_time()
        try:
            response = await node.protocol.get_stub(peer).rpc_ping(request, timeout=timeout)
        except Exception as e:
            return Ping(peer.to_base58(), error=f"{type(e).__name__}: {e}".strip(": "))
        return Ping(peer.to_base58(), sent, get_dht_time(), response.dht_time, response.available)

    pings = await asyncio.gather(*(ping(peer) for peer in [*known, *others][: max(CLOCK_PEERS, len(known))]))
    visible = await node.get_visible_maddrs(latest=True)
    return Probe([str(a) for a in visible], list(pings))


def _without_peer_id(maddr: str) -> str:
    return maddr.split("/p2p/")[0]


def check_listen(cfg: PeerConfig) -> Check | None:
    """A fixed ``--listen`` port already held by another process, or not an address of this machine (p2pd binds with
    SO_REUSEPORT, so a second peer on the same port would start and share its connections); None when all is well."""
    for maddr in cfg.listen:
        pairs = dict(addresses.parse(maddr, "--listen", need_peer_id=False))
        host, port = pairs.get("ip4") or pairs.get("ip6"), int(pairs.get("tcp") or 0)
        if host is None or port == 0:
            continue
        with socket.socket(socket.AF_INET6 if "ip6" in pairs else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as p2pd: TIME_WAIT does not count as in use
            try:
                probe.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return fail("listen", f"--listen {maddr}: TCP port {port} is already in use by another process",
                                "stop that process (another peer?) or pick another port (0: any free one)")  # fmt: skip
                return fail("listen", f"--listen {maddr}: cannot bind it ({e.strerror})", "listen on an address "
                            "of this machine (0.0.0.0: all of them) and a port you may use")  # fmt: skip
    return None


def _listen_detail(cfg: PeerConfig, visible: list[str]) -> Check:
    shown = ", ".join(_without_peer_id(a) for a in visible)
    asked = ", ".join(cfg.listen) or f"{DEFAULT_LISTEN} (default)"
    kinds = {host_kind(a) for a in visible}
    scope = "" if kinds - {"loopback"} else "; loopback only: peers on other machines cannot connect"
    reach = nat.plan(cfg.nat, cfg.client_mode, cfg.join, cfg.listen, cfg.announce)
    if reach.client_mode:
        scope = f"; {'behind NAT: client mode' if reach.automatic else '--client-mode'}: accepts no inbound connections"
    elif reach.relay == "use":
        scope = "; behind NAT: dialled through the first public --join peer as a relay (--nat holepunch)"
    return ok("listen", f"bound {asked}, visible as {shown}{scope}")


def classify_dial_back(cfg: PeerConfig, probe: Probe) -> Check:
    """Whether the swarm can dial this node back: from the bootstrap peers' answers and the address classes of this
    node's visible addresses against theirs. What cannot be seen from here is said so."""
    bootstrap = [p for p in probe.pings[: len(cfg.join)] if not p.error]
    reach = nat.plan(cfg.nat, cfg.client_mode, cfg.join, cfg.listen, cfg.announce)
    if reach.client_mode:
        why = "behind NAT, so the peer joins in client mode (--nat auto)" if reach.automatic else "--client-mode"
        return ok("dial-back", f"outbound only ({why}): peers never dial you; you train and average through reachable "
                  "peers, as long as one of them is in your group")  # fmt: skip
    if reach.relay == "use":
        return ok("dial-back", "behind NAT (--nat holepunch): peers dial you through the first public --join peer "
                  "as a relay, and a hole punch then connects each of them directly once "
                  f"{nat.PUNCH_OBSERVERS} public peers have seen your address; a router that rejects unsolicited "
                  "packets instead of dropping them breaks the punch")  # fmt: skip
    refused = [p.peer[:12] for p in bootstrap if not p.reached_back]
    if refused:
        return fail("dial-back", f"the bootstrap peer ({', '.join(refused)}) could not open a stream back to this node",
                    "behind NAT or a firewall: pass --client-mode, or forward a TCP port and pass --listen "
                    "/ip4/0.0.0.0/tcp/PORT --announce /ip4/<public ip>/tcp/PORT")  # fmt: skip
    mine = {host_kind(a) for a in probe.addresses}
    theirs = {host_kind(a) for a in cfg.join}
    shown = ", ".join(_without_peer_id(a) for a in probe.addresses)
    reached = "the bootstrap peer opened a stream back to this node (over this node's connection, not a fresh dial)"
    if "public" in mine:
        return ok("dial-back", f"public address ({shown}): {reached}; a fresh dial from the internet cannot be "
                  "tested from here: make sure that TCP port is open to inbound connections")  # fmt: skip
    if theirs <= {"loopback"} or (theirs <= {"loopback", "private"} and "private" in mine):
        where = "this machine" if theirs <= {"loopback"} else "your local network"
        return ok("dial-back", f"reachable from {where} ({shown}): {reached}; whether you are behind NAT from the "
                  "internet cannot be checked without a public peer")  # fmt: skip
    if mine <= {"loopback"}:
        return fail("dial-back", f"you listen on loopback only ({shown}) but the swarm is on other machines: they "
                    "cannot dial you", "pass --listen /ip4/0.0.0.0/tcp/PORT --announce /ip4/<your ip>/tcp/PORT, or "
                    "--client-mode")  # fmt: skip
    return fail("dial-back", f"behind NAT: you announce private addresses only ({shown}) and the swarm is on the "
                "internet, so peers there cannot dial you", "forward a TCP port to this machine and pass --listen "
                "/ip4/0.0.0.0/tcp/PORT --announce /ip4/<public ip>/tcp/PORT, or drop --nat off (the peer then joins "
                "in client mode)")  # fmt: skip


CLOCK_FIX = "synchronise this machine's clock (enable NTP, e.g. timedatectl set-ntp true)"


def check_clock(probe: Probe) -> Check:
    timed = [p for p in probe.pings if not p.error and p.remote_time]
    if not timed:
        return fail("clock", "no peer told its DHT time", "check the join check above")
    worst = max(timed, key=lambda p: abs(p.offset))
    if len(timed) == 1:
        uncertainty = (worst.received - worst.sent) * 500  # ms: half the round trip
        detail = f"offset {worst.offset:+.3f} s (+/-{uncertainty:.0f} ms) against the DHT time of the bootstrap peer"
    else:
        median = statistics.median(p.offset for p in timed)
        detail = f"offset {median:+.3f} s against {len(timed)} peers' DHT time (median; worst {worst.offset:+.3f} s)"
    if abs(worst.offset) > CLOCK_TOLERANCE:
        return fail("clock", f"{detail}: more than {CLOCK_TOLERANCE:.0f} s off; averaging rounds need the peers' "
                    "clocks to agree (hivemind refuses a bootstrap peer 3 s off)", CLOCK_FIX)  # fmt: skip
    return ok("clock", detail)


def clock_error(message: str) -> Check:
    """hivemind's refusal at bootstrap: ``local time must be within 3 seconds of others(local: X, peer: Y)``."""
    times = re.search(r"local: ([0-9.]+), peer: ([0-9.]+)", message)
    if times is None:
        return fail("clock", f"hivemind refused to join: {message.strip()}", CLOCK_FIX)
    offset = float(times.group(2)) - float(times.group(1))
    return fail("clock", f"offset {offset:+.1f} s against the DHT time of the bootstrap peer: hivemind refuses to "
                "join a swarm more than 3 s off", CLOCK_FIX)  # fmt: skip


@dataclass
class Started:
    dht: object | None
    seconds: float
    error: Exception | None = None


def _start_node(cfg: PeerConfig) -> Started:
    from peer.swarm import records
    from peer.swarm.dht import start_dht

    started = time.perf_counter()
    try:
        dht = start_dht(cfg, records.registry_validators())
    except Exception as e:  # UserError from start_dht; hivemind's own bootstrap errors (ValidationError, ...)
        return Started(None, time.perf_counter() - started, e)
    return Started(dht, time.perf_counter() - started)


def _p2pd_ok(node: Started) -> Check:
    return ok("p2pd", f"started in {node.seconds:.1f} s")


def _p2pd_failed(error: Exception) -> Check:
    if isinstance(error, UserError):
        return from_error("p2pd", error)
    from peer.swarm.hivemind_compat import CHECKED_VERSIONS

    pin = CHECKED_VERSIONS[-1]
    return fail("p2pd", f"the p2p daemon failed: {type(error).__name__}: {error}",
                f"reinstall hivemind, which ships p2pd: pip install --force-reinstall 'hivemind=={pin}'")  # fmt: skip


def network_checks(cfg: PeerConfig, explicit: set[str], inputs: Inputs | None) -> tuple[list[Check], Run]:
    """p2pd, listen, join, dial-back, clock, manifest, and the run's manifest once found."""
    from peer.swarm.dht import stop_dht

    listen_problem = check_listen(cfg)
    with tempfile.TemporaryDirectory(prefix="bertswarm-doctor-") as scratch:
        # a throw-away identity: the doctor must not collide with (or create) a running peer's
        node_cfg = dataclasses.replace(cfg, identity=str(Path(scratch) / "identity.key"),
                                       startup_timeout=min(cfg.startup_timeout, JOIN_TIMEOUT))  # fmt: skip
        node = _start_node(node_cfg)
        if node.dht is None:
            return _start_failed(cfg, node_cfg, node, listen_problem, inputs), None
        try:
            probe = node.dht.run_coroutine(partial(_probe, join_peers=_peer_ids(cfg.join), timeout=PING_TIMEOUT))
            checks = [_p2pd_ok(node), listen_problem or _listen_detail(cfg, probe.addresses)]
            if not cfg.join:
                return [*checks, skip("join"), skip("dial-back"), skip("clock"), _own_manifest(inputs)], None
            checks.append(_join_check(cfg, probe))
            checks += [classify_dial_back(cfg, probe), check_clock(probe)]
            manifest_check, run = _manifest_check(node.dht, cfg, explicit, inputs)
            return [*checks, manifest_check], run
        finally:
            stop_dht(node.dht)


def _peer_ids(join: list[str]) -> list[str]:
    return [dict(addresses.parse(maddr, "--join", need_peer_id=True))["p2p"] for maddr in join]


def _start_failed(cfg: PeerConfig, node_cfg: PeerConfig, node: Started, listen_problem: Check | None,
                  inputs: Inputs | None) -> list[Check]:  # fmt: skip
    """The node did not start. With --join, start one without it to tell p2pd's and the listen address's part from
    the bootstrap's."""
    from peer.swarm.dht import stop_dht

    alone = _start_node(dataclasses.replace(node_cfg, join=[])) if cfg.join else node
    if alone.dht is None:
        if listen_problem is not None:
            p2pd = skip("p2pd", "not checked on its own: it could not bind --listen (see listen)")
        else:
            p2pd = _p2pd_failed(alone.error)
        listen = listen_problem or skip("listen", "not checked: p2pd did not start")
        if cfg.join:
            return [p2pd, listen, *(skip(name, "not checked: p2pd did not start") for name in CHECK_NAMES[-4:])]
        return [p2pd, listen, skip("join"), skip("dial-back"), skip("clock"), _own_manifest(inputs)]
    try:
        visible = [str(a) for a in alone.dht.get_visible_maddrs(latest=True)]
    finally:
        stop_dht(alone.dht)
    checks = [_p2pd_ok(alone), listen_problem or _listen_detail(cfg, visible)]
    message, not_checked, answered = str(node.error), "not checked: could not join", "the bootstrap peer answered"
    if "local time must be within" in message:
        return [*checks, ok("join", answered), skip("dial-back", not_checked), clock_error(message),
                skip("manifest", not_checked)]  # fmt: skip
    if "can't access this node" in message:
        dial_back = fail("dial-back", f"{answered} but could not reach this node back ({message.strip()})", "behind "
                         "NAT or a firewall: pass --client-mode, or forward a TCP port and --announce it")  # fmt: skip
        return [*checks, ok("join", answered), dial_back, skip("clock", not_checked), skip("manifest", not_checked)]
    if "did not start within" in message:
        join_check = fail("join", f"no answer from {', '.join(cfg.join)} within {node_cfg.startup_timeout:.0f} s",
                          "check that the peer is running and reachable (a firewall may drop the connection); copy "
                          "a fresh line from a live peer")  # fmt: skip
    elif isinstance(node.error, UserError):
        join_check = from_error("join", node.error)
    else:
        join_check = fail("join", f"could not join through {', '.join(cfg.join)} ({message.strip()})", "check that "
                          "the peer is running and reachable; copy a fresh line from a live peer")  # fmt: skip
    return [*checks, join_check, *(skip(name, not_checked) for name in CHECK_NAMES[-3:])]


def _join_check(cfg: PeerConfig, probe: Probe) -> Check:
    pings = probe.pings[: len(cfg.join)]
    answered = [p for p in pings if not p.error]
    if not answered:
        return fail("join", f"no --join peer answered a ping ({pings[0].error})",
                    "check that the peer is running; copy a fresh line from a live peer")  # fmt: skip
    others = len(probe.pings) - len(pings)
    times = ", ".join(f"{(p.received - p.sent) * 1000:.0f} ms" for p in answered)
    detail = f"{len(answered)} of {len(pings)} --join peer(s) answered ({times})"
    if len(answered) < len(pings):
        detail += "; not: " + ", ".join(f"{p.peer[:12]} ({p.error})" for p in pings if p.error)
    return ok("join", detail + (f"; pinged {others} more peer(s) of its routing table" if others else ""))


def _own_manifest(inputs: Inputs | None) -> Check:
    if inputs is None:
        return skip("manifest", "not checked: this peer's settings are invalid (see above)")
    m = inputs.manifest
    return skip("manifest", f"{NO_JOIN}: this peer would start run {m.run_id!r} ({_describe(m)})")


def _describe(m: RunManifest) -> str:
    return f"manifest {m.fingerprint[:12]}: {m.preset}, seq-len {m.seq_len}, {m.mode}"


def _manifest_check(dht, cfg: PeerConfig, explicit: set[str], inputs: Inputs | None) -> tuple[Check, Run]:
    """The run's signed manifest, through the joined node, checked by the peer's own ``join.check_compatible``
    (flags, tokenizer, prepared data)."""
    from peer import join

    quick = dataclasses.replace(cfg, startup_timeout=MANIFEST_TIMEOUT)
    try:
        found = join.wait_for_run(dht, cfg.run_id, MANIFEST_TIMEOUT, bootstrap=join.bootstrap_peer_ids(cfg.join),
                                  pinned=join.read_pins(cfg.state_path))  # fmt: skip
    except UserError as e:
        return from_error("manifest", e), None
    run_id, run = found.run_id, found.manifest
    if inputs is None:
        return skip("manifest", f"run {run_id!r} found, not compared: this peer's settings are invalid"), run
    try:  # the peer's own checks, without publishing anything
        join.check_compatible(run, quick, explicit, inputs.tokenizer_fingerprint, inputs.vocab_size,
                              inputs.data_fingerprint)  # fmt: skip
    except UserError as e:
        return from_error("manifest", e), run
    detail = f"run {run_id!r} ({_describe(run)}): your flags, tokenizer and data agree"
    if run.restricted:
        return _allowlist_check(dht, cfg, found, detail), run
    return ok("manifest", detail), run


def _allowlist_check(dht, cfg: PeerConfig, found, detail: str) -> Check:
    """A closed run (``--allow``): whether this peer's own id (its identity file, not the doctor's throw-away one) is
    on the creator's signed allowlist."""
    from peer.swarm import identity, membership

    fix = "send your peer id (bertswarm-peer id) to the run's creator, who adds it to their --allow file"
    if not cfg.identity_path.exists():
        return fail("manifest", f"{detail}; the run is closed, and this peer has no id yet", fix)
    key = identity.load_identity_key(cfg.identity_path)
    me = identity.peer_id_of_public_key(key.get_public_key())
    if found.signed.creator == identity.public_key_text(key):
        return ok("manifest", f"{detail}; you created this closed run")
    listed = membership.wait_for_members(dht, found.run_id, found.signed.creator, MANIFEST_TIMEOUT)
    if listed is None:
        return fail("manifest", f"{detail}; the run is closed and its allowlist was not found", "check the --join "
                    "address (the peer must be a member of the run)")  # fmt: skip
    if not listed[0].allows(me):
        return fail("manifest", f"{detail}; the run is closed and your peer id {me} is not on its allowlist", fix)
    return ok("manifest", f"{detail}; your peer id is on the run's allowlist")


# --- the whole --------------------------------------------------------------------------------------------------------


def diagnose(cfg: PeerConfig, explicit: set[str]) -> list[Check]:
    """Every check, in the order of ``CHECK_NAMES``. The network goes first: with --join, the memory and state dir
    checks are for the run's settings (its preset, sequence length), which a joiner adopts."""
    found = [check_python(), check_torch(), check_hivemind()]
    device_check, device = _guarded("device", partial(check_device, cfg.device), pair=True)
    try:
        inputs, inputs_problem = load_inputs(cfg), None
    except UserError as e:
        inputs, inputs_problem = None, from_error("manifest", e)
    network, run = _guarded("p2pd", partial(network_checks, cfg, explicit, inputs), pair=True)
    found += [device_check, *(network if isinstance(network, list) else [network])]
    run = run or (inputs.manifest if inputs is not None else None)
    found += [
        check_memory(cfg, run, device, available_ram()),
        _guarded("state dir", partial(check_state_dir, cfg, run)),
    ]
    by_name = {c.name: c for c in found} | ({"manifest": inputs_problem} if inputs_problem else {})
    return [by_name.get(name) or skip(name, "not checked") for name in CHECK_NAMES]


def _guarded(name: str, check, pair: bool = False):
    """Run one check; an unexpected error fails that check instead of the doctor (``pair``: ``check`` returns
    ``(Check, value)``, and a failure ``(Check, None)``)."""
    try:
        return check()
    except UserError as e:
        failed = from_error(name, e)
    except Exception as e:
        failed = fail(name, f"the check itself failed: {type(e).__name__}: {e}", "report this with the output above")
    return (failed, None) if pair else failed


MARKS = {"ok": "✓", "fail": "✗", "skip": "–"}
ASCII_MARKS = {"ok": "+", "fail": "x", "skip": "-"}
COLOURS = {"ok": "\033[32m", "fail": "\033[31m", "skip": "\033[2m"}


def render(checks: list[Check], *, colour: bool = False, marks: dict[str, str] = MARKS) -> str:
    """The table: a mark, the check's name and what was found; under each failure, its fix."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = f"{COLOURS[c.status]}{marks[c.status]}\033[0m" if colour else marks[c.status]
        lines.append(f"{mark} {c.name:<{width}}  {c.detail}")
        if c.status == "fail":
            lines.append(f"  {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)


def _marks_for(stream) -> dict[str, str]:
    try:
        "".join(MARKS.values()).encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKS
    return MARKS


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        started = time.perf_counter()
        cfg, explicit = parse_config(argv, parser=build_parser(prog=PROG, description=DESCRIPTION))
        setup_logging()
        stream = sys.stdout
        joining = f", joining through {', '.join(cfg.join)}" if cfg.join else " (no --join: a new swarm)"
        print(f"{PROG}: would a bertswarm {__version__} peer with these flags work here{joining}?", file=stream)
        checks = diagnose(cfg, explicit)
        colour = stream.isatty() and not os.environ.get("NO_COLOR")
        print(render(checks, colour=colour, marks=_marks_for(stream)), file=stream)
        failed = [c.name for c in checks if c.status == "fail"]
        seconds = time.perf_counter() - started
        verdict = "a peer would work" if not failed else f"{len(failed)} failed: a peer would not work"
        print(f"{len(checks)} checks in {seconds:.1f} s: {verdict}", file=stream, flush=True)
        if failed:
            raise ChecksFailed(f"{len(failed)} check(s) failed ({', '.join(failed)}); see the fixes above")

    return run_command(PROG, body)


def _gib(n: float | None) -> str:
    if n is None or math.isnan(n):
        return "?"
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"
