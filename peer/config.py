"""Every setting of a peer, declared once: a typed dataclass field with its flag help.

The command line and the ``BERTSWARM_*`` environment variables are generated from these fields (see ``cli.py``);
``PeerConfig.validate`` is the single place that checks values. Settings that every peer of one run must share
(model size, sequence length, optimizer, schedule, target batch) are *not* read from here at run time: they go into
the run manifest (``manifest.py``), which joiners adopt from the swarm.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from peer.errors import UserError
from peer.logs import LOG_FORMATS
from peer.run.manifest import (
    AGGREGATIONS,
    DEFAULT_AGGREGATION,
    DEFAULT_INNER_STEPS,
    DEFAULT_OUTER_COMPRESSION,
    DEFAULT_OUTER_LR,
    DEFAULT_OUTER_MOMENTUM,
    MODES,
    OUTER_COMPRESSIONS,
    RUN_ID_PATTERN,
)
from peer.run.presets import PRESET_NAMES
from peer.swarm import addresses
from peer.swarm.addresses import DEFAULT_LISTEN
from peer.swarm.nat import NAT_MODES, PUNCH_OBSERVERS, host_kind

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "lamb")


def setting(help: str, *, group: str = "peer", metavar: str | None = None, **kwargs):
    """A dataclass field whose metadata carries the flag's help text, help group and metavar (``cli.py`` builds
    argparse from it). Shared by the peer's and the coordinator's configs."""
    metadata = {"help": help, "group": group, **({"metavar": metavar} if metavar else {})}
    return field(metadata=metadata, **kwargs)


@dataclass
class PeerConfig:
    # --- swarm -----------------------------------------------------------------------------------------------------
    join: list[str] = setting(
        "multiaddr of any live peer to join through (repeatable); without it, start a new swarm",
        default_factory=list,
        metavar="MADDR",
        group="swarm",
    )
    listen: list[str] = setting(
        f"multiaddr to listen on (repeatable); default {DEFAULT_LISTEN} (loopback, random port). "
        "Use /ip4/0.0.0.0/tcp/PORT to accept peers from other machines",
        default_factory=list,
        metavar="MADDR",
        group="swarm",
    )
    announce: list[str] = setting(
        "multiaddr others should dial to reach you, e.g. /ip4/<public ip>/tcp/PORT (repeatable)",
        default_factory=list,
        metavar="MADDR",
        group="swarm",
    )
    client_mode: bool = setting(
        "behind NAT/firewall: accept no inbound connections (you train and average through others)",
        default=False,
        group="swarm",
    )
    nat: str = setting(
        f"one of {', '.join(NAT_MODES)}; auto: join in client mode when every address this peer would announce is "
        "private and a --join peer's is public (nobody could dial it); holepunch: instead, be reached through the "
        "first public --join peer as a relay and connect to other peers behind NAT directly by hole punching (needs "
        f"{PUNCH_OBSERVERS} public peers in the swarm and --listen /ip4/0.0.0.0/tcp/PORT); off: never switch by itself",
        default="auto",
        group="swarm",
    )
    identity: str | None = setting(
        "private key file that fixes this peer's id across restarts (default: <state-dir>/identity.key)",
        default=None,
        metavar="PATH",
        group="swarm",
    )
    address_file: str | None = setting(
        "once connected, write this peer's join address to PATH (atomically), for scripts and containers",
        default=None,
        metavar="PATH",
        group="swarm",
    )
    state_dir: str = setting(
        "directory for this peer's identity and saved training state (one per peer process)",
        default="bertswarm-state",
        metavar="DIR",
        group="swarm",
    )
    startup_timeout: float = setting(
        "seconds to wait for the bootstrap peer and the run manifest before giving up",
        default=30.0,
        metavar="SECONDS",
        group="swarm",
    )

    # --- run (shared by all peers through the manifest) ---------------------------------------------------------
    run_id: str | None = setting(
        "name of the training run (DHT key prefix); a joiner adopts the run it finds (default: bertswarm)",
        default=None,
        group="run",
    )
    preset: str = setting(f"model size, one of {', '.join(PRESET_NAMES)}", default="tiny", group="run")
    data: list[str] = setting(
        "training text: files, directories or globs of .txt / .jsonl (field 'text'), or hf:NAME[:CONFIG][:SPLIT]; "
        "or a directory written by bertswarm-prepare (then the only entry; the run pins it); default: the embedded "
        "corpus",
        default_factory=list,
        metavar="PATH",
        group="run",
    )
    tokenizer: str | None = setting(
        "WordPiece vocab.txt or tokenizer.json (default: the shipped 8192-token uncased vocab)",
        default=None,
        metavar="PATH",
        group="run",
    )
    seq_len: int = setting("tokens per training sequence", default=128, group="run")
    mlm_probability: float = setting("share of tokens masked for MLM", default=0.15, group="run")
    nsp: bool = setting("also train next-sentence prediction (BertForPreTraining)", default=False, group="run")
    target_batch_size: int | None = setting(
        "samples the whole swarm accumulates per optimizer step (default: per preset)", default=None, group="run"
    )
    optimizer: str = setting(f"one of {', '.join(OPTIMIZERS)}", default="adamw", group="run")
    lr: float | None = setting("peak learning rate (default: per preset)", default=None, group="run")
    weight_decay: float = setting("decoupled weight decay", default=0.01, group="run")
    max_grad_norm: float = setting(
        "clip the averaged gradient to this global L2 norm (0 = off)", default=1.0, group="run"
    )
    warmup_steps: int = setting("global steps of linear LR warm-up", default=50, group="run")
    total_steps: int = setting("global steps until the LR has decayed linearly to zero", default=10000, group="run")
    mode: str = setting(
        "training mode: 'sync' averages gradients at every global step; 'diloco' trains --inner-steps local steps, "
        "then averages the change of the weights (for slow links; see README)",
        default="sync",
        group="run",
    )
    inner_steps: int = setting(
        "diloco: local optimizer steps between two outer averaging rounds", default=DEFAULT_INNER_STEPS, group="run"
    )
    outer_lr: float = setting("diloco: outer Nesterov SGD learning rate", default=DEFAULT_OUTER_LR, group="run")
    outer_momentum: float = setting("diloco: outer Nesterov momentum", default=DEFAULT_OUTER_MOMENTUM, group="run")
    outer_compression: str = setting(
        f"diloco: compression of the averaged weight changes, one of {', '.join(OUTER_COMPRESSIONS)}",
        default=DEFAULT_OUTER_COMPRESSION,
        group="run",
    )
    outer_overlap: bool = setting(
        "diloco: exchange the weight changes in the background while the next inner steps compute (one round late; "
        "with outer momentum it cost held-out loss in our benchmark: pair it with --outer-momentum 0)",
        default=False,
        group="run",
    )
    aggregation: str = setting(
        f"how averaging combines the peers' contributions, one of {', '.join(AGGREGATIONS)}: the robust rules bound "
        "what one dishonest peer can do; 'mean' trusts everyone (docs/security.md)",
        default=DEFAULT_AGGREGATION,
        group="run",
    )
    allow: str | None = setting(
        "restrict a new run to the peer ids listed in FILE, one per line (yours is added); only the run's creator "
        "passes it, and may edit FILE while the run goes on (default: open to anyone; docs/security.md)",
        default=None,
        metavar="FILE",
        group="run",
    )

    # --- this peer ------------------------------------------------------------------------------------------------
    init_from: str | None = setting(
        "start a new swarm from a published checkpoint (directory or coordinator URL) instead of random weights; "
        "its manifest must match this run",
        default=None,
        metavar="DIR|URL",
        group="run",
    )
    batch_size: int | None = setting(
        "samples per local forward/backward pass (default: per preset)", default=None, group="peer"
    )
    device: str = setting(f"one of {', '.join(DEVICES)}", default="auto", group="peer")
    threads: int | None = setting("torch CPU threads (default: torch's choice)", default=None, group="peer")
    seed: int | None = setting(
        "seed of this peer's data order and masking (default: derived from peer id)", default=None, group="peer"
    )
    matchmaking_time: float = setting(
        "seconds to gather a group before averaging; raise it (e.g. 5-15) if rounds fail on slow networks",
        default=3.0,
        metavar="SECONDS",
        group="peer",
    )
    averaging_timeout: float = setting(
        "seconds an averaging round may take before this peer falls back to its local gradients",
        default=30.0,
        metavar="SECONDS",
        group="peer",
    )
    metrics_port: int | None = setting(
        "serve Prometheus metrics on this port (0 = any free port; default: off)",
        default=None,
        metavar="PORT",
        group="peer",
    )
    metrics_host: str = setting("address of the metrics endpoint", default="127.0.0.1", group="peer")
    max_steps: int | None = setting(
        "leave cleanly once the swarm's global optimizer step reaches N", default=None, metavar="N", group="peer"
    )
    save_every: float = setting(
        "seconds between saves of local training state (0 = only at exit)",
        default=120.0,
        metavar="SECONDS",
        group="peer",
    )
    log_every: float = setting("seconds between progress reports", default=5.0, metavar="SECONDS", group="peer")
    quiet: bool = setting("warnings and errors only: no status line, no progress reports", default=False, group="peer")
    verbose: bool = setting("also bertswarm's debug lines", default=False, group="peer")
    log_format: str = setting(
        f"how log lines are written to stderr, one of {', '.join(LOG_FORMATS)} (json: one object per line, for service "
        "managers and log shippers)",
        default="text",
        group="peer",
    )

    def validate(self) -> PeerConfig:
        """Check every value; raise ``UserError`` naming the flag, the bad value and what is allowed."""
        _choice("--preset", self.preset, PRESET_NAMES)
        _choice("--device", self.device, DEVICES)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--mode", self.mode, MODES)
        _choice("--outer-compression", self.outer_compression, OUTER_COMPRESSIONS)
        _choice("--aggregation", self.aggregation, AGGREGATIONS)
        _choice("--log-format", self.log_format, LOG_FORMATS)
        _choice("--nat", self.nat, NAT_MODES)
        if self.quiet and self.verbose:
            raise UserError("--quiet and --verbose contradict each other; pass one")
        _positive("inner_steps", self.inner_steps)
        if not 0.0 < self.outer_lr <= 10.0:
            raise UserError(f"--outer-lr {self.outer_lr}: must be in (0, 10], e.g. 0.7")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise UserError(f"--outer-momentum {self.outer_momentum}: must be in [0, 1), e.g. 0.9")
        for name in ("seq_len", "target_batch_size", "batch_size", "threads", "max_steps", "total_steps"):
            _positive(name, getattr(self, name))
        if not 8 <= self.seq_len <= 512:
            raise UserError(f"--seq-len {self.seq_len}: must be between 8 and 512 (BERT position embeddings)")
        if not 0.0 < self.mlm_probability < 1.0:
            raise UserError(f"--mlm-probability {self.mlm_probability}: must be strictly between 0 and 1")
        if self.lr is not None and not 0.0 < self.lr < 1.0:
            raise UserError(f"--lr {self.lr}: must be between 0 and 1, e.g. 5e-4")
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise UserError(f"{_flag(name)} {getattr(self, name)}: must be >= 0")
        for name in ("matchmaking_time", "averaging_timeout", "startup_timeout", "log_every"):
            if not getattr(self, name) > 0:
                raise UserError(f"{_flag(name)} {getattr(self, name)}: must be > 0 seconds")
        if self.warmup_steps >= self.total_steps:
            raise UserError(f"--warmup-steps {self.warmup_steps} must be smaller than --total-steps {self.total_steps}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise UserError(f"--metrics-port {self.metrics_port}: must be a TCP port 0-65535")
        if self.run_id is not None and not _is_run_id(self.run_id):
            raise UserError(
                f"--run-id {self.run_id!r}: use 1-64 letters, digits, '-' or '_' (it prefixes the swarm's DHT keys)"
            )
        addresses.validate(self.join, self.listen, self.announce)
        if self.init_from and self.join:
            raise UserError("--init-from starts a new swarm; a joining peer takes the swarm's state, drop one of them")
        if self.client_mode and self.announce:
            raise UserError("--client-mode accepts no inbound connections, so --announce makes no sense; drop one")
        if self.nat == "holepunch":
            _check_holepunch(self)
        if self.address_file is not None and not Path(self.address_file).expanduser().parent.is_dir():
            raise UserError(f"--address-file {self.address_file}: its directory does not exist; create it first")
        if self.batch_size and self.target_batch_size and self.batch_size > self.target_batch_size:
            raise UserError(
                f"--batch-size {self.batch_size} exceeds --target-batch-size {self.target_batch_size}; lower it"
            )
        return self

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @property
    def identity_path(self) -> Path:
        return Path(self.identity).expanduser() if self.identity else self.state_path / "identity.key"


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(PeerConfig)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_holepunch(cfg: PeerConfig) -> None:
    """``--nat holepunch`` needs what a hole punch needs: a public peer to relay through, no --client-mode, and a
    listen address that is not loopback (the punched connection leaves from the listening port)."""
    if cfg.client_mode:
        raise UserError("--client-mode accepts no inbound connections, so --nat holepunch makes no sense; drop one")
    if not any(host_kind(a) == "public" for a in cfg.join):
        raise UserError("--nat holepunch needs a --join peer with a public address to relay through; pass one, or "
                        "drop --nat holepunch")  # fmt: skip
    if all(host_kind(a) == "loopback" for a in cfg.listen or [DEFAULT_LISTEN]):
        raise UserError("--nat holepunch: this peer listens on loopback only, so no connection can be punched to it; "
                        "pass --listen /ip4/0.0.0.0/tcp/PORT")  # fmt: skip


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{flag} {value!r}: unknown; choose one of {', '.join(allowed)}")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{_flag(name)} {value}: must be a positive integer")


def _is_run_id(value: str) -> bool:
    return re.fullmatch(RUN_ID_PATTERN, value) is not None  # ASCII only: it prefixes DHT keys
