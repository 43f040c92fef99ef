"""``nestrnn sweep SPEC.yaml``: a hyper-parameter search on Optuna; each (trial, seed) is an
ordinary run directory trained by ``nestrnn train`` (see :mod:`nestrnn.sweep`)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from nestrnn.errors import UserError

HELP = "search hyper-parameters (Optuna): each trial trains one run per seed"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  nestrnn sweep configs/sweeps/adding_lr.yaml --workers 2\n"
        "  nestrnn sweep spec.yaml --dir sweeps/lr train.epochs=5    fixed overrides for every trial\n"
        "  nestrnn sweep spec.yaml --storage postgresql://host/db    run it on several machines\n"
        "The spec (YAML): base, overrides, space {KEY: {float|int: [lo, hi], log, step} or\n"
        "{choice: [...]}, memory: {memories: [...]} or all}, sampler (tpe|random|grid), trials,\n"
        "seeds, metric, direction, pruner (none|median|percentile|threshold or {name: ..., OPTION:\n"
        "VALUE}), heartbeat_s. Each trial trains once per seed in SWEEP/trials/NNNN-seedS/; its\n"
        "value is the mean of the seeds' best validation metric. Pruning follows the first\n"
        "seed's validation records. A diverged trial is failed with its reason and counts as\n"
        "tried. Running the command again continues the study up to `trials`; a trial whose\n"
        "worker died is retried in the same run directories, resumed from last.pt.\n"
        "Needs optuna: pip install 'nestrnn[sweep]'. See docs/training.md, Sweeps."
    )
    parser.add_argument("spec", metavar="SPEC.yaml", help="the sweep spec")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides fixed for every trial (they win over the spec's overrides)",
    )
    parser.add_argument(
        "--dir",
        metavar="SWEEP_DIR",
        help="the sweep directory (default: sweeps/<spec name>); run again to continue it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this machine sharing the study (default 1)",
    )
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="K",
        help="torch threads of each run (train.threads; default: CPU cores / workers)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="an Optuna RDB URL shared by workers on several machines (default: "
        "sqlite:///SWEEP_DIR/study.db)",
    )
    parser.add_argument(
        "--study", metavar="NAME", help="the study's name (default: the sweep directory's name)"
    )
    parser.add_argument("--trials", type=int, metavar="N", help="override the spec's trials")
    parser.add_argument(
        "--status",
        action="store_true",
        help="print the table of trials and the best one (and write best.yaml); train nothing",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("nestrnn sweep needs optuna: pip install 'nestrnn[sweep]'") from None
    from nestrnn.sweep import report, worker
    from nestrnn.sweep.spec import load_spec

    if "=" in args.spec and not Path(args.spec).exists():  # KEY=VALUE before the spec
        positional = [args.spec, *args.overrides]
        specs = [a for a in positional if "=" not in a or Path(a).exists()]
        if len(specs) != 1:
            raise UserError(f"give one SPEC.yaml (and KEY=VALUE overrides), got {positional}")
        args.spec, args.overrides = specs[0], [a for a in positional if a != specs[0]]
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise UserError(f"--threads-per-worker must be at least 1, got {args.threads_per_worker}")
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    spec = load_spec(args.spec, args.overrides, args.trials)
    sweep_dir = Path(args.dir or Path("sweeps") / Path(args.spec).stem)
    url = args.storage or f"sqlite:///{sweep_dir / 'study.db'}"
    name = args.study or sweep_dir.resolve().name
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // args.workers)
    if args.status:
        if args.storage is None and not (sweep_dir / "study.db").is_file():
            raise UserError(f"{sweep_dir} holds no sweep (no study.db)")
        report.finish(spec, worker.make_study(spec, url, name), sweep_dir)
        return 0
    if not args.worker:
        _prepare(sweep_dir, spec.resolved())
    study = worker.make_study(spec, url, name)
    if args.worker or args.workers == 1:
        worker.work(spec, study, sweep_dir, threads)
    else:  # this process is one of the workers
        _spawn(args, sweep_dir, threads, lambda: worker.work(spec, study, sweep_dir, threads))
    if not args.worker:
        report.finish(spec, study, sweep_dir)
    return 0


def _prepare(sweep_dir: Path, resolved: dict) -> None:
    """The sweep directory and its ``sweep.yaml``; another sweep's directory is refused."""
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a directory")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved = sweep_dir / "sweep.yaml"
    text = yaml.safe_dump(resolved, sort_keys=False)
    if saved.exists():
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        changed = sorted(
            k for k in set(old) | set(resolved) if k != "trials" and old.get(k) != resolved.get(k)
        )
        if changed:
            raise UserError(
                f"{sweep_dir} holds another sweep ({', '.join(changed)} differ from "
                f"{saved}); give another --dir"
            )
    saved.write_text(text, encoding="utf-8")


def _spawn(
    args: argparse.Namespace, sweep_dir: Path, threads: int, work: Callable[[], None]
) -> None:
    """``--workers N``: this process works beside N - 1 worker processes of this command (each
    stops with this one)."""
    from nestrnn.engine.parent_death import libc_prctl, terminate_with_parent

    argv = [
        sys.executable,
        "-m",
        "nestrnn",
        "sweep",
        args.spec,
        *args.overrides,
        "--worker",
        "--dir",
        str(sweep_dir),
        "--threads-per-worker",
        str(threads),
    ]
    for flag, value in (
        ("--storage", args.storage),
        ("--study", args.study),
        ("--trials", args.trials),
    ):
        if value is not None:
            argv += [flag, str(value)]
    parent, prctl = os.getpid(), libc_prctl()
    workers = [
        subprocess.Popen(argv, preexec_fn=lambda: terminate_with_parent(prctl, parent))
        for _ in range(args.workers - 1)
    ]
    try:
        work()
        codes = [w.wait() for w in workers]
    except BaseException as error:  # Ctrl-C reaches them too; otherwise they stop here
        for w in workers:
            if not isinstance(error, KeyboardInterrupt):
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait()
        raise
    if any(codes):
        raise UserError(f"a sweep worker failed (exit statuses {codes}); see its error above")
