"""``nestrnn train``: train a model on a task.

With no arguments it trains a small Nested LSTM on the synthetic adding problem (no download;
about a minute on a laptop CPU). ``-c NAME`` loads a bundled experiment config (``-c FILE`` any
YAML file); ``key=value`` arguments override any config value; ``--resume RUN_DIR`` continues a
run exactly. What the run is (new, resumed, where) is decided in :mod:`nestrnn.engine.launch`.
"""

from __future__ import annotations

import argparse
import signal
import sys

from omegaconf import OmegaConf

from nestrnn.config import ConfigError, bundled_config_names, format_config, section
from nestrnn.engine.distributed import (
    BACKENDS,
    DistContext,
    is_main_process,
    launched_by_torchrun,
    restart_count,
)
from nestrnn.engine.launch import (
    RunPlan,
    plan_on_main,
    plan_run,
    resume_dir,
    run_config,
    run_torchrun,
)
from nestrnn.engine.rundir import remove_empty
from nestrnn.errors import UserError, one_line

HELP = "train a model on a task (no arguments: the synthetic adding problem, ~1.5 minutes on 2 CPU cores)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  nestrnn train                                   the default run (adding problem)\n"
        "  nestrnn train -c ptb_char model.family=stacked_lstm   a bundled experiment config\n"
        "  nestrnn train task.name=text_file task.path=input.txt train.epochs=5\n"
        "  nestrnn train --resume runs/adding-20250101-120000\n"
        "  nestrnn train --resume auto --run-dir runs/job   continue runs/job, or start it\n"
        "  nestrnn train --nproc 2 --run-dir runs/ddp     data parallel, 2 processes (torchrun)\n"
        "KEY=VALUE overrides and options may come in any order.\n"
        "A run directory holds one run: a new run refuses a directory that holds one (see\n"
        "--overwrite), and a second process on a run that is being written is refused.\n"
        "SIGTERM, Ctrl-C or SIGHUP saves last.pt at the current step and exits with 143, 130\n"
        "or 129; continue with --resume. Exit status: 0 done, 1 training diverged, 2 a user\n"
        "error.\n"
        "see docs/training.md (tasks, configs, data, checkpoints) and docs/distributed.md"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.epochs=3 model.family=lstm optim.lr=1e-3",
    )
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML config file (repeatable, later files win); a bare NAME is a config shipped "
        f"with nestrnn: {', '.join(bundled_config_names())}",
    )
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        help="where the run's files go (default: runs/<task>-<time>); must not hold a run",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (KEY=VALUE overrides still apply); "
        "'auto': continue --run-dir when it has a checkpoint, else start it there",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let a new run replace the run already in --run-dir (its checkpoints, metrics and "
        "summary are deleted)",
    )
    parser.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume even though the task's data differs from the data the run was trained on",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N processes on this machine (runs torchrun --standalone)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="torch.distributed backend under torchrun (auto: nccl on GPUs, gloo on CPUs)",
    )
    show = parser.add_mutually_exclusive_group()
    show.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )
    show.add_argument(
        "--print-params",
        action="store_true",
        help="print the size of every model family (nlstm, lstm, stacked_lstm) and exit",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is one only when stderr is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    # each line as soon as it is printed, also into a file or a pipe (nohup, tee, a scheduler's
    # log), where Python would otherwise hold stdout's lines until the process ends
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if args.print_config or args.print_params:
        return _show(args)
    if args.nproc is not None:
        return _launch(args)
    with DistContext.from_env(args.backend) as dist:
        restarted = restart_count() > 0
        plan = plan_on_main(dist, lambda: plan_run(args, restarted))
        try:
            return _train(args, plan, dist)
        except BaseException:
            remove_empty(list(plan.created))  # a mistake found later leaves no empty folder
            raise


def _show(args: argparse.Namespace) -> int:
    """--print-config / --print-params: the configuration the run would have; nothing is written."""
    config = run_config(args, resume_dir(args, restart_count() > 0))
    if not is_main_process():
        return 0
    if args.print_config:
        print(format_config(config), end="")
    else:
        print_params(config)
    return 0


def print_params(config) -> None:
    from nestrnn.engine.build import build_task, model_settings
    from nestrnn.models import family_table, format_family_table

    task = build_task(config, prepare=False)
    try:
        task.prepare_sizes()  # no download: a vocabulary's size comes from the task
    except ValueError as error:  # options that do not fit the data (DataError passes)
        raise ConfigError(one_line(error)) from None
    model_cfg = section(config, "model")
    with model_settings():
        rows = family_table(model_cfg, task.build_model)
    what = f"target {model_cfg.target_params:,}" if model_cfg.target_params else "same hidden size"
    print(f"task {config.task.name}, {what}:")
    print(format_family_table(rows, model_cfg.family))


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: check the run here, then run this command again under torchrun."""
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if launched_by_torchrun():
        raise UserError("--nproc starts torchrun itself; under torchrun leave it out")
    plan = plan_run(args, restarted=False)  # mistakes show once, here, not in every process
    try:
        status = _run_workers(args, plan)
    except BaseException:
        remove_empty(list(plan.created))
        raise
    if status:  # the workers failed: a run that wrote nothing leaves no empty folder
        remove_empty(list(plan.created))
    return status


def _run_workers(args: argparse.Namespace, plan: RunPlan) -> int:
    from nestrnn.engine.trainer import resolve_device

    resolve_device(plan.config.train.device)  # a device that is not here: one line, not N
    if plan.config.train.batch_size % args.nproc:
        raise ConfigError(
            f"train.batch_size ({plan.config.train.batch_size}) must be a multiple of the number "
            f"of processes ({args.nproc}): each one trains on an equal share"
        )
    argv = ["train", *args.overrides, "--backend", args.backend]
    if plan.resume:
        argv += ["--resume", str(plan.run_dir)]
    else:  # the launcher picks the run directory, so every process (and a restart) agrees on it
        for path in args.config:
            argv += ["-c", path]
        argv += ["--run-dir", str(plan.run_dir)]
        argv += {"any": ["--overwrite"], "incomplete": ["--resume", "auto"], "nothing": []}[
            plan.replace
        ]
    argv += [
        flag
        for flag, on in (
            ("--no-progress", args.no_progress),
            ("--allow-data-change", args.allow_data_change),
        )
        if on
    ]
    return run_torchrun(args.nproc, argv)


def _train(args: argparse.Namespace, plan: RunPlan, dist: DistContext) -> int:
    from nestrnn.engine.stopping import StopSignals, exit_status
    from nestrnn.engine.trainer import Trainer, TrainingDiverged, format_metrics

    config = plan.config
    if args.no_progress:
        OmegaConf.update(config, "train.progress", False)
    trainer = Trainer(
        config,
        plan.run_dir,
        resume=plan.resume,
        replace=plan.replace,
        allow_data_change=args.allow_data_change,
        dist=dist,
        echo=print if dist.is_main else None,
    )
    if dist.is_main:
        print(trainer.describe(), flush=True)
    try:
        with StopSignals() as stop:
            summary = trainer.fit(stop=stop)
    except TrainingDiverged as error:
        if dist.is_main:
            print(f"nestrnn train: {error}", file=sys.stderr)
        return 1
    run_dir = summary.run_dir
    if summary.reason == "test_interrupted":
        if dist.is_main:
            name = signal.Signals(summary.signal).name
            print(
                f"nestrnn train: stopped by {name} during the final test; the training is "
                f"complete ({run_dir / 'best.pt'}). Get the test result with: nestrnn eval "
                f"{run_dir} --split test",
                file=sys.stderr,
            )
        return exit_status(summary.signal)
    if summary.reason == "interrupted":
        if dist.is_main:
            name = signal.Signals(summary.signal).name
            print(
                f"nestrnn train: stopped by {name} after step {summary.steps}; "
                f"{run_dir / 'last.pt'} holds it. Continue with: nestrnn train --resume "
                f"{run_dir}",
                file=sys.stderr,
            )
        return exit_status(summary.signal)
    if not dist.is_main:
        return 0
    if summary.reason == "already_finished":
        print(
            f"nothing to do: {run_dir} is finished ({summary.epochs} epochs, {summary.steps} "
            "steps); to train further raise train.epochs (or train.max_steps, "
            "train.early_stopping) in the overrides"
        )
        return 0
    metric = summary.primary_metric
    print(
        f"finished ({summary.reason.replace('_', ' ')}) in {_duration(summary.elapsed)}: "
        f"{summary.epochs} epochs, {summary.steps} steps"
    )
    if summary.best:
        print(
            f"best valid {format_metrics(summary.best, [metric])} at epoch "
            f"{summary.best_epoch} ({format_metrics(summary.best)})"
        )
    if summary.test:
        source = "best checkpoint" if summary.best else "final model"
        print(f"test ({source}): {format_metrics(summary.test)}")
    print(f"run directory: {run_dir}")
    print(f"  nestrnn eval {run_dir} --split test")
    if summary.reason == "max_steps":
        print(f"  nestrnn train --resume {run_dir} train.max_steps=0   # to continue")
    return 0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"
