"""CUDA graphs of the Triton step loops: capture, cache and replay.

A step loop can run as a captured CUDA graph, cached per shape; inputs are copied into the graph's
static buffers and its outputs cloned out, so calls that share a graph (several layers, both
directions) stay independent. ``TritonConfig(cuda_graph=...)`` or ``NESTRNN_TRITON_CUDA_GRAPH``
(``1``, ``0``, ``auto``) decide; by default (``auto``) a loop is captured when its shapes repeat
(the second call with the same key) and B * H is at most ``AUTO_GRAPH_MAX_BATCH_HIDDEN``, where
graphs measured faster, while the cached static buffers fit in a share of the device's memory (and
in half of what is free); a loop whose graph had to be evicted runs directly from then on.
Inside another capture (a user's graph, ``torch.compile(mode="reduce-overhead")``) the loop runs
directly, with the graph configuration, to be captured by that one.

The loops themselves and their launch parameters are ``triton_loop.py``'s; this module only needs
what ``Launch`` and ``Launches`` describe.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from nestrnn.ops.nested_lstm.triton_configs import TritonConfig
from nestrnn.ops.nested_lstm.triton_kernels import LAUNCH_ERRORS

__all__ = [
    "AUTO_GRAPH_MAX_BATCH_HIDDEN",
    "clear_cuda_graphs",
    "cuda_graph_count",
    "run",
]


class Launch(Protocol):
    """What this module needs of a step loop's launch parameters (``triton_loop._Launch``);
    it must also be hashable: it is part of a graph's cache key."""

    @property
    def cfg(self) -> TritonConfig: ...

    @property
    def batch(self) -> int: ...

    @property
    def hidden(self) -> int: ...


class Launches(Protocol):
    """A call's launch parameters launched directly and in a CUDA graph (``triton_loop._Launches``)."""

    @property
    def direct(self) -> Launch: ...

    @property
    def graphed(self) -> Launch: ...


class _Graphed:
    """A step loop captured in a CUDA graph over static buffers (GPU only)."""

    def __init__(self, loop, launch: Launch, static: dict[str, Tensor]):
        self.static = static
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up run: compiles the kernels outside the capture
            loop(launch, static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (autograd's, say) do not void the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            loop(launch, static)

    def __call__(self, inputs: dict[str, Tensor], fill=None) -> dict[str, Tensor]:
        for name, value in inputs.items():
            self.static[name].copy_(value)
        if fill is not None:
            fill(self.static)
        self.graph.replay()
        return self.static


# Auto graphs up to this B * H: beyond it graphs measured no faster than direct launches in float32,
# and nothing was measured beyond (256, 1024) (benchmarks/results/tune_triton_cuda.json, an H200);
# one limit for every dtype.
AUTO_GRAPH_MAX_BATCH_HIDDEN = 256 * 1024
AUTO_GRAPH_MEMORY_SHARE = 8  # auto graphs' static buffers take at most 1/8 of device memory
_MAX_GRAPHS = 16
_MAX_SEEN = 64

_GRAPHS: OrderedDict[tuple, _Graphed] = OrderedDict()  # least recently used first
_SEEN: OrderedDict[tuple, None] = OrderedDict()  # keys run once without a graph (auto mode)
_EVICTED: OrderedDict[tuple, None] = OrderedDict()  # keys whose graph was evicted: not recaptured
_LOCK = threading.Lock()
_auto_failure: str | None = None  # why an automatic capture failed (none is tried again)


def cuda_graph_count() -> int:
    """How many captured step loops are cached."""
    return len(_GRAPHS)


def clear_cuda_graphs() -> None:
    """Release every cached CUDA graph and its static buffers; shapes must repeat again to be
    captured anew."""
    with _LOCK:
        _GRAPHS.clear()
        _SEEN.clear()
        _EVICTED.clear()


def _capture_stream(bufs: dict[str, Tensor]) -> torch.cuda.Stream | None:
    """The current CUDA stream of the buffers' device; None where no graph can be captured (not
    CUDA, or inside another capture, which then records the loop's launches itself)."""
    device = bufs["gates"].device
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return torch.cuda.current_stream(device)


def _graph_budget(device: torch.device) -> int:
    """Bytes that automatic graphs' static buffers may hold together: a share of the device's
    memory, and of what is free now at most half."""
    held = sum(_nbytes(g.static) for g in _GRAPHS.values())
    free = torch.cuda.mem_get_info(device)[0]
    share = torch.cuda.get_device_properties(device).total_memory // AUTO_GRAPH_MEMORY_SHARE
    return min(share, held + free // 2)


def _nbytes(bufs: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in bufs.values())


def _graph_for(loop, launch: Launch, bufs: dict[str, Tensor], fill, write_only) -> _Graphed | None:
    """The cached graph of this call's key, or one captured now, or None: run directly."""
    stream = _capture_stream(bufs)
    if stream is None or launch.cfg.cuda_graph is False:
        return None
    auto = launch.cfg.cuda_graph is None
    device = bufs["gates"].device
    key = (
        loop.__name__,
        device,
        stream,
        launch,
        *((name, tuple(v.shape), v.dtype) for name, v in sorted(bufs.items())),
    )
    with _LOCK:
        if key in _GRAPHS:
            _GRAPHS.move_to_end(key)
            return _GRAPHS[key]
        if auto and not _auto_captures_now(key, launch, _nbytes(bufs), device):
            return None
        static = {name: torch.zeros_like(v) for name, v in bufs.items()}
        for name, v in bufs.items():
            if name not in write_only:
                static[name].copy_(v)
        fill(static)
        try:
            graphed = _Graphed(loop, launch, static)
        except LAUNCH_ERRORS as err:  # a bug of ours is no capture failure: it propagates
            if not auto:
                raise
            _give_up_automatic_graphs(f"{type(err).__name__}: {err}")
            return None
        _SEEN.pop(key, None)
        _GRAPHS[key] = graphed
        while len(_GRAPHS) > _MAX_GRAPHS:
            _evict_oldest()
        return graphed


def _auto_captures_now(key: tuple, launch: Launch, size: int, device: torch.device) -> bool:
    """Whether auto mode captures this loop now (``size``: bytes of its static buffers): not at a
    key's first sighting, nor where graphs measured no faster; least recently used graphs are
    evicted to keep within the memory budget."""
    if _auto_failure or launch.batch * launch.hidden > AUTO_GRAPH_MAX_BATCH_HIDDEN:
        return False
    if key in _EVICTED:  # more loops alternate than fit: capturing again would thrash
        return False
    if key not in _SEEN:  # shapes that never repeat are not captured
        _SEEN[key] = None
        while len(_SEEN) > _MAX_SEEN:
            _SEEN.popitem(last=False)
        return False
    budget = _graph_budget(device)
    if size > budget:
        return False
    while _GRAPHS and size + sum(_nbytes(g.static) for g in _GRAPHS.values()) > budget:
        _evict_oldest()
    return True


def _evict_oldest() -> None:
    """Drop the least recently used graph; auto mode does not capture its key again."""
    key, _ = _GRAPHS.popitem(last=False)
    _EVICTED[key] = None
    while len(_EVICTED) > _MAX_SEEN:
        _EVICTED.popitem(last=False)


def _give_up_automatic_graphs(reason: str) -> None:
    global _auto_failure
    _auto_failure = reason
    warnings.warn(
        f"nestrnn: capturing a CUDA graph failed ({reason}); the Triton step loops run without "
        "graphs from now on",
        RuntimeWarning,
        stacklevel=3,
    )


def run(
    loop,
    launches: Launches,
    bufs: dict[str, Tensor],
    outputs: tuple[str, ...],
    fill: Callable[[dict[str, Tensor]], None],
    write_only: tuple[str, ...],
) -> dict[str, Tensor]:
    """Run a step loop directly, or through a CUDA graph (see the module docstring), with the
    launch parameters chosen for each (``launches``).

    ``bufs`` holds every tensor the loop touches; ``fill(bufs)`` writes values into parts of buffers
    (the initial state slots). In graph mode every buffer not named in ``write_only`` (what the
    loop only writes, or what ``fill`` writes) is copied into the graph's static twin, ``fill`` is
    applied to the static buffers, and ``outputs`` are cloned out (the static buffers are reused
    by the next call). A buffer read and written, like the gates that come in holding the input
    projection, is both copied in and cloned out.
    """
    graphed = _graph_for(loop, launches.graphed, bufs, fill, write_only)
    if graphed is None:
        fill(bufs)
        capturing = bufs["gates"].is_cuda and torch.cuda.is_current_stream_capturing()
        loop(launches.graphed if capturing else launches.direct, bufs)  # in another's capture
        return bufs
    static = graphed({name: v for name, v in bufs.items() if name not in write_only}, fill)
    return {**bufs, **{name: static[name].clone() for name in outputs}}
