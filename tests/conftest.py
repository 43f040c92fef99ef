"""Test-session settings: hypothesis profiles, Triton's CPU interpreter, shared data location."""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run on CPU tensors under the interpreter; it must be set before Triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The real data sets for development (``NESTRNN_DATA_DIR``, else ../shared/data), if present."""
    configured = os.environ.get("NESTRNN_DATA_DIR")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None
