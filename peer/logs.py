"""Where every bertswarm command's log lines go: stderr, as text (colours only on a terminal) or JSON lines, never
overprinting the peer's live status line.

On a terminal the peer keeps one status line at the bottom (``peer.progress.StatusDisplay``). :class:`Terminal` is the
one writer of that line: a log record is printed *above* it (the status line is cleared, the record written, the
status line drawn again), so the two never run into each other. A record logged by one of hivemind's forked helper
processes clears the line before it is written; the status line comes back at the peer's next report.

``--log-format json`` writes one JSON object per line (``time``, ``level``, ``logger``, ``message``, and for status
reports the numbers as fields) for service managers and log shippers; ``--quiet`` shows warnings and errors only (no
status line), ``--verbose`` bertswarm's debug lines too.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CLEAR_LINE = "\r\x1b[2K"
_COLOURS = {logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m", logging.CRITICAL: "\x1b[31;1m"}
_RESET = "\x1b[0m"


class Terminal:
    """stderr's last line: the status line on a terminal, with log records printed above it."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.status = ""  # the status line on screen ("" when none)
        self._owner = os.getpid()  # forked helpers clear the line but cannot draw the owner's status
        self._lock = threading.RLock()

    def show_status(self, text: str) -> None:
        with self._lock:
            self.stream.write(_CLEAR_LINE + text)
            self.stream.flush()
            self.status = text

    def end_status(self) -> None:
        """Leave the last status line on screen as a finished line."""
        with self._lock:
            if self.status:
                self.stream.write("\n")
                self.stream.flush()
                self.status = ""

    def write_line(self, text: str) -> None:
        with self._lock:
            owner = os.getpid() == self._owner
            # a forked helper cannot know whether the owner's status line is on screen now: it always clears the line
            if self.is_tty and (self.status or not owner):
                self.stream.write(_CLEAR_LINE)
            self.stream.write(text + "\n")
            if self.is_tty and self.status and owner:
                self.stream.write(self.status)
            self.stream.flush()


class TerminalHandler(logging.Handler):
    def __init__(self, terminal: Terminal) -> None:
        super().__init__()
        self.terminal = terminal

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.terminal.write_line(self.format(record))
        except Exception:  # logging must never take the process down
            self.handleError(record)


class TextFormatter(logging.Formatter):
    """``12:00:01 WARN peer.trainer: ...``; on a terminal the level is coloured."""

    def __init__(self, colour: bool) -> None:
        super().__init__(TEXT_FORMAT, datefmt="%H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        colour = _COLOURS.get(record.levelno) if self.colour else None
        return text.replace(record.levelname, f"{colour}{record.levelname}{_RESET}", 1) if colour else text


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra={"fields": {...}}`` adds structured fields (status reports do)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_terminal: Terminal | None = None
_settings = {"log_format": "text", "quiet": False}


def terminal() -> Terminal:
    """The process's terminal (made by :func:`setup`, else one on stderr)."""
    global _terminal
    if _terminal is None:
        _terminal = Terminal()
    return _terminal


def status_line_wanted() -> bool:
    """A live status line: on a terminal, with text logs, unless ``--quiet``."""
    return terminal().is_tty and _settings["log_format"] == "text" and not _settings["quiet"]


def setup(*, quiet: bool = False, verbose: bool = False, log_format: str = "text", stream=None) -> Terminal:
    """Route the root logger (and everything that propagates to it) through the terminal, in ``log_format``.
    ``BERTSWARM_LOG_LEVEL`` still sets the level when neither ``quiet`` nor ``verbose`` is given;
    ``BERTSWARM_DEBUG_LOGGERS`` (comma-separated logger names, e.g. ``hivemind.averaging.matchmaking``) shows those
    loggers' debug lines whatever the level: why a round found no group, without the DHT's thousands of lines."""
    global _terminal
    _terminal = Terminal(stream)
    _settings.update(log_format=log_format, quiet=quiet)
    handler = TerminalHandler(_terminal)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(colour=_colour(_terminal)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = os.environ.get("BERTSWARM_LOG_LEVEL", "INFO").upper()
    level = "WARNING" if quiet else "DEBUG" if verbose else level if level in logging._nameToLevel else "INFO"
    root.setLevel(level)
    for name in os.environ.get("BERTSWARM_DEBUG_LOGGERS", "").split(","):
        if name.strip():
            logging.getLogger(name.strip()).setLevel(logging.DEBUG)
    return _terminal


def _colour(term: Terminal) -> bool:
    return term.is_tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
