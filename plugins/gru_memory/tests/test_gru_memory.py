"""The plugin passes nestrnn's invariant suite."""

from nestrnn_gru import GRUMemory

from nestrnn.testing import MemoryFunctionInvariants


class TestGRUMemory(MemoryFunctionInvariants):
    @staticmethod
    def make_memory(hidden_size):
        return GRUMemory(hidden_size)
