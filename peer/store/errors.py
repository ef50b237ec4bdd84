"""Errors of the storage layer: one line naming the path, the problem and a fix, never a command-line flag.

They are :class:`~peer.errors.UserError`\\ s (exit code 2, no traceback). The store does not know which flag a path
came from; a caller that does turns one into the user's terms with :meth:`StoreError.with_flag`::

    except CheckpointError as e:
        raise e.with_flag("--init-from") from None   # "--init-from /ckpt/epoch-000003: model.safetensors is corrupt..."
"""

from __future__ import annotations

from pathlib import Path

from peer.errors import InputError


class StoreError(InputError):
    """``"<path>: <problem>; <fix>"``, so that ``f"{flag} {error}"`` reads as one sentence."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(path, problem)
        self.path = str(path)


class CheckpointError(StoreError):
    """A checkpoint (or checkpoint root, or checkpoint URL) that cannot be written, read or trusted."""


class StateError(StoreError):
    """A peer's state directory or local state file that cannot be used."""
