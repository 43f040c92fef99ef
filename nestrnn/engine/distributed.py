"""Process topology: one process, or data parallelism over ``torch.distributed`` (DDP).

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR`` set) a run is
``WORLD_SIZE`` processes; :meth:`DistContext.from_env` joins the process group (``nccl`` on GPUs,
``gloo`` on CPUs, or ``backend`` when given). What each part of the engine does with it:

* the model is wrapped in ``DistributedDataParallel``: gradients are averaged over processes;
* every training batch goes through ``task.shard_batch(batch, rank, world_size)``: each process
  trains on its contiguous block of rows of the global batch (for language models: its block of
  the ``train.batch_size`` streams), so N processes see exactly what one process would;
* evaluation splits every batch's rows over the processes, and metric sums are all-reduced;
* only rank 0 prints, shows the progress bar and writes the run directory (``RunDir``); rank 0
  reads a checkpoint and broadcasts it, so the other ranks (and nodes) need no shared file system
  for the run directory.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import Tensor

from nestrnn.config import ConfigError
from nestrnn.engine.parent_death import libc_prctl, terminate_with_parent
from nestrnn.errors import UserError

T = TypeVar("T")

#: environment variables torchrun sets for every worker
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BACKENDS = ("auto", "nccl", "gloo")


def _import_group_defaults() -> None:
    """Import, before the process group exists, the modules whose functions default to
    ``group=torch.distributed.group.WORLD`` (DDP imports them when it is built).

    Imported later, those defaults would hold the group until the interpreter ends, so that
    ``destroy_process_group`` could not stop gloo's worker threads; a worker still releasing a
    collective's tensor while the interpreter shut down then aborted the process ("terminate
    called without an active exception") after a run had finished.
    """
    import torch.distributed.nn.functional  # noqa: F401


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARS)


def is_main_process() -> bool:
    """Whether this process speaks for the job: rank 0 under torchrun, or a lone process."""
    return not launched_by_torchrun() or os.environ["RANK"] == "0"


def restart_count() -> int:
    """How often torchrun restarted this job's workers (0: the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def max_restarts() -> int:
    try:
        return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    except ValueError:
        return 0


def choose_backend(backend: str = "auto", device: str = "auto") -> str:
    """``nccl`` when the run uses GPUs, else ``gloo`` (``backend`` other than auto wins)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if wants_cuda and torch.cuda.is_available() else "gloo"


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    #: where collective tensors live (the GPU of this rank for nccl)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def single(cls) -> DistContext:
        return cls()

    @classmethod
    def from_env(cls, backend: str = "auto", device: str = "auto") -> DistContext:
        """Join the process group torchrun set up; a single process when not under torchrun."""
        if not launched_by_torchrun():
            return cls.single()
        terminate_with_parent(libc_prctl())  # torchrun's agent: SIGTERM when it is killed
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        name = choose_backend(backend, device)
        collective_device = torch.device("cpu")
        if name == "nccl":
            if not torch.cuda.is_available():
                raise ConfigError("the nccl backend needs CUDA; use --backend gloo on CPUs")
            torch.cuda.set_device(local_rank)
            collective_device = torch.device("cuda", local_rank)
        if not torch.distributed.is_initialized():
            _import_group_defaults()
            kwargs: dict[str, Any] = {"timeout": _dt.timedelta(minutes=30)}
            if name == "nccl":
                kwargs["device_id"] = collective_device
            # the store of torchrun's agent outlives a restart: a prefix per attempt keeps the
            # new workers from reading the addresses of the dead ones
            store, _, _ = next(torch.distributed.rendezvous("env://"))
            store = torch.distributed.PrefixStore(f"nestrnn/attempt{restart_count()}", store)
            torch.distributed.init_process_group(
                name, store=store, rank=rank, world_size=world_size, **kwargs
            )
        return cls(rank, world_size, local_rank, name, collective_device)

    @property
    def is_main(self) -> bool:
        """Whether this process does the I/O (writes files, prints, shows progress)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_initialized()

    def from_main(self, produce: Callable[[], T]) -> T:
        """``produce()``, run by rank 0 alone, on every rank; a UserError it raises is raised on
        every rank, so that all of them stop alike (rank 0 reads files, the others receive)."""
        outcome: Any = None
        if self.is_main:
            try:
                outcome = ("ok", produce())
            except UserError as error:
                outcome = ("error", error)
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]

    def _require(self) -> None:
        if not torch.distributed.is_initialized():
            raise RuntimeError("world_size > 1 needs torch.distributed to be initialised")

    def barrier(self) -> None:
        if self.world_size > 1:
            self._require()
            torch.distributed.barrier()

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects; tensors come back on the CPU)."""
        if self.world_size == 1:
            return obj
        self._require()
        holder = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(holder, src=0, device=self.device)
        return holder[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        self._require()
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_tensor(self, tensor: Tensor) -> Tensor:
        """The sum over processes of ``tensor`` (float64, on the collective device)."""
        if self.world_size == 1:
            return tensor
        self._require()
        packed = tensor.detach().to(self.device, torch.float64).clone()
        torch.distributed.all_reduce(packed)
        return packed

    def all_reduce_stats(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum metric statistics over processes (the identity for a single process).

        A rank may have seen no rows (a last evaluation batch smaller than the world): the keys
        are merged first, and missing ones count as 0.
        """
        if self.world_size == 1:
            return stats
        self._require()
        keys = sorted(set().union(*self.gather(sorted(stats))))
        zero = torch.zeros((), dtype=torch.float64)
        packed = torch.stack([stats.get(k, zero).detach().double().cpu() for k in keys])
        summed = self.all_reduce_tensor(packed).cpu()
        return dict(zip(keys, summed.unbind(0)))

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> DistContext:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
