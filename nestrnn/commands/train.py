"""``nestrnn train``: train a model on a task.

With no arguments it trains a small Nested LSTM on the synthetic adding problem (no download;
about a minute on a laptop CPU). ``-c configs/<experiment>.yaml`` loads an experiment;
``key=value`` arguments override any config value; ``--resume RUN_DIR`` continues a run exactly.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nestrnn.cli import CommandError
from nestrnn.config import (
    ConfigError,
    format_config,
    load_config,
    load_yaml,
    section,
    task_class,
)  # fmt: skip
from nestrnn.data_utils import DataError
from nestrnn.engine.distributed import (
    BACKENDS,
    DistContext,
    launched_by_torchrun,
    max_restarts,
    restart_count,
)  # fmt: skip
from nestrnn.engine.rundir import CheckpointError

HELP = "train a model on a task (no arguments: the synthetic adding problem, ~1 minute on a CPU)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  nestrnn train                                   the default run (adding problem)\n"
        "  nestrnn train -c configs/ptb_char.yaml model.family=stacked_lstm\n"
        "  nestrnn train task.name=text_file task.path=input.txt train.epochs=5\n"
        "  nestrnn train --resume runs/adding-20250101-120000\n"
        "  nestrnn train --nproc 2 --run-dir runs/ddp     data parallel, 2 processes (torchrun)\n"
        "see docs/training.md (tasks, configs, data, checkpoints) and docs/distributed.md"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="config overrides, e.g. train.epochs=3 model.family=lstm optim.lr=1e-3",
    )  # fmt: skip
    parser.add_argument(
        "-c", "--config", action="append", default=[], metavar="FILE",
        help="YAML config file (repeatable, later files win); a bare name means configs/NAME.yaml",
    )  # fmt: skip
    parser.add_argument(
        "--run-dir", metavar="DIR", help="where the run's files go (default: runs/<task>-<time>)"
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (KEY=VALUE overrides still apply); "
        "'auto': continue --run-dir when it has a checkpoint, else start it",
    )  # fmt: skip
    parser.add_argument(
        "--nproc", type=int, metavar="N",
        help="train with N processes on this machine (runs torchrun --standalone)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="torch.distributed backend under torchrun (auto: nccl on GPUs, gloo on CPUs)",
    )  # fmt: skip
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )
    parser.add_argument(
        "--print-params", action="store_true",
        help="print the size of every model family (nlstm, lstm, stacked_lstm) and exit",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _auto_resume(args: argparse.Namespace) -> bool:
    """``--resume auto``, or a worker that torchrun restarted: continue --run-dir if it can."""
    return args.resume == "auto" or (restart_count() > 0 and not args.resume)


def _load(args: argparse.Namespace):
    if _auto_resume(args):
        if not args.run_dir:
            raise CommandError("--resume auto (and torchrun --max-restarts) needs --run-dir DIR")
        run_dir = Path(args.run_dir)
        if (run_dir / "last.pt").is_file() and (run_dir / "config.yaml").is_file():
            args.resume, args.config = str(run_dir), []
        else:
            args.resume = None
            config = load_config(args.config, args.overrides)
            if restart_count() > 0 and (run_dir / "metrics.jsonl").is_file():
                (run_dir / "metrics.jsonl").unlink()  # of a failed attempt that saved nothing
            return config, None
    if args.resume:
        if args.config:
            raise CommandError("--resume takes the configuration from the run directory; "
                               "give KEY=VALUE overrides only")  # fmt: skip
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise CommandError(f"{run_dir} is not a run directory (no config.yaml)")
        if not (run_dir / "last.pt").is_file():
            raise CommandError(f"{run_dir} has no checkpoint (last.pt) to resume from")
        base = OmegaConf.to_container(load_yaml(saved))
        return load_config([], args.overrides, base=base), run_dir
    return load_config(args.config, args.overrides), None


def print_params(config) -> None:
    from nestrnn.models import family_table, format_family_table

    task = task_class(config.task.name)(OmegaConf.to_object(config.task), seed=config.train.seed)
    task.prepare()
    model_cfg = section(config, "model")
    try:
        rows = family_table(model_cfg, task.build_model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    what = f"target {model_cfg.target_params:,}" if model_cfg.target_params else "same hidden size"
    print(f"task {config.task.name}, {what}:")
    print(format_family_table(rows, model_cfg.family))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: run this command again under torchrun with N local processes."""
    from nestrnn.engine.rundir import default_run_dir

    if args.nproc < 1:
        raise CommandError(f"--nproc must be at least 1, got {args.nproc}")
    if launched_by_torchrun():
        raise CommandError("--nproc starts torchrun itself; under torchrun leave it out")
    if args.print_config or args.print_params:
        return _run(args)  # nothing to train: no processes needed
    try:
        config, resume_dir = _load(args)  # errors show once, here, not in every process
        if config.train.batch_size % args.nproc:
            raise ConfigError(
                f"train.batch_size ({config.train.batch_size}) must be a multiple of the number "
                f"of processes ({args.nproc}): each one trains on an equal share"
            )
    except (ConfigError, DataError, FileNotFoundError, CheckpointError) as error:
        raise CommandError(str(error)) from None
    argv = [*args.overrides, "--backend", args.backend]
    if resume_dir is not None:
        argv += ["--resume", str(resume_dir)]
    else:
        # the parent picks the run directory, so every process (and a restart) agrees on it
        for path in args.config:
            argv += ["-c", path]
        argv += ["--run-dir", str(args.run_dir or default_run_dir(config.task.name))]
    if args.no_progress:
        argv.append("--no-progress")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "nestrnn", "train", *argv]  # fmt: skip
    return subprocess.call(command)


def _decide(args: argparse.Namespace, dist: DistContext) -> tuple[Any, Path | None, Path]:
    """(config, resume dir, run dir): decided by rank 0 and sent to every rank."""
    from nestrnn.engine.rundir import default_run_dir

    result: Any = None
    if dist.is_main:
        try:
            if max_restarts() > 0 and not (args.run_dir or args.resume):
                raise CommandError(
                    "with torchrun --max-restarts give --run-dir DIR: restarted workers continue "
                    "from DIR/last.pt"
                )
            config, resume_dir = _load(args)
            if args.no_progress:
                OmegaConf.update(config, "train.progress", False)
            run_dir = resume_dir or Path(args.run_dir or default_run_dir(config.task.name))
            result = ("ok", OmegaConf.to_container(config), resume_dir, run_dir)
        except (CommandError, ConfigError, DataError, FileNotFoundError, CheckpointError) as error:
            result = ("error", str(error))
    result = dist.broadcast(result)
    if result[0] == "error":
        raise CommandError(result[1])
    _, container, resume_dir, run_dir = result
    return load_config([], [], base=container), resume_dir, run_dir


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        return _launch(args)
    rank = int(os.environ.get("RANK", "0") or 0) if launched_by_torchrun() else 0
    try:
        return _run(args)
    except CommandError:
        if rank:  # every rank fails alike; only rank 0 prints the error
            return 2
        raise
    finally:
        if torch_distributed_initialized():
            import torch.distributed

            torch.distributed.destroy_process_group()


def torch_distributed_initialized() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _run(args: argparse.Namespace) -> int:
    from nestrnn.engine.trainer import Trainer, TrainingDiverged, _fmt

    warnings.showwarning = _show_warning
    dist = DistContext.single()
    try:
        if args.print_config or args.print_params or not launched_by_torchrun():
            config, resume_dir = _load(args)
            if args.no_progress:
                OmegaConf.update(config, "train.progress", False)
            first = not launched_by_torchrun() or os.environ["RANK"] == "0"
            if args.print_config:
                if first:
                    print(format_config(config), end="")
                return 0
            if args.print_params:
                if first:
                    print_params(config)
                return 0
            from nestrnn.engine.rundir import default_run_dir

            run_dir = resume_dir or Path(args.run_dir or default_run_dir(config.task.name))
        else:
            try:
                dist = DistContext.from_env(args.backend)
            except ValueError as error:
                raise CommandError(str(error)) from None
            config, resume_dir, run_dir = _decide(args, dist)
        echo = print if dist.is_main else None
        trainer = Trainer(config, run_dir, resume=resume_dir is not None, dist=dist, echo=echo)
        if dist.is_main:
            print(trainer.describe(), flush=True)
        try:
            summary = trainer.fit()
        except KeyboardInterrupt:
            if trainer.last_checkpoint_step is not None and dist.is_main:
                print(f"interrupted; continue from step {trainer.last_checkpoint_step} with: "
                      f"nestrnn train --resume {run_dir}", file=sys.stderr)  # fmt: skip
            raise
    except (ConfigError, DataError, FileNotFoundError, CheckpointError) as error:
        raise CommandError(str(error)) from None
    except TrainingDiverged as error:
        if dist.is_main:
            print(f"nestrnn train: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if "state_dict" in str(error) and args.resume:
            first = str(error).splitlines()[0]
            raise CommandError(f"the checkpoint does not fit the configuration: {first}") from None
        raise

    if not dist.is_main:
        return 0
    metric = summary.primary_metric
    print(f"finished ({summary.reason.replace('_', ' ')}) in {_duration(summary.elapsed)}: "
          f"{summary.epochs} epochs, {summary.steps} steps")  # fmt: skip
    if summary.best:
        print(f"best valid {_fmt(summary.best, [metric])} at epoch {summary.best_epoch} "
              f"({_fmt(summary.best)})")  # fmt: skip
    if summary.test:
        print(
            f"test ({'best checkpoint' if summary.best else 'final model'}): {_fmt(summary.test)}"
        )
    print(f"run directory: {summary.run_dir}")
    print(f"  nestrnn eval {summary.run_dir} --split test")
    if summary.reason == "max_steps":
        print(f"  nestrnn train --resume {summary.run_dir} train.max_steps=0   # to continue")
    return 0
