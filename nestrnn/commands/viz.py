"""``nestrnn viz RUN_DIR``: the temporal hierarchy of a trained run, as figures and numbers.

Reads a sequence (``--text``, or ``--length`` symbols of a split of the task's data), runs the
model one step at a time and records every memory level's cell (a Nested LSTM's outer and inner
memories; a stacked LSTM's lower and upper layers). Writes to ``--out`` (default RUN_DIR/figures):

* ``cells.png``: chosen units' cells over the sequence, one column per level (the paper's figure);
* ``text.png`` (language models): the symbols coloured by tanh(cell) of each chosen unit;
* ``heatmap.png``: many units per level over the sequence;
* ``autocorrelation.png``: each level's mean autocorrelation function;
* ``timescales.json``: each level's timescale statistics (see :mod:`nestrnn.analysis`), measured
  over ``--timescale-length`` steps of held-out data in ``--streams`` parallel streams; the table
  is also printed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from nestrnn.errors import UserError

HELP = "figures and timescales of each memory level of a trained run (outer/inner, lower/upper)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  nestrnn viz runs/text_file-20250101-120000 --text 'To be, or not to be'\n"
        "  nestrnn viz RUN --split valid --length 200 --units 0,5,9\n"
        "  nestrnn viz RUN --timescales-only --timescale-length 4000\n"
        "see docs/visualisation.md for what the figures and the numbers mean"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. task.data_dir=/data/ptb (the data moved)",
    )
    source = parser.add_argument_group("the plotted sequence")
    source.add_argument("--text", help="plot this text (language models); default: a data split")
    source.add_argument(
        "--split",
        default="valid",
        choices=("train", "valid", "test"),
        help="split to take the plotted sequence and the timescale data from (default valid)",
    )
    source.add_argument("--length", type=int, default=200, help="steps to plot (default 200)")
    source.add_argument("--offset", type=int, default=0, help="where in the split to start (0)")
    source.add_argument(
        "--warmup",
        type=int,
        default=100,
        help="symbols of the split read before the plotted/measured window, so the state is "
        "not the zero start (default 100; --text starts from zeros)",
    )
    source.add_argument(
        "--example", type=int, default=0, help="which example of the split (non-LM tasks)"
    )
    units = parser.add_argument_group("units")
    units.add_argument("--units", help="comma-separated units to plot, e.g. 0,5,9")
    units.add_argument(
        "--num-units",
        type=int,
        default=4,
        help="without --units: plot the N most variable units (default 4)",
    )
    units.add_argument(
        "--heat-units", type=int, default=64, help="units per level in the heat map (default 64)"
    )
    scales = parser.add_argument_group("timescales")
    scales.add_argument(
        "--timescales-only", action="store_true", help="no figures: print and save the timescales"
    )
    scales.add_argument(
        "--timescale-length",
        type=int,
        default=2000,
        help="steps per stream over which timescales are measured (default 2000)",
    )
    scales.add_argument(
        "--streams",
        type=int,
        default=4,
        help="parallel streams (LM) or examples x 64 (other tasks) for timescales (default 4)",
    )
    scales.add_argument(
        "--max-lag",
        type=int,
        default=0,
        help="longest autocorrelation lag (default: a quarter of the measured steps)",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/figures)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a path")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stepping a small model one step at a time gains "
        "nothing from more, and nn.LSTM can get far slower with them; 0: torch's default)",
    )


# --------------------------------------------------------------------------- data


def _parse_units(spec: str | None, hidden: int) -> list[int] | None:
    if not spec:
        return None
    try:
        units = [int(u) for u in spec.replace(" ", "").split(",") if u]
    except ValueError:
        raise UserError(f"--units must be comma-separated integers, got {spec!r}") from None
    bad = [u for u in units if not 0 <= u < hidden]
    if bad or not units:
        raise UserError(f"--units: the model has units 0..{hidden - 1}; got {spec!r}")
    return units


def _is_lm(task: Any) -> bool:
    return getattr(task, "kind", None) == "lm" and hasattr(task, "encode")


def _split_ids(task: Any, split: str) -> Any:
    splits = getattr(task, "splits", None)
    if isinstance(splits, dict) and split in splits and getattr(splits[split], "dim", None):
        ids = splits[split]
        if ids.dim() == 1:
            return ids.long()
    return None


def _symbols(task: Any, ids: list[int]) -> list[str]:
    from nestrnn.figures import displayable

    return displayable([task.decode([i]) for i in ids])


def _first_batch(task: Any, split: str, rows: int, bptt: int) -> Any:
    try:
        batch = next(iter(task.eval_batches(split, rows, bptt)))
    except StopIteration:
        raise UserError(f"the {split} split is empty") from None
    return batch.inputs


def plotted_sequence(
    task: Any, args: argparse.Namespace, bptt: int
) -> tuple[Any, Any, list[str] | None, str]:
    """``(warm-up inputs or None, inputs (1, T, ...), labels, description)`` to plot."""
    import torch

    if args.text is not None:
        if not _is_lm(task):
            raise UserError("--text works for language-model runs only; use --split for others")
        ids = task.encode(args.text)  # text it cannot encode: a UserError naming the symbols
        if not ids:
            raise UserError("--text is empty (after removing what the task ignores)")
        x = torch.tensor([ids], dtype=torch.long)
        return None, x, _symbols(task, ids), f"the given text ({len(ids)} symbols)"
    ids = _split_ids(task, args.split)
    if ids is not None:
        start = min(args.offset, max(ids.numel() - args.length, 0))
        begin = max(start - args.warmup, 0)
        window = ids[start : start + args.length]
        warm = ids[begin:start].unsqueeze(0) if start > begin else None
        labels = _symbols(task, window.tolist()) if _is_lm(task) else None
        text = f"{args.split} split, symbols {start}-{start + window.numel()}"
        return warm, window.unsqueeze(0), labels, text
    inputs = _first_batch(task, args.split, args.example + 1, bptt)
    if args.example >= inputs.shape[0]:
        raise UserError(f"--example {args.example}: the {args.split} split is too small")
    x = inputs[args.example : args.example + 1, : args.length]
    labels = [str(int(v)) for v in x[0]] if not x.is_floating_point() else None
    return None, x, labels, f"{args.split} split, example {args.example}"


def timescale_inputs(task: Any, args: argparse.Namespace, bptt: int) -> tuple[Any, Any, str]:
    """``(warm-up inputs or None, inputs (B, T, ...), description)`` for the timescales: windows
    of a language model's split, or the first examples of another task's split."""
    ids = _split_ids(task, args.split)
    if ids is not None:
        streams = max(args.streams, 1)
        length = args.timescale_length
        need = args.warmup + length
        if ids.numel() < need * streams:
            streams = max(ids.numel() // need, 1)
        if ids.numel() < need:
            length = max(ids.numel() - args.warmup, 0)
            if length < 8:
                raise UserError(f"the {args.split} split ({ids.numel()} symbols) is too short")
            warnings.warn(
                f"the {args.split} split is short: timescales over {length} steps", stacklevel=2
            )
        gap = (ids.numel() - args.warmup - length) // streams
        rows = [ids[b * gap : b * gap + args.warmup + length] for b in range(streams)]
        import torch

        data = torch.stack(rows)
        warm = data[:, : args.warmup] if args.warmup else None
        what = f"{args.split} split, {streams} streams x {length} steps after {args.warmup} warm-up"
        return warm, data[:, args.warmup :], what
    inputs = _first_batch(task, args.split, 64 * max(args.streams, 1), bptt)
    steps = inputs.shape[1]
    return None, inputs, f"{args.split} split, {inputs.shape[0]} examples x {steps} steps"


# --------------------------------------------------------------------------- the command


def _load(args: argparse.Namespace) -> tuple[Any, bool]:
    """The run, and whether its data is loaded (with --text, missing data is not needed)."""
    from nestrnn.data_utils import DataError
    from nestrnn.engine.loading import load_run

    try:
        return load_run(args.run_dir, args.checkpoint, args.overrides, args.device), True
    except DataError as error:
        if args.text is None:
            raise
        print(
            f"warning: the task's data is not available ({error}); timescales are measured on "
            "the given text",
            file=sys.stderr,
        )
    return load_run(args.run_dir, args.checkpoint, args.overrides, args.device, False), False


def run(args: argparse.Namespace) -> int:
    for name in ("length", "timescale_length", "num_units", "heat_units", "streams"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("offset", "warmup", "max_lag", "example"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    if args.threads < 0:
        raise UserError("--threads must be >= 0")
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    from nestrnn import analysis
    from nestrnn.engine.rundir import json_safe, writing

    loaded, has_data = _load(args)
    task, model, device = loaded.task, loaded.model, loaded.device
    model.eval()
    core = analysis.recurrent_core(model)
    hidden = int(getattr(core, "hidden_size", 0)) or loaded.checkpoint["model_meta"]["hidden_size"]
    units = _parse_units(args.units, hidden)
    bptt = int(loaded.config.train.bptt)
    out = Path(args.out) if args.out else Path(args.run_dir) / "figures"
    family = str(loaded.config.model.family)

    # the plotted sequence
    plot_warm, plot_x, labels, plot_what = (None, None, None, "")
    if not args.timescales_only or not has_data:
        plot_warm, plot_x, labels, plot_what = plotted_sequence(task, args, bptt)

    # the timescales
    if has_data:
        ts_warm, ts_x, ts_what = timescale_inputs(task, args, bptt)
    else:
        ts_warm, ts_x, ts_what = plot_warm, plot_x, plot_what
    state = analysis.warm_state(model, None if ts_warm is None else ts_warm.to(device))
    assert ts_x is not None  # read above whenever there is no data of the task's own
    recording = analysis.record_cells(model, ts_x.to(device), state)
    if recording.steps < 3:
        raise UserError(f"{recording.steps} steps are too few to measure a timescale")
    max_lag = args.max_lag or None
    rows = analysis.timescales(recording, max_lag=max_lag)
    print(f"timescales of {family} ({loaded.path.name}) over {ts_what}:")
    print(analysis.format_table(rows))

    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plot_info: dict[str, Any] = {}
    if not args.timescales_only:
        from nestrnn import figures

        state = analysis.warm_state(model, None if plot_warm is None else plot_warm.to(device))
        assert plot_x is not None  # read above for every plot
        plotted = analysis.record_cells(model, plot_x.to(device), state)
        chosen = units or analysis.pick_units(plotted, args.num_units)
        heat = list(range(min(args.heat_units, hidden)))
        title = f"{family}: {plot_what}"
        drawn = {"cells.png": figures.cells_figure(plotted, chosen, labels, title=title)}
        if labels is not None and _is_lm(task):
            drawn["text.png"] = figures.text_figure(plotted, chosen, labels, title=title)
        drawn["heatmap.png"] = figures.heatmap_figure(plotted, heat, labels, title=title)
        drawn["autocorrelation.png"] = figures.acf_figure(rows, title=f"{family}: {ts_what}")
        for name, fig in drawn.items():
            with writing(out / name):
                written.append(figures.save(fig, out / name))
        plot_info = {
            "what": plot_what,
            "steps": plotted.steps,
            "units": chosen,
            "heat_units": len(heat),
            "levels": plotted.level_names(),
        }
        if labels is not None:
            plot_info["symbols"] = "".join(labels) if _is_lm(task) else labels

    record = {
        "run_dir": str(args.run_dir),
        "checkpoint": str(loaded.path),
        "step": loaded.checkpoint.get("position", {}).get("global_step"),
        "task": str(loaded.config.task.name),
        "family": family,
        "hidden_size": hidden,
        "kind": recording.kind,
        "measured_on": ts_what,
        "steps": recording.steps,
        "sequences": int(recording.cells.shape[2]),
        "max_lag": len(rows[0].acf) - 1,
        "levels": [
            {"layer": level.layer, "level": level.level, **row.as_dict()}
            for level, row in zip(recording.levels, rows)
        ],
        "plot": plot_info,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    path = out / "timescales.json"
    with writing(path):
        path.write_text(
            json.dumps(json_safe(record), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    written.append(path)
    for item in written:
        print(f"wrote {item}")
    return 0
