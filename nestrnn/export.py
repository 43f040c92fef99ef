"""Exporting models: ONNX, and the library that runs them without nestrnn.

``torch.export``, ``ExportedProgram.run_decompositions()`` and ``torch.onnx.export(dynamo=True)``
need nothing: the op decomposes into core ATen ops and one scan over time
(``nestrnn.ops.nested_lstm.decompose``, whose body is the reference cell step), an ONNX ``Scan``
that runs any sequence length::

    torch.onnx.export(model, (x,), dynamo=True)

To run a traced or exported model where nestrnn is not installed (a C++ program, a server),
load the library of ``library_path()`` there first: it defines ``nestrnn::nested_lstm``.
"""

from __future__ import annotations

from pathlib import Path


def library_path() -> Path:
    """The path of the shared library that runs ``nestrnn::nested_lstm`` without nestrnn, built
    on first use (a C++ compiler and this torch's headers are needed: about half a minute).

    A TorchScript file, ExportedProgram or AOTInductor package of a model with a NestedLSTM then
    runs in a process that never imports nestrnn: ``torch.ops.load_library(path)`` in Python,
    link or ``dlopen`` it in C++, before loading the model. Raises ``RuntimeError`` saying why
    when it cannot be built."""
    from nestrnn.ops.nested_lstm.library import library_path as path

    return path()
