"""Every setting of ``bertswarm-serve``, declared once (the CLI is generated from these fields, as for the peer)."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from peer.config import setting
from peer.errors import UserError

_opt = partial(setting, group="serve")

MAX_BATCH_LIMIT = 1024


@dataclass
class ServeConfig:
    checkpoints: str = _opt("a checkpoint root (the coordinator's --checkpoint-dir; its latest is served) or a "
                            "coordinator's URL, e.g. http://127.0.0.1:9500/checkpoints (required)",
                            default="", metavar="DIR|URL")  # fmt: skip
    host: str = _opt("address to listen on (default: loopback only)", default="127.0.0.1")
    port: int = _opt("port to listen on (0 = any free port)", default=9600, metavar="PORT")
    max_batch: int = _opt("most inputs per model call; also the most inputs of one request", default=32, metavar="N")
    batch_window_ms: float = _opt("how long the first request of a batch waits for others", default=5.0,
                                  metavar="MS")  # fmt: skip
    threads: int = _opt("CPU threads torch uses for a batch (0 = one fewer than the CPUs, at least 1: the event "
                        "loop keeps a core)", default=0, metavar="N")  # fmt: skip
    poll_seconds: float = _opt("seconds between checks for a newer checkpoint", default=5.0, metavar="SECONDS")
    shutdown_seconds: float = _opt("on SIGINT/SIGTERM, seconds in-flight requests get to finish", default=10.0,
                                   metavar="SECONDS")  # fmt: skip

    @property
    def is_url(self) -> bool:
        return self.checkpoints.startswith(("http://", "https://"))

    def validate(self) -> ServeConfig:
        if not self.checkpoints:
            raise UserError("--checkpoints is required: pass a checkpoint directory or a coordinator's http(s) URL")
        if self.is_url:
            parsed = urllib.parse.urlsplit(self.checkpoints)
            try:
                parsed.port  # noqa: B018  (raises ValueError on a malformed port)
            except ValueError:
                parsed = parsed._replace(netloc="")
            if not parsed.hostname or parsed.query or parsed.fragment:
                raise UserError(f"--checkpoints {self.checkpoints}: not a usable URL; pass the coordinator's "
                                "address, e.g. http://127.0.0.1:9500/checkpoints")  # fmt: skip
        elif "://" in self.checkpoints:
            raise UserError(f"--checkpoints {self.checkpoints}: only http:// and https:// URLs are supported; pass "
                            "a coordinator's http(s) URL or a local checkpoint directory")  # fmt: skip
        else:
            path = Path(self.checkpoints).expanduser()
            if not path.is_dir():
                problem = "is not a directory" if path.exists() else "does not exist"
                raise UserError(f"--checkpoints {path}: {problem}; pass the coordinator's --checkpoint-dir (it may be "
                                "empty until the first checkpoint)")  # fmt: skip
            if not os.access(path, os.R_OK | os.X_OK):
                raise UserError(f"--checkpoints {path}: not readable; make it readable or run as its owner")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: must be a TCP port 0-65535")
        if not 1 <= self.max_batch <= MAX_BATCH_LIMIT:
            raise UserError(f"--max-batch {self.max_batch}: must be 1-{MAX_BATCH_LIMIT}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise UserError(f"--batch-window-ms {self.batch_window_ms}: must be 0-1000")
        if self.threads < 0:
            raise UserError(f"--threads {self.threads}: must be >= 0 (0 = one fewer than the CPUs)")
        for name in ("poll_seconds", "shutdown_seconds"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0 seconds")
        return self
