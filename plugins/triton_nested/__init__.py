"""``triton_nested``: another name for the nested memory, shipped with nestrnn.

Configs and checkpoints of earlier releases name it; it builds :class:`nestrnn.memory.NestedMemory`
(same parameters and names), whose layers run the whole-sequence op, on Triton kernels on CUDA
under ``backend="auto"``. Importing this module does not import Triton.
"""

from __future__ import annotations

from collections.abc import Callable

from nestrnn.hookspecs import hookimpl
from nestrnn.memory.nested import NestedMemory


@hookimpl
def register_memories(register: Callable[..., None]) -> None:
    register(
        "triton_nested",
        NestedMemory,
        "another name for 'nested' (its layers run Triton kernels on CUDA under backend='auto')",
    )
