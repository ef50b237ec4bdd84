"""The optimizer of ``--mode diloco``: the run's inner optimizer (AdamW/LAMB with clipping, the run's LR schedule) on
this peer's own batches, and the DiLoCo engine (``peer.swarm.diloco``) for the outer rounds every ``inner_steps``.

It offers the trainer what ``peer.swarm.optim.SwarmOptimizer`` offers in sync mode (``step``, ``zero_grad``,
``local_epoch``, ``catch_up``, ``progress``, state for ``<state-dir>``, ``shutdown``), so ``peer.trainer`` reads
the same
in both modes. Here a "step" of the run (``local_epoch``, ``--max-steps``, checkpoints) is an *outer* step.

- LR schedule: the run's warm-up and linear decay, keyed to the inner step count ``outer_epoch × H + inner step``,
  which every peer shares after a state download. A peer that loaded the outer state (a joiner, a straggler) also
  warms its inner learning rate up over H inner steps: its inner optimizer's moments start cold.
- Local state (``<state-dir>``): the model holds θ_outer at a save (saved between outer rounds: the parameters of the
  last outer step are what a restart resumes from), with the inner moments and the outer momentum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import hivemind
import torch

from peer.run.manifest import RunManifest
from peer.swarm.diloco import DiLoCo, RoundReport, trained_parameters
from peer.swarm.optim import SwarmProgress, lr_lambda, optimizer_factory, param_groups

logger = logging.getLogger(__name__)

OUTER_MOMENTUM_KEY = "outer_momentum"  # saved next to the inner moments of each parameter in <state-dir>


class DiLoCoOptimizer:
    def __init__(
        self,
        model: torch.nn.Module,
        manifest: RunManifest,
        dht: hivemind.DHT,
        *,
        matchmaking_time: float,
        averaging_timeout: float,
        on_round: Callable[[RoundReport], None] | None = None,
        on_state_loaded: Callable[[float], None] | None = None,
    ):
        self.manifest, self.model = manifest, model
        self.opt = optimizer_factory(manifest)(param_groups(model, manifest.weight_decay))
        self.opt.on_nonfinite = self._count_nonfinite_step
        self.skipped_nonfinite_steps = 0
        self._lr_factor = lr_lambda(manifest)
        self._base_lrs = [group["lr"] for group in self.opt.param_groups]
        self._on_state_loaded = on_state_loaded or (lambda seconds: None)
        self.engine = DiLoCo(
            dht=dht,
            run_id=manifest.run_id,
            model=model,
            inner_steps=manifest.inner_steps,
            outer_lr=manifest.outer_lr,
            outer_momentum=manifest.outer_momentum,
            compression=manifest.outer_compression,
            overlap=manifest.outer_overlap,
            aggregation=manifest.aggregation,
            matchmaking_time=matchmaking_time,
            averaging_timeout=averaging_timeout,
            load_state_timeout=max(60.0, 4 * averaging_timeout),
            on_round=on_round,
            on_state_loaded=lambda epoch, seconds: self._on_state_loaded(seconds),
        )
        self._set_lr()

    # --- what the trainer uses --------------------------------------------------------------------------------------

    @property
    def local_epoch(self) -> int:
        """The outer step this peer holds."""
        return self.engine.outer_epoch

    @property
    def inner_step_count(self) -> int:
        """Inner steps of the run so far: the schedule's clock, the same on every peer after a state download."""
        return self.engine.outer_epoch * self.engine.inner_steps + self.engine.inner_step

    @property
    def learning_rate(self) -> float:
        return self.opt.param_groups[0]["lr"]

    ignored_progress_records = 0  # DiLoCo's records carry no sample counts to lie about (see peer.swarm.diloco)

    def step(self) -> RoundReport | None:
        """One inner optimizer step on the local gradients; every H of them, an outer round."""
        self.opt.step()
        report = self.engine.after_inner_step()
        self._set_lr()
        return report

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def catch_up(self, timeout: float) -> bool:
        """Before the first inner step: download the outer state if a peer holds a newer one (a joiner)."""
        return self.engine.load_state_from_peers(timeout=timeout)

    def progress(self) -> SwarmProgress:
        status = self.engine.status
        text = f"inner {status.inner_step}/{status.inner_steps}"
        if status.last is not None:
            last = status.last
            text += (
                f", last round {last.outcome} ({last.group_size} peer{'s' if last.group_size != 1 else ''}) in "
                f"{last.seconds:.1f}s, {(last.bytes_sent + last.bytes_received) / 1e6:.1f} MB"
            )
        return SwarmProgress(peers=1 + self.engine.others_seen, text=text)

    def cancel_matchmaking(self) -> bool:
        """The stop signal: join no new outer round and abandon one still looking for its group."""
        return self.engine.cancel_matchmaking()

    def leave_swarm(self) -> None:
        """First thing when leaving: withdraw this peer's progress record, so the others stop waiting for it."""
        self.engine.leave()

    # --- local state (<state-dir>) -----------------------------------------------------------------------------------

    @torch.no_grad()
    def model_state_for_save(self) -> dict[str, torch.Tensor]:
        """θ_outer by parameter name (what a restart resumes from; the inner progress since the last round is not
        kept)."""
        params, _, _ = self.engine.outer_state(copy=False)  # written to disk at once, on the training thread
        names, _ = trained_parameters(self.model)
        return dict(zip(names, params, strict=True))

    def state_dict(self) -> dict:
        """``{"state": {index: {name: tensor}}, "param_groups": ...}``: the inner moments and, under the same
        parameter's index, its outer momentum."""
        state = self.opt.state_dict()
        # torch's per-parameter dicts are the live ones: add the outer momentum to copies
        state["state"] = {index: dict(entries) for index, entries in state["state"].items()}
        _, momentum, _ = self.engine.outer_state(copy=False)
        for index, buffer in zip(self._inner_indices(), momentum, strict=True):
            if buffer is not None:
                state["state"].setdefault(index, {})[OUTER_MOMENTUM_KEY] = buffer
        return state

    def load_state_dict(self, state: dict, *, epoch: int) -> None:
        """Resume: the model already holds the saved θ_outer; restore the inner moments, the outer momentum and
        the outer epoch."""
        momentum = [state["state"].get(index, {}).pop(OUTER_MOMENTUM_KEY, None) for index in self._inner_indices()]
        self.opt.load_state_dict(state)
        self.engine.restore(momentum, epoch)
        self._set_lr()

    def _inner_indices(self) -> list[int]:
        """The inner optimizer's state index of each outer parameter, in the engine's order (its param groups put
        the weight-decayed parameters first, the engine follows ``named_parameters``)."""
        index = {id(p): i for i, p in enumerate(p for group in self.opt.param_groups for p in group["params"])}
        return [index[id(p)] for p in trained_parameters(self.model)[1]]

    def start_at(self, epoch: int) -> None:
        """``--init-from``: the model holds the checkpoint's weights; the run continues at its outer step."""
        self.engine.restore(None, epoch)
        self._set_lr()

    def shutdown(self) -> None:
        self.engine.shutdown()

    # --- internals -------------------------------------------------------------------------------------------------

    def _set_lr(self) -> None:
        factor = self._lr_factor(self.inner_step_count) * self.engine.joiner_lr_factor(self.engine.inner_steps)
        for group, base in zip(self.opt.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor if math.isfinite(factor) else 0.0

    def _count_nonfinite_step(self) -> None:
        self.skipped_nonfinite_steps += 1
