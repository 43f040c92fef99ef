"""What the tests of native code share."""

from __future__ import annotations

import os

import pytest

from nestrnn.ops.common.build_cache import NativeStatus


def require(found: NativeStatus, what: str) -> None:
    """Skip where a native library cannot be built, except where it must be
    (``NESTRNN_REQUIRE_NATIVE=1``, set by CI): there its absence fails the test."""
    if not found.available:
        reason = f"{what} unavailable: {found.reason}"
        if os.environ.get("NESTRNN_REQUIRE_NATIVE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
