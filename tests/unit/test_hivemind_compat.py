"""hivemind_compat: the checked hivemind versions, the patches it installs, and hivemind's logging."""

import logging
import subprocess
import sys

import hivemind
import pytest

from peer.errors import UserError
from peer.swarm import hivemind_compat


def test_the_installed_hivemind_is_a_checked_one():
    assert hivemind.__version__ in hivemind_compat.CHECKED_VERSIONS
    hivemind_compat.check_version()


def test_an_unchecked_hivemind_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(hivemind, "__version__", "1.2.0")
    with pytest.raises(UserError) as e:
        hivemind_compat.check_version()
    message = str(e.value)
    assert "\n" not in message
    assert "hivemind 1.2.0 is installed" in message and "1.1.12" in message
    assert message.endswith("pip install 'hivemind==1.1.12'")


def test_importing_it_imports_no_hivemind():
    """configure_logging must run before hivemind's first import (which reads HIVEMIND_LOGLEVEL once)."""
    code = "import sys, peer.cli, peer.swarm.hivemind_compat; assert 'hivemind' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_patches_once_and_is_idempotent():
    from hivemind.averaging import allreduce
    from hivemind.compression.quantization import BlockwiseQuantization, Quantization

    from peer.swarm.guards import FiniteTensorPartReducer

    hivemind_compat.install()
    hivemind_compat.install()
    assert allreduce.TensorPartReducer is FiniteTensorPartReducer
    assert Quantization.extract is hivemind_compat._extract_quantized
    assert BlockwiseQuantization.extract is hivemind_compat._extract_blockwise


def test_hooked_classes_are_built_once():
    assert hivemind_compat.HookedOptimizer is hivemind_compat.HookedOptimizer
    assert issubclass(hivemind_compat.HookedOptimizer, hivemind.Optimizer)
    assert hivemind_compat.FilteredProgressTracker.__qualname__ == "FilteredProgressTracker"
    with pytest.raises(AttributeError):
        hivemind_compat.NoSuchThing  # noqa: B018


def test_orphaned_request_errors_are_dropped_and_other_errors_kept():
    def record(exc: BaseException | None) -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("hivemind.dht.dht", logging.ERROR, __file__, 1, "failed", None, exc_info)

    for orphaned in (FileNotFoundError(), ConnectionResetError(), EOFError()):
        assert not hivemind_compat.drop_orphaned_request_errors(record(orphaned))
    assert hivemind_compat.drop_orphaned_request_errors(record(ValueError()))
    assert hivemind_compat.drop_orphaned_request_errors(record(None))


def test_a_failed_state_download_is_one_warning_and_a_refused_member_none():
    from peer.swarm.membership import NotAMember

    def record(exc: BaseException) -> logging.LogRecord:
        msg = f"Failed to download state from QmPeer - {exc!r}"
        return logging.LogRecord("hivemind.averaging.averager", logging.ERROR, __file__, 1, msg, None,
                                 (type(exc), exc, None))  # fmt: skip

    refused = record(ConnectionError("Connect failed. msg=failed to dial\n * [/ip4/127.0.0.1/tcp/1] refused"))
    assert hivemind_compat.shorten_download_failures(refused)
    assert refused.levelno == logging.WARNING and refused.exc_info is None
    assert (
        refused.getMessage()
        == "Failed to download state from QmPeer (Connect failed. msg=failed to dial); trying the next"
    )
    assert not hivemind_compat.shorten_download_failures(record(NotAMember("not on the allowlist")))
    other = logging.LogRecord("hivemind.averaging.averager", logging.ERROR, __file__, 1, "something else", None, None)
    assert hivemind_compat.shorten_download_failures(other) and other.levelno == logging.ERROR
