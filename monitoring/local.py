"""``make monitor``: a local Prometheus (Debian's ``prometheus`` package, no docker) scraping ``make demo``'s swarm.

Also used by the tests, which point it at a swarm of their own on random ports.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from monitoring.build import RULES_PATH

COORDINATOR_JOB, PEER_JOB = "bertswarm-coordinator", "bertswarm-peer"
DEMO_COORDINATOR, DEMO_FIRST_PEER_PORT = "127.0.0.1:9500", 9400  # coordinator.demo's fixed ports


def prometheus_config(coordinators: list[str], peers: list[str], interval: str = "5s") -> dict:
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(RULES_PATH)],
        "scrape_configs": [
            {"job_name": COORDINATOR_JOB, "static_configs": [{"targets": coordinators}]},
            {"job_name": PEER_JOB, "static_configs": [{"targets": peers}]},
        ],
    }


def start_prometheus(config: dict, workdir: Path, listen: str, log=None) -> subprocess.Popen:
    """Write ``config`` under ``workdir`` and start Prometheus on it (the caller stops it)."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("monitor: the prometheus binary is not on PATH; install it (apt-get install prometheus) "
                         "or run the docker stack in docker/")  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
               f"--web.listen-address={listen}", "--storage.tsdb.retention.time=2d"]  # fmt: skip
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None)


def port_free(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    with socket.socket() as s:
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make monitor", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3, help="peers of make demo to scrape (ports 9400, 9401, ...)")
    parser.add_argument("--listen", default="127.0.0.1:9090", help="Prometheus's own address")
    parser.add_argument("--workdir", type=Path, default=Path("demo-state/prometheus"))
    args = parser.parse_args(argv)
    if not port_free(args.listen):
        print(f"monitor: {args.listen} is in use; pass another --listen (make monitor MONITOR_LISTEN=...)",
              file=sys.stderr)  # fmt: skip
        return 2
    peers = [f"127.0.0.1:{DEMO_FIRST_PEER_PORT + i}" for i in range(args.peers)]
    try:
        proc = start_prometheus(prometheus_config([DEMO_COORDINATOR], peers), args.workdir, args.listen)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"monitor: Prometheus on http://{args.listen} scrapes the coordinator at {DEMO_COORDINATOR} and peers at "
          f"{', '.join(peers)}; start the swarm with `make demo` in another terminal. Alerts: "
          f"http://{args.listen}/alerts. Ctrl-C stops it.", flush=True)  # fmt: skip
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 0


if __name__ == "__main__":
    sys.exit(main())
