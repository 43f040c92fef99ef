"""Fuzzing the user-facing inputs: config overrides, command-line arguments and data files.

Whatever the input, a command either works or ends in a clear one-line error: exit status 2 and a
single ``nestrnn <cmd>: error: ...`` line on stderr (argparse adds its usage line before it), never
a traceback, and never a changed or lost file. Everything runs in-process through
``nestrnn.cli.main``.
"""

from __future__ import annotations

import gzip
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from helpers_tasks import assert_one_line_error, main_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nestrnn.cli import main
from nestrnn.config import ModelConfig, OptimConfig, TrainConfig, field_types

settings.register_profile(
    "fuzz",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
fuzz = settings(settings.get_profile("fuzz"), max_examples=settings().max_examples + 10)

KNOWN_KEYS = sorted(
    [f"model.{k}" for k in field_types(ModelConfig)]
    + [f"optim.{k}" for k in field_types(OptimConfig)]
    + [f"train.{k}" for k in field_types(TrainConfig)]
    + ["task.name", "task.length", "task.path", "task.data_dir", "task.valid_fraction"]
)
SPECIAL = [
    "",
    "null",
    "~",
    "true",
    "no",
    "[1, 2]",
    "{a: 1}",
    "{",
    "]",
    "'",
    '"',
    ".inf",
    "-.inf",
    ".nan",
    "1e999",
    "-1",
    "0",
    "0.5",
    "3",
    "abc",
    "${oops}",
    "${train.seed}",
    "x: y",
    "!!python/object:os.system",
    "&a",
    "*a",
    "%",
    "\x00",
    "é",
    "\\",
    "=",
    "1_000",
]
#: a tiny run: one optimizer step on a short adding problem, small evaluation sets
TINY = [
    "task.length=5",
    "task.valid_size=8",
    "task.test_size=8",
    "model.hidden_size=4",
    "train.batch_size=4",
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "train.max_steps=1",
    "train.progress=false",
]

keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.from_regex(r"[a-z_]{1,8}(\.[a-z_0-9]{1,8}){0,2}", fullmatch=True),
    st.text(max_size=12),
)
values = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
overrides = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, values), st.text(max_size=10)),
    max_size=4,
)
#: small values only, for overrides that really build and train a model
small_values = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(-3, 6).map(str),
    st.sampled_from(["0.0", "1e-9", "2.5", "-0.5", "1e3"]),
)
small_overrides = st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KNOWN_KEYS), small_values), max_size=3
)


# --------------------------------------------------------------------------- config overrides


@fuzz
@given(overrides)
def test_any_override_prints_a_config_or_one_error_line(capsys, items):
    code, _, err = main_cli(["train", "--print-config", *items], capsys)
    assert_one_line_error(code, err, "train")


@fuzz
@given(small_overrides)
def test_any_small_override_trains_or_fails_cleanly(capsys, items):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        argv = ["train", "--run-dir", str(run_dir), *TINY, *items]
        code, _, err = main_cli(argv, capsys)
        # 1: training diverged (a non-finite loss, e.g. with optim.lr=1e3): reported in one line
        assert_one_line_error(code, err, "train", ok=(0, 1))
        if code == 1:
            assert re.fullmatch(r"nestrnn train: the .* became .*\n", err), err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--run-dir", str(run_dir), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


@fuzz
@given(small_overrides)
def test_failed_resume_changes_no_file(capsys, finished_run, items):
    before = snapshot(finished_run)
    argv = ["train", "--resume", str(finished_run), "model.hidden_size=5", *items]
    code, _, err = main_cli(argv, capsys)  # the model cannot change: always an error
    assert code == 2
    assert_one_line_error(code, err, "train")
    assert snapshot(finished_run) == before


# --------------------------------------------------------------------------- command lines

TOKENS = [
    "train",
    "eval",
    "sample",
    "tasks",
    "--resume",
    "--run-dir",
    "-c",
    "--config",
    "--print-config",
    "--print-params",
    "--no-progress",
    "--nproc",
    "--backend",
    "--split",
    "--checkpoint",
    "--json",
    "--prime",
    "--length",
    "--temperature",
    "--seed",
    "auto",
    "best",
    "last",
    "test",
    "valid",
    "nccl",
    "gloo",
    "-1",
    "0",
    "2",
    "x=1",
    "=",
    "--",
    "-",
    "default",
    "ptb_char",
    "/nonexistent",
    ".",
    "--version",
    "-h",
]


@fuzz
@given(
    st.sampled_from(["train", "eval", "sample", "tasks"]),
    st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=8)), max_size=5),
)
def test_any_command_line_fails_cleanly(capsys, command, args):
    if command == "train" or "--resume" in args:
        args = [*args, "--print-config"]  # never start a real training run
    if "-h" in args or "--version" in args:
        return  # help and version exit 0 by design
    code, out, err = main_cli([command, *args], capsys)
    assert_one_line_error(code, err, command)


def test_bad_command_line_examples(capsys, tmp_path, finished_run):
    cases = [
        (["train", "--nproc", "0"], "--nproc must be at least 1"),
        (["train", "--resume", "auto"], "--resume auto"),
        (["train", "--resume", str(tmp_path)], "is not a run directory"),
        (["eval", str(tmp_path)], ""),
        (["train", "--resume", str(finished_run), "-c", "default"], "--resume takes"),
    ]
    for argv, message in cases:
        code, _, err = main_cli(argv, capsys)
        assert_one_line_error(code, err, argv[0])
        assert code == 2 and message in err


# --------------------------------------------------------------------------- data files


@fuzz
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_random_text_file(capsys, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.txt"
        path.write_bytes(data)
        argv = [
            "train",
            "--run-dir",
            str(Path(tmp) / "run"),
            "task.name=text_file",
            f"task.path={path}",
            "train.bptt=4",
            "train.batch_size=2",
            *[o for o in TINY if not o.startswith(("task.", "train.batch_size"))],
        ]
        code, _, err = main_cli(argv, capsys)
        assert_one_line_error(code, err, "train")
        assert path.read_bytes() == data


def _idx(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">I{len(shape)}I", magic, *shape) + payload


mnist_file = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda n, body: _idx(2051, (n, 28, 28), body), st.integers(0, 3), st.binary(max_size=64)
    ),
    st.builds(lambda n, body: _idx(2049, (n,), body), st.integers(0, 12), st.binary(max_size=12)),
    st.builds(lambda n: _idx(2051, (n, 28, 28), bytes(n * 784)), st.integers(0, 12)),
)


@fuzz
@given(
    st.lists(mnist_file, min_size=4, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4)
)
def test_random_idx_files(capsys, contents, zipped):
    names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mnist"
        folder.mkdir()
        for name, data, gz in zip(names, contents, zipped):
            (folder / (name + ".gz" if gz else name)).write_bytes(
                gzip.compress(data) if gz else data
            )
        before = snapshot(folder)
        argv = [
            "train",
            "--run-dir",
            str(Path(tmp) / "run"),
            "task.name=mnist_glimpses",
            f"task.data_dir={folder}",
            "task.download=false",
            "task.valid_size=1",
            "train.batch_size=1",
            "train.eval_batch_size=4",
            *[o for o in TINY if not o.startswith(("task.", "train.batch_size"))],
        ]
        code, _, err = main_cli(argv, capsys)
        assert_one_line_error(code, err, "train")
        assert snapshot(folder) == before


verse = st.text(alphabet="春风明月山水花", min_size=0, max_size=8)
quatrain = st.lists(verse, min_size=0, max_size=5).map("\t".join)
poem_file = st.one_of(
    st.binary(max_size=200),
    st.lists(quatrain, max_size=4).map(lambda lines: "\n".join(lines).encode()),
    st.lists(
        st.sampled_from(["春 风 明 月 山\t水 花 春 风 明\t月 山 水 花 春\t风 明 月 山 水"]),
        min_size=1,
        max_size=3,
    ).map(lambda lines: "\n".join(lines).encode()),
)


@fuzz
@given(st.lists(poem_file, min_size=3, max_size=3))
def test_random_quatrain_files(capsys, contents):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "poems"
        folder.mkdir()
        for name, data in zip(["qtrain", "qvalid", "qtest"], contents):
            (folder / name).write_bytes(data)
        before = snapshot(folder)
        argv = [
            "train",
            "--run-dir",
            str(Path(tmp) / "run"),
            "task.name=chinese_poems",
            f"task.data_dir={folder}",
            "train.bptt=4",
            "train.batch_size=1",
            "train.eval_batch_size=1",
            *[o for o in TINY if not o.startswith(("task.", "train.batch_size"))],
        ]
        code, _, err = main_cli(argv, capsys)
        assert_one_line_error(code, err, "train")
        assert snapshot(folder) == before


@fuzz
@given(st.binary(max_size=200), st.sampled_from(["last.pt", "best.pt", "config.yaml"]))
def test_corrupt_run_directory(capsys, finished_run, data, name):
    """A corrupt file in a run directory: eval and --resume fail cleanly and change nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        for path in finished_run.iterdir():
            (run_dir / path.name).write_bytes(path.read_bytes())
        (run_dir / name).write_bytes(data)
        before = snapshot(run_dir)
        for argv in (["eval", str(run_dir)], ["train", "--resume", str(run_dir)]):
            code, _, err = main_cli(argv, capsys)
            assert_one_line_error(code, err, argv[0])
        assert snapshot(run_dir) == before


# --------------------------------------------------------------------------- a real process


def test_bad_input_in_a_real_process(tmp_path):
    """The installed entry point: exit status 2 and exactly one line on stderr."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train: {batch_size: [\x00")
    for args in (["optim.lr=abc"], ["-c", str(bad)], ["--resume", str(tmp_path)], ["x"]):
        result = subprocess.run(
            [sys.executable, "-m", "nestrnn", "train", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().split("\n")
        assert lines[-1].startswith("nestrnn train: error: ") and "Traceback" not in result.stderr
        assert len(lines) == 1 or lines[0].startswith("usage: "), result.stderr
