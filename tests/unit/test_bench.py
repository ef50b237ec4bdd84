"""The benchmark machinery (``bench/``) cannot rot: report generation, statistics, rate and traffic arithmetic, the
replay of a swarm's micro-batches, and one real (tiny) single-process arm. No timed assertions."""

import math
import time

import pytest
import torch

from bench import arms, averaging, report, train_worker, workload
from bench.common import summarize
from bench.train_worker import _Indexed


def test_summarize_ignores_failed_repetitions():
    assert summarize([3.0, None, 1.0, float("nan"), 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([None])["n"] == 0


def test_report_marks_goals_and_shows_median_and_spread(tmp_path):
    result = {
        "scenario": "throughput",
        "title": "1. Throughput",
        "reps": 3,
        "machine": {"nproc": 2, "torch": "x", "hivemind": "1.1.12", "date": "today"},
        "loadavg_1m": {"median": 1.2, "min": 1.0, "max": 1.5, "n": 4},
        "duration_s": 60.0,
        "rows": [
            {"metric": "swarm ÷ single", "values": [0.9, 0.99, 0.95], "goal": ">= 0.97"},
            {"metric": "swarm ÷ DDP", "values": [1.2, 1.1, 1.3], "goal": ">= 1.0"},
            {"metric": "swarm samples/s", "values": [10.0, 12.0, 11.0], "unit": "samples/s"},
        ],
        "notes": ["a note"],
    }
    (tmp_path / "throughput.json").write_text(__import__("json").dumps(result))
    doc = tmp_path / "performance.md"
    report.write(tmp_path, doc)
    text = doc.read_text()
    assert "| swarm ÷ single | 0.950 | 0.900–0.990 | 3 | >= 0.97 | **missed** |" in text
    assert "| swarm ÷ DDP | 1.200 | 1.100–1.300 | 3 | >= 1.0 | met |" in text
    assert "| swarm samples/s | 11.0 samples/s | 10.0–12.0 | 3 |" in text
    assert "hivemind 1.1.12" in text and "a note" in text
    assert "## Goals" in text and text.count("**missed**") == 2  # once in the goals summary, once in the scenario


def test_rates_count_whole_global_steps_after_the_first():
    # two peers: step 1 reached at t=10 (first peer to get there), step 4 reached by both by t=16
    records = [{"steps": [[10.0, 1], [12.0, 2], [14.0, 3], [16.0, 4]]}, {"steps": [[10.5, 1], [12.1, 2], [15.9, 4]]}]
    steps_per_s, measured = arms.steps_per_second(records)
    assert measured == 3 and steps_per_s == pytest.approx(3 / 5.9)
    assert arms.samples_per_second(records, target=256) == pytest.approx(256 * 3 / 5.9)
    assert math.isnan(arms.steps_per_second([{"steps": [[1.0, 1]]}])[0])


def test_ideal_traffic_of_a_butterfly_all_reduce():
    assert averaging.bytes_moved_per_peer(1000, 2, "none") == 4000  # half the vector out and back, twice: 2·½·4000
    assert averaging.bytes_moved_per_peer(1000, 4, "fp16") == pytest.approx(2 * 0.75 * 2000)
    assert averaging.bytes_moved_per_peer(1000, 4, "int8") == pytest.approx(2 * 0.75 * 1000)


def test_replay_regenerates_each_peers_micro_batches():
    run = workload.make_manifest("unit", seq_len=32)
    expected = [next(s) for s in [workload.stream(run, 4, workload.peer_seed(1))] for _ in range(4)]
    indexed = _Indexed(workload.stream(run, 4, workload.peer_seed(1)))
    for k in (1, 3, 2):  # out of order, as contributions can be after a catch-up
        batch = indexed.get(k)
        assert all(torch.equal(batch[name], expected[k][name]) for name in expected[k])


@pytest.mark.timeout(90)
def test_single_process_arm_trains_the_global_batch(tmp_path):
    cfg = dict(preset="tiny", seq_len=32, batch=8, target=16, warmup=1, steps=2, eval=True)
    record = arms.run_single(tmp_path, cfg, threads=1, timeout=80)
    assert [epoch for _, epoch in record["steps"]] == [1, 2]
    assert record["samples"] == 2 * 16  # every step saw exactly the global batch
    assert record["steps"][0][0] < record["steps"][1][0]
    assert 0 < record["heldout_loss"] < math.log(8192) + 2  # an untrained model's MLM loss is about ln(vocab)


def test_throughput_diagnostics_from_worker_records():
    from bench.scenarios import throughput

    # two peers: step 0 is the tracker's warm-up and excluded; steps 1 and 2 took 10 and 12 micro-batches of 8 needed
    records = [
        {"contributions": {"0": [0, 1, 2], "1": [3, 4, 5, 6, 7], "2": [8, 9, 10, 11, 12, 13]}},
        {"contributions": {"0": [0], "1": [1, 2, 3, 4, 5], "2": [6, 7, 8, 9, 10, 11]}},
    ]
    assert throughput._overshoot(records, needed=8) == pytest.approx(11 / 8)
    timed = [{"compute_s": 3.0, "micro_batches": 10}, {"compute_s": 5.0, "micro_batches": 10}, {"compute_s": None}]
    assert throughput._seconds_per_micro_batch(timed) == pytest.approx(0.4)
    cpu = [
        {"cpu_during_training": {"main_thread_s": 10.0, "other_threads_s": 1.0, "children_total_s": 9.0}},
        {"cpu_during_training": {"main_thread_s": 4.0, "other_threads_s": 0.0, "children_total_s": 2.0}},
    ]
    assert throughput._cpu_beside_training(cpu) == pytest.approx((1.0 + 0.5) / 2)


class _FakeOptimizer:
    """Stands in for ``SwarmOptimizer``: every 3rd accepted micro-batch completes a global step."""

    def __init__(self):
        self.local_epoch, self.accumulated = 0, 0

    def step(self):
        self.accumulated += 1
        if self.accumulated == 3:
            self.local_epoch, self.accumulated = self.local_epoch + 1, 0


class _FakeTrainer:
    """The attributes of ``peer.trainer.Trainer`` (and the bench's subclass) that ``train_worker._train`` reads; its
    ``step`` has the trainer's shape (compute, drop non-finite batches, ``opt.step``) without a model or a swarm."""

    def __init__(self, steps, nonfinite=(), load_at=None):
        self.opt, self.steps, self.nonfinite, self.load_at = _FakeOptimizer(), steps, set(nonfinite), load_at
        self.mini_steps = self.state_loads = self.k = 0
        self.round_log = [["success", 2, 0.1]]

    @property
    def finished(self):
        return self.opt.local_epoch >= self.steps

    def step(self):
        k, self.k = self.k, self.k + 1
        t = time.perf_counter()
        while time.perf_counter() - t < 0.002:  # "forward/backward"
            pass
        if k in self.nonfinite:
            return
        if k == self.load_at:  # in opt.step, the peer catches up with the swarm and its local progress is discarded
            self.state_loads += 1
            self.opt.local_epoch, self.opt.accumulated = self.opt.local_epoch + 1, 0
        else:
            self.opt.step()
        self.mini_steps += 1


def test_swarm_arm_drives_the_products_trainer_step_and_records_contributions():
    from peer.trainer import Trainer

    assert issubclass(train_worker._BenchTrainer, Trainer)
    assert "step" not in vars(train_worker._BenchTrainer)  # the measured step is the product's own
    trainer, result = _FakeTrainer(steps=3, nonfinite={1}, load_at=5), {"steps": []}
    train_worker._train(trainer, result)
    # k=1 dropped (non-finite); k=5 was a state load (pending 4 discarded); every 3rd accepted batch ends a step
    assert result["contributions"] == {0: [0, 2, 3], 2: [6, 7, 8]}
    assert [epoch for _, epoch in result["steps"]] == [1, 3]
    assert result["micro_batches"] == 9 and result["state_loads"] == 1 and result["rounds"] == trainer.round_log
    assert result["compute_s"] >= 9 * 0.002 and result["compute_cpu_s"] > 0 and result["opt_step_s"] >= 0


SPIN_THEN_WAIT = (
    "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\nsys.stdin.read()"
)


@pytest.mark.timeout(30)
def test_cpu_breakdown_names_helpers_and_counts_their_cpu():
    import subprocess
    import sys
    import time

    from bench.common import cpu_breakdown

    busy = subprocess.Popen([sys.executable, "-c", SPIN_THEN_WAIT], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:  # until the child has spun its 0.5 s of CPU (or the deadline, and the assertion says why)
            cpu = cpu_breakdown(roles={busy.pid: "spinner"})
            if cpu["children_s"].get(f"spinner-{busy.pid}", 0) >= 0.5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert cpu["children_s"][f"spinner-{busy.pid}"] >= 0.5
        assert cpu["main_thread_s"] > 0
    finally:
        busy.communicate(b"")


def test_diloco_rate_and_utilisation_from_worker_records():
    # peer 0's inner steps end at 10, 11, 12, 15 (the last includes the outer round); peer 1's at 10.5 .. 15.5
    records = [
        {"inner_times": [10.0, 11.0, 12.0, 15.0], "compute_s": 4.5, "phases": {"peers_ready": 20.0, "trained": 26.0}},
        {"inner_times": [10.5, 11.5, 12.5, 15.5], "compute_s": 3.0, "phases": {"peers_ready": 20.0, "trained": 26.0}},
    ]
    assert arms.diloco_samples_per_second(records, batch=16) == pytest.approx(2 * 3 * 16 / 5.5)
    assert arms.compute_utilisation(records[0]) == pytest.approx(0.75)
    assert math.isnan(arms.diloco_samples_per_second([{"inner_times": [1.0]}], batch=16))
    assert math.isnan(arms.compute_utilisation({"compute_s": 1.0, "phases": {}}))


def test_swarm_arm_passes_the_training_mode_to_the_manifest():
    run = workload.make_manifest("r", "tiny", 64, 32, 8, mode="diloco", inner_steps=16, outer_compression="int8",
                                 outer_overlap=True)  # fmt: skip
    assert (run.mode, run.inner_steps, run.outer_compression, run.outer_overlap) == ("diloco", 16, "int8", True)
    assert workload.make_manifest("r", "tiny", 64, 32, 8, mode=None).mode == "sync"
    args = arms._common(dict(train_mode="diloco", inner_steps=16, outer_compression="fp16", outer_overlap=True))
    parsed = train_worker.parse(["swarm", "--out", "/tmp/x", "--name", "p", *args])
    assert (parsed.train_mode, parsed.inner_steps, parsed.outer_compression, parsed.outer_overlap) == (
        "diloco", 16, "fp16", True)  # fmt: skip


def test_net_tx_bytes_sums_the_non_loopback_interfaces(tmp_path):
    from bench.common import net_tx_bytes

    for dev, tx in (("lo", 999), ("veth0", 1000), ("eth1", 24)):
        (tmp_path / dev / "statistics").mkdir(parents=True)
        (tmp_path / dev / "statistics" / "tx_bytes").write_text(f"{tx}\n")
    assert net_tx_bytes(tmp_path) == 1024
    assert net_tx_bytes(tmp_path / "absent") == 0


def test_diloco_scenario_arms_train_the_same_samples_and_rows_take_ratios_per_repetition():
    from bench.scenarios import diloco
    from peer.run.manifest import DEFAULT_INNER_STEPS, DEFAULT_OUTER_COMPRESSION

    plan = diloco.plan(quick=False, have_link=True)
    for link, arm, cfg in plan:
        if link == "loopback":  # peers × inner steps × batch == DDP steps × global batch
            steps = cfg["steps"] * cfg.get("inner_steps", 1)
            assert steps == diloco.INNER and cfg["eval"] and cfg["target"] == diloco.PEERS * cfg["batch"], arm
        elif arm.startswith(f"diloco_h{diloco.H_SHORT}_"):  # the options and their reference: the same samples
            assert cfg["steps"] * cfg["inner_steps"] == diloco.INNER_OPTIONS, arm
    main = diloco.arm_name(diloco.H, diloco.COMPRESSION)
    assert {(lk, a) for lk, a, _ in plan} >= {("loopback", main), (20, main), (10, main), (100, main)}
    assert (diloco.H, diloco.COMPRESSION) == (DEFAULT_INNER_STEPS, DEFAULT_OUTER_COMPRESSION)  # the product's
    assert [a for lk, a, _ in diloco.plan(quick=True, have_link=False)] == ["ddp", f"diloco_h16_{diloco.COMPRESSION}"]

    cfg = diloco.diloco_cfg(16, 32, "none")
    records = [
        {"inner_times": [0.0, 1.0, 2.0], "compute_s": 1.0, "phases": {"peers_ready": 0, "trained": 2.0},
         "heldout_loss": 7.0, "link_tx_bytes": 960, "telemetry_bytes_sent": 500, "outer_epoch": 2,
         "rounds": [["success", 2, 0.1, 0.1, 250], ["failed", 1, 0.1, 0.1, 0]],
         "cpu_during_training": {"main_thread_s": 2.0, "other_threads_s": 0.1, "children_total_s": 0.1}},
    ] * 2  # fmt: skip
    figures = diloco.summarize_arm(records, cfg)
    assert figures["samples"] == 2 * 3 * 16 and figures["link_bytes_per_sample"] == pytest.approx(1920 / 96)
    assert figures["heldout_loss"] == 7.0 and figures["helper_cpu_ratio"] == pytest.approx(0.1)
    assert figures["not_success"] == ["failed", "failed"] and figures["utilisation"] == pytest.approx(0.5)

    raw = {
        "loopback/ddp": [{"samples_per_s": 10.0, "heldout_loss": 7.0}, {"error": "boom"}],
        "loopback/diloco_h64_int8": [{"samples_per_s": 12.0, "heldout_loss": 7.07, "utilisation": 0.9}] * 2,
        "20/diloco_h16_none": [{"samples_per_s": 8.0, "heldout_loss": 7.0}] * 2,
        "20/diloco_h16_none_overlap": [{"samples_per_s": 10.0, "heldout_loss": 7.7}] * 2,
    }
    rows = {r["metric"]: r for r in diloco.build_rows(raw, reps=2, h=64, quick=False)}
    speed = rows["loopback: diloco (H=64, int8) ÷ DDP samples/s"]
    assert speed["values"][0] == pytest.approx(1.2) and math.isnan(speed["values"][1]) and speed["goal"] == ">= 1.0"
    assert rows["held-out MLM loss, diloco (H=64, int8) ÷ sync, same samples"]["values"][0] == pytest.approx(1.01)
    assert rows["held-out loss (H=16), outer_overlap true ÷ false"]["values"] == [pytest.approx(1.1)] * 2


def test_data_scenario_rows_take_ratios_per_repetition_and_per_worker():
    from bench.scenarios import data

    raw = {
        "anchor": [{"tokens_per_s": 100.0}, {"tokens_per_s": 200.0}],
        "prep_1": [{"tokens_per_s": 90.0}, {"tokens_per_s": 190.0}],
        "prep_2": [{"tokens_per_s": 180.0}, {"tokens_per_s": 300.0}],
        "peer_10MB": [{"startup_s": 5.0, "peak_rss_mib": 700.0}] * 2,
        "peer_5GB": [{"startup_s": 5.5, "peak_rss_mib": 710.0}, {"startup_s": None, "peak_rss_mib": 700.0}],
        "batch_wait": [{"ratio": 0.002, "max_wait_s": 0.01, "step_s": 0.5}] * 2,
    }
    rows = {r["metric"]: r for r in data.build_rows(raw, "5GB")}
    assert rows["preparation, 1 worker ÷ tokenizers encode_batch (tokens/s)"]["values"] == [0.9, 0.95]
    per_worker = rows["preparation, 2 workers ÷ (2 × tokenizers encode_batch) (tokens/s per worker)"]["values"]
    assert per_worker == [0.9, 0.75]
    startup = rows["peer start-up, 5GB ÷ 10MB prepared dataset"]
    assert (
        startup["values"][0] == pytest.approx(1.1) and math.isnan(startup["values"][1]) and startup["goal"] == "<= 1.1"
    )
    assert rows["batch wait ÷ training step time"]["values"] == [0.002, 0.002]


def test_serve_scenario_rows_take_ratios_per_repetition_and_check_steps_per_client():
    from bench.scenarios import serve

    answers = [[(1.0, 200, 1), (2.0, 200, 2), (3.5, 200, 3)], [(1.5, 503, -1), (2.5, 200, 2), (2.6, 0, -1)]]
    load = serve.summarize_load(answers, {2: 1.8, 3: 3.0, 4: 3.9})
    assert load["failed"] == 2 and load["forward_only"] and load["requests"] == 6 and load["unseen"] == 1
    assert load["lags_s"] == [pytest.approx(0.2), pytest.approx(0.5)]
    assert not serve.summarize_load([[(1.0, 200, 2), (2.0, 200, 1)]], {})["forward_only"]

    cfg = serve.config(quick=True)
    assert (cfg["clients"], cfg["load_s"], cfg["publish_every_s"]) == (32, 15, 3)
    assert serve.config(quick=False)["load_s"] == 60 and serve.config(quick=False)["publish_every_s"] == 10
    raw = {
        "serve": [{"requests_per_s": 300.0, "p50_s": 0.1, "p99_s": 0.2, "failed": 0}, {"error": "boom"}],
        "pipeline": [{"requests_per_s": 100.0, "p50_s": 0.01, "p99_s": 0.02}] * 2,
        "load": [{**load, "lags_s": [1.0, 3.0, 2.0]}, {"error": "boom"}],
    }
    rows = {r["metric"]: r for r in serve.build_rows(raw, cfg)}
    ratio = rows["bertswarm-serve (32 clients, dynamic batching) ÷ pipeline loop (requests/s)"]
    assert ratio["values"] == [3.0, None] and ratio["goal"] == ">= 2.0"
    assert rows["load test: failed requests"]["values"] == [2, None]
    assert rows["load test: steps only move forward per client (1 = yes)"]["values"] == [1.0, None]
    assert rows["load test: publish → first answer with the new step (median)"]["values"] == [2.0, None]
    assert rows["load test: publish → first answer with the new step (max)"]["values"] == [3.0, None]
    assert report.goal_met(ratio["goal"], 3.0) == "met"
    assert len(serve.texts(40)) == 40 and all(t.count("[MASK]") == 1 for t in serve.texts(40))


def test_loss_head_scenario_rows_take_ratios_per_repetition_and_its_check_compares_both_losses():
    from bench.scenarios import loss_head
    from peer.run.model import build_model

    assert loss_head.config(quick=True)["steps"] < loss_head.config(quick=False)["steps"]
    assert loss_head.config(quick=True)["presets"] == ("tiny", "mini")
    raw = {
        "tiny": [
            {"ratio": 3.0, "transformers": {"samples_per_s": 40.0}, "pretraining_loss": {"samples_per_s": 120.0},
             "loss_max_rel_diff": 2e-7},
            {"error": "boom"},
        ],
        "mini": [{"ratio": 1.5, "transformers": {"samples_per_s": 16.0}, "pretraining_loss": {"samples_per_s": 24.0},
                  "loss_max_rel_diff": 1e-4}],
    }  # fmt: skip
    rows = {r["metric"]: r for r in loss_head.build_rows(raw)}
    tiny = rows["tiny: step time, transformers' loss ÷ pretraining_loss"]
    assert tiny["values"] == [3.0, None] and tiny["goal"] == ">= 2.0"
    assert rows["tiny: pretraining_loss"]["values"] == [120.0, None]
    assert rows["mini: model(**batch).loss"]["unit"] == "samples/s"
    check = rows["mini: loss, max relative difference of the two on the same batch"]
    assert report.goal_met(check["goal"], check["values"][0]) == "**missed**"
    assert report.goal_met(tiny["goal"], 3.0) == "met"

    small = dict(vocab_size=8192, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)  # fmt: skip
    model = build_model(small, nsp=False, seed=1).train()
    batches = [next(s) for s in [workload.stream(workload.make_manifest("unit", seq_len=32), 4, 0)] for _ in range(2)]
    assert 0.0 <= loss_head._max_relative_difference(model, batches) <= 1e-5
    assert model.training  # the check leaves the model training


def test_the_gpu_check_refuses_a_machine_without_cuda_in_one_line(tmp_path, monkeypatch, capsys):
    from bench import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gpu_check: no CUDA device is visible to torch; run it on a machine with an NVIDIA GPU"]
    assert not (tmp_path / "out").exists()
