"""A checkpoint served over HTTP by a coordinator (``/checkpoints/<name>/<file>``, or any static file server): find
its ``bertswarm.json`` (a URL may name a checkpoint or a root serving ``latest``) and download its weights, bounded
in size and time. Failures are :class:`~peer.store.errors.CheckpointError`\\ s naming the URL; verification of what
was downloaded is :mod:`peer.store.load`'s job.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from peer.store.checkpoint import LATEST_FILE, NAME, checkpoint_name
from peer.store.errors import CheckpointError
from peer.store.metadata import METADATA_FILE, CheckpointMetadata

DOWNLOAD_TIMEOUT = 30.0  # seconds without progress before a download from a coordinator is given up
SOURCE_FIX = "pass a checkpoint directory, a checkpoint root (uses its latest) or a coordinator's http(s) URL"
_CHUNK = 1 << 20
_MAX_METADATA_BYTES = 1 << 20


def fetch_metadata(given: str) -> tuple[str, CheckpointMetadata]:
    """``(checkpoint base URL, metadata)``; the URL may name a checkpoint or a root serving ``latest``.

    A root's ``latest`` is resolved to the ``epoch-*`` checkpoint it names at the time of the call (the base URL
    returned names that checkpoint, not ``latest``), so that the files downloaded next all belong to one checkpoint
    even if a newer one is published meanwhile. A root is tried as ``<url>/latest/bertswarm.json`` (the coordinator,
    or a static server of a root whose ``latest`` is a symlink), then as a text file ``<url>/latest`` naming the
    checkpoint (roots written before ``latest`` became a symlink: backwards compatible).
    """
    url = given.rstrip("/")
    try:
        meta = CheckpointMetadata.parse(_get(f"{url}/{METADATA_FILE}", given), given)
        if url.endswith(f"/{LATEST_FILE}"):
            return _pinned(url.removesuffix(f"/{LATEST_FILE}"), url, meta, given)
        return url, meta
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise _http_error(url, e) from None
    try:
        meta = CheckpointMetadata.parse(_get(f"{url}/{LATEST_FILE}/{METADATA_FILE}", given), given)
        return _pinned(url, f"{url}/{LATEST_FILE}", meta, given)
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise _http_error(f"{url}/{LATEST_FILE}", e) from None
    try:  # an old-format root: latest is a text file holding the checkpoint's name
        name = _get(f"{url}/{LATEST_FILE}", given).decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as e:
        raise CheckpointError(
            url,
            f"no {METADATA_FILE} or {LATEST_FILE} there (HTTP {e.code}); pass the URL of a checkpoint the coordinator "
            "serves",
        ) from None
    if not NAME.fullmatch(name):
        raise CheckpointError(url, f"{LATEST_FILE} names {name[:40]!r}, not a checkpoint; {SOURCE_FIX}")
    base = f"{url}/{name}"
    try:
        return base, CheckpointMetadata.parse(_get(f"{base}/{METADATA_FILE}", given), base)
    except urllib.error.HTTPError as e:
        raise _http_error(base, e) from None


def _pinned(root: str, latest: str, meta: CheckpointMetadata, given: str) -> tuple[str, CheckpointMetadata]:
    """The checkpoint ``latest`` resolved to, by name (``<root>/epoch-NNNNNN``); ``latest`` itself if the server has
    no such name (the sha256 check after the download still catches a mix of two checkpoints)."""
    base = f"{root}/{checkpoint_name(meta.epoch)}"
    try:
        pinned = CheckpointMetadata.parse(_get(f"{base}/{METADATA_FILE}", given), base)
    except (urllib.error.HTTPError, CheckpointError):
        return latest, meta
    return (base, pinned) if pinned.sha256 == meta.sha256 else (latest, meta)


def download(url: str, target: Path, where: str, limit: int) -> None:
    """Stream ``url`` into ``target``, refusing more than ``limit`` bytes (a broken server must not fill the disk)."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(target, "wb") as f:
            size = 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise CheckpointError(
                        where,
                        f"{url} is larger than the {limit} bytes its {METADATA_FILE} records; the server sends "
                        "another file, pass the URL of a checkpoint the coordinator serves",
                    )
                f.write(chunk)
    except urllib.error.HTTPError as e:
        raise _http_error(url, e) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _unreachable(where, e) from None


def _get(url: str, where: str) -> bytes:
    """A small file; HTTPError is left to the caller (a 404 can mean "try as a root")."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            data = response.read(_MAX_METADATA_BYTES + 1)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _unreachable(where, e) from None
    if len(data) > _MAX_METADATA_BYTES:
        raise CheckpointError(where, f"{url} is larger than 1 MB, not checkpoint metadata; {SOURCE_FIX}")
    return data


def _http_error(url: str, e: urllib.error.HTTPError) -> CheckpointError:
    return CheckpointError(url, f"the server answered HTTP {e.code} {e.reason}; {SOURCE_FIX}")


def _unreachable(where: str, e: Exception) -> CheckpointError:
    reason = " ".join(str(getattr(e, "reason", None) or e).split())
    return CheckpointError(where, f"cannot download ({reason}); check the coordinator's address and that it is running")
