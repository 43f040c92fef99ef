"""Built-in memory functions, registered through the same hook as third-party plugins."""

from __future__ import annotations

from collections.abc import Callable

from nestrnn.hookspecs import hookimpl
from nestrnn.memory.additive import AdditiveMemory
from nestrnn.memory.nested import NestedMemory


@hookimpl
def register_memories(register: Callable[..., None]) -> None:
    register("additive", AdditiveMemory, "c = f*c_prev + i*g: the plain LSTM update")
    register("nested", NestedMemory, "an inner LSTM computes the cell (Nested LSTM), any depth")
