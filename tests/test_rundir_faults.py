"""Run directories that cannot be tricked, corrupted or poisoned: files of a run that are links,
FIFOs or folders, flipped bits in checkpoints, damaged or hand-edited config.yaml, resume
overrides that cannot work, malformed metrics and summaries, and start-up faults.

Each case starts from a copy of one finished run (2 epochs of 3 steps, stopped at step 4: it has
``best.pt``, ``last.pt`` and a summary) and runs the command line as a user would.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_tasks import (
    REPO,
    TINY,
    assert_one_line_error,
    main_cli,
    run_cli,
    snapshot,
    train_steps,
    write_text,
)

from nestrnn.engine import rundir as rd

SHORT = [
    *TINY,
    "task.length=6",
    "task.valid_size=16",
    "task.test_size=16",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.batch_size=8",
]
LINK = "is a symbolic link, not a regular file"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    import torch

    from nestrnn.cli import main

    run = tmp_path_factory.mktemp("template") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", *SHORT, "train.max_steps=4", "--run-dir", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run"))


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _error(argv: list[str], capsys, command: str) -> str:
    code, _, err = main_cli(argv, capsys)
    assert_one_line_error(code, err, command, ok=())
    return err


# --------------------------------------------------------------------------- links, FIFOs, folders


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path: Path, capsys) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / rd.LOCK).symlink_to(victim)
    err = _error(["train", *SHORT, "--run-dir", str(run)], capsys, "train")
    assert f"{run / rd.LOCK} {LINK}" in err
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        (rd.METRICS, ["train", "--resume", "{run}", "train.max_steps=0"]),
        (rd.CONFIG, ["train", "--resume", "{run}", "train.max_steps=0"]),
        (rd.LAST, ["train", "--resume", "{run}", "train.max_steps=0"]),
        (rd.LAST + rd.SUM_SUFFIX, ["train", "--resume", "{run}", "train.max_steps=0"]),
        (rd.SUMMARY, ["train", "--resume", "{run}"]),
        (rd.BEST, ["eval", "{run}"]),
        (rd.METRICS, ["plot", "{run}", "--out", "{run}/../curves.png"]),
    ],
)
def test_no_file_of_a_run_is_followed_through_a_link(
    run: Path, tmp_path: Path, capsys, name: str, argv: list[str]
) -> None:
    """Each file replaced by a link to a copy outside the run: refused, the copy untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(run / name, outside / name)
    (run / name).symlink_to(outside / name)
    before = snapshot(outside)
    command = [arg.format(run=run) for arg in argv]
    err = _error(command, capsys, argv[0])
    assert f"{run / name} {LINK}" in err
    assert snapshot(outside) == before


def test_a_dangling_metrics_link_does_not_write_outside_the_run(
    run: Path, tmp_path: Path, capsys
) -> None:
    (run / rd.METRICS).unlink()
    (run / rd.METRICS).symlink_to(tmp_path / "elsewhere.jsonl")
    err = _error(["train", "--resume", str(run), "train.max_steps=0"], capsys, "train")
    assert f"{run / rd.METRICS} {LINK}" in err
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_a_fifo_or_a_folder_in_place_of_a_run_file(run: Path, capsys) -> None:
    (run / rd.METRICS).unlink()
    os.mkfifo(run / rd.METRICS)
    # a reader of a FIFO would wait forever for a writer: a process with a time limit
    result = run_cli(["plot", str(run), "--out", str(run.parent / "c.png")], run.parent)
    assert_one_line_error(result.returncode, result.stderr, "plot", ok=())
    assert f"{run / rd.METRICS} is a FIFO" in result.stderr
    (run / rd.METRICS).unlink()
    (run / rd.METRICS).mkdir()
    err = _error(["train", "--resume", str(run), "train.max_steps=0"], capsys, "train")
    assert f"{run / rd.METRICS} is a directory" in err
    (run / rd.LAST).unlink()
    (run / rd.LAST).mkdir()
    err = _error(["eval", str(run), "--checkpoint", "last"], capsys, "eval")
    assert f"{run / rd.LAST} is a directory" in err


# --------------------------------------------------------------------------- checksums


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        (rd.BEST, ["eval", "{run}"]),
        (rd.LAST, ["eval", "{run}", "--checkpoint", "last"]),
        (rd.LAST, ["train", "--resume", "{run}", "train.max_steps=0"]),
        (rd.BEST, ["viz", "{run}", "--timescales-only", "--timescale-length", "8"]),
    ],
)
def test_a_flipped_bit_in_a_checkpoint_is_refused(
    run: Path, capsys, name: str, argv: list[str]
) -> None:
    _flip_a_bit(run / name)
    before = snapshot(run)
    err = _error([arg.format(run=run) for arg in argv], capsys, argv[0])
    assert f"{run / name} is damaged: its sha256 does not match {name}.sha256" in err
    assert "restore it from a copy" in err
    assert snapshot(run) == before


def test_checkpoints_without_a_checksum_still_load(run: Path, capsys) -> None:
    """A run written before checkpoints had sums: it loads, resumes, and gains them."""
    for name in (rd.LAST, rd.BEST):
        (run / (name + rd.SUM_SUFFIX)).unlink()
    assert main_cli(["eval", str(run)], capsys)[0] == 0
    code, _, err = main_cli(["train", "--resume", str(run), "train.max_steps=0"], capsys)
    assert code == 0, err
    assert train_steps(run) == list(range(1, 7))
    assert (run / (rd.LAST + rd.SUM_SUFFIX)).read_text().count("\n") == 1
    assert main_cli(["eval", str(run), "--checkpoint", "last"], capsys)[0] == 0


def test_a_crash_while_a_checkpoint_is_replaced_does_not_block_the_resume(
    run: Path, capsys
) -> None:
    faults = REPO / "tests" / "faults.py"
    result = subprocess.run(
        [
            sys.executable,
            str(faults),
            "crash-in-checkpoint",
            "--",
            "train",
            "--resume",
            str(run),
            "train.max_steps=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 1 and "fault: exit while replacing" in result.stderr
    code, _, err = main_cli(["train", "--resume", str(run), "train.max_steps=0"], capsys)
    assert code == 0, err
    assert train_steps(run) == list(range(1, 7))


# --------------------------------------------------------------------------- resume configuration


def test_resume_keeps_the_checkpoints_configuration(run: Path, capsys) -> None:
    """A truncated config.yaml and a hand edit: the run continues as saved in last.pt; the
    edit is named in a warning, and config.yaml is written again whole."""
    config = run / rd.CONFIG
    whole = config.read_text()
    config.write_text(whole[: len(whole) // 3] + "\x00\x01garbage: [")
    code, _, err = main_cli(["train", "--resume", str(run), "train.max_steps=5"], capsys)
    assert code == 0, err
    assert "warning: " in err and "damaged" in err
    assert config.read_text() == whole.replace("max_steps: 4", "max_steps: 5")

    config.write_text(config.read_text().replace("epochs: 2", "epochs: 9"))
    code, _, err = main_cli(["train", "--resume", str(run), "train.max_steps=0"], capsys)
    assert code == 0, err
    assert "not applied: train.epochs=9" in err
    assert train_steps(run) == list(range(1, 7))  # 2 epochs, as saved


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=2", "train.batch_size cannot change"),
        ("optim.name=sgd", "optim.name cannot change"),
    ],
)
def test_an_override_that_cannot_resume_is_refused_before_anything_is_written(
    tmp_path: Path, capsys, override: str, message: str
) -> None:
    corpus = write_text(tmp_path / "corpus.txt", repeats=10)
    run = tmp_path / "lm"
    args = [
        *TINY,
        "task.name=text_file",
        f"task.path={corpus}",
        "train.epochs=1",
        "train.steps_per_epoch=4",
        "train.batch_size=4",
        "train.bptt=6",
    ]
    assert main_cli(["train", *args, "train.max_steps=2", "--run-dir", str(run)], capsys)[0] == 0
    before = snapshot(run)
    err = _error(["train", "--resume", str(run), "train.max_steps=0", override], capsys, "train")
    assert message in err
    assert snapshot(run) == before
    code, _, err = main_cli(["train", "--resume", str(run), "train.max_steps=0"], capsys)
    assert code == 0, err


def test_resume_auto_does_not_replace_a_hand_written_config(tmp_path: Path, capsys) -> None:
    run = tmp_path / "job"
    run.mkdir()
    (run / rd.CONFIG).write_text("train:\n  epochs: 1\n")
    err = _error(["train", *SHORT, "--resume", "auto", "--run-dir", str(run)], capsys, "train")
    assert f"-c {run / rd.CONFIG}" in err
    assert (run / rd.CONFIG).read_text() == "train:\n  epochs: 1\n"


def test_an_empty_resume_is_an_error(tmp_path: Path) -> None:
    result = run_cli(["train", *SHORT, "--resume", ""], tmp_path)
    assert_one_line_error(result.returncode, result.stderr, "train", ok=())
    assert "--resume needs a run directory" in result.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- default run directory


def _take_default(root: str, barrier, names) -> None:
    barrier.wait()
    names.put(str(rd.default_run_dir("adding", root)[0]))


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    barrier, names = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=_take_default, args=(str(tmp_path), barrier, names))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    taken = [names.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(60)
    assert len(set(taken)) == 4 and all(Path(name).is_dir() for name in taken)


# --------------------------------------------------------------------------- malformed records


@pytest.mark.parametrize(
    ("line", "fault"),
    [
        ("[1, 2]", "is not a JSON record"),
        ('{"event": "train", "step": "seven", "loss": 1.0}', 'has no "step" number'),
        ('{"step": 1, "loss": 1.0}', 'has no "event" name'),
        ('{"event": "epoch", "step": 3, "valid": [1]}', "has metrics that are not an object"),
    ],
)
def test_a_malformed_metrics_record_is_one_line(run: Path, capsys, line: str, fault: str) -> None:
    metrics = run / rd.METRICS
    metrics.write_text(line + "\n" + metrics.read_text())
    for argv in (
        ["plot", str(run), "--out", str(run.parent / "c.png")],
        ["train", "--resume", str(run), "train.max_steps=0"],
    ):
        err = _error(argv, capsys, argv[0])
        assert f"{metrics}, line 1 {fault}" in err


@pytest.mark.parametrize("text", ["[]", '"done"', "{torn"])
def test_a_malformed_summary_is_one_line(run: Path, capsys, text: str) -> None:
    (run / rd.SUMMARY).write_text(text)
    for argv in (
        ["plot", str(run), "--out", str(run.parent / "c.png")],
        ["train", "--resume", str(run)],
    ):
        err = _error(argv, capsys, argv[0])
        assert f"{run / rd.SUMMARY} is not a run summary" in err


# --------------------------------------------------------------------------- start-up faults


def test_a_full_disk_at_start_up_is_one_line(tmp_path: Path) -> None:
    limit = 200  # environment.json and config.yaml are larger
    result = subprocess.run(
        [sys.executable, "-m", "nestrnn", "train", *SHORT, "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert_one_line_error(result.returncode, result.stderr, "train", ok=())
    assert f"cannot write {tmp_path / 'run' / rd.ENVIRONMENT}: File too large" in result.stderr


def test_a_runs_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("not a folder\n")
    result = run_cli(["train", *SHORT], tmp_path)
    assert_one_line_error(result.returncode, result.stderr, "train", ok=())
    assert "cannot write runs" in result.stderr or "cannot create runs" in result.stderr
