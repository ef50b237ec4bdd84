"""Download the swarm's current state as an observer, verify it, and evaluate it on held-out text.

The coordinator holds a ``TrainingStateAverager`` (the peers' ``RobustStateAverager``) with exactly the peers' parameter
and optimizer structure (built by the same ``peer`` functions; in ``--mode diloco`` the peers' outer state: θ_outer,
outer momentum, outer step), in client mode and with state sharing off: it can download state, and it never serves its
possibly stale copy to joining peers nor takes part in averaging rounds."""

from __future__ import annotations

import logging
import time

import hivemind
import torch

from peer.finetune.metrics import evaluate_mlm
from peer.run.manifest import RunManifest
from peer.run.model import build_model
from peer.swarm import hivemind_compat
from peer.swarm.diloco import OuterStateAverager, outer_optimizer, trained_parameters
from peer.swarm.optim import optimizer_factory, param_groups, scheduler_factory

logger = logging.getLogger(__name__)


class StateDownloader:
    def __init__(self, dht: hivemind.DHT, manifest: RunManifest):
        self.manifest = manifest
        self.model = build_model(manifest.model, nsp=manifest.nsp, seed=manifest.init_seed)
        hivemind_compat.install()  # before the averager forks, as the peers do
        # an observer: downloads state, never serves its possibly stale copy, never joins an averaging round
        observer = dict(
            dht=dht, offload_optimizer=True, custom_gradients=True, client_mode=True, allow_state_sharing=False,
            min_matchmaking_time=1.0, request_timeout=0.5, start=True,
        )  # fmt: skip
        if manifest.mode == "diloco":  # the outer state: θ_outer, the outer momentum and the outer step
            names, params = trained_parameters(self.model)
            self.averager = OuterStateAverager(
                prefix=f"{manifest.run_id}_outer",
                params=list(params),
                parameter_names=names,
                optimizer=outer_optimizer(manifest.outer_lr, manifest.outer_momentum),
                **observer,
            )
        else:
            # the peers' class: hivemind names its RPC handlers after the class, so the download must ask for theirs
            self.averager = hivemind_compat.RobustStateAverager(
                prefix=f"{manifest.run_id}_state_averager",
                aggregation=manifest.aggregation,
                optimizer=optimizer_factory(manifest),
                params=param_groups(self.model, manifest.weight_decay),
                scheduler=scheduler_factory(manifest),
                **observer,
            )

    def download(self, timeout: float) -> int | None:
        """Load the newest state a peer offers; the global step it belongs to, or None if no peer answered."""
        started = time.perf_counter()
        before = (self.averager.local_epoch, _checksum(self.model))
        self.averager.load_state_from_peers(timeout=timeout)
        if (self.averager.local_epoch, _checksum(self.model)) == before:
            return None  # hivemind returns silently when no peer sent its state
        logger.info("downloaded the swarm's state at step %d in %.2fs", self.averager.local_epoch,
                    time.perf_counter() - started)  # fmt: skip
        return self.averager.local_epoch

    def shutdown(self) -> None:
        self.averager.shutdown()


@torch.no_grad()
def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.double().sum() for p in model.parameters()))


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def evaluate(model: torch.nn.Module, batches: list[dict]) -> dict[str, float]:
    """Held-out MLM loss (mean over masked tokens), accuracy (argmax == original token at masked positions) and the
    number of masked tokens: ``bertswarm-eval``'s computation (one implementation), recorded without its perplexity."""
    figures = evaluate_mlm(model, batches)
    figures.pop("perplexity")
    return figures
