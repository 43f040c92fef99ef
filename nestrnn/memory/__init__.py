"""Memory functions: the pluggable cell update of the outer LSTM."""

from nestrnn.memory.additive import AdditiveMemory
from nestrnn.memory.base import MemoryFunction, State
from nestrnn.memory.build import MemorySpec, build_memory
from nestrnn.memory.nested import NestedMemory

__all__ = [
    "AdditiveMemory",
    "MemoryFunction",
    "MemorySpec",
    "NestedMemory",
    "State",
    "build_memory",
]
