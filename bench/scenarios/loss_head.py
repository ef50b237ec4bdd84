"""Scenario: the training loss with the vocabulary head at the masked positions only
(``peer.run.model.pretraining_loss``) against transformers' own ``model(**batch).loss``.

Per preset (tiny, mini): batch 16 × 128 tokens from the benchmark workload's stream, one torch thread, a training step
of forward, backward and AdamW step. Each arm trains its own copy of the same initial model with its own optimizer,
on the same batches; the arms alternate in this process (their order swaps every repetition), each timed over the same
steps after one untimed warm-up step. The headline is a ratio within each repetition: step time with transformers'
loss ÷ with ``pretraining_loss``. A check row: on each batch of the repetition, both losses computed by the same
model in eval mode (no dropout) agree to a relative difference of at most 1e-5.
"""

from __future__ import annotations

import copy
import os
import time

NAME = "loss_head"
TITLE = "Training loss: the vocabulary head at the masked positions only vs transformers' loss"
PRESETS = ("tiny", "mini")
ARMS = ("transformers", "pretraining_loss")
GOALS = {"tiny": ">= 2.0", "mini": ">= 1.2"}


def config(quick: bool) -> dict:
    return dict(batch=16, seq_len=128, threads=1, steps=1 if quick else 8, presets=PRESETS)


def _step_loss(arm: str, model, batch):
    from peer.run.model import pretraining_loss

    return model(**batch).loss if arm == "transformers" else pretraining_loss(model, batch)


def _train(arm: str, model, optimizer, batches: list) -> float:
    """Seconds for one training step on each of ``batches``."""
    started = time.perf_counter()
    for batch in batches:
        loss = _step_loss(arm, model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def _max_relative_difference(model, batches: list) -> float:
    """The largest |transformers − pretraining_loss| ÷ |transformers| over ``batches``, one model in eval mode."""
    import torch

    model.eval()
    try:
        worst = 0.0
        with torch.no_grad():
            for batch in batches:
                reference = _step_loss("transformers", model, batch).double().item()
                ours = _step_loss("pretraining_loss", model, batch).double().item()
                worst = max(worst, abs(reference - ours) / abs(reference))
        return worst
    finally:
        model.train()


def measure_preset(preset: str, reps: int, cfg: dict) -> list[dict]:
    """One entry per repetition: both arms' step times and samples/s, and the loss check."""
    import torch

    from bench import workload
    from peer.run.model import build_model

    run = workload.make_manifest(f"bench-loss-head-{preset}", preset, cfg["seq_len"])
    initial = build_model(run.model, nsp=False, seed=run.init_seed).train()
    models = {arm: copy.deepcopy(initial) for arm in ARMS}
    optimizers = {arm: torch.optim.AdamW(models[arm].parameters(), lr=1e-4) for arm in ARMS}
    stream = workload.stream(run, cfg["batch"], seed=0)
    warmup = next(stream)
    for arm in ARMS:  # AdamW's state and the allocator's first buffers, untimed
        _train(arm, models[arm], optimizers[arm], [warmup])
    out = []
    for rep in range(reps):
        batches = [next(stream) for _ in range(cfg["steps"])]
        order = ARMS if rep % 2 == 0 else ARMS[::-1]
        figures: dict = {"order": list(order)}
        for arm in order:
            seconds = _train(arm, models[arm], optimizers[arm], batches)
            figures[arm] = {"step_s": seconds / len(batches), "samples_per_s": cfg["batch"] * len(batches) / seconds}
        figures["ratio"] = figures["transformers"]["step_s"] / figures["pretraining_loss"]["step_s"]
        figures["loss_max_rel_diff"] = _max_relative_difference(models["pretraining_loss"], batches)
        figures["loadavg_1m_after"] = os.getloadavg()[0]
        out.append(figures)
        print(f"  {preset} rep {rep + 1} ({' then '.join(order)}): {figures['ratio']:.2f}× "
              f"({figures['transformers']['step_s']:.3f} s vs {figures['pretraining_loss']['step_s']:.3f} s a step), "
              f"loss max rel diff {figures['loss_max_rel_diff']:.1e}", flush=True)  # fmt: skip
    return out


def run(workdir, reps: int, quick: bool) -> dict:
    import torch

    cfg = config(quick)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        raw = {preset: measure_preset(preset, reps, cfg) for preset in cfg["presets"]}
    finally:
        torch.set_num_threads(threads)
    notes = [
        f"In this process, {cfg['threads']} torch thread, batch {cfg['batch']} × {cfg['seq_len']} tokens from the "
        "benchmark workload's stream (15 % masked), no NSP: a step is forward, backward and an AdamW step. Each arm "
        f"trains its own copy of the same initial model; per repetition both arms run the same {cfg['steps']} new "
        f"batch{'es' if cfg['steps'] > 1 else ''} after one untimed warm-up step at the start, in alternating order. "
        "`transformers` = "
        "`model(**batch).loss` of `BertForMaskedLM` (the head at all 128 positions); `pretraining_loss` = "
        "`peer.run.model.pretraining_loss` (the head at the masked positions only).",
        "Loss check: on each of the repetition's batches, the `pretraining_loss` arm's model in eval mode (no "
        "dropout) computes both losses; the row is the largest relative difference.",
    ]
    return {"config": {**cfg, "presets": list(cfg["presets"])}, "rows": build_rows(raw), "raw": raw, "notes": notes}


def build_rows(raw: dict) -> list[dict]:
    """The report's rows (pure; unit-tested): ratios taken within each repetition."""

    def per_rep(preset: str, *path: str) -> list:
        values = []
        for figures in raw.get(preset, []):
            for key in path:
                figures = figures.get(key) if isinstance(figures, dict) else None
            values.append(figures)
        return values

    rows = []
    for preset in [p for p in PRESETS if p in raw]:
        rows += [
            {"metric": f"{preset}: step time, transformers' loss ÷ pretraining_loss", "goal": GOALS[preset],
             "values": per_rep(preset, "ratio")},
            {"metric": f"{preset}: model(**batch).loss", "unit": "samples/s",
             "values": per_rep(preset, "transformers", "samples_per_s")},
            {"metric": f"{preset}: pretraining_loss", "unit": "samples/s",
             "values": per_rep(preset, "pretraining_loss", "samples_per_s")},
            {"metric": f"{preset}: loss, max relative difference of the two on the same batch", "goal": "<= 1e-5",
             "values": per_rep(preset, "loss_max_rel_diff")},
        ]  # fmt: skip
    return rows
