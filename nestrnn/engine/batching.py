"""Batching with random access: batch ``k`` of training is a pure function of ``k`` and the seed.

This is what makes resuming exact and sharding simple: the data position of a run is just its
global step, and a restarted run asks for batch ``k`` again and gets the same tensors.

* :class:`StreamBatches`: the standard character-level LM layout. The corpus is cut into
  ``batch_size`` contiguous streams (row b holds tokens ``b*L .. (b+1)*L-1``) that are read
  left to right in chunks of ``bptt`` steps; the recurrent state is carried from one chunk to the
  next (truncated BPTT), and reset when a new pass over the corpus starts.
* :class:`ShuffledBatches`: independent examples, reshuffled every pass with a seeded permutation.
* :func:`generator`: a ``torch.Generator`` seeded from a tuple of integers (synthetic data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor


def generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of ``keys`` (stable across runs and platforms)."""
    digest = hashlib.sha256(",".join(str(int(k)) for k in keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def compact_ids(ids: Tensor, vocab_size: int) -> Tensor:
    """Store token ids in the smallest integer type that holds ``vocab_size`` symbols."""
    dtype = (
        torch.uint8 if vocab_size <= 256 else torch.int16 if vocab_size <= 32767 else torch.int32
    )
    return ids.to(dtype)


class StreamBatches:
    """A token stream as ``batch_size`` parallel streams, read in ``bptt``-step chunks.

    Chunk ``i`` has inputs ``data[:, i*bptt : (i+1)*bptt]`` and targets shifted by one. Training
    uses the ``num_full`` chunks of exactly ``bptt`` steps; evaluation also reads the shorter last
    chunk so that every token but the first of each stream is predicted exactly once.
    """

    def __init__(self, ids: Tensor, batch_size: int, bptt: int, name: str = "data") -> None:
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D token tensor, got shape {tuple(ids.shape)}")
        length = ids.numel() // batch_size
        if length < 2:
            raise ValueError(
                f"the {name} split ({ids.numel():,} tokens) is too small for {batch_size} streams; "
                "lower the batch size"
            )
        self.data = ids[: batch_size * length].view(batch_size, length)
        self.batch_size = batch_size
        self.bptt = bptt
        self.length = length
        self.num_full = (length - 1) // bptt
        self.num_chunks = -(-(length - 1) // bptt)

    def chunk(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.bptt
        stop = min(start + self.bptt, self.length - 1)
        x = self.data[:, start:stop].long()
        y = self.data[:, start + 1 : stop + 1].long()
        return x, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(self.num_chunks):
            yield self.chunk(i)


class ShuffledBatches:
    """Batches of example indices; pass ``p`` over the data uses its own seeded permutation.

    Training batch ``k`` is batch ``k % num_batches`` of pass ``k // num_batches``; the last
    incomplete batch of a pass is dropped.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if num_examples < batch_size:
            raise ValueError(
                f"only {num_examples:,} training examples for a batch size of {batch_size}; "
                "lower train.batch_size"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.num_batches = num_examples // batch_size
        self._pass = -1
        self._perm: Tensor | None = None

    def indices(self, index: int) -> Tensor:
        epoch, i = divmod(index, self.num_batches)
        if epoch != self._pass or self._perm is None:
            self._perm = torch.randperm(self.num_examples, generator=generator(self.seed, epoch))
            self._pass = epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


def sequential_batches(num_examples: int, batch_size: int) -> Iterator[Tensor]:
    """Evaluation order: 0..n-1 in batches, the last one possibly smaller."""
    for start in range(0, num_examples, batch_size):
        yield torch.arange(start, min(start + batch_size, num_examples))
