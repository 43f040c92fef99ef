"""Exporting models: ONNX, and the library that runs them without nestrnn.

``torch.export``, ``ExportedProgram.run_decompositions()`` and ``torch.onnx.export(dynamo=True)``
need nothing: the op decomposes into core ATen ops and one scan over time
(``nestrnn.ops.nested_lstm.decompose``), an ONNX ``Scan`` that runs any sequence length. This
translation table is an alternative that unrolls the time loop into plain ONNX ops, for runtimes
without ``Scan`` (export with a static sequence length)::

    torch.onnx.export(model, (x,), dynamo=True,
                      custom_translation_table=nestrnn.onnx_translation_table())

To run a traced or exported model where nestrnn is not installed (a C++ program, a server),
load the library of ``library_path()`` there first: it defines ``nestrnn::nested_lstm``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def onnx_translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` (needs onnxscript)."""
    from nestrnn.ops.nested_lstm.onnx import onnx_translation_table as table

    return table()


def library_path() -> Path:
    """The path of the shared library that runs ``nestrnn::nested_lstm`` without nestrnn, built
    on first use (a C++ compiler and this torch's headers are needed: about half a minute).

    A TorchScript file, ExportedProgram or AOTInductor package of a model with a NestedLSTM then
    runs in a process that never imports nestrnn: ``torch.ops.load_library(path)`` in Python,
    link or ``dlopen`` it in C++, before loading the model. Raises ``RuntimeError`` saying why
    when it cannot be built."""
    from nestrnn.ops.nested_lstm.library import library_path as path

    return path()
