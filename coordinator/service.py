"""The coordinator's loop, read as steps: read the peers' metrics, export them, and every so often download the
swarm's state, verify it, evaluate it and publish a checkpoint. It never writes anything peers act on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import hivemind
from hivemind.utils import get_dht_time

from coordinator.aggregate import SwarmView, aggregate
from coordinator.config import CoordinatorConfig
from coordinator.metrics import SwarmMetrics
from coordinator.snapshot import StateDownloader, all_finite, evaluate
from peer.errors import UserError
from peer.run import schema
from peer.run.manifest import RunManifest
from peer.store import checkpoint
from peer.store.errors import CheckpointError
from peer.swarm.records import read_swarm_metrics

logger = logging.getLogger(__name__)

ANNOUNCE_TTL = 3600.0


class CoordinatorService:
    def __init__(self, cfg: CoordinatorConfig, dht: hivemind.DHT, run: RunManifest, tokenizer, eval_batches,
                 public_url: str, subkey: bytes):  # fmt: skip
        self.cfg, self.dht, self.run, self.tokenizer = cfg, dht, run, tokenizer
        self.eval_batches, self.public_url, self.subkey = eval_batches, public_url, subkey
        self.checkpoint_root = Path(cfg.checkpoint_dir).expanduser()
        self.metrics = SwarmMetrics()
        self.view = SwarmView()
        self.downloader = StateDownloader(dht, run)
        self.last_eval: dict | None = None
        existing = checkpoint.list_checkpoints(self.checkpoint_root)
        self.last_checkpoint = existing[0] if existing else None
        self._last_publish_time = time.monotonic()
        if self.last_checkpoint is not None:
            self.metrics.checkpoint_epoch.set(self.last_checkpoint.epoch)

    # --- steps ------------------------------------------------------------------------------------------------------

    def read_metrics(self) -> SwarmView:
        records = read_swarm_metrics(self.dht, self.run.run_id)
        self.view = aggregate(records, now=time.time(), stale_after=self.cfg.stale_after,
                              target_batch_size=self.run.target_batch_size)  # fmt: skip
        self.metrics.update(self.view)
        return self.view

    def checkpoint_due(self) -> bool:
        cfg, last_epoch = self.cfg, (self.last_checkpoint.epoch if self.last_checkpoint else 0)
        if self.view.peers == 0 or self.view.epoch <= last_epoch:
            return False
        by_steps = cfg.checkpoint_every > 0 and self.view.epoch >= last_epoch + cfg.checkpoint_every
        by_time = (
            cfg.checkpoint_minutes > 0 and time.monotonic() - self._last_publish_time >= 60 * cfg.checkpoint_minutes
        )
        return by_steps or by_time

    def publish_checkpoint(self) -> checkpoint.CheckpointInfo | None:
        """Download, verify, evaluate, write, announce. Runs in a worker thread."""
        epoch = self.downloader.download(timeout=max(30.0, self.cfg.startup_timeout))
        model = self.downloader.model
        if epoch is None:
            logger.warning("no peer sent its state; will retry at the next tick")
            return None
        if not all_finite(model):
            logger.error("the swarm's state at step %d has non-finite weights; not publishing it", epoch)
            self.metrics.checkpoints.labels("failed").inc()
            return None
        eval_metrics = evaluate(model, self.eval_batches)
        started = time.perf_counter()
        try:
            path = checkpoint.write_checkpoint(
                self.checkpoint_root, model, self.tokenizer, self.run, epoch=epoch, samples_seen=self.view.samples,
                eval_metrics=eval_metrics, keep=self.cfg.keep,
            )  # fmt: skip
        except CheckpointError as e:
            raise e.with_flag("--checkpoint-dir") from None
        seconds = time.perf_counter() - started
        info = next(i for i in checkpoint.list_checkpoints(self.checkpoint_root) if Path(i.path) == Path(path))
        self.last_checkpoint, self.last_eval = info, eval_metrics
        self._last_publish_time = time.monotonic()
        self.metrics.checkpoint_published(epoch, eval_metrics, seconds, created=time.time())
        logger.info("published %s (step %d): held-out loss %.3f, accuracy %.3f, written in %.2fs", info.name, epoch,
                    eval_metrics["mlm_loss"], eval_metrics["mlm_accuracy"], seconds)  # fmt: skip
        record = schema.CheckpointRecord(
            epoch=epoch,
            name=info.name,
            sha256=info.sha256,
            url=f"{self.public_url}/checkpoints/{info.name}",
            time=time.time(),
        )
        self.dht.store(schema.checkpoints_key(self.run.run_id), record.dict(), get_dht_time() + ANNOUNCE_TTL,
                       subkey=self.subkey)  # fmt: skip
        return info

    def status(self) -> dict:
        last = self.last_checkpoint
        return {
            "run_id": self.run.run_id,
            "manifest_fingerprint": self.run.fingerprint,
            "swarm": self.view.to_json(),
            "eval": self.last_eval,
            "last_checkpoint": last.to_dict() if last else None,
        }

    # --- loop -------------------------------------------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await loop.run_in_executor(None, self.read_metrics)
                if self.checkpoint_due():
                    try:
                        await loop.run_in_executor(None, self.publish_checkpoint)
                    except UserError as e:  # e.g. the checkpoint disk filled up: say so, keep observing
                        self.metrics.checkpoints.labels("failed").inc()
                        logger.error("could not publish a checkpoint: %s", e)
                    except Exception:
                        self.metrics.checkpoints.labels("failed").inc()
                        logger.exception("publishing a checkpoint failed; will retry")
            except Exception:
                logger.exception("reading the swarm's metrics failed; will retry")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.cfg.tick)

    def close(self) -> None:
        self.downloader.shutdown()
