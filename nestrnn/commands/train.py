"""``nestrnn train``: train a model on a task.

With no arguments it trains a small Nested LSTM on the synthetic adding problem (no download;
about a minute on a laptop CPU). ``-c configs/<experiment>.yaml`` loads an experiment;
``key=value`` arguments override any config value; ``--resume RUN_DIR`` continues a run exactly.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from omegaconf import OmegaConf

from nestrnn.cli import CommandError
from nestrnn.config import ConfigError, format_config, load_config, section, task_class
from nestrnn.data_utils import DataError

HELP = "train a model on a task (no arguments: the synthetic adding problem, ~1 minute on a CPU)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  nestrnn train                                   the default run (adding problem)\n"
        "  nestrnn train -c configs/ptb_char.yaml model.family=stacked_lstm\n"
        "  nestrnn train task.name=text_file task.path=input.txt train.epochs=5\n"
        "  nestrnn train --resume runs/adding-20250101-120000\n"
        "see docs/training.md for tasks, configs, data locations and checkpoints"
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
        help="continue RUN_DIR from its last checkpoint (KEY=VALUE overrides still apply)",
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


def _load(args: argparse.Namespace):
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
        base = OmegaConf.to_container(OmegaConf.load(saved))
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


def run(args: argparse.Namespace) -> int:
    from nestrnn.engine.rundir import default_run_dir
    from nestrnn.engine.trainer import Trainer, TrainingDiverged, _fmt

    warnings.showwarning = _show_warning
    try:
        config, resume_dir = _load(args)
        if args.no_progress:
            OmegaConf.update(config, "train.progress", False)
        if args.print_config:
            print(format_config(config), end="")
            return 0
        if args.print_params:
            print_params(config)
            return 0
        run_dir = resume_dir or Path(args.run_dir or default_run_dir(config.task.name))
        trainer = Trainer(config, run_dir, resume=resume_dir is not None)
        print(trainer.describe(), flush=True)
        try:
            summary = trainer.fit()
        except KeyboardInterrupt:
            if trainer.last_checkpoint_step is not None:
                print(f"interrupted; continue from step {trainer.last_checkpoint_step} with: "
                      f"nestrnn train --resume {run_dir}", file=sys.stderr)  # fmt: skip
            raise
    except (ConfigError, DataError, FileNotFoundError) as error:
        raise CommandError(str(error)) from None
    except TrainingDiverged as error:
        print(f"nestrnn train: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if "state_dict" in str(error) and args.resume:
            first = str(error).splitlines()[0]
            raise CommandError(f"the checkpoint does not fit the configuration: {first}") from None
        raise

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
