"""Exporting models with ``torch.onnx.export(dynamo=True)``.

``torch.export`` and ``torch.jit.trace`` need nothing: they record nestrnn's op as the custom
operator it is. ONNX has no such operator, so the ONNX exporter needs its translation::

    torch.onnx.export(model, (x,), dynamo=True,
                      custom_translation_table=nestrnn.onnx_translation_table())

The translation unrolls the time loop: export with a static sequence length. Models whose memory
function is not an additive/nested chain export through ordinary PyTorch ops and need no table.
"""

from __future__ import annotations

from collections.abc import Callable


def onnx_translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` (needs onnxscript)."""
    from nestrnn.ops.nested_lstm.onnx import onnx_translation_table as table

    return table()
