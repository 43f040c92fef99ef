"""The whole-sequence nested-LSTM op and its backends.

``nested_lstm`` runs one direction of one layer over a whole sequence. Every backend computes the
same function as ``naive.nested_lstm_naive`` (the reference); see that module for shapes.

Backends:
    "naive"   plain per-step PyTorch with autograd (reference; any device)
    "fused"   CPU/GPU fast path: one input GEMM, hand-written backward (``fused.py``)
    "triton"  fused Triton kernels (``fused_triton.py``; CUDA, or CPU under TRITON_INTERPRET=1)
    "auto"    "triton" for fp32/fp16/bf16 CUDA tensors when Triton is importable, otherwise "fused"
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from nestrnn.ops.nested_lstm.common import LevelWeights
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive

BACKENDS = ("auto", "naive", "fused", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["BACKENDS", "LevelWeights", "nested_lstm", "nested_lstm_naive", "resolve_backend"]


def triton_available() -> bool:
    """True when the Triton package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, x: Tensor) -> str:
    """Turn ``backend`` ("auto" included) into the concrete backend used for input ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if x.is_cuda and x.dtype in TRITON_DTYPES and triton_available():
        return "triton"
    return "fused"


def nested_lstm(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction of a Nested LSTM layer with the chosen backend.

    Returns ``(output (T, B, H), h_n (B, H), c_n (D, B, H))``.
    """
    backend = resolve_backend(backend, x)
    if backend == "naive":
        return nested_lstm_naive(x, weights, h0, c0, batch_sizes, reverse)
    if backend == "fused":
        from nestrnn.ops.nested_lstm.fused import nested_lstm_fused

        return nested_lstm_fused(x, weights, h0, c0, batch_sizes, reverse)
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on CPU); "
            f"got input on {x.device}"
        )
    from nestrnn.ops.nested_lstm.fused_triton import nested_lstm_triton

    return nested_lstm_triton(x, weights, h0, c0, batch_sizes, reverse)
