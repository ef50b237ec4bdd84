"""Every setting of the coordinator, declared once (the CLI is generated from these fields, as for the peer)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from peer.config import setting
from peer.errors import UserError
from peer.swarm import addresses

_opt = partial(setting, group="coordinator")  # fields without a group belong to the "coordinator" help section


@dataclass
class CoordinatorConfig:
    join: list[str] = _opt("multiaddr of any live peer of the swarm (repeatable, required)", default_factory=list,
                           metavar="MADDR", group="swarm")  # fmt: skip
    listen: list[str] = _opt("multiaddr the coordinator's DHT node listens on (default: loopback, random port)",
                             default_factory=list, metavar="MADDR", group="swarm")  # fmt: skip
    run_id: str | None = _opt("run to observe (default: the one run the swarm hosts)", default=None, group="swarm")
    state_dir: str = _opt("directory for the coordinator's identity", default="bertswarm-coordinator",
                          metavar="DIR", group="swarm")  # fmt: skip
    startup_timeout: float = _opt("seconds to wait for the swarm", default=30.0, metavar="SECONDS", group="swarm")
    http_host: str = _opt("address of the HTTP endpoint (/metrics, /status, /checkpoints)", default="127.0.0.1")
    http_port: int = _opt("port of the HTTP endpoint (0 = any free port)", default=9500, metavar="PORT")
    checkpoint_dir: str = _opt("where published checkpoints are written", default="checkpoints", metavar="DIR")
    checkpoint_every: int = _opt("publish a checkpoint every N global steps (0 = off)", default=50, metavar="N")
    checkpoint_minutes: float = _opt("also publish at least every N minutes of training (0 = off)", default=0.0,
                                     metavar="MINUTES")  # fmt: skip
    keep: int = _opt("number of newest checkpoints to keep", default=5)
    data: list[str] = _opt("text whose held-out split is used for evaluation, or the run's prepared dataset "
                           "directory (its held-out split) (default: the embedded corpus)",
                           default_factory=list, metavar="PATH")  # fmt: skip
    tokenizer: str | None = _opt("the run's vocab.txt or tokenizer.json if it does not use the shipped one",
                                 default=None, metavar="PATH")  # fmt: skip
    eval_batches: int = _opt("held-out batches per evaluation", default=8)
    tick: float = _opt("seconds between reads of the peers' metrics", default=5.0, metavar="SECONDS")
    stale_after: float = _opt("seconds after which a peer's metrics record no longer counts", default=30.0,
                              metavar="SECONDS")  # fmt: skip

    def validate(self) -> CoordinatorConfig:
        if not self.join:
            raise UserError("--join is required: pass the join address printed by any live bertswarm-peer")
        addresses.validate(self.join, self.listen, [])
        if not 0 <= self.http_port <= 65535:
            raise UserError(f"--http-port {self.http_port}: must be a TCP port 0-65535")
        for name in ("checkpoint_every", "eval_batches", "keep"):
            if getattr(self, name) < 0 or (name != "checkpoint_every" and getattr(self, name) == 0):
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive integer")
        for name in ("tick", "stale_after", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0 seconds")
        if self.checkpoint_minutes < 0:
            raise UserError(f"--checkpoint-minutes {self.checkpoint_minutes}: must be >= 0")
        return self
