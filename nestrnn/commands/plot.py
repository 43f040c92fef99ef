"""``nestrnn plot RUN_DIR...``: training curves from metrics.jsonl, several runs overlaid."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, cast

from nestrnn.errors import UserError

HELP = "plot training curves (metrics.jsonl) of one or more runs, overlaid, to a PNG"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  nestrnn plot runs/ptb_char-A runs/ptb_char-B --out compare.png\n"
        "  nestrnn plot RUN --metric bpc,loss --smooth 0.9\n"
        "training records are thin lines, validation (after each epoch) thick lines with dots,\n"
        "the test result a star; one colour per run"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--metric", help="comma-separated metrics, one panel each (default: the primary metric)"
    )
    parser.add_argument(
        "--labels", help="comma-separated legend names, one per run (default: folder and family)"
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="PNG to write (default: RUN_DIR/figures/curves.png for one run, curves.png for more)",
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="exponential smoothing of the training curve, in [0, 1) (default 0: none)",
    )
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    parser.add_argument("--title", default="", help="figure title")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl (a run still writing may have a partial last line: left out)."""
    from nestrnn.engine.rundir import METRICS
    from nestrnn.engine.rundir import read_records as read_metrics

    path = run_dir / METRICS
    if not os.path.lexists(path):  # a link or a folder there is read_metrics' error
        raise UserError(f"{run_dir} has no {METRICS} (is it a run directory?)")
    return read_metrics(path)


def _config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml for labels and the primary metric ({} when missing or damaged;
    never read through a link, nor from a FIFO)."""
    from omegaconf import OmegaConf

    from nestrnn.engine import runfiles
    from nestrnn.engine.rundir import CONFIG

    path = run_dir / CONFIG
    if not os.path.lexists(path):
        return {}
    text = runfiles.read_bytes(path, UserError)
    try:
        loaded = OmegaConf.to_container(OmegaConf.create(text.decode("utf-8")))
    except Exception:
        return {}
    return cast(dict[str, Any], loaded) if isinstance(loaded, dict) else {}


def primary_metric(run_dir: Path, config: dict[str, Any]) -> str:
    """The run's primary metric: from summary.json, else its task class, else ``loss``."""
    from nestrnn.engine.rundir import SUMMARY, read_summary

    summary = read_summary(run_dir / SUMMARY)
    if summary is not None and isinstance(summary.get("primary_metric"), str):
        return summary["primary_metric"]
    name = (config.get("task") or {}).get("name")
    if name:
        try:
            from nestrnn.config import task_class

            return str(task_class(name).primary_metric)
        except Exception:
            pass
    return "loss"


def default_label(run_dir: Path, config: dict[str, Any]) -> str:
    model = config.get("model") or {}
    family = model.get("family")
    if not family:
        return run_dir.name
    if family == "nlstm":
        what = f"nlstm d{model.get('depth')}"
    elif family == "stacked_lstm":
        what = f"stacked {int(model.get('num_layers', 1)) * int(model.get('depth', 1))}L"
    else:
        what = f"lstm {model.get('num_layers', 1)}L"
    return f"{run_dir.name} ({what})"


def run(args: argparse.Namespace) -> int:
    from nestrnn import figures

    if not 0.0 <= args.smooth < 1.0:
        raise UserError("--smooth must be in [0, 1)")
    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"no run directory {d}")
    configs = [_config(d) for d in dirs]
    runs = [read_records(d) for d in dirs]
    if args.labels:
        labels = [label.strip() for label in args.labels.split(",")]
        if len(labels) != len(dirs):
            raise UserError(f"--labels gives {len(labels)} names for {len(dirs)} runs")
    else:
        labels = [default_label(d, c) for d, c in zip(dirs, configs)]
    if args.metric:
        metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    else:
        metrics = list(dict.fromkeys(primary_metric(d, c) for d, c in zip(dirs, configs)))
    if not metrics:
        raise UserError("--metric names no metric")
    found = {
        key
        for records in runs
        for record in records
        for key in (*record.keys(), *(record.get("valid") or {}).keys())
    }
    missing = [m for m in metrics if m not in found]
    if missing:
        known = sorted(
            found
            - {
                "event",
                "epoch",
                "step",
                "lr",
                "grad_norm",
                "train",
                "valid",
                "best",
                "source",
                "what",
                "value",
            }
        )
        raise UserError(
            f"no run has the metric(s) {', '.join(missing)}; they have: "
            f"{', '.join(known) or 'no metrics yet'}"
        )
    if args.out:
        out = Path(args.out)
    elif len(dirs) == 1:
        out = dirs[0] / "figures" / "curves.png"
    else:
        out = Path("curves.png")
    from nestrnn.engine.rundir import writing

    fig = figures.curves_figure(
        list(zip(labels, runs)), metrics, args.smooth, args.log_y, args.title
    )
    with writing(out):
        print(f"wrote {figures.save(fig, out)}")
    return 0
