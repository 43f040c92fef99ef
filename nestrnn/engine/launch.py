"""Launching training: what a run is (new or resumed, where), and ``--nproc`` under torchrun.

* :func:`plan_run` decides, from the command line and the run directory, the configuration, the
  run directory and whether the run is new or resumed (``--resume DIR``; ``--resume auto`` and a
  worker that torchrun restarted continue ``--run-dir`` when it has a checkpoint, else start it).
  Under torchrun rank 0 decides and tells the others (:func:`plan_on_main`).
* :func:`run_torchrun` runs the same ``nestrnn`` command under ``torchrun --standalone`` with N
  processes (through :mod:`nestrnn.engine.torchrun`). torchrun gets its own process group: SIGTERM, SIGINT and SIGHUP sent to the launcher
  (by ``timeout``, a scheduler, Ctrl-C, a closed terminal; not one the launcher was started to
  ignore, like ``nohup``'s SIGHUP) are forwarded to it once, torchrun passes them on to its
  workers (which save ``last.pt`` and stop) and the launcher waits for all of it. On Linux torchrun
  also gets SIGTERM when the launcher dies, and each worker when torchrun dies
  (:mod:`nestrnn.engine.parent_death`), so a ``kill -9`` of either leaves no process training
  behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from omegaconf import DictConfig, OmegaConf

from nestrnn.config import load_config, load_yaml, to_container
from nestrnn.engine import rundir as rd
from nestrnn.engine.distributed import DistContext, max_restarts
from nestrnn.engine.parent_death import libc_prctl, terminate_with_parent
from nestrnn.engine.rundir import Replace
from nestrnn.engine.stopping import exit_status
from nestrnn.errors import UserError

#: what the launcher passes on to torchrun
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class RunPlan:
    """What ``nestrnn train`` is about to do."""

    config: DictConfig
    run_dir: Path
    resume: bool
    replace: Replace  # what a new run may replace in run_dir (see Trainer)


def resume_dir(args: argparse.Namespace, restarted: bool) -> Path | None:
    """The run directory to continue (None: a new run), from ``--resume``/``--run-dir``.

    ``restarted``: this process is a worker that torchrun restarted (it continues --run-dir like
    ``--resume auto``, with the original command line, ``-c`` included)."""
    if args.overwrite and args.resume:
        raise UserError("--overwrite starts a new run; it cannot go with --resume")
    if args.resume and args.resume != "auto":
        chosen = Path(args.resume)
        if args.run_dir and Path(args.run_dir).resolve() != chosen.resolve():
            raise UserError(
                f"--resume {args.resume} continues that directory; leave out --run-dir "
                f"{args.run_dir} (or use --resume auto --run-dir DIR)"
            )
        _check_resumable_dir(rd.RunDir(chosen))
        if args.config:
            raise UserError(
                "--resume takes the configuration from the run directory; give KEY=VALUE "
                "overrides only"
            )
        return chosen
    if args.resume != "auto" and not restarted:
        return None
    if not args.run_dir:
        raise UserError("--resume auto (and torchrun --max-restarts) needs --run-dir DIR")
    run = rd.RunDir(args.run_dir)
    run.check_is_directory()
    if not run.resumable():
        return None
    if args.config and not restarted:
        raise UserError(
            f"{run.path} has a checkpoint: --resume auto continues it with its saved "
            "configuration; leave out -c (KEY=VALUE overrides still apply)"
        )
    return run.path


def _check_resumable_dir(run: rd.RunDir) -> None:
    run.check_is_directory()
    if not (run / rd.CONFIG).is_file():
        raise rd.RunDirError(f"{run.path} is not a run directory (no {rd.CONFIG})")
    if not (run / rd.LAST).is_file():
        raise rd.RunDirError(f"{run.path} has no checkpoint ({rd.LAST}) to resume from")


def run_config(args: argparse.Namespace, resuming: Path | None) -> DictConfig:
    """The configuration: a resumed run's saved one, else the defaults, ``-c`` files and
    overrides (a resumed run takes overrides too)."""
    if resuming is None:
        return load_config(args.config, args.overrides)
    base = OmegaConf.to_container(load_yaml(resuming / rd.CONFIG))
    return load_config([], args.overrides, base=base)


def plan_run(args: argparse.Namespace, restarted: bool) -> RunPlan:
    """Decide the run (see the module docstring); every check that needs no data or model is
    done here, so that a mistake is reported before anything is loaded."""
    if max_restarts() > 0 and not (args.run_dir or args.resume):
        raise UserError(
            "with torchrun --max-restarts give --run-dir DIR: restarted workers continue from "
            "DIR/last.pt"
        )
    named = args.resume if args.resume not in (None, "auto") else args.run_dir
    if named:  # first: whatever else is wrong, a run being written is not to be touched
        rd.RunDir(named).check_not_busy()
    resuming = resume_dir(args, restarted)
    config = run_config(args, resuming)
    if resuming is not None:
        return RunPlan(config, resuming, True, "nothing")
    replace: Replace = "any" if args.overwrite else "nothing"
    if args.resume == "auto" or restarted:
        replace = "incomplete"  # a run killed before its first checkpoint starts again
    run = rd.RunDir(args.run_dir or rd.default_run_dir(config.task.name))
    run.check_new_run(replace)
    return RunPlan(config, run.path, False, replace)


def plan_on_main(dist: DistContext, decide: Callable[[], RunPlan]) -> RunPlan:
    """``decide()`` on rank 0, its plan on every rank (the configuration travels as a dict)."""

    def decide_portably() -> tuple[dict, Path, bool, Replace]:
        plan = decide()
        return to_container(plan.config), plan.run_dir, plan.resume, plan.replace

    container, run_dir, resume, replace = dist.from_main(decide_portably)
    return RunPlan(load_config([], [], base=container), run_dir, resume, replace)


def run_torchrun(nproc: int, argv: list[str]) -> int:
    """``python -m torch.distributed.run --standalone --nproc-per-node NPROC -m nestrnn ARGV``
    (see the module docstring); its exit status, or 128 + n when signal n stopped the launch."""
    command = [sys.executable, "-m", "nestrnn.engine.torchrun", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "nestrnn", *argv]  # fmt: skip
    received: list[int] = []
    process = subprocess.Popen(command, preexec_fn=_child_setup())

    def forward(signum: int, frame: FrameType | None) -> None:
        if not received:  # once: a second one would break torchrun's own shutdown
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    previous = {
        signum: signal.signal(signum, forward)
        for signum in FORWARDED_SIGNALS
        if signal.getsignal(signum) is not signal.SIG_IGN  # nohup's SIGHUP stays ignored
    }
    try:
        status = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return exit_status(received[0]) if received else status


def _child_setup() -> Callable[[], None]:
    """What the torchrun process does before it starts: its own process group (so that a
    terminal's Ctrl-C reaches it once, through the launcher) and, on Linux, SIGTERM when the
    launcher dies. Resolved here: a forked child must not load libraries."""
    parent, prctl = os.getpid(), libc_prctl()

    def setup() -> None:
        os.setpgrp()
        terminate_with_parent(prctl, parent)

    return setup
