"""Exporting models with ``torch.onnx.export(dynamo=True)``.

``torch.export``, ``ExportedProgram.run_decompositions()`` and ``torch.onnx.export(dynamo=True)``
need nothing: the op decomposes into core ATen ops and one scan over time
(``nestrnn.ops.nested_lstm.decompose``), an ONNX ``Scan`` that runs any sequence length. This
translation table is an alternative that unrolls the time loop into plain ONNX ops, for runtimes
without ``Scan`` (export with a static sequence length)::

    torch.onnx.export(model, (x,), dynamo=True,
                      custom_translation_table=nestrnn.onnx_translation_table())
"""

from __future__ import annotations

from collections.abc import Callable


def onnx_translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` (needs onnxscript)."""
    from nestrnn.ops.nested_lstm.onnx import onnx_translation_table as table

    return table()
