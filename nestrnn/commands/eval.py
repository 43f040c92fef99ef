"""``nestrnn eval RUN_DIR``: evaluate a run's checkpoint on a split."""

from __future__ import annotations

import argparse
import json

from nestrnn.errors import UserError
from nestrnn.output import stdout_to_stderr

HELP = "evaluate a trained run on a split (valid or test)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. task.data_dir=/data/ptb (the data moved); the model is the "
        "checkpoint's and cannot be changed",
    )
    parser.add_argument("--split", default="test", choices=("valid", "test"), help="default: test")
    parser.add_argument(
        "--checkpoint",
        default="best",
        metavar="WHICH",
        help="best (default), last, or a path to a checkpoint file",
    )
    parser.add_argument("--device", help="auto, cpu, cuda (default: the run's train.device)")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=0,
        metavar="N",
        help="evaluate on at most N batches (default 0: the whole split)",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from nestrnn.engine.loading import load_run
    from nestrnn.engine.trainer import evaluate, format_metrics

    if args.max_batches < 0:
        raise UserError(f"--max-batches must be >= 0 (0: the whole split), got {args.max_batches}")
    with stdout_to_stderr():  # a plugin task or memory function may print: not into the result
        loaded = load_run(args.run_dir, args.checkpoint, args.overrides, args.device)
        train = loaded.config.train
        metrics = evaluate(
            loaded.model,
            loaded.task,
            args.split,
            train.eval_batch_size or train.batch_size,
            train.bptt,
            loaded.device,
            args.max_batches,
        )
    if args.json:
        record = {
            "run_dir": str(args.run_dir),
            "checkpoint": str(loaded.path),
            "split": args.split,
            "metrics": metrics,
        }
        print(json.dumps(record, indent=2))
    else:
        step = loaded.checkpoint["position"]["global_step"]
        print(
            f"{loaded.config.task.name} {args.split} ({loaded.path.name}, step {step}): "
            f"{format_metrics(metrics)}"
        )
    return 0
