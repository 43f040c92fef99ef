"""Which implementation of the op runs a call: the one place that decides.

Implementations (each a module of this package):

    "torch_lstm"  torch's own LSTM kernel: depth 1, standard activations; inference inside the op,
                  and training in eager mode, where torch's LSTM runs with its own autograd
                  outside the op (nn.LSTM's numbers and speed; the op's loops need a saved
                  layout torch's kernel does not give)
    "c_loop"      the C time loops on CPU (float32/float64; half precision runs in float32)
    "torch_loop"  the time loops in plain PyTorch calls, any device
    "triton"      the fused Triton kernels (CUDA; or CPU under TRITON_INTERPRET=1 for tests)

Backends a caller may ask for: "auto" (the fastest that can run: on CUDA chosen from measurements,
see :func:`cuda_choice`; elsewhere :func:`fallback_choice`: torch_lstm for depth-1 inference, else
the C loop on CPU, else the PyTorch loop), "triton" (falls back to :func:`fallback_choice`, with a
warning once, where Triton cannot run), or an implementation's name, which pins it and is an error
where it cannot run. A call with zoneout or layer normalisation (``norms``) never runs torch_lstm,
which has neither.

An implementation that fails at run time (a Triton kernel that does not compile on this GPU, say)
is recorded with :func:`mark_broken` and not planned again in this process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from nestrnn.ops.common.levels import LevelActivations, state_dtype
from nestrnn.ops.nested_lstm import c_loop, torch_lstm

IMPLEMENTATIONS = ("torch_lstm", "c_loop", "torch_loop", "triton")
BACKENDS = ("auto", *IMPLEMENTATIONS)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_DEPTH = 15  # the kernels take every level's activation code packed into 64 bits

_broken: dict[str, str] = {}
_warned: set[str] = set()


@dataclass(frozen=True)
class Plan:
    """The implementation that runs, and why (``note`` says why another was not used)."""

    implementation: str
    note: str = ""


def mark_broken(implementation: str, reason: str) -> None:
    """Never plan ``implementation`` again in this process; warn once with ``reason``."""
    _broken[implementation] = reason
    warn_once(f"nestrnn: the {implementation} implementation failed ({reason}); using another")


def failures() -> dict[str, str]:
    """The implementations that failed at run time in this process, with the reason."""
    return dict(_broken)


def forget_failures() -> None:
    """Plan every implementation again (after fixing what made one fail), and warn again."""
    _broken.clear()
    _warned.clear()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_unavailable_reason(x: Tensor, depth: int) -> str | None:
    """Why the Triton kernels cannot run ``x`` at ``depth`` (None when they can)."""
    if "triton" in _broken:
        return f"it failed earlier: {_broken['triton']}"
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not (x.is_cuda or (interpreting and x.device.type == "cpu")):
        return f"input on {x.device}"
    if x.dtype not in TRITON_DTYPES or (interpreting and x.dtype == torch.bfloat16):
        return f"input dtype {x.dtype}"
    if depth > TRITON_MAX_DEPTH:
        return f"depth {depth} > {TRITON_MAX_DEPTH}"
    if not _triton_installed():
        return "Triton is not installed"
    return None


@functools.cache
def _triton_installed() -> bool:
    """Looked up once: the plan is made on every call, and a lookup searches sys.path."""
    return importlib.util.find_spec("triton") is not None


def plan(
    x: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    training: bool,
    backend: str = "auto",
    eager: bool = False,
    hidden: int | None = None,
    zoneout: bool = False,
    norms: bool = False,
) -> Plan:
    """The implementation for this call (see the module docstring). ``eager``: the caller can run
    torch's LSTM with its own autograd (no compile, export, trace or torch.func transform).
    ``hidden``: the hidden size, which ``auto``'s choice on CUDA depends on (None: unknown, and
    depth 1 keeps cuDNN). ``zoneout``: the call has zoneout (torch's LSTM cannot run it);
    ``norms``: it has layer normalisation."""
    training = training and not eager  # torch's LSTM trains only outside the op
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("auto", "triton"):
        why_not = triton_unavailable_reason(x, len(activations))
        if backend == "auto" and not x.is_cuda:  # the interpreter runs only when asked for
            why_not = why_not or f"input on {x.device}"
        if backend == "auto" and x.is_cuda:
            chosen = cuda_choice(
                x, batch_sizes, reverse, activations, training, why_not, hidden, zoneout, norms
            )
            return Plan(chosen, "" if why_not is None else f"triton: {why_not}")
        if why_not is None:
            return Plan("triton")
        chosen = fallback_choice(x, batch_sizes, reverse, activations, training, zoneout, norms)
        if backend == "triton" and "triton" not in _broken:  # a failure was warned about
            warn_once(f"nestrnn: backend 'triton' cannot run here ({why_not}); using {chosen}")
        return Plan(chosen, f"triton: {why_not}")
    why_not = _pinned_reason(
        backend, x, batch_sizes, reverse, activations, training, zoneout, norms
    )
    if why_not is not None:
        raise RuntimeError(f"the {backend} implementation cannot run this call: {why_not}")
    return Plan(backend)


# Up to these B * H the Triton loops were faster than cuDNN at depth 1 on an H200, forward and
# forward+backward (benchmarks/results/speed_cuda_*.json); in float16 and at larger sizes cuDNN was
# as fast or faster. TF32 was not measured.
DEPTH1_TRITON_MAX_BATCH_HIDDEN = {torch.bfloat16: 128 * 512, torch.float32: 16 * 768}


def cuda_choice(
    x: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    training: bool,
    triton_why_not: str | None,
    hidden: int | None = None,
    zoneout: bool = False,
    norms: bool = False,
) -> str:
    """``auto``'s implementation for a CUDA input, from what was measured on an H200.

    - torch's LSTM (cuDNN) where it can run (``training`` here is training inside the op), except
      where the Triton loops measured faster at depth 1 (``DEPTH1_TRITON_MAX_BATCH_HIDDEN``;
      ``hidden`` None: not applied), and without zoneout, which it lacks;
    - otherwise the Triton loops: at depth 2 faster than the PyTorch loop in every dtype and size
      measured; where they cannot run (``triton_why_not``), :func:`fallback_choice`.
    """
    if triton_why_not is not None:
        return fallback_choice(x, batch_sizes, reverse, activations, training, zoneout, norms)
    cudnn = torch_lstm.unavailable_reason(x, batch_sizes, reverse, activations) is None
    if not training and not (zoneout or norms) and cudnn and not _triton_beats_cudnn(x, hidden):
        return "torch_lstm"
    return "triton"


def _triton_beats_cudnn(x: Tensor, hidden: int | None) -> bool:
    """Whether the Triton loops measured faster than cuDNN at depth 1 for this dtype and size."""
    limit = DEPTH1_TRITON_MAX_BATCH_HIDDEN.get(x.dtype)
    ieee = x.dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32
    return limit is not None and hidden is not None and ieee and x.shape[1] * hidden <= limit


def fallback_choice(
    x: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    training: bool,
    zoneout: bool = False,
    norms: bool = False,
) -> str:
    """The implementation where Triton does not run (off CUDA, or after it failed): torch's LSTM for
    depth-1 inference without zoneout or layer normalisation where it can, else the C loop where
    it can, else the PyTorch loop."""
    if (
        not training
        and not (zoneout or norms)
        and torch_lstm.unavailable_reason(x, batch_sizes, reverse, activations) is None
    ):
        return "torch_lstm"
    if c_loop.unavailable_reason(x.device, state_dtype(x.dtype)) is None:
        return "c_loop"
    return "torch_loop"


def _pinned_reason(
    backend, x, batch_sizes, reverse, activations, training, zoneout=False, norms=False
) -> str | None:
    if backend == "torch_lstm":
        if zoneout:
            return "torch's LSTM has no zoneout"
        if norms:
            return "torch's LSTM has no layer normalisation"
        if training:
            return "it trains only in eager mode, outside the op"
        return torch_lstm.unavailable_reason(x, batch_sizes, reverse, activations)
    if backend == "c_loop":
        return c_loop.unavailable_reason(x.device, state_dtype(x.dtype))
    return None
