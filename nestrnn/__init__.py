"""nestrnn: Nested LSTMs and pluggable memory functions for PyTorch.

from nestrnn import NestedLSTM
rnn = NestedLSTM(input_size=32, hidden_size=64, num_layers=1, depth=2)
output, (h_n, c_n) = rnn(x)          # c_n: (depth, layers * directions, batch, hidden)
"""

from nestrnn.cell import NestedLSTMCell
from nestrnn.hookspecs import hookimpl
from nestrnn.layer import NestedLSTM
from nestrnn.memory import AdditiveMemory, MemoryFunction, NestedMemory, build_memory
from nestrnn.registry import (
    get_registry,
    memory_names,
    register_memory,
    register_task,
    task_names,
)
from nestrnn.serialization import safe_globals

__version__ = "0.1.0"

__all__ = [
    "AdditiveMemory",
    "MemoryFunction",
    "NestedLSTM",
    "NestedLSTMCell",
    "NestedMemory",
    "__version__",
    "build_memory",
    "get_registry",
    "hookimpl",
    "memory_names",
    "register_memory",
    "register_task",
    "safe_globals",
    "task_names",
]
