"""The public invariant suite (nestrnn.testing) over every registered memory function."""

from __future__ import annotations

import os

import pytest

from nestrnn import memory_names
from nestrnn.memory import build_memory
from nestrnn.testing import INVARIANTS, check_invariant

NAMES = memory_names()


def test_example_plugin_is_registered_in_ci():
    """CI installs plugins/gru_memory, so the suite below covers a real entry-point plugin."""
    if "gru" not in NAMES:
        if os.environ.get("CI"):
            pytest.fail("the example plugin nestrnn-gru is not installed (see .ci/run)")
        pytest.skip("pip install ./plugins/gru_memory to run the suite on the example plugin")


@pytest.mark.parametrize("invariant", INVARIANTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", NAMES)
def test_registered_memory_function(name, invariant):
    check_invariant(invariant, lambda hidden_size: build_memory(name, hidden_size))


@pytest.mark.parametrize("invariant", INVARIANTS, ids=lambda f: f.__name__)
def test_deeper_nesting(invariant):
    check_invariant(invariant, lambda h: build_memory({"name": "nested", "depth": 4}, h), 5)
