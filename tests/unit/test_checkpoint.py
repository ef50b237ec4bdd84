"""Checkpoints: a Hugging Face round trip, latest and pruning, every load failure, unwritable roots, and a writer
SIGKILLed at every write step leaving only complete checkpoints."""

import copy
import errno
import fcntl
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForMaskedLM, pipeline

from peer.config import PeerConfig
from peer.data.tokenizer import default_tokenizer, tokenizer_fingerprint
from peer.errors import UserError
from peer.run.manifest import from_config
from peer.run.model import build_model
from peer.store import checkpoint
from peer.store.checkpoint import latest_path, list_checkpoints, write_checkpoint
from peer.store.errors import CheckpointError
from peer.store.load import load_checkpoint, verify_run

REPO = Path(__file__).resolve().parents[2]
METRICS = {"mlm_loss": 5.25, "mlm_accuracy": 0.125}
FILES = [
    "bertswarm.json",
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
]


@pytest.fixture(scope="module")
def tiny():
    tok = default_tokenizer()
    manifest = from_config(PeerConfig().validate(), "test", tokenizer_fingerprint(tok), tok.get_vocab_size())
    return SimpleNamespace(tok=tok, manifest=manifest, model=build_model(manifest.model, nsp=False, seed=0))


def write(root, tiny, epoch, *, model=None, manifest=None, **kwargs):
    return write_checkpoint(
        root,
        model or tiny.model,
        tiny.tok,
        manifest or tiny.manifest,
        epoch=epoch,
        samples_seen=256 * epoch,
        eval_metrics=METRICS,
        **kwargs,
    )


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory):
    """One written checkpoint, read-only for the tests that use it."""
    return write(tmp_path_factory.mktemp("source"), tiny, 1)


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(checkpoint.TMP_PREFIX))


def equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- round trip ---------------------------------------------------------------------------------------------------


def test_round_trip_through_transformers(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = write(tmp_path, tiny, 3)
    assert path == tmp_path / "epoch-000003" and latest_path(tmp_path) == path
    names = {p.name for p in path.iterdir()}
    # safetensors only, no pickle; transformers < 5 also writes special_tokens_map.json
    assert set(FILES) <= names and names - set(FILES) <= {"special_tokens_map.json"}
    assert os.readlink(tmp_path / "latest") == "epoch-000003"  # relative: a copy of the root stays valid

    hf, loading = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    assert type(hf).__name__ == "BertForMaskedLM"
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    assert equal_state(hf.state_dict(), tiny.model.state_dict())
    fill = pipeline("fill-mask", model=str(path), tokenizer=str(path), device="cpu")
    predictions = fill("the [MASK] of the function.")
    assert len(predictions) == 5 and all(p["token_str"] and p["sequence"] for p in predictions)

    state, meta = load_checkpoint(path, tiny.manifest.fingerprint)
    fresh = build_model(tiny.manifest.model, nsp=False, seed=1)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert equal_state(fresh.state_dict(), tiny.model.state_dict())
    assert meta["sha256"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert meta["fingerprint"] == tiny.manifest.fingerprint and meta["run_id"] == "test"
    assert meta["manifest"] == json.loads(tiny.manifest.to_json())
    assert (meta["epoch"], meta["samples_seen"], meta["eval_metrics"]) == (3, 768, METRICS)
    assert meta["created_at"].endswith("Z")

    (info,) = list_checkpoints(tmp_path)
    assert (info.name, info.epoch, info.sha256, info.eval_metrics) == ("epoch-000003", 3, meta["sha256"], METRICS)
    assert info.size_bytes == sum(p.stat().st_size for p in path.iterdir())
    listing = json.loads(info.to_json())
    assert listing["name"] == "epoch-000003" and "path" not in listing


def test_nsp_model_checkpoint_loads_as_masked_lm(tiny, tmp_path):
    model = build_model(tiny.manifest.model, nsp=True, seed=0)
    path = write(tmp_path, tiny, 1, model=model)
    hf = AutoModelForMaskedLM.from_pretrained(path)
    assert torch.equal(hf.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


def test_non_finite_metrics_are_stored_as_null(tiny, tmp_path):
    path = write_checkpoint(
        tmp_path, tiny.model, tiny.tok, tiny.manifest, epoch=1, samples_seen=0, eval_metrics={"mlm_loss": float("nan")}
    )
    assert json.loads((path / "bertswarm.json").read_text())["eval_metrics"] == {"mlm_loss": None}


# --- latest, pruning, rewrites ------------------------------------------------------------------------------------


def test_latest_and_pruning(tiny, tmp_path):
    for epoch in range(1, 8):
        write(tmp_path, tiny, epoch, keep=3)
    assert [info.epoch for info in list_checkpoints(tmp_path)] == [7, 6, 5]
    assert latest_path(tmp_path) == tmp_path / "epoch-000007"
    assert visible(tmp_path) == [".lock", "epoch-000005", "epoch-000006", "epoch-000007", "latest"]

    write(tmp_path, tiny, 2, keep=3)  # an older epoch written last is what latest names, so it is never pruned
    assert [info.epoch for info in list_checkpoints(tmp_path)] == [7, 6, 5, 2]
    assert latest_path(tmp_path) == tmp_path / "epoch-000002"
    write(tmp_path, tiny, 8, keep=3)
    assert [info.epoch for info in list_checkpoints(tmp_path)] == [8, 7, 6]


def test_rewriting_an_epoch_keeps_this_runs_and_replaces_another_runs(tiny, tmp_path):
    first = json.loads((write(tmp_path, tiny, 4) / "bertswarm.json").read_text())
    again = json.loads((write(tmp_path, tiny, 4) / "bertswarm.json").read_text())
    assert again == first
    other = from_config(PeerConfig(lr=1e-4).validate(), "other", tiny.manifest.tokenizer_fingerprint, 8192)
    write(tmp_path, tiny, 4, manifest=other)
    (info,) = list_checkpoints(tmp_path)
    assert info.fingerprint == other.fingerprint and info.run_id == "other"
    assert visible(tmp_path) == [".lock", "epoch-000004", "latest"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_latest_is_a_loadable_symlink(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write(tmp_path, tiny, 1)
    write(tmp_path, tiny, 2)
    latest = tmp_path / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "epoch-000002"
    model = AutoModelForMaskedLM.from_pretrained(latest)
    assert equal_state(model.state_dict(), tiny.model.state_dict())
    fill = pipeline("fill-mask", model=str(latest), device="cpu")
    assert len(fill("the [MASK] of the function.")) == 5
    copied = tmp_path.parent / f"{tmp_path.name}-copy"
    shutil.copytree(tmp_path, copied, symlinks=True)  # like rsync -a: the relative link names the copy's checkpoint
    assert latest_path(copied) == copied / "epoch-000002" and (copied / "latest").resolve() == copied / "epoch-000002"


def test_old_text_file_latest_is_still_read(tiny, tmp_path, source):
    """Roots written before ``latest`` became a symlink: the text file is read, and the next write replaces it."""
    shutil.copytree(source, tmp_path / source.name)
    (tmp_path / "latest").write_text(f"{source.name}\n")
    assert latest_path(tmp_path) == tmp_path / source.name
    load_checkpoint(tmp_path, tiny.manifest.fingerprint)
    write(tmp_path, tiny, 2)
    assert os.readlink(tmp_path / "latest") == "epoch-000002"


def test_damaged_latest_falls_back_to_the_newest(tiny, tmp_path):
    assert latest_path(tmp_path) is None and latest_path(tmp_path / "missing") is None
    write(tmp_path, tiny, 1)
    write(tmp_path, tiny, 2)
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").symlink_to("../../etc")
    assert latest_path(tmp_path) == tmp_path / "epoch-000002"
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").symlink_to("epoch-000009")  # dangling
    assert latest_path(tmp_path) == tmp_path / "epoch-000002"
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").write_text("../../etc\n")  # an old-format text file
    assert latest_path(tmp_path) == tmp_path / "epoch-000002"
    (tmp_path / "latest").write_text("epoch-000001\n")
    assert latest_path(tmp_path) == tmp_path / "epoch-000001"
    (tmp_path / "epoch-000001" / "bertswarm.json").unlink()  # damaged by hand: neither listed nor named
    assert [info.epoch for info in list_checkpoints(tmp_path)] == [2]
    assert latest_path(tmp_path) == tmp_path / "epoch-000002"


def test_leftovers_are_removed_by_the_next_write(tiny, tmp_path):
    (tmp_path / ".tmp-epoch-000009-123").mkdir(parents=True)
    (tmp_path / ".tmp-epoch-000009-123" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-latest-123").write_text("epoch-000009")
    (tmp_path / ".tmp-latest-124").symlink_to("epoch-000009")  # a crashed writer's temp symlink, dangling
    write(tmp_path, tiny, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "epoch-000001", "latest"]


def test_one_writer_per_root(tiny, tmp_path):
    with open(tmp_path / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="being written by another process"):
            write(tmp_path, tiny, 1)
    assert visible(tmp_path) == [".lock"]


# --- unwritable roots ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "fix"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "free disk space"),
        (OSError(errno.EACCES, "Permission denied"), "make it writable"),
        (OSError(errno.EROFS, "Read-only file system"), "make it writable"),
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "free disk"),
    ],
)
def test_failed_write_is_a_user_error_and_leaves_nothing(tiny, tmp_path, monkeypatch, error, fix):
    write(tmp_path, tiny, 1)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: cannot write a checkpoint \(.+\); .*{fix}") as caught:
        write(tmp_path, tiny, 2)
    assert str(caught.value.with_flag("--checkpoint-dir")).startswith(f"--checkpoint-dir {tmp_path}: cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "epoch-000001", "latest"]
    assert latest_path(tmp_path) == tmp_path / "epoch-000001"


def test_full_disk_at_fsync_leaves_nothing(tiny, tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match="No space left on device.*free disk space"):
        write(tmp_path, tiny, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_root_that_is_a_file(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for root in (blocker, blocker / "sub"):
        with pytest.raises(CheckpointError, match=r"^\S*file\b.*not a directory"):
            write(root, tiny, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- loading: every failure ---------------------------------------------------------------------------------------


def test_load_from_root_uses_latest(tiny, source):
    state, meta = load_checkpoint(source.parent, tiny.manifest.fingerprint)
    assert meta["epoch"] == 1 and "bert.embeddings.word_embeddings.weight" in state


@pytest.fixture()
def copy_of(source, tmp_path):
    path = tmp_path / source.name
    shutil.copytree(source, path)
    return path


def test_load_missing(tmp_path):
    with pytest.raises(CheckpointError, match=r"^\S+/nope: no such file or directory; pass a checkpoint"):
        load_checkpoint(tmp_path / "nope", None)


def test_load_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.safetensors").write_bytes(b"x")
    for path in (tmp_path / "empty", tmp_path / "file.safetensors"):
        with pytest.raises(CheckpointError, match=r"^\S+: not a bertswarm checkpoint .*; pass a checkpoint directory"):
            load_checkpoint(path, None)


def test_load_flipped_byte(copy_of):
    weights = copy_of / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"^\S+: model.safetensors is corrupt: its sha256 .* download .* again"):
        load_checkpoint(copy_of, None)


def test_load_truncated_or_missing_weights(copy_of):
    weights = copy_of / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="model.safetensors is corrupt"):
        load_checkpoint(copy_of, None)
    weights.unlink()
    with pytest.raises(UserError, match="model.safetensors is corrupt or missing"):
        load_checkpoint(copy_of, None)


def test_load_corrupt_metadata(copy_of):
    (copy_of / "bertswarm.json").write_text('{"epoch": ')
    with pytest.raises(CheckpointError, match=r"^\S+: bertswarm.json is unreadable .*pass another one"):
        load_checkpoint(copy_of, None)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"epoch": -1}, r" is unreadable \(epoch: Input should be greater than or equal to 0\)"),
        ({"samples_seen": "12"}, r" is unreadable \(samples_seen: Input should be a valid integer\)"),
        ({"sha256": "abc"}, r" is unreadable \(sha256: String should match pattern"),
        ({"model_bytes": -5}, r" is unreadable \(model_bytes: Input should be greater than or equal to 0\)"),
        ({"eval_metrics": {"mlm_loss": "low"}}, r" is unreadable \(eval_metrics\.mlm_loss"),
        ({"created_at": "yesterday"}, r" is unreadable \(created_at: Invalid isoformat string"),
        ({"format_version": 2}, r" is unreadable \(format_version: Input should be 1\)"),
        ({"surprise": 1}, r" is unreadable \(surprise: Extra inputs are not permitted\)"),
        ({"fingerprint": "0" * 64}, r" is unreadable \(fingerprint 000000000000 is not that of its manifest"),
        ({"run_id": "other"}, r" is unreadable \(run_id 'other' is not that of its manifest"),
        ({"manifest": {"version": 1, "lr": 2.0}}, r": run manifest is invalid \("),
        ({"manifest": {"version": 9}}, r": run manifest version 9, this peer speaks 1"),
    ],
)
def test_metadata_is_parsed_strictly_by_load_and_list(copy_of, change, problem):
    meta = json.loads((copy_of / "bertswarm.json").read_text())
    (copy_of / "bertswarm.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(CheckpointError, match=rf"^{copy_of}: bertswarm.json{problem}") as caught:
        load_checkpoint(copy_of, None)
    assert "\n" not in str(caught.value) and "--" not in str(caught.value)
    assert list_checkpoints(copy_of.parent) == []  # the same parser decides what the listing shows


def test_errors_name_the_path_and_callers_add_the_flag(source, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "empty", None)
    assert caught.value.path == str(tmp_path / "empty")
    flagged = caught.value.with_flag("--init-from")
    assert type(flagged) is UserError and str(flagged).startswith(f"--init-from {tmp_path / 'empty'}: not a bertswarm")
    _, meta = load_checkpoint(source, None)
    verify_run(meta, meta["fingerprint"], source)
    with pytest.raises(CheckpointError, match=rf"^{source}: checkpoint of another run \(run 'test'"):
        verify_run(meta, "0" * 64, source)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(
        CheckpointError, match=rf"^{blocker / 'sub'}: not writable \(Not a directory\); pick a writable"
    ):
        checkpoint.check_writable(blocker / "sub")
    checkpoint.check_writable(tmp_path / "new")
    assert [p.name for p in (tmp_path / "new").iterdir()] == []


def test_load_checkpoint_of_another_run(source):
    with pytest.raises(CheckpointError, match=r"^\S+: checkpoint of another run \(run 'test', manifest [0-9a-f]{12}"):
        load_checkpoint(source, "0" * 64)


def test_load_non_finite_weights(tiny, tmp_path):
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    path = write(tmp_path, tiny, 1, model=model)
    with pytest.raises(
        UserError, match=r"weights are not finite \(NaN/inf in bert.encoder.layer.0.output.dense.weight\)"
    ):
        load_checkpoint(path, tiny.manifest.fingerprint)


@pytest.fixture()
def served(source):
    """The source checkpoint's root over HTTP on 127.0.0.1, as ``http.server`` serves a directory."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(source.parent)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_load_from_url(tiny, source, served):
    local_state, local_meta = load_checkpoint(source, None)
    urls = (f"{served}/{source.name}", f"{served}/{source.name}/", served, f"{served}/latest")
    for url in urls:  # a checkpoint, or a root's latest (a symlink, served as a directory)
        state, meta = load_checkpoint(url, tiny.manifest.fingerprint)
        assert equal_state(state, local_state) and meta == local_meta
    with pytest.raises(UserError, match="checkpoint of another run"):
        load_checkpoint(f"{served}/{source.name}", "0" * 64)
    with pytest.raises(CheckpointError, match=r"^\S+/nope: no bertswarm.json or latest there \(HTTP 404\)"):
        load_checkpoint(f"{served}/nope", None)


def test_url_of_a_root_resolves_latest_to_its_checkpoint(tiny, tmp_path):
    """The coordinator's ``/checkpoints/latest/...`` and an old-format root (text ``latest``) over HTTP; a root URL
    is pinned to the checkpoint ``latest`` names, so a newer one published mid-download cannot mix files."""
    import asyncio

    from coordinator import http as coordinator_http
    from peer.store import remote

    new_root, old_root = tmp_path / "new", tmp_path / "old"
    write(new_root, tiny, 1)
    write(new_root, tiny, 2)
    shutil.copytree(new_root / "epoch-000001", old_root / "epoch-000001")
    (old_root / "latest").write_text("epoch-000001\n")

    async def main():
        runners, urls = [], []
        for root in (new_root, old_root):
            app = coordinator_http.make_app(SimpleNamespace(checkpoint_root=root))
            app.router.add_static("/static", root, follow_symlinks=True)
            runner, port = await coordinator_http.serve(app, "127.0.0.1", 0)
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{port}")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, resolve, *urls)
        finally:
            for runner in runners:
                await runner.cleanup()

    def resolve(new, old):
        return [
            (base.removeprefix(new), meta.epoch)
            for base, meta in map(remote.fetch_metadata, [f"{new}/checkpoints", f"{new}/checkpoints/latest"])
        ] + [(remote.fetch_metadata(f"{old}/static")[0].removeprefix(old), 1)]

    assert asyncio.run(main()) == [
        ("/checkpoints/epoch-000002", 2),
        ("/checkpoints/epoch-000002", 2),
        ("/static/epoch-000001", 1),
    ]


def test_load_from_unreachable_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CheckpointError, match=r"^http://127.0.0.1:\d+/x: cannot download \(.*refused.*\); check"):
        load_checkpoint(f"http://127.0.0.1:{port}/x", None)
    with pytest.raises(CheckpointError, match=r"^http://: cannot download \(no host given\)"):
        load_checkpoint("http://", None)


# --- SIGKILL at every write step ----------------------------------------------------------------------------------

# The write steps of epoch 2 in the worker (keep=1, so it also prunes epoch 1), counted by the worker's hooks:
# mkdir (root, exists) · mkdir (temp dir) · write config.json · save_file · save_tokenizer · mkdir x2 (by the
# tokenizer writer and transformers' save_pretrained, exists) · fsync x5 (every file) · write bertswarm.json · fsync
# it · fsync temp dir · rename to epoch-000002 · fsync root · write latest temp · fsync it · replace latest · fsync
# root · temp symlink to epoch-000002 · replace latest with it · fsync root · rename epoch-000001 away · fsync root ·
# unlink x6 · rmdir. The worker is killed just *before* step N, for every N. The tokenizer's share depends on the
# installed transformers (which files it writes).
KILL_STEPS = 29
WORKER_TIMEOUT = 120  # a worker runs half of the kill points


@pytest.fixture(scope="module")
def killed(source, tmp_path_factory):
    """Run every kill point (and one run without a kill), in two workers that fork a child per kill point:
    {step: (root, returncode, out)}."""
    base = tmp_path_factory.mktemp("kill")

    def run(steps: list[int]) -> list[tuple[int, tuple]]:
        done = subprocess.run(
            [sys.executable, "-m", "tests.unit.checkpoint_kill_worker", str(base), str(source), *map(str, steps)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT,  # subprocess.run kills and reaps the worker if it hangs
        )
        assert done.returncode == 0, done.stdout + done.stderr
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert [r["step"] for r in results] == steps, done.stdout + done.stderr
        return [(r["step"], (base / f"at-{r['step']:02d}", r["returncode"], r["out"])) for r in results]

    halves = [list(range(0, KILL_STEPS + 1, 2)), list(range(1, KILL_STEPS + 1, 2))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pair for half in pool.map(run, halves) for pair in half)


def test_kill_steps_cover_the_whole_write(killed):
    root, returncode, out = killed[0]
    assert returncode == 0, out
    steps = json.loads(out.splitlines()[-1])
    assert len(steps) == KILL_STEPS, f"the write has {len(steps)} steps now, update KILL_STEPS: {steps}"
    assert [info.epoch for info in list_checkpoints(root)] == [2]


@pytest.mark.parametrize("step", range(1, KILL_STEPS + 1))
def test_kill_leaves_only_complete_checkpoints(tiny, killed, step):
    steps = json.loads(killed[0][2].splitlines()[-1])
    published = steps.index("rename") + 1  # step N kills before N: epoch 2 is visible once step `published` ran
    pointed = steps.index("replace") + 1
    pruning = len(steps) - steps[::-1].index("rename")  # epoch 1 is renamed away by this step
    root, returncode, out = killed[step]
    assert returncode == -signal.SIGKILL, out

    expected = [1] if step <= published else [2, 1] if step <= pruning else [2]
    assert [info.epoch for info in list_checkpoints(root)] == expected
    assert [name for name in visible(root) if name.startswith("epoch-")] == [f"epoch-00000{e}" for e in expected[::-1]]
    assert set(visible(root)) - {"epoch-000001", "epoch-000002"} == {".lock", "latest"}
    latest = latest_path(root)
    assert latest == root / ("epoch-000002" if step > pointed else "epoch-000001")
    # the symlink itself: always there, never dangling, naming a complete checkpoint, loadable as is
    link = root / "latest"
    assert link.is_symlink() and os.readlink(link) == latest.name and link.resolve() == latest.resolve()
    assert equal_state(AutoModelForMaskedLM.from_pretrained(link).state_dict(), tiny.model.state_dict())
    load_checkpoint(root, tiny.manifest.fingerprint)  # sha256 and finiteness verified

    write(root, tiny, 3, keep=1)  # the next write removes the leftovers
    assert sorted(p.name for p in root.iterdir()) == [".lock", "epoch-000003", "latest"]
