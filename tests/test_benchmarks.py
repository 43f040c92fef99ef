"""The GPU and speed benchmark scripts run end to end on CPU, at tiny sizes.

``bash benchmarks/gpu.sh --dry-run`` runs gpu.sh's Python steps on CPU under Triton's interpreter,
so that what a GPU session runs in one go is known to work before it gets a GPU. The issue rows of
``speed.py`` (variants, user memory functions) run on the CPU path, and the op-only mode that a
machine without nestrnn's dependencies gets is checked with pluggy hidden.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
TINY = ["--shapes", "3x8x3", "--repeats", "1", "--max-interference", "1"]


def script_env(**extra: str) -> dict[str, str]:
    """This interpreter's environment first on PATH (gpu.sh calls ``python``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, **extra}


def load(name: str, monkeypatch):
    """Import a benchmark script as a module."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.mark.slow
def test_gpu_sh_dry_run_without_triton(tmp_path):
    """Where Triton is not installed the dry run still runs what needs no Triton, and passes."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nsys.modules['triton'] = None  # `import triton` fails: not installed\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    env = script_env(OUT=str(out), PYTHONPATH=str(hide))
    run = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "triton not installed" in run.stdout and "Traceback" not in run.stdout
    assert run.stdout.rstrip().endswith("ALL STEPS PASSED")
    assert {p.name for p in out.iterdir()} == {
        "gpu_run.log",
        "speed_cpu_float32.json",
        "speed_cpu_float32.md",
    }
    result = json.loads((out / "speed_cpu_float32.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["NLSTM-2"]["implementation"]["fwd+bwd"] in ("c_loop", "torch_loop")  # the CPU op


def test_gpu_sh_dry_run(tmp_path, monkeypatch):
    """Every step, the tuning with --quick-tune (pick_config's candidates: the table's would add
    tens of seconds of the interpreter and no other code; test_tuning_candidates checks that a
    full tuning tries them)."""
    pytest.importorskip("triton")
    run = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--dry-run", "--quick-tune"],
        cwd=REPO,
        env=script_env(OUT=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "ALL PASS" in run.stdout and run.stdout.rstrip().endswith("ALL STEPS PASSED")
    assert {p.name for p in tmp_path.iterdir()} == {
        "gpu_run.log",
        "speed_cpu_float32.json",
        "speed_cpu_float32.md",
        "tune_triton_cpu.json",
        "tune_triton_cpu.md",
    }
    tuned = json.loads((tmp_path / "tune_triton_cpu.json").read_text())["results"]
    assert [(r["dtype"], r["B"], r["H"]) for r in tuned] == [("fp32", 3, 17)]
    assert all("error" not in row for row in tuned[0]["rows"])  # every candidate checked and timed
    assert any(row["fields"][-1] for row in tuned[0]["rows"])  # cuBLAS GEMMs among them
    tune = load("tune_triton", monkeypatch)
    quick = [tune.fields(cfg) for cfg in tune.candidates("fp32", 3, 17, quick=True)]
    assert [tuple(row["fields"]) for row in tuned[0]["rows"]] == quick  # --quick-tune reached it
    result = json.loads((tmp_path / "speed_cpu_float32.json").read_text())
    assert set(result["meta"]["triton_configs"]) == {"3x17"}  # the tuned one, timed
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"NLSTM-1", "NLSTM-2", "NLSTM-3", "NLSTM-2 torch_loop"}
    assert all(rows[f"NLSTM-{d}"]["implementation"]["fwd+bwd"] == "triton" for d in (1, 2, 3))
    assert rows["NLSTM-2 torch_loop"]["implementation"]["fwd+bwd"] == "torch_loop"
    assert [s["T"] for s in result["split"]] == [4]
    assert (tmp_path / "gpu_run.log").read_text().rstrip().endswith("ALL STEPS PASSED")


def test_tuning_candidates(monkeypatch):
    """tune_triton.candidates: pick_config's choices first, once each, then (but for --quick) the
    table's whose batch block the batch needs; cuBLAS GEMMs among the quick ones."""
    pytest.importorskip("triton")
    tune = load("tune_triton", monkeypatch)
    full = [tune.fields(cfg) for cfg in tune.candidates("fp32", 3, 17)]
    quick = [tune.fields(cfg) for cfg in tune.candidates("fp32", 3, 17, quick=True)]
    assert full[: len(quick)] == quick and len(set(full)) == len(full)
    assert any(fields[-1] for fields in quick)
    table = {(*entry, False) for entry in tune.FP32_CANDIDATES if entry[0] <= 16}  # batch 3: 16
    assert set(full) == set(quick) | table and len(full) > len(quick)


def test_speed_issue_rows_on_cpu(tmp_path):
    """The variant and user-function rows, each with its ratio, in one run."""
    out = tmp_path / "speed.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "speed.py"),
            *TINY,
            "--depths",
            "2",
            "--variants",
            "--memories",
            "--regularisers",
            "--threads",
            "1",
            "--clock",
            "process",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    expected = {
        "outer candidate tanh": "NLSTM-2",
        "cell softsign": "NLSTM-2",
        "bias-free level": "NLSTM-2",
        "LeakyMemory": "LSTM-1",
        "GRUMemory": "LSTM-1",
        "+ weight drop": "NLSTM-2 layer",
        "+ locked dropout": "NLSTM-2 layer",
        "+ zoneout": "NLSTM-2 layer",
        "+ recompute T/4": "NLSTM-2 layer",
    }
    if importlib.util.find_spec("nestrnn_gru") is None:
        del expected["GRUMemory"]
    for name, baseline in expected.items():
        assert rows[name]["vs"][baseline]["fwd+bwd_ratio"] > 0
    assert "LeakyMemory / LSTM-1: fwd" in run.stdout


def test_long_sequences_measures_a_row_with_and_without_recomputation_per_length(tmp_path):
    out = tmp_path / "long.json"
    command = [sys.executable, str(BENCHMARKS / "long_sequences.py"), "--steps", "40,400"]
    command += ["--every", "10", "--hidden", "8", "--batch", "2", "--limit-gib", "3"]
    run = subprocess.run(
        [*command, "--json", str(out)],
        cwd=REPO,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["T"], r["checkpoint_every"]) for r in rows] == [
        (40, None),
        (40, 10),
        (400, None),
        (400, 10),
    ]
    assert all(r["fits"] and r["step_mib"] >= 0 for r in rows)


HIDE_PLUGGY = (
    "import os, runpy, sys; sys.modules['pluggy'] = None; sys.argv = sys.argv[1:]; "
    "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_speed_without_nestrnn_dependencies_times_the_op(tmp_path):
    """A bare GPU machine has torch and triton only: the op's rows still run."""
    out = tmp_path / "speed.json"
    command = [sys.executable, "-c", HIDE_PLUGGY, str(BENCHMARKS / "speed.py")]
    run = subprocess.run(
        [*command, *TINY, "--depths", "1", "--backend", "torch_loop", "--json", str(out)],
        cwd=REPO,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.read_text())["meta"]["nestrnn"] == "op only: pluggy is not installed"
    refused = subprocess.run(
        [*command, *TINY, "--memories"],
        cwd=REPO,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert "NestedLSTM needs nestrnn's dependencies (pluggy is not installed)" in refused.stderr


def test_speed_refuses_to_time_a_fallback_under_the_backend_name():
    """Without the interpreter, Triton cannot run on CPU: the op would fall back, speed.py stops."""
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "speed.py"),
            *TINY,
            "--depths",
            "1",
            "--backend",
            "triton",
        ],
        cwd=REPO,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert run.stderr.strip().endswith("refusing to time it under that name")
    assert "backend 'triton' runs" in run.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "3x4"], "shape '3x4' is not BxHxT"),
        (["--shapes", "3x0x4"], "has a size below 1"),
        (["--depths", "0"], "depths must be at least 1"),
        (["--repeats", "0"], "0 is not positive"),
        (["--backend", "cudnn"], "invalid choice: 'cudnn'"),
        (["--variants", "--backend", "generic"], "--variants times the op's variants"),
    ],
)
def test_speed_rejects_bad_arguments(argv, message, monkeypatch, capsys):
    speed = load("speed", monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        speed.parse_args(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("speed.py: error:") and message in error


def test_gpu_check_rejects_bad_arguments(monkeypatch, capsys):
    gpu_check = load("gpu_check", monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for argv, message in (
        (["--dtypes", "fp64"], "unknown dtype 'fp64'"),
        ([], "TRITON_INTERPRET=1 is set"),
    ):
        with pytest.raises(SystemExit) as exit_:
            gpu_check.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_gpu_sh_rejects_an_unknown_option():
    run = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--fast"],
        cwd=REPO,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert (
        run.stderr.strip()
        == "usage: bash benchmarks/gpu.sh [--quick | --regularisers | --dry-run] [--quick-tune]"
    )


def test_tuning_takes_the_fastest_correct_configuration(tmp_path, monkeypatch):
    """tune_triton.best: the least sum of time ratios in the mode the op runs at that size (CUDA
    graphs up to the limit, else direct launches), never a configuration that failed its check;
    tuned(): that configuration at the tuned (B, H), pick_config's own elsewhere."""
    pytest.importorskip("triton")
    import torch

    tune = load("tune_triton", monkeypatch)

    from test_triton_configs import measured_row as row

    fused = row([32, 16, 32, 4, None, False], (10.0, 20.0), (10.0, 20.0))
    cublas = row([32, 32, 32, 4, None, True], (9.0, 15.0), (30.0, 40.0))
    broken = {"config": "broken", "fields": [16, 16, 32, 4, None, False], "error": "wrong"}
    small = {"dtype": "bf16", "B": 32, "H": 256, "T": 50, "rows": [fused, broken, cublas]}
    large = {"dtype": "bf16", "B": 1024, "H": 1024, "T": 50, "rows": [fused, broken, cublas]}
    assert tune.best(small) == (32, 32, 32, 4, None, True)  # in graphs: cuBLAS
    assert tune.best(large) == (32, 16, 32, 4, None, False)  # launched directly: fused
    assert tune.best({**small, "rows": [broken]}) is None

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"machine": "m", "results": [small, {**small, "dtype": "fp16"}]}))
    loop = tune.triton_loop()
    untuned = loop.pick_config(64, 256, None, torch.bfloat16, True)
    with tune.tuned(str(path), "bfloat16") as labels:
        cfg = loop.pick_config(32, 256, None, torch.bfloat16, True)
        assert (cfg.block_b, cfg.block_h, cfg.block_k, cfg.cublas_gemms) == (32, 32, 32, True)
        assert loop.pick_config(64, 256, None, torch.bfloat16, True) == untuned
    assert labels == {(32, 256): "32x32x32 w4 cuBLAS"}
    assert loop.pick_config(64, 256, None, torch.bfloat16, True) == untuned  # restored


def fake_sweep(spec, directory, overrides, workers, threads):
    """What ``nestrnn sweep`` leaves (the shared layout: ``trials/NNNN-seedS/`` run directories
    with the trial's sampled values), trained here in-process: random trials, or the grid of
    one-value choices."""
    import math
    import random

    import yaml

    from nestrnn.config import load_config
    from nestrnn.engine.trainer import Trainer
    from nestrnn.sweep.spec import load_spec

    # what the real command would check first: the spec and overrides quality.py gives it
    written = directory.with_name(directory.name + ".yaml")
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    load_spec(written, list(overrides))
    rng = random.Random(0)
    fixed = [f"{key}={value}" for key, value in spec["overrides"].items()]
    for trial in range(spec.get("trials", 1)):
        sampled = []
        for key, dist in spec["space"].items():
            if "choice" in dist:
                value = dist["choice"][0]
            else:
                low, high = dist["float"]
                value = (
                    math.exp(rng.uniform(math.log(low), math.log(high)))
                    if dist.get("log")
                    else rng.uniform(low, high)
                )
            sampled.append(f"{key}={value}")
        for seed in spec["seeds"]:
            config = load_config(
                [], [*fixed, *overrides, *sampled, f"train.seed={seed}", f"train.threads={threads}"]
            )
            Trainer(config, directory / "trials" / f"{trial:04d}-seed{seed}", echo=None).fit()


def test_quality_quick_tunes_measures_and_compares(tmp_path, monkeypatch):
    """``quality.py --quick``: every model tuned with the same budget, re-run over seeds and
    compared with the stacked LSTM as baseline. The sweep step trains in this process (twelve
    ``nestrnn train`` processes would take minutes; tests/test_sweep.py runs the real command)."""
    pytest.importorskip("scipy")
    quality = load("quality", monkeypatch)
    monkeypatch.setattr(quality, "run_sweep", fake_sweep)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the king is dead. long live the queen.\n" * 60)
    argv = [
        "text_file",
        f"task.path={corpus}",
        "--quick",
        "--out-dir",
        str(tmp_path / "results"),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    assert quality.main(argv) == 0
    record = json.loads((tmp_path / "results" / "quality_text_file.json").read_text())
    rows = record["results"]
    assert [r["model"] for r in rows] == ["nlstm", "stacked_lstm", "lstm"]
    assert [r["baseline"] for r in rows] == [False, True, False]
    assert all(r["n"] == 2 and r["test"] in ("paired", None) for r in rows)  # seeds 0, 1 pair
    assert all(set(r["tuned"]) == {"optim.lr", "model.dropout"} for r in rows)
    assert max(r["params"] for r in rows) / min(r["params"] for r in rows) < 1.25
    assert record["metric"] == "bpc" and record["split"] == "test"
    assert {"commit", "dirty", "machine", "command", "date"} <= set(record["meta"])
    assert record["meta"]["command"].startswith("python benchmarks/quality.py text_file")
    table = (tmp_path / "results" / "quality_text_file.md").read_text()
    assert table.count("\n| ") == 4  # header and one row per model
    tuning = list((tmp_path / "runs" / "tune" / "nlstm" / "trials").iterdir())
    assert sorted(p.name for p in tuning) == ["0000-seed0", "0001-seed0"]  # the same budget each


def test_the_docs_tables_are_the_result_files() -> None:
    """Every table of measured figures in the docs is what benchmarks/tables.py renders from
    benchmarks/results/*.json: a figure edited by hand, or a result file re-measured without
    re-rendering, fails here."""
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "tables.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_result_file_has_the_common_meta() -> None:
    """One schema for every result file the benchmark scripts write (bench_common.write_result)."""
    keys = {"commit", "dirty", "machine", "torch", "python", "command", "date"}
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        if path.name.startswith(("tune_triton", "quality_")):  # their scripts' own layouts
            continue
        data = json.loads(path.read_text())
        assert data["schema"] == 1 and isinstance(data["rows"], list), path.name
        assert keys <= set(data["meta"]), path.name
        assert {"cpu", "cores", "gpu"} <= set(data["meta"]["machine"]), path.name
