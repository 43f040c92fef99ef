"""A pool of large CPU buffers that the time loops reuse from one call to the next.

PyTorch caches GPU memory but not CPU memory, and fresh memory from the system costs a page fault
on its first touch (what that costs: docs/design.md). The pool hands a buffer out again only when
nothing but the pool references its storage any more (the caller, or the autograd graph that saved
it, has let it go). Up to ``NESTRNN_WORKSPACE_MB`` (default 2048; 0 turns pooling off) is kept;
``clear_workspace()`` releases it. Other devices get plain ``torch.empty``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

__all__ = ["WORKSPACE", "Workspace", "clear_workspace"]


class Workspace:
    """The pool: ``empty`` and ``zeros`` hand out (views of) pooled buffers."""

    min_bytes = 1 << 17  # smaller buffers come from malloc's heap, already warm

    def __init__(self) -> None:
        self.max_bytes = int(os.environ.get("NESTRNN_WORKSPACE_MB", "2048")) << 20
        self._buffers: list[Tensor] = []
        self._lock = threading.Lock()
        self._use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)
        self._free_count = None if self._use_count is None else self._count(torch.empty(1))

    def _count(self, t: Tensor) -> int:
        return cast(Callable[[int], int], self._use_count)(t.untyped_storage()._cdata)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A tensor of ``shape`` with undefined contents (pooled when large and on CPU)."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if (
            device.type != "cpu"
            or self._free_count is None
            or nbytes < self.min_bytes
            or nbytes > self.max_bytes
        ):
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            best = None
            for buf in self._buffers:  # the smallest free buffer that fits without much waste
                size = buf.numel()
                fits = buf.dtype == dtype and numel <= size <= 2 * numel
                smaller = best is None or size < best.numel()
                if fits and smaller and self._count(buf) == self._free_count:
                    best = buf
            if best is None:
                with torch.inference_mode(False):  # usable later in training, too
                    best = torch.empty(numel, dtype=dtype)
                self._buffers.append(best)
                self._trim()
            return best[:numel].view(shape)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.empty(shape, dtype, device).zero_()

    def _trim(self) -> None:
        """Forget the oldest buffers beyond the byte limit (ones in use are freed by their users)."""
        total = sum(b.numel() * b.element_size() for b in self._buffers)
        while total > self.max_bytes and len(self._buffers) > 1:
            old = self._buffers.pop(0)
            total -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


WORKSPACE = Workspace()


def clear_workspace() -> None:
    """Release the CPU buffers the op keeps for reuse between calls."""
    WORKSPACE.clear()
