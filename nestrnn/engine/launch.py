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
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from omegaconf import DictConfig, OmegaConf

from nestrnn.config import ConfigError, load_config, to_container
from nestrnn.engine import rundir as rd
from nestrnn.engine import runfiles
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
    #: the folders created for a default run directory (rank 0; see rundir.remove_empty)
    created: tuple[Path, ...] = ()


def resume_dir(args: argparse.Namespace, restarted: bool) -> Path | None:
    """The run directory to continue (None: a new run), from ``--resume``/``--run-dir``.

    ``restarted``: this process is a worker that torchrun restarted (it continues --run-dir like
    ``--resume auto``, with the original command line, ``-c`` included)."""
    if args.resume is not None and not args.resume.strip():
        raise UserError("--resume needs a run directory (or auto); it was given an empty one")
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
    if not run.holds_run():
        raise rd.RunDirError(f"{run.path} is not a run directory (no {rd.CONFIG})")
    if not os.path.lexists(run / rd.LAST):
        raise rd.RunDirError(f"{run.path} has no checkpoint ({rd.LAST}) to resume from")


def run_config(args: argparse.Namespace, resuming: Path | None) -> DictConfig:
    """The configuration: the defaults, ``-c`` files and overrides; for a resumed run, the one
    saved in its ``last.pt`` and the overrides.

    A resumed run's ``config.yaml`` is not read for its settings: it is written again at the
    start of each attempt, so it may hold overrides of an attempt that failed before its first
    checkpoint, a hand edit, or be damaged. Where it differs from what the run continues with,
    a warning names the settings (to keep one, pass it as an override)."""
    if resuming is None:
        return load_config(args.config, args.overrides)
    saved = OmegaConf.to_container(
        OmegaConf.create(rd.load_checkpoint(resuming / rd.LAST)["config"])
    )
    config = load_config([], args.overrides, base=saved)
    _warn_about_config_file(resuming / rd.CONFIG, load_config([], [], base=saved), config)
    return config


def _warn_about_config_file(path: Path, saved: DictConfig, config: DictConfig) -> None:
    """Warn when the run's ``config.yaml`` sets what neither the checkpoint's configuration
    ``saved`` nor the resumed run's ``config`` (with the overrides) has (see :func:`run_config`);
    settings it lacks (a truncated file) are not differences."""
    if not os.path.lexists(path):
        return
    try:
        text = runfiles.read_bytes(path, ConfigError).decode("utf-8")
        written = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except Exception:  # damaged: unreadable bytes, broken YAML, a FIFO, a link
        written = None
    if not isinstance(written, dict):
        warnings.warn(
            f"{path} is damaged or not a configuration; resuming with the configuration saved in "
            f"{rd.LAST} (the file is written again)",
            stacklevel=2,
        )
        return
    kept = (to_container(saved), to_container(config))
    changes = [
        f"{key}={_value(value)}"
        for key, value in _leaves(written)
        if all(_lookup(tree, key) != value for tree in kept)
    ]
    if changes:
        warnings.warn(
            f"{path} differs from the configuration saved in {rd.LAST}, which a resumed run "
            f"keeps (with the overrides given); not applied: {' '.join(changes)} (pass them as "
            "KEY=VALUE overrides to apply them; the file is written again)",
            stacklevel=2,
        )


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``("section.key", value)`` for every value of a nested mapping."""
    out: list[tuple[str, object]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.extend(_leaves(value, f"{name}.") if isinstance(value, dict) else [(name, value)])
    return out


def _lookup(tree: dict, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


_MISSING = object()


def _value(value: object) -> str:
    """``value`` as a KEY=VALUE override writes it."""
    return "null" if value is None else json.dumps(value) if isinstance(value, list) else str(value)


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
    if args.run_dir:
        run, created = rd.RunDir(args.run_dir), list[Path]()
    else:
        path, created = rd.default_run_dir(config.task.name)
        run = rd.RunDir(path)
    run.check_new_run(replace)
    return RunPlan(config, run.path, False, replace, tuple(created))


def plan_on_main(dist: DistContext, decide: Callable[[], RunPlan]) -> RunPlan:
    """``decide()`` on rank 0, its plan on every rank (the configuration travels as a dict)."""

    def decide_portably() -> tuple[dict, Path, bool, Replace, tuple[Path, ...]]:
        plan = decide()
        return to_container(plan.config), plan.run_dir, plan.resume, plan.replace, plan.created

    container, run_dir, resume, replace, created = dist.from_main(decide_portably)
    created = created if dist.is_main else ()
    return RunPlan(load_config([], [], base=container), run_dir, resume, replace, created)


def run_torchrun(nproc: int, argv: list[str]) -> int:
    """``python -m torch.distributed.run --standalone --nproc-per-node NPROC -m nestrnn ARGV``
    (see the module docstring); its exit status, or 128 + n when signal n stopped the launch."""
    command = [
        sys.executable,
        "-m",
        "nestrnn.engine.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "nestrnn",
        *argv,
    ]
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
