"""Quality at equal parameter count: Nested LSTM (depth 2) vs stacked LSTM (2 layers) vs LSTM.

    python benchmarks/quality.py tinyshakespeare                 # preset: text_file on tiny-shakespeare
    python benchmarks/quality.py chinese_poems --steps 400
    python benchmarks/quality.py mnist_glimpses --seeds 0,1
    python benchmarks/quality.py text_file task.path=my.txt --params 200000
    python benchmarks/quality.py text_file task.path=small.txt --quick   # seconds: a smoke test

Each model is trained by the engine itself (``nestrnn.engine.trainer.Trainer``, the code path of
``nestrnn train``) with the same configuration except ``model.family``: the same task options,
optimizer, schedule, batches, seed and budget of optimizer steps (``--steps``, split into
``--epochs`` epochs, each ending in a validation pass; early stopping is off so every model gets
the whole budget). Every family is sized by the engine to the same ``model.target_params``
(``--params``, the whole model: embedding or input layer, recurrent core and read-out). The test
split is evaluated with the checkpoint that was best on validation.

Results: ``<out-dir>/quality_<name>.md`` (a table) and ``.json`` (every run, with the exact
command, versions, machine and per-run configuration); run directories under ``--runs-dir``
(default ``runs/quality/<name>/<family>-seed<k>``), usable with ``nestrnn viz`` and
``nestrnn plot``. Presets (``tinyshakespeare``, ``chinese_poems``, ``mnist_glimpses``) read the
data from ``--data-dir`` (default ``$NESTRNN_DATA_DIR`` or ``../shared/data``); any other
registered task name works with ``KEY=VALUE`` overrides. See benchmarks/QUALITY.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import statistics
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
    "steps": 6,
    "epochs": 2,
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
    parser.add_argument("--steps", type=int, help="optimizer steps per model (the budget)")
    parser.add_argument("--epochs", type=int, help="validation passes (the steps are split)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--name", help="results name (default: the task or preset)")
    parser.add_argument(
        "--out-dir",
        default=str(REPO / "benchmarks" / "results"),
        help="where quality_<name>.md/.json go (default benchmarks/results)",
    )
    parser.add_argument("--runs-dir", help="run directories (default runs/quality/<name>)")
    parser.add_argument("--data-dir", help="shared data folder of the presets")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="toy budget (tiny models, a few steps): checks that it runs",
    )
    parser.add_argument("--verbose", action="store_true", help="print the engine's epoch lines")
    parser.add_argument(
        "--render",
        action="store_true",
        help="train nothing: rewrite <out-dir>/quality_<name>.md from its .json",
    )
    return parser.parse_args(argv)


def common_overrides(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The overrides shared by every model, and the budget actually used."""
    preset = PRESETS.get(args.task)
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
    if preset is not None:
        task = [item.format(data=data) for item in preset["task"]]
        budget = dict(preset)
    else:
        task = [f"task.name={args.task}"]
        budget = {"params": 100_000, "steps": 300, "epochs": 3, "train": []}
    if args.quick:
        budget = {**budget, **QUICK}
    params = args.params or budget["params"]
    steps = args.steps or budget["steps"]
    epochs = args.epochs or budget["epochs"]
    if min(params, steps, epochs) < 1:
        raise SystemExit("--params, --steps and --epochs must be >= 1")
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
        f"train.threads={args.threads}",
        f"train.device={args.device}",
        "train.progress=false",
        "train.test=true",
    ]
    return overrides, {
        "params": params,
        "steps": steps,
        "epochs": epochs,
        "steps_per_epoch": per_epoch,
    }


def train_one(
    model: str, seed: int, common: list[str], user: list[str], run_dir: Path, verbose: bool
) -> dict[str, Any]:
    """Train one model through the engine (``user`` overrides win); its results as a dict."""
    from nestrnn.config import load_config, to_container
    from nestrnn.engine.trainer import Trainer

    label, model_overrides = MODELS[model]
    config = load_config([], [*common, *model_overrides, *user, f"train.seed={seed}"])
    if run_dir.exists():
        if not (run_dir / "config.yaml").exists() and any(run_dir.iterdir()):
            raise SystemExit(f"{run_dir} exists and is not a run directory; not overwriting it")
        shutil.rmtree(run_dir)
    echo = (lambda line: print(f"    {line}", flush=True)) if verbose else None
    started = time.perf_counter()
    trainer = Trainer(config, run_dir, echo=echo)
    summary = trainer.fit()
    total = time.perf_counter() - started
    return {
        "model": model,
        "label": label,
        "seed": seed,
        "hidden_size": trainer.sizing.hidden_size,
        "params": trainer.sizing.params,
        "steps": summary.steps,
        "epochs": summary.epochs,
        "best_epoch": summary.best_epoch,
        "valid": summary.best,
        "test": summary.test,
        "train_valid_s": round(summary.elapsed, 2),
        "total_s": round(total, 2),
        "run_dir": str(run_dir),
        "config": to_container(config),
        "primary_metric": summary.primary_metric,
        "higher_is_better": bool(trainer.task.higher_is_better),
    }


def _mean_sd(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _digits(metric: str) -> int:
    return 2 if metric in ("error", "acc", "ppl", "ppl_char") else 4


def summarise(runs: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """Per model: mean (and sd) over seeds of every metric, parameters and times."""
    rows = []
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        row: dict[str, Any] = {
            "model": model,
            "label": mine[0]["label"],
            "hidden_size": mine[0]["hidden_size"],
            "params": mine[0]["params"],
            "seeds": [r["seed"] for r in mine],
        }
        for split in ("valid", "test"):
            keys = sorted({k for r in mine for k in r[split]})
            row[split] = {
                k: statistics.mean(r[split][k] for r in mine if k in r[split]) for k in keys
            }
            row[f"{split}_text"] = {
                k: _mean_sd([r[split][k] for r in mine if k in r[split]], _digits(k)) for k in keys
            }
        for key in ("train_valid_s", "total_s"):
            row[key] = statistics.mean(r[key] for r in mine)
        rows.append(row)
    return rows


def _test_values(record: dict[str, Any], model: str) -> list[float]:
    primary = record["primary_metric"]
    return [
        r["test"][primary] for r in record["runs"] if r["model"] == model and primary in r["test"]
    ]


def verdict(record: dict[str, Any]) -> str:
    """One sentence: which model has the best test metric, and whether that is a ranking."""
    primary = record["primary_metric"]
    pick = max if record["higher_is_better"] else min
    rows = sorted(
        record["summary"],
        key=lambda r: r["test"].get(primary, math.nan) * (-1 if record["higher_is_better"] else 1),
    )
    best = pick(rows, key=lambda r: r["test"].get(primary, math.nan))
    text = f"Best test {primary}: {best['label']}."
    if len(rows) < 2:
        return text
    runner = rows[1] if rows[0] is best else rows[0]
    gap = abs(best["test"][primary] - runner["test"][primary])
    if len(record["seeds"]) > 1:
        spread = max(
            statistics.stdev(_test_values(record, r["model"]))
            for r in (best, runner)
            if len(_test_values(record, r["model"])) > 1
        )
        if gap < spread:
            text += (
                f" Its lead over {runner['label']} ({gap:.{_digits(primary)}f}) is smaller than "
                f"the seed-to-seed sd ({spread:.{_digits(primary)}f}): not a ranking."
            )
    else:
        text += (
            " One seed only: a difference of the size of the seed-to-seed spread is not a "
            "ranking (measure it with --seeds 0,1,2)."
        )
    return text


def markdown(record: dict[str, Any]) -> str:
    rows = record["summary"]
    primary = record["primary_metric"]
    test_keys = [k for k in rows[0]["test"] if k != "baseline"] if rows else []
    test_keys = [primary, *[k for k in test_keys if k != primary]]
    budget = record["budget"]
    seeds = record["seeds"]
    lines = [
        f"# Quality at equal parameters: {record['name']} (task `{record['task']}`)",
        "",
        "Produced by:",
        "",
        "```",
        record["command"],
        "```",
        "",
        f"{record['date']} on {record['machine']['processor']} ({record['machine']['cpu_count']} "
        f"CPUs, torch {record['versions']['torch']}, {record['threads']} thread(s) per run, device "
        f"{record['device']}).",
        f"Budget per model: {budget['steps']} optimizer steps in {budget['epochs']} epochs of "
        f"{budget['steps_per_epoch']}, validation after each epoch; target "
        f"{budget['params']:,} parameters; seed(s) {', '.join(map(str, seeds))}"
        + (" (mean ± sd over seeds)" if len(seeds) > 1 else "")
        + ".",
        f"Primary metric: `{primary}` ({'higher' if record['higher_is_better'] else 'lower'} is "
        "better); valid = best epoch; test = the checkpoint best on validation.",
        "",
    ]
    header = ["model", "hidden", "params", f"valid {primary}"] + [f"test {k}" for k in test_keys]
    header += ["train+valid s", "total s"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        cells = [
            row["label"],
            str(row["hidden_size"]),
            f"{row['params']:,}",
            row["valid_text"].get(primary, "-"),
        ]
        cells += [row["test_text"].get(k, "-") for k in test_keys]
        cells += [f"{row['train_valid_s']:.1f}", f"{row['total_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines += ["", verdict(record)]
    lines += [
        "",
        "Times are wall-clock seconds on a shared CPU machine: `train+valid` is the engine's own "
        "count (training steps and validation passes), `total` adds model sizing, data loading and "
        "the test pass. Compare times within one table only.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    name = args.name or args.task
    if args.render:
        source = Path(args.out_dir) / f"quality_{name}.json"
        if not source.is_file():
            raise SystemExit(f"--render: no {source}")
        record = json.loads(source.read_text(encoding="utf-8"))
        (Path(args.out_dir) / f"quality_{name}.md").write_text(markdown(record), encoding="utf-8")
        print(markdown(record))
        return 0
    common, budget = common_overrides(args)
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path("runs") / "quality" / name

    import torch

    import nestrnn
    from nestrnn.config import ConfigError
    from nestrnn.data_utils import DataError

    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    print(
        f"quality benchmark {name}: {', '.join(models)}; {budget['steps']} steps, "
        f"target {budget['params']:,} parameters, seeds {seeds}",
        flush=True,
    )
    for seed in seeds:
        for model in models:
            run_dir = runs_dir / f"{model}-seed{seed}"
            try:
                result = train_one(model, seed, common, args.overrides, run_dir, args.verbose)
            except (ConfigError, DataError, FileNotFoundError) as error:
                print(f"quality.py: error: {error}", file=sys.stderr)
                return 2
            primary = result["primary_metric"]
            print(
                f"  {result['label']:<24} seed {seed}: hidden {result['hidden_size']}, "
                f"{result['params']:,} params, valid {primary} {result['valid'].get(primary, math.nan):.4f}, "
                f"test {primary} {result['test'].get(primary, math.nan):.4f}, "
                f"{result['total_s']:.0f}s",
                flush=True,
            )
            runs.append(result)

    first = runs[0]
    record = {
        "name": name,
        "task": first["config"]["task"]["name"],
        "command": shlex.join(["python", "benchmarks/quality.py", *sys.argv[1:]])
        if argv is None
        else shlex.join(["python", "benchmarks/quality.py", *argv]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "budget": budget,
        "seeds": seeds,
        "threads": args.threads,
        "device": args.device,
        "primary_metric": first["primary_metric"],
        "higher_is_better": first["higher_is_better"],
        "overrides": [*common, *args.overrides],
        "versions": {
            "nestrnn": nestrnn.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "summary": summarise(runs, models),
        "runs": runs,
    }
    out = Path(args.out_dir)
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


if __name__ == "__main__":
    sys.exit(main())
