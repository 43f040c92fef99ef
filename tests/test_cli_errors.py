"""Every user mistake is one line on stderr and exit status 2, before anything is written; nothing
a user gives is silently ignored; options and KEY=VALUE overrides come in any order.

The cases are those that once gave a traceback or did something else than what they said. All run
``nestrnn.cli.main`` in this process, next to two finished runs that must stay byte-identical.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_tasks import (
    TINY,
    assert_one_line_error,
    main_cli,
    snapshot,
    write_text,
)

from nestrnn.engine import resources

SHORT = [
    *TINY,
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=8",
    "train.device=cpu",
]
ADDING = ["task.length=6", "task.valid_size=16", "task.test_size=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder with two finished runs: ``adding`` and ``lm`` (a character language model)."""
    import torch

    from nestrnn.cli import main

    root = tmp_path_factory.mktemp("runs")
    corpus = write_text(root / "corpus.txt", repeats=10)
    threads = torch.get_num_threads()
    try:
        assert main(["train", *SHORT, *ADDING, "--run-dir", str(root / "adding")]) == 0
        assert (
            main(
                [
                    "train",
                    *TINY,
                    "task.name=text_file",
                    f"task.path={corpus}",
                    "train.epochs=1",
                    "train.steps_per_epoch=2",
                    "train.batch_size=4",
                    "train.bptt=8",
                    "--run-dir",
                    str(root / "lm"),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def unchanged(runs: Path):
    """The finished runs, checked to be byte-identical afterwards."""
    before = snapshot(runs)
    yield runs
    assert snapshot(runs) == before


def _error(argv: list[str], capsys) -> str:
    code, _, err = main_cli(argv, capsys)
    assert_one_line_error(code, err, argv[0])
    assert code == 2, err
    return err


TRAIN_ERRORS = [
    (["model.memory=nosuchmemory"], "unknown memory 'nosuchmemory'; known memory names"),
    (["model.memory=triton_nested"], "'triton_nested' (another name for 'nested', removed: use"),
    (["model.memory={name: nested, foo: 1}"], "invalid options for memory 'nested'"),
    (["model.depth=1000"], "'model.depth' must be at most 100"),
    (["model.memory={name: nested, depth: 1000}"], "nested too deeply to be built"),
    (["model.hidden_size=1000000000"], "needs at least 55.5 EiB of memory"),
    (["train.batch_size=1000000000"], "batch 1000000000 x 30 steps"),
    (["train.bptt=1000000000", "task.name=text_file", "task.path=corpus.txt"], "needs at least"),
    (["optim.lr=1e38"], "'optim.lr' must be in (0, 1000], got 1e+38"),
    (["optim.lr=.inf"], "'optim.lr' must be a finite number, got inf"),
    (["optim.momentum=1.5"], "'optim.momentum' must be in [0, 1)"),
    (["task.name=ptb_char", "task.data_dir=corpus.txt"], "corpus.txt is a file; point task"),
    (["task.name=text_file", "task.path=."], "task.path: . is a folder"),
    (["-c", "string.yaml"], "must hold a mapping of sections (task, model, optim, train), not the"),
    (["-c", "nosuchconfig"], "bundled configs: chinese_poems, default, mnist_glimpses"),
    (["--print-config", "--print-params"], "not allowed with argument --print-config"),
    (["--resume", "adding", "--run-dir", "elsewhere"], "leave out --run-dir elsewhere"),
    (["--resume", "auto", "--run-dir", "adding", "-c", "default"], "leave out -c"),
    (["--resume", "adding", "--overwrite"], "--overwrite starts a new run"),
    (["--resume", "adding", "model.hidden_size=9"], "model cannot change when resuming"),
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["train.device=foo"], "'train.device' must be auto, cpu, cuda, cuda:N or mps; got 'foo'"),
    (["train.device=mps"], "train.device=mps but MPS (Apple GPUs) is not available here"),
    (["train.device=cuda:7"], "train.device=cuda:7 but "),  # no CUDA, or fewer than 8 GPUs
    (["--nproc", "2", "train.device=mps"], "train.device=mps but MPS"),  # once, by the launcher
    (["train.seed=1180591620717411303424"], "'train.seed' must be in [0, 9223372036854775807]"),
    (["train.seed=-1"], "'train.seed' must be in [0, 9223372036854775807] (2**63 - 1), got -1"),
]


@pytest.mark.parametrize(
    ("argv", "message"), TRAIN_ERRORS, ids=[" ".join(a) for a, _ in TRAIN_ERRORS]
)
def test_train_mistakes(unchanged, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.chdir(unchanged)
    (unchanged / "string.yaml").write_text('"just a string"\n')
    try:
        where = [] if {"--run-dir", "--resume"} & set(argv) else ["--run-dir", "new"]
        err = _error(["train", *SHORT, *argv, *where], capsys)
    finally:
        (unchanged / "string.yaml").unlink()
    assert message in err
    assert not (unchanged / "new").exists() and not (unchanged / "runs").exists()


def test_a_model_too_large_for_this_machine(unchanged, monkeypatch, capsys) -> None:
    """hidden 30000 (3.6e9 parameters) needs more than 50 GiB: refused before anything is built
    or written, with the estimate and the limit (here 16 GiB of RAM)."""
    monkeypatch.setattr(resources, "available_bytes", lambda device: 16 << 30)
    monkeypatch.chdir(unchanged)
    err = _error(["train", *SHORT, "model.hidden_size=30000"], capsys)
    assert "needs at least 54.0 GiB of memory" in err and "but 16.0 GiB of RAM available" in err
    assert not (unchanged / "runs").exists()


def test_normal_runs_fit(monkeypatch) -> None:
    """The estimate stays a lower bound: the paper's PTB model on a laptop with 2 GiB free."""
    monkeypatch.setattr(resources, "available_bytes", lambda device: 2 << 30)
    import torch

    work = resources.Workload(6_000_000, "adam", 128, 100, 1000, 2)
    resources.check_fits(work, torch.device("cpu"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "adding", "--max-batches", "-1"], "--max-batches must be >= 0"),
        (["eval", "adding", "--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
        (["eval", "adding", "--checkpoint", "nothing.pt"], "no checkpoint at nothing.pt"),
        (["eval", "adding", "model.hidden_size=32"], "model.hidden_size: 8 -> 32"),
        (["eval", "adding", "task.name=copy_memory"], "task.name: 'adding' -> 'copy_memory'"),
        (["eval", "nowhere"], "no run directory nowhere"),
        (["sample", "lm", "--temperature", "nan"], "--temperature must be a finite number"),
        (["sample", "lm", "--length", "-3"], "--length must be >= 0"),
        (["sample", "lm", "--prime", "Zebra"], "symbols the model does not know: 'Z'"),
        (["sample", "adding"], "is not a language model"),
        (["viz", "lm", "--text", "QQ"], "symbols the model does not know: 'Q'"),
    ],
)
def test_eval_sample_viz_mistakes(unchanged, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.chdir(unchanged)
    assert message in _error(argv, capsys)


@pytest.mark.parametrize(
    ("edit", "change"),
    [
        (("family: nlstm", "family: lstm"), "model.family: 'nlstm' -> 'lstm'"),
        (("depth: 2", "depth: 3"), "model.depth: 2 -> 3"),
    ],
)
def test_an_edited_config_yaml_is_named(runs, tmp_path, capsys, edit, change) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs / "adding", run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(*edit))
    err = _error(["eval", str(run)], capsys)
    assert f"{config} (edited?) would change the model" in err and change in err


def test_overrides_and_options_in_any_order(unchanged, monkeypatch, capsys) -> None:
    monkeypatch.chdir(unchanged)
    argv = [
        "train",
        "train.epochs=3",
        "--no-progress",
        "train.steps_per_epoch=7",
        "--print-config",
        "optim.lr=0.01",
    ]
    code, out, err = main_cli(argv, capsys)
    assert code == 0, err
    assert "epochs: 3 " in out and "steps_per_epoch: 7 " in out and "lr: 0.01 " in out
    code, out, err = main_cli(
        ["eval", "adding", "--split", "valid", "model.backend=generic", "--json"], capsys
    )
    assert code == 0 and '"split": "valid"' in out, err


def test_a_reader_that_goes_away_ends_the_output_quietly() -> None:
    """`nestrnn tasks | head -0`: no traceback, the status of a process ended by SIGPIPE."""
    child = subprocess.Popen(
        [sys.executable, "-m", "nestrnn", "tasks"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()  # before the child has imported anything, let alone written
    _, stderr = child.communicate(timeout=120)
    assert stderr.decode() == ""
    assert child.returncode == 141
