"""``bertswarm-coordinator``: observe a swarm, export its metrics, publish checkpoints. Optional: the swarm trains the
same with or without it, and it may die or restart at any time."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from functools import partial
from pathlib import Path

from coordinator.config import CoordinatorConfig
from peer.cli import build_parser, parse_config, run_command, setup_logging
from peer.errors import UserError

logger = logging.getLogger(__name__)

GROUPS = {"swarm": "joining the swarm", "coordinator": "metrics and checkpoints"}
DESCRIPTION = (
    "Observe a bertswarm swarm: export swarm-wide Prometheus metrics and publish Hugging Face-compatible "
    "checkpoints. It never trains, decides or serves state; the swarm does not need it."
)


def check_checkpoint_dir(path: Path) -> None:
    """Fail fast (one line, before joining) when checkpoints could not be written."""
    from peer.store.checkpoint import check_writable
    from peer.store.errors import CheckpointError

    try:
        check_writable(path)
    except CheckpointError as e:
        raise e.with_flag("--checkpoint-dir") from None


async def run(cfg: CoordinatorConfig) -> None:
    from peer.swarm import hivemind_compat

    hivemind_compat.check_version()  # before anything that subclasses hivemind's internals is imported
    # heavy imports after the flags are known to be sane
    from coordinator import http
    from coordinator.service import CoordinatorService
    from peer import join
    from peer.config import PeerConfig
    from peer.data.tokenizer import tokenizer_fingerprint
    from peer.swarm import dht as swarm
    from peer.swarm import records
    from peer.trainer import load_inputs

    check_checkpoint_dir(Path(cfg.checkpoint_dir).expanduser())
    tokenizer, documents, dataset = load_inputs(cfg.tokenizer, cfg.data)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    service = None
    dht_cfg = PeerConfig(join=cfg.join, listen=cfg.listen, client_mode=True, state_dir=cfg.state_dir,
                         startup_timeout=cfg.startup_timeout)  # fmt: skip
    holder: dict = {}
    app = http.make_app(_Lazy(holder))
    runner, port = await http.serve(app, cfg.http_host, cfg.http_port)
    dht = await loop.run_in_executor(None, swarm.start_dht, dht_cfg, records.registry_validators())
    try:
        found = await loop.run_in_executor(None, partial(join.wait_for_run, dht, cfg.run_id, cfg.startup_timeout,
                                                         bootstrap=join.bootstrap_peer_ids(cfg.join)))  # fmt: skip
        run_id, run_manifest = found.run_id, found.manifest
        if run_manifest.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
            raise UserError(
                "the run uses another tokenizer than this coordinator; pass --tokenizer with the run's file"
            )
        validators, subkey = records.run_validators(run_id)
        dht.add_validators(validators)
        batches = evaluation_batches(run_manifest, tokenizer, documents, dataset, cfg.eval_batches)
        public_url = f"http://{cfg.http_host}:{port}"
        # in the main thread: hivemind's averager changes signal handlers when it starts, and then resets SIGINT
        service = CoordinatorService(cfg, dht, run_manifest, tokenizer, batches, public_url, subkey)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        holder["service"] = service
        print(f"bertswarm-coordinator: observing run {run_id}; metrics on {public_url}/metrics, status on "
              f"{public_url}/status, checkpoints in {cfg.checkpoint_dir}", flush=True)  # fmt: skip
        await service.run_forever(stop)
    finally:
        if service is not None:
            service.close()
        swarm.stop_dht(dht)
        await runner.cleanup()


def evaluation_batches(run_manifest, tokenizer, documents: list[str], dataset, max_batches: int) -> list[dict]:
    """Held-out batches: the prepared dataset's held-out split when ``--data`` names one (it must be the run's), else
    the held-out split of the text."""
    from peer.data.batches import heldout_batches
    from peer.data.corpus import split_heldout
    from peer.data.stream import prepared_heldout_batches
    from peer.data.tokenizer import TokenizerInfo
    from peer.errors import InputError
    from peer.join import data_conflict

    if dataset is None:
        _, heldout = split_heldout(documents)
        return heldout_batches(heldout, tokenizer, seq_len=run_manifest.seq_len, batch_size=16, seed=0,
                               max_batches=max_batches, nsp=run_manifest.nsp)  # fmt: skip
    if dataset.fingerprint != run_manifest.data_fingerprint:
        raise UserError(data_conflict(run_manifest.data_fingerprint, dataset.fingerprint))
    try:
        return prepared_heldout_batches(dataset, TokenizerInfo.of(tokenizer), batch_size=16, seed=0,
                                        max_batches=max_batches)  # fmt: skip
    except InputError as e:
        raise e.with_flag("--data") from None


class _Lazy:
    """The HTTP app starts before the service exists (to claim the port first); until then it answers 503."""

    def __init__(self, holder: dict):
        self._holder = holder

    def __getattr__(self, name):
        service = self._holder.get("service")
        if service is None:
            from aiohttp import web

            raise web.HTTPServiceUnavailable(text="still joining the swarm\n")
        return getattr(service, name)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser(CoordinatorConfig, "bertswarm-coordinator", DESCRIPTION, GROUPS)
        cfg, _ = parse_config(argv, parser=parser, config_cls=CoordinatorConfig)
        setup_logging()
        import uvloop

        uvloop.run(run(cfg))

    return run_command("bertswarm-coordinator", body, None)


if __name__ == "__main__":
    sys.exit(main())
