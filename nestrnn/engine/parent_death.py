"""SIGTERM when the parent process dies (Linux's parent-death signal), so that a ``kill -9`` of a
launcher leaves nothing training behind: the child saves ``last.pt`` and stops, as on any SIGTERM.

Used twice: the ``--nproc`` launcher's torchrun gets it for the launcher, and each torchrun worker
for torchrun's agent. Elsewhere than Linux nothing is set up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def libc_prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux, else None. Looked up before a fork: a forked child that has not
    yet exec'd must not load libraries."""
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def terminate_with_parent(prctl: Callable[..., int] | None, parent: int | None = None) -> None:
    """Ask for SIGTERM when the parent dies. If it died already, which shows as a new parent
    (``parent`` is the pid it had; None: the orphans' reaper, pid 1), the signal comes now."""
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    orphaned = os.getppid() == 1 if parent is None else os.getppid() != parent
    if orphaned:
        os.kill(os.getpid(), signal.SIGTERM)
