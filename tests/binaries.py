"""External programs some tests need (Debian's prometheus package: promtool and the prometheus server)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str) -> str:
    """``name``'s path; without it the test is skipped, except in CI (CI=true), where .ci/run must have installed it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing in CI; .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (apt-get install prometheus); CI runs this test")
    return path
