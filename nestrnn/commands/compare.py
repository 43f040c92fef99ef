"""``nestrnn compare RUNS_OR_SWEEPS...``: configurations compared over seeds, with confidence
intervals and a test against a baseline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nestrnn.errors import UserError

if TYPE_CHECKING:
    from nestrnn.compare.runs import Configuration

HELP = "compare runs (or sweeps) by configuration: mean, sd, 95% CI and a t-test over seeds"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  nestrnn compare runs/sweep-A                 # every run under it\n"
        "  nestrnn compare runs/nlstm-* runs/lstm-* --baseline model.family=lstm\n"
        "  nestrnn compare SWEEP --metric error --split valid --markdown --plot curves.png\n"
        "runs whose config.yaml files are equal but for train.seed (and the keys that do not\n"
        "change the result: train.device, train.threads, train.progress, train.log_every,\n"
        "train.checkpoint_every, log.*) are the seeds of one configuration"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RUNS_OR_SWEEPS",
        help="run directories, or folders searched for them",
    )
    parser.add_argument(
        "--baseline",
        metavar="LABEL_OR_PATH",
        help="the configuration the others are tested against: a label fragment such as "
        "model.family=stacked_lstm, or a run's path (default: the first configuration)",
    )
    parser.add_argument("--metric", help="the metric (default: the task's selection metric)")
    parser.add_argument(
        "--split",
        choices=("valid", "test"),
        help="test (default when the runs have it) or valid (the best epoch)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    output.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--plot", metavar="FILE", help="also write the validation curves (png, svg or pdf)"
    )


def _skip(path: Path, reason: str) -> None:
    print(f"nestrnn compare: skipped {path}: {reason}", file=sys.stderr)


def _baseline(configurations: list[Configuration], wanted: str | None) -> int:
    """The index of the baseline configuration: the first, the one holding a run at the path
    ``wanted``, or the one whose label contains every word of ``wanted``."""
    if wanted is None:
        return 0
    path = Path(wanted)
    if path.exists():
        target = path.resolve()
        for index, c in enumerate(configurations):
            if any(
                run.path.resolve() == target or target in run.path.resolve().parents
                for run in c.runs
            ):
                return index
        raise UserError(f"--baseline {wanted}: no compared run is at or under that path")
    words = wanted.split()
    exact = [i for i, c in enumerate(configurations) if c.label == wanted]
    matches = exact or [
        i for i, c in enumerate(configurations) if all(word in c.label for word in words)
    ]
    if len(matches) == 1:
        return matches[0]
    labels = "; ".join(c.label for c in configurations)
    if not matches:
        raise UserError(f"--baseline {wanted!r} matches no configuration; they are: {labels}")
    raise UserError(
        f"--baseline {wanted!r} matches {len(matches)} configurations; name one of: "
        + "; ".join(configurations[i].label for i in matches)
    )


def run(args: argparse.Namespace) -> int:
    from nestrnn.compare import runs as found
    from nestrnn.compare import stats, table

    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        from nestrnn.compare.figure import FORMATS

        if plot.suffix[1:].lower() not in FORMATS:
            raise UserError(f"--plot {plot}: give a .png, .svg or .pdf file")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    stats.scipy_stats()  # missing scipy: an error before any work
    runs = found.find_runs(args.paths)
    if not runs:
        raise UserError(f"no run directories (with {found.CONFIG}) under {' '.join(args.paths)}")
    for r in runs:
        if r.skipped:
            _skip(r.path, r.skipped)
    finished = [r for r in runs if r.summary is not None]
    if not finished:
        raise UserError(f"none of the {len(runs)} run(s) found has finished")
    metric = args.metric or str(finished[0].summary.get("primary_metric") or "loss")  # type: ignore[union-attr]
    split = args.split or next(
        (
            s
            for s in table.SPLITS
            if any(table.value_of(r, s, metric) is not None for r in finished)
        ),
        "valid",
    )
    kept = []
    for r in finished:
        if table.value_of(r, split, metric) is None:
            hint = (
                "; compare the best validation values with --split valid" if split == "test" else ""
            )
            _skip(r.path, f"no {split} {metric} in its summary.json{hint}")
        else:
            kept.append(r)
    if not kept:
        known = sorted({m for r in finished for m in (r.summary.get(split) or {})})  # type: ignore[union-attr]
        where = f" on the {split} split" if args.split else ""
        raise UserError(
            f"unknown metric {metric!r}{where}; the runs have: {', '.join(known) or 'none'}"
        )
    configurations = found.group(kept)
    baseline = _baseline(configurations, args.baseline)
    rows = table.rows(configurations, metric, split, baseline)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.markdown:
        print(table.markdown(rows), end="")
    else:
        print(table.text(rows), end="")
    if plot is not None:
        from nestrnn.compare import figure
        from nestrnn.engine.rundir import METRICS, read_records, writing

        curves = [
            (c.label, [read_records(r.path / METRICS) for r in c.runs]) for c in configurations
        ]
        with writing(plot):
            figure.save(figure.curves_figure(curves, metric), plot)
        print(f"wrote {plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
