"""A clean terminal: log lines never overprint the live status line; JSON lines for log shippers; --quiet, --verbose;
colours only on a terminal (peer.logs, peer.progress.StatusDisplay)."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from peer import logs
from peer.config import PeerConfig
from peer.errors import UserError
from peer.progress import Snapshot, StatusDisplay

SNAP = Snapshot(epoch=7, round_text="96/192 samples, next step in 4s", peers=3, loss=6.5, samples_per_second=41.0,
                samples_total=1000, learning_rate=1e-3)  # fmt: skip
STATUS = "step 7 | 96/192 samples, next step in 4s | 3 peers | loss 6.500 | 41.0 samples/s | lr 1.00e-03"


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.setup(stream=io.StringIO())  # later tests get a plain terminal, not one of these streams
    logging.getLogger().handlers[:] = handlers


def screen(raw: str) -> list[str]:
    """What a terminal shows: each "\\r\\x1b[2K" clears the current line, "\\n" ends it."""
    lines, current = [], ""
    i = 0
    while i < len(raw):
        if raw.startswith("\r\x1b[2K", i):
            current, i = "", i + 5
        elif raw[i] == "\n":
            lines.append(current)
            current, i = "", i + 1
        else:
            current, i = current + raw[i], i + 1
    return [*lines, current] if current else lines


def test_log_lines_go_above_the_status_line_never_into_it(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    tty = Tty()
    logs.setup(stream=tty)
    display = StatusDisplay()
    assert display.live
    display.show(SNAP)
    logging.getLogger("peer.swarm.optim").warning("gradient averaging round failed; stepped with local gradients")
    logging.getLogger("hivemind.averaging").warning("a groupmate left")
    display.show(SNAP)
    display.close()
    shown = screen(tty.getvalue())
    warn = logging.getLevelName(logging.WARNING)  # bertswarm names it WARN once hivemind_compat is configured
    assert shown[0].endswith(f"{warn} peer.swarm.optim: gradient averaging round failed; stepped with local gradients")
    assert shown[1].endswith(f"{warn} hivemind.averaging: a groupmate left")
    assert shown[2] == STATUS and len(shown) == 3  # the status line stays last, whole, on its own line
    assert all(STATUS not in line or line == STATUS for line in shown)


def test_a_forked_helper_clears_the_line_and_leaves_the_redraw_to_the_peer():
    tty = Tty()
    term = logs.setup(stream=tty)
    term._owner = os.getpid() + 1  # as seen from a helper hivemind forked before any status line was drawn
    tty.write(STATUS)  # the peer's status line, drawn after the fork
    logging.getLogger("hivemind").warning("from a helper")
    shown = screen(tty.getvalue())
    assert len(shown) == 1 and shown[0].endswith("from a helper")  # on its own line; the peer redraws its status


def test_colours_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    tty, plain = Tty(), io.StringIO()
    logs.setup(stream=tty)
    logging.getLogger("x").warning("careful")
    logs.setup(stream=plain)
    logging.getLogger("x").warning("careful")
    warn = logging.getLevelName(logging.WARNING)
    assert f"\x1b[33m{warn}\x1b[0m" in tty.getvalue()
    assert "\x1b" not in plain.getvalue() and f"{warn} x: careful" in plain.getvalue()


def test_json_lines_carry_the_status_numbers_as_fields():
    out = io.StringIO()
    logs.setup(stream=out, log_format="json")
    display = StatusDisplay()
    assert not display.live
    display.show(SNAP)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("peer.trainer").exception("something broke")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == "peer.progress" and first["message"] == STATUS
    assert first["epoch"] == 7 and first["peers"] == 3 and first["samples_per_second"] == 41.0
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_quiet_shows_warnings_only_and_verbose_debug():
    out = io.StringIO()
    logs.setup(stream=out, quiet=True)
    StatusDisplay().show(SNAP)
    logging.getLogger("peer.trainer").info("an info line")
    logging.getLogger("peer.trainer").warning("a warning")
    assert out.getvalue().count("\n") == 1 and "a warning" in out.getvalue()
    logs.setup(stream=out, verbose=True)
    logging.getLogger("peer.trainer").debug("a debug line")
    assert "a debug line" in out.getvalue()


def test_debug_loggers_named_in_the_environment_show_their_debug_lines_alone(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("BERTSWARM_DEBUG_LOGGERS", "bertswarm-test.matchmaking, bertswarm-test.other")
    logging.getLogger("bertswarm-test").setLevel(logging.WARNING)  # as hivemind's own level (HIVEMIND_LOGLEVEL)
    try:
        logs.setup(stream=out)
        logging.getLogger("bertswarm-test.matchmaking").debug("rejected with BAD_EXPIRATION_TIME")
        logging.getLogger("bertswarm-test.dht").debug("a DHT line")
        logging.getLogger("peer.trainer").debug("a debug line of bertswarm")
        assert "rejected with BAD_EXPIRATION_TIME" in out.getvalue()
        assert "a DHT line" not in out.getvalue() and "a debug line of bertswarm" not in out.getvalue()
    finally:
        for name in ("bertswarm-test", "bertswarm-test.matchmaking", "bertswarm-test.other"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_flags_are_checked():
    with pytest.raises(UserError, match="--log-format 'xml'"):
        PeerConfig(log_format="xml").validate()
    with pytest.raises(UserError, match="--quiet and --verbose contradict"):
        PeerConfig(quiet=True, verbose=True).validate()
