"""Process topology: where data parallelism plugs in.

Today a run is one process (:meth:`DistContext.single`). The engine is written so that adding
``torch.distributed`` DDP later is local to this module and two call sites:

* every file a run writes goes through :class:`nestrnn.engine.rundir.RunDir`, which writes only when
  ``is_main`` (rank 0); console output goes through :meth:`Trainer.log`, which does the same;
* every training batch goes through ``task.shard_batch(batch, rank, world_size)``, the hook that
  gives each process its rows of the global batch (a contiguous block by default);
* a DDP version would add: ``init_process_group`` here (from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``),
  wrapping the model in ``DistributedDataParallel`` in the trainer, an all-reduce of the summed
  metric statistics (:meth:`DistContext.all_reduce_stats`), and a barrier around checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def single(cls) -> DistContext:
        return cls()

    @property
    def is_main(self) -> bool:
        """Whether this process does the I/O (writes files, prints, shows progress)."""
        return self.rank == 0

    def all_reduce_stats(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum metric statistics over processes (the identity for a single process)."""
        if self.world_size == 1:
            return stats
        if not torch.distributed.is_initialized():  # pragma: no cover - future DDP path
            raise RuntimeError("world_size > 1 needs torch.distributed to be initialised")
        keys = sorted(stats)
        packed = torch.stack([stats[k].double() for k in keys])
        torch.distributed.all_reduce(packed)
        return dict(zip(keys, packed.unbind(0)))
