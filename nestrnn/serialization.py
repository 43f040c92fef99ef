"""Loading whole pickled models with ``torch.load(weights_only=True)``, PyTorch's default.

``weights_only`` loading refuses every class it was not told about. nestrnn's modules keep only
tensors, numbers, strings and containers (activation *names*, not functions), so allowlisting
nestrnn's own classes is enough::

    with torch.serialization.safe_globals(nestrnn.safe_globals()):
        model = torch.load("model.pt", weights_only=True)

A model that uses a memory function of your own needs that class too:
``nestrnn.safe_globals(MyMemory)``.
"""

from __future__ import annotations

from nestrnn.cell import NestedLSTMCell
from nestrnn.layer import NestedLSTM
from nestrnn.memory import AdditiveMemory, NestedMemory


def safe_globals(*extra: type) -> list[type]:
    """nestrnn's module classes, then ``extra``, for ``torch.serialization.safe_globals``."""
    return [NestedLSTM, NestedLSTMCell, AdditiveMemory, NestedMemory, *extra]
