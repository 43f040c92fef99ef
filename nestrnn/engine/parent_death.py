"""SIGTERM when the parent process dies (Linux's parent-death signal), so that a ``kill -9`` of a
launcher leaves nothing training behind: the child saves ``last.pt`` and stops, as on any SIGTERM.

Used twice: the ``--nproc`` launcher's torchrun gets it for the launcher, and each torchrun worker
for torchrun's agent. Elsewhere than Linux nothing is set up.

A dead parent shows as a new parent (the orphan's reaper), so the parent a process is compared
with is the pid it had at start, never "pid 1": torchrun as a container's entrypoint *is* pid 1,
and a subreaper (``systemd --user``, ``tini -s``) is a parent that is not pid 1.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

#: this process's parent when nestrnn was imported (for a torchrun worker: torchrun's agent,
#: which started it a moment before). A parent that died even earlier shows as the reaper here and
#: goes unnoticed; the worker then fails at the rendezvous with the agent's store.
STARTING_PARENT = os.getppid()


def libc_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux, else None. Looked up before a fork: a forked child that has not
    yet exec'd must not load libraries."""
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def terminate_with_parent(prctl: Callable[..., int] | None, parent: int | None = None) -> None:
    """Ask for SIGTERM when the parent dies. If it died already, which shows as another parent
    than ``parent`` (the pid it had; None: :data:`STARTING_PARENT`), the signal comes now."""
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != (STARTING_PARENT if parent is None else parent):
        os.kill(os.getpid(), signal.SIGTERM)
