"""The Triton-fused nested memory function (shipped with nestrnn, registered as ``triton_nested``).

It is :class:`nestrnn.memory.NestedMemory` with the same parameters and names, so checkpoints move
freely between the two; the difference is where it runs. Under ``backend="auto"`` a layer whose
memory is this function runs the whole sequence with the fused Triton kernels
(``nestrnn.ops.nested_lstm.fused_triton``) when its tensors are on CUDA and Triton is installed; on
CPU it runs the CPU fused op, exactly like ``nested``. Importing this module does not import Triton.
"""

from __future__ import annotations

from collections.abc import Callable

from nestrnn.hookspecs import hookimpl
from nestrnn.memory.nested import NestedMemory


class TritonNestedMemory(NestedMemory):
    """A nested memory whose layers prefer the fused Triton kernels on CUDA."""

    preferred_backend = "triton"


@hookimpl
def register_memories(register: Callable[..., None]) -> None:
    register(
        "triton_nested",
        TritonNestedMemory,
        "nested memory run by fused Triton kernels on CUDA (same parameters as 'nested')",
    )
