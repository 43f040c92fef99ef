"""Quality at equal parameter count: Nested LSTM (depth 2) vs stacked LSTM (2 layers) vs LSTM,
each tuned with the same budget, then measured over seeds.

    python benchmarks/quality.py tinyshakespeare                 # preset: text_file on tiny-shakespeare
    python benchmarks/quality.py chinese_poems --trials 12 --sampler random
    python benchmarks/quality.py mnist_glimpses --seeds 0,1,2,3,4 --workers 2
    python benchmarks/quality.py text_file task.path=my.txt --params 200000
    python benchmarks/quality.py text_file task.path=small.txt --quick   # seconds: a smoke test

For each model, on the same task options, optimizer, schedule, batches and budget of optimizer
steps (``--steps`` split into ``--epochs`` epochs, early stopping off) and sized to the same
``model.target_params``:

1. **tune**: ``nestrnn sweep`` tries ``--trials`` configurations of :data:`SPACE` (the learning
   rate, dropout and any :data:`REGULARISERS`) with the same sampler (``--sampler``, TPE or
   random) on one seed (``--tune-seed``); the best is the one with the best mean validation
   metric (``nestrnn compare --split valid``);
2. **measure**: that configuration is trained again on every seed of ``--seeds`` (a one-point
   grid sweep);
3. **compare**: ``nestrnn compare`` of the three final sweeps, the stacked LSTM as baseline:
   mean ± sd, 95% CI and a paired t-test over seeds of the test metric, wall time and steps.

Results: ``<out-dir>/quality_<name>.md`` (a table) and ``.json`` (with the commit, machine,
command and date, the tuning and every final row); sweep directories under ``--runs-dir``
(default ``runs/quality/<name>/{tune,final}/<model>``), ordinary run directories that
``nestrnn eval``, ``viz``, ``plot`` and ``compare`` read. Presets (``tinyshakespeare``,
``chinese_poems``, ``mnist_glimpses``) read the data from ``--data-dir`` (default
``$NESTRNN_DATA_DIR`` or ``../shared/data``); any other registered task name works with
``KEY=VALUE`` overrides. Needs the ``sweep`` and ``compare`` extras. See benchmarks/QUALITY.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: the three models compared; each one's overrides (applied after the common ones)
MODELS: dict[str, tuple[str, list[str]]] = {
    "nlstm": ("NLSTM (depth 2)", ["model.family=nlstm", "model.depth=2", "model.num_layers=1"]),
    "stacked_lstm": (
        "stacked LSTM (2 layers)",
        ["model.family=stacked_lstm", "model.depth=2", "model.num_layers=1"],
    ),
    "lstm": ("LSTM (1 layer)", ["model.family=lstm", "model.num_layers=1"]),
}
#: the model the others are tested against
BASELINE = "stacked_lstm"

#: what every model is tuned over (the sweep spec's ``space``), with the same budget
SPACE: dict[str, dict[str, Any]] = {
    "optim.lr": {"float": [3.0e-4, 1.0e-2], "log": True},
    "model.dropout": {"float": [0.0, 0.5]},
}
#: regularisers tuned alongside, in the sweep spec's syntax; e.g.
#: ``"optim.weight_decay": {"float": [1.0e-6, 1.0e-3], "log": True}``
REGULARISERS: dict[str, dict[str, Any]] = {}

#: named setups: the task and its data, and the default budget (all overridable)
PRESETS: dict[str, dict[str, Any]] = {
    "tinyshakespeare": {
        "task": ["task.name=text_file", "task.path={data}/tinyshakespeare/input.txt"],
        "params": 100_000,
        "steps": 1500,
        "epochs": 5,
        "train": ["train.batch_size=32", "train.bptt=100", "train.eval_batch_size=32"],
    },
    "chinese_poems": {
        "task": ["task.name=chinese_poems", "task.data_dir={data}/chinese_poems"],
        "params": 600_000,
        "steps": 600,
        "epochs": 3,
        "train": [
            "model.embedding_dim=32",
            "train.batch_size=32",
            "train.bptt=48",
            "train.eval_batch_size=32",
        ],
    },
    "mnist_glimpses": {
        "task": ["task.name=mnist_glimpses", "task.data_dir={data}/mnist"],
        "params": 100_000,
        "steps": 3000,
        "epochs": 6,
        "train": ["train.batch_size=64", "optim.lr=0.002"],
    },
}

QUICK = {
    "params": 3_000,
    "steps": 4,
    "epochs": 2,
    "trials": 2,
    "seeds": [0, 1],
    "train": [
        "train.batch_size=4",
        "train.bptt=16",
        "train.eval_batch_size=4",
        "train.eval_max_batches=2",
        "model.embedding_dim=8",
    ],
}


def default_data_dir() -> Path:
    env = os.environ.get("NESTRNN_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(PRESETS) + "; or any registered task name",
    )
    parser.add_argument("task", help="a preset or a registered task name")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for every model (they win over the preset)",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, from {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument("--params", type=int, help="target parameter count of every model")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (the budget)")
    parser.add_argument("--epochs", type=int, help="validation passes (the steps are split)")
    parser.add_argument("--trials", type=int, help="tuning trials per model (default 8)")
    parser.add_argument(
        "--sampler",
        choices=("tpe", "random"),
        default="tpe",
        help="how the trials are chosen (default tpe)",
    )
    parser.add_argument("--tune-seed", type=int, default=0, help="the seed of the tuning runs")
    parser.add_argument("--seeds", help="comma-separated seeds of the final runs (default 0,1,2)")
    parser.add_argument("--workers", type=int, default=1, help="sweep workers (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--name", help="results name (default: the task or preset)")
    parser.add_argument(
        "--out-dir",
        default=str(REPO / "benchmarks" / "results"),
        help="where quality_<name>.md/.json go (default benchmarks/results)",
    )
    parser.add_argument("--runs-dir", help="sweep directories (default runs/quality/<name>)")
    parser.add_argument("--data-dir", help="shared data folder of the presets")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="toy budget (tiny models, 2 trials, 2 seeds): checks that it runs",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="train nothing: rewrite <out-dir>/quality_<name>.md from its .json",
    )
    return parser.parse_args(argv)


def common_overrides(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The overrides shared by every model and run, and the budget actually used."""
    preset = PRESETS.get(args.task)
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    if preset is not None:
        task = [item.format(data=data) for item in preset["task"]]
        budget = dict(preset)
    else:
        task = [f"task.name={args.task}"]
        budget = {"params": 100_000, "steps": 300, "epochs": 3, "train": []}
    budget = {"trials": 8, "seeds": [0, 1, 2], **budget}
    if args.quick:
        budget = {**budget, **QUICK}
    params = args.params or budget["params"]
    steps = args.steps or budget["steps"]
    epochs = args.epochs or budget["epochs"]
    trials = args.trials or budget["trials"]
    try:
        seeds = (
            [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else budget["seeds"]
        )
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if min(params, steps, epochs, trials, args.workers, args.threads) < 1 or not seeds:
        raise SystemExit(
            "--params, --steps, --epochs, --trials, --workers and --threads must be >= 1, "
            "--seeds not empty"
        )
    epochs = min(epochs, steps)
    per_epoch = math.ceil(steps / epochs)
    overrides = [
        *task,
        *budget["train"],
        f"model.target_params={params}",
        f"train.epochs={epochs}",
        f"train.steps_per_epoch={per_epoch}",
        f"train.max_steps={steps}",
        "train.early_stopping=0",
        f"train.device={args.device}",
        "train.progress=false",
        "train.test=true",
    ]
    return overrides, {
        "params": params,
        "steps": steps,
        "epochs": epochs,
        "steps_per_epoch": per_epoch,
        "trials": trials,
        "seeds": seeds,
    }


# --------------------------------------------------------------------------- sweep and compare


def run_sweep(
    spec: dict[str, Any], directory: Path, overrides: list[str], workers: int, threads: int
) -> None:
    """``nestrnn sweep SPEC KEY=VALUE... --dir DIRECTORY``: the spec is written beside the
    sweep directory (``<directory>.yaml``); run again, it continues the study."""
    import yaml

    path = directory.with_name(directory.name + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "nestrnn",
        "sweep",
        str(path),
        *overrides,
        "--dir",
        str(directory),
        "--workers",
        str(workers),
        "--threads-per-worker",
        str(threads),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(
            f"quality.py: {shlex.join(command)} failed ({done.returncode}): "
            f"{done.stderr.strip()[-2000:]}"
        )


def run_compare(*args: str) -> list[dict[str, Any]]:
    """``nestrnn compare ARGS... --json``, in this process; its rows."""
    from nestrnn.cli import main as nestrnn

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = nestrnn(["compare", *args, "--json"])
    if err.getvalue().strip():
        print(err.getvalue().rstrip(), file=sys.stderr)  # the runs it skipped, with the reason
    if code != 0:
        raise SystemExit(f"quality.py: nestrnn compare {shlex.join(args)} failed ({code})")
    return json.loads(out.getvalue())


def _flat_config(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from nestrnn.compare.runs import flatten

    loaded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    return flatten(loaded)  # type: ignore[arg-type]


def best_values(
    rows: list[dict[str, Any]], space: dict[str, Any], higher_is_better: bool
) -> dict[str, Any]:
    """The tuned keys' values of the row with the best mean (read from its first run)."""
    pick = max if higher_is_better else min
    best = pick(rows, key=lambda row: row["mean"])
    config = _flat_config(Path(best["runs"][0]))
    return {key: config[key] for key in space}


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def meta(argv: list[str] | None) -> dict[str, Any]:
    """Commit, dirty tree, machine, command and date of a result file."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_common import describe_machine

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    words = sys.argv[1:] if argv is None else argv
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": {**describe_machine("cpu"), "platform": platform.platform()},
        "command": shlex.join(["python", "benchmarks/quality.py", *words]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- the table


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits if abs(value) < 100 else 2}f}"


def markdown(record: dict[str, Any]) -> str:
    budget, metric = record["budget"], record["metric"]
    tuned = list(record["space"])
    lines = [
        f"# Quality at equal parameters: {record['name']} (task `{record['task']}`)",
        "",
        "Produced by:",
        "",
        "```",
        record["meta"]["command"],
        "```",
        "",
        f"{record['meta']['date']}, commit {str(record['meta']['commit'])[:12]}"
        + (" (uncommitted changes)" if record["meta"]["dirty"] else "")
        + f", on {record['meta']['machine']['device']} ({record['meta']['machine']['cpu_count']} "
        f"CPUs, torch {record['meta']['machine']['torch']}), device {record['device']}, "
        f"{record['threads']} thread(s) per run, {record['workers']} sweep worker(s).",
        f"Every run: {budget['steps']} optimizer steps in {budget['epochs']} epochs, target "
        f"{budget['params']:,} parameters. Tuning: {budget['trials']} {record['sampler']} trials "
        f"per model over {', '.join(f'`{k}`' for k in tuned)} (seed {record['tune_seed']}, best "
        f"validation {metric}); the best configuration then trained on seeds "
        f"{', '.join(map(str, budget['seeds']))}.",
        f"`{metric}` on the {record['split']} split ({'higher' if record['higher_is_better'] else 'lower'}"
        " is better): mean ± sd over seeds, 95% CI (Student t), p: two-sided t-test against "
        f"{MODELS[record['baseline']][0] if record['baseline'] else 'the first model'} "
        "(paired by seed; Welch where the seeds do not pair).",
        "",
    ]
    header = [
        "model",
        *tuned,
        "hidden",
        "params",
        f"{record['split']} {metric}",
        "95% CI",
        "vs baseline",
        "p",
        "wall s",
        "steps",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 1))
    for row in record["results"]:
        p = row["p_value"] if row["test"] == "paired" else row["welch_p_value"]
        cells = [
            MODELS[row["model"]][0],
            *(f"{row['tuned'][k]:.4g}" for k in tuned),
            str(row["hidden_size"]),
            f"{row['params']:,}",
            _num(row["mean"]) + (f" ± {_num(row['sd'])}" if row["sd"] is not None else ""),
            f"[{_num(row['ci95'][0])}, {_num(row['ci95'][1])}]" if row["ci95"] else "-",
            "-" if row["baseline"] else f"{row['delta']:+.4f}",
            "baseline" if row["baseline"] else f"{_num(p, 3)} ({row['test']})",
            _num(row["wall_s_mean"], 1),
            "-" if row["steps"] is None else f"{row['steps']:g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wall time: the engine's own count (training and validation) per run, mean over seeds, on "
        "a shared machine; compare times within one table only.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    name = args.name or args.task
    out = Path(args.out_dir)
    if args.render:
        source = out / f"quality_{name}.json"
        if not source.is_file():
            raise SystemExit(f"--render: no {source}")
        record = json.loads(source.read_text(encoding="utf-8"))
        if "meta" not in record:
            raise SystemExit(f"--render: {source} was written by the earlier, untuned benchmark")
        (out / f"quality_{name}.md").write_text(markdown(record), encoding="utf-8")
        print(markdown(record))
        return 0
    common, budget = common_overrides(args)
    # a key the user fixes is not tuned; a preset's value of a tuned key gives way to the tuning
    fixed = {o.split("=", 1)[0] for o in args.overrides}
    space = {k: v for k, v in {**SPACE, **REGULARISERS}.items() if k not in fixed}
    if not space:
        raise SystemExit("quality.py: the overrides fix every tuned key; nothing to tune")
    common = [o for o in common if o.split("=", 1)[0] not in space] + args.overrides
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path("runs") / "quality" / name
    started = time.perf_counter()
    print(
        f"quality benchmark {name}: {', '.join(models)}; {budget['trials']} {args.sampler} "
        f"trials each, then seeds {budget['seeds']}; {budget['steps']} steps, target "
        f"{budget['params']:,} parameters",
        flush=True,
    )
    tuned: dict[str, dict[str, Any]] = {}
    higher_is_better = False
    for model in models:
        directory = runs_dir / "tune" / model
        spec = {
            "overrides": _as_mapping(MODELS[model][1]),
            "space": space,
            "sampler": args.sampler,
            "trials": budget["trials"],
            "seeds": [args.tune_seed],
        }
        run_sweep(spec, directory, common, args.workers, args.threads)
        rows = run_compare(str(directory), "--split", "valid")
        higher_is_better = _higher_is_better(Path(rows[0]["runs"][0]))
        tuned[model] = best_values(rows, space, higher_is_better)
        print(f"  {MODELS[model][0]:<24} tuned: {tuned[model]}", flush=True)
    for model in models:
        grid = {key: {"choice": [value]} for key, value in tuned[model].items()}
        spec = {
            "overrides": _as_mapping(MODELS[model][1]),
            "space": grid,
            "sampler": "grid",
            "seeds": budget["seeds"],
        }
        run_sweep(spec, runs_dir / "final" / model, common, args.workers, args.threads)
    finals = [runs_dir / "final" / model for model in models]
    baseline = BASELINE if BASELINE in models else None
    extra = ["--baseline", str(runs_dir / "final" / baseline)] if baseline else []
    rows = run_compare(*map(str, finals), *extra)
    results = []
    for model, final in zip(models, finals):
        row = next(r for r in rows if Path(r["runs"][0]).is_relative_to(final))
        summary = _summary(Path(row["runs"][0]))
        results.append(
            {
                "model": model,
                "tuned": tuned[model],
                "hidden_size": summary.get("hidden_size"),
                "params": summary.get("params"),
                **row,
            }
        )
    record = {
        "meta": meta(argv),
        "name": name,
        "task": _flat_config(Path(rows[0]["runs"][0]))["task.name"],
        "budget": budget,
        "sampler": args.sampler,
        "tune_seed": args.tune_seed,
        "space": space,
        "threads": args.threads,
        "workers": args.workers,
        "device": args.device,
        "metric": rows[0]["metric"],
        "split": rows[0]["split"],
        "higher_is_better": higher_is_better,
        "baseline": baseline,
        "overrides": common,
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{name}.json").write_text(
        json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    text = markdown(record)
    (out / f"quality_{name}.md").write_text(text, encoding="utf-8")
    print()
    print(text)
    print(f"wrote {out / f'quality_{name}.md'} and .json ({record['wall_s']:.0f}s in all)")
    return 0


def _as_mapping(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` as the sweep spec's ``overrides`` mapping (values parsed as YAML)."""
    import yaml

    return {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in overrides)}


def _higher_is_better(run_dir: Path) -> bool:
    from nestrnn.config import task_class

    return bool(task_class(_flat_config(run_dir)["task.name"]).higher_is_better)


if __name__ == "__main__":
    sys.exit(main())
