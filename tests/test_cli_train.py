"""The train / eval / sample / tasks commands. Each command runs at least once as a subprocess
(``python -m nestrnn.cli``, as a user runs it); the further calls of a test run in this process
(``main_cli``: the same ``main``, its exit status and output), which spares the seconds a fresh
interpreter spends importing torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from helpers_tasks import POEM_CHARS, TINY, main_cli, run_cli, write_poems, write_text

ADDING = [
    *TINY,
    "task.length=6",
    "task.valid_size=32",
    "task.test_size=32",
    "train.epochs=2",
    "train.steps_per_epoch=5",
    "train.batch_size=8",
]


def _ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _ok_here(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``nestrnn ARGV`` in this process; its stdout, after checking that it succeeded."""
    code, out, err = main_cli(argv, capsys)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def adding_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One adding-task run trained by ``nestrnn train`` in a subprocess, shared by the tests that
    only read it: (its directory, what the command printed)."""
    folder = tmp_path_factory.mktemp("adding")
    out = _ok(run_cli(["train", *ADDING, "--run-dir", "run"], folder))
    return folder / "run", out


def test_train_eval_and_resume(
    adding_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, out = adding_run
    assert "task adding" in out and "model nlstm (depth 2, 1 layer), hidden 8" in out
    assert "epoch 1/2 | train mse" in out and "epoch 2/2" in out
    assert "finished (completed)" in out and "test (best checkpoint): mse" in out
    assert {"config.yaml", "environment.json", "metrics.jsonl", "last.pt", "best.pt"} <= {
        p.name for p in run.iterdir()
    }

    evaluated = json.loads(_ok(run_cli(["eval", "run", "--split", "test", "--json"], run.parent)))
    summary = json.loads((run / "summary.json").read_text())
    assert evaluated["metrics"]["mse"] == pytest.approx(summary["test"]["mse"])
    assert "adding valid (best.pt" in _ok_here(["eval", str(run), "--split", "valid"], capsys)

    # stop after 3 steps, resume in a fresh process, and get the same records as the run above
    split = tmp_path / "split"
    stopped = _ok_here(["train", *ADDING, "train.max_steps=3", "--run-dir", str(split)], capsys)
    assert "finished (max steps)" in stopped and "--resume" in stopped
    _ok(run_cli(["train", "--resume", "split", "train.max_steps=0"], tmp_path))

    def records(run_dir: Path) -> list[dict]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] in ("train", "epoch")]

    assert records(split) == records(run)


def test_sample_from_a_text_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_text(tmp_path / "corpus.txt", repeats=10)
    lm = str(tmp_path / "lm")
    _ok_here(
        [
            "train",
            *TINY,
            "task.name=text_file",
            f"task.path={corpus}",
            "train.epochs=1",
            "train.steps_per_epoch=3",
            "train.batch_size=4",
            "train.bptt=8",
            "--run-dir",
            lm,
        ],
        capsys,
    )
    out = _ok_here(
        ["sample", lm, "--prime", "To be", "--length", "30", "--temperature", "0.5"], capsys
    )
    assert out.startswith("To be") and len(out.rstrip("\n")) >= 5
    greedy = ["sample", lm, "--prime", "To", "--length", "10", "--temperature", "0"]
    assert _ok(run_cli(greedy, tmp_path)) == _ok_here(greedy, capsys)  # here and in a fresh process
    code, _, err = main_cli(["sample", lm, "--prime", "Zebra"], capsys)
    assert code == 2 and "does not know" in err


@pytest.mark.slow
def test_sample_refuses_a_prime_a_vocabulary_with_unk_does_not_know(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The poems' vocabulary has <unk>; a prime symbol outside it is still an error, not <unk>."""
    data = write_poems(tmp_path / "poems")
    run = str(tmp_path / "poems-run")
    _ok_here(
        [
            "train",
            *TINY,
            "task.name=chinese_poems",
            f"task.data_dir={data}",
            "train.epochs=1",
            "train.steps_per_epoch=2",
            "train.batch_size=4",
            "train.bptt=8",
            "--run-dir",
            run,
        ],
        capsys,
    )
    known = POEM_CHARS[:3]
    assert _ok_here(["sample", run, "--prime", known, "--length", "5"], capsys)
    bad = run_cli(["sample", "poems-run", "--prime", known + "猫狗"], tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (
        "nestrnn sample: error: the text has symbols the model does not know: '狗', '猫'\n"
    )


def test_config_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(["train", "optim.lrr=0.1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "nestrnn train: error: unknown config key 'optim.lrr' (in the command line); "
        "did you mean 'optim.lr'?"
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = main_cli(["train", "train.epochs=many"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'train.epochs' must be an integer, got 'many'" in err
    code, _, err = main_cli(
        ["train", "task.name=ptb_char", "task.download=false", f"task.data_dir={tmp_path}"],
        capsys,
    )
    assert code == 2 and "ptb.char.train.txt is missing" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_print_config_and_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _ok(run_cli(["train", "--print-config", "model.family=lstm"], tmp_path))
    assert "family: lstm" in out and "# " in out
    (tmp_path / "printed.yaml").write_text(out)
    monkeypatch.chdir(tmp_path)
    again = _ok_here(["train", "-c", "printed.yaml", "--print-config"], capsys)
    assert again == out
    table = _ok_here(["train", "--print-params", "model.target_params=20000"], capsys)
    assert "nlstm" in table and "stacked_lstm" in table and "<- this run" in table
    assert not (tmp_path / "runs").exists()


def test_tasks_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _ok(run_cli(["tasks"], tmp_path))
    for name in (
        "ptb_char",
        "text8",
        "chinese_poems",
        "mnist_glimpses",
        "text_file",
        "copy_memory",
        "adding",
    ):
        assert name in out
    data = json.loads(_ok_here(["tasks", "--json"], capsys))
    mnist = next(t for t in data["tasks"] if t["name"] == "mnist_glimpses")
    assert mnist["primary_metric"] == "error"
    assert {"name": "glimpse_size", "default": 7}.items() <= next(
        o for o in mnist["options"] if o["name"] == "glimpse_size"
    ).items()


def test_sample_refuses_a_non_language_model(
    adding_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = main_cli(["sample", str(adding_run[0])], capsys)
    assert code == 2 and "not a language model" in err


@pytest.fixture
def counting_server():
    """An HTTP server on 127.0.0.1 that answers 404 to everything and counts the requests."""
    import http.server
    import threading

    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    server.shutdown()
    server.server_close()


SHIPPED_CONFIGS = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_print_params_needs_no_data(
    config: str,
    tmp_path: Path,
    counting_server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--print-params sizes the models without the data: no download, no file written (nestrnn
    reads these variables when it needs them, so this process can run the command)."""
    url, requests = counting_server
    data, home = tmp_path / "data", tmp_path / "home"
    data.mkdir()
    home.mkdir()
    env = {"NESTRNN_DATA_DIR": str(data), "HOME": str(home), "NESTRNN_CACHE_DIR": str(home / "c")}
    env |= {f"NESTRNN_{name}_URL": url for name in ("PTB", "TEXT8", "MNIST")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    table = _ok_here(["train", "-c", config, "--print-params"], capsys)
    assert "nlstm" in table and "stacked_lstm" in table and "<- this run" in table
    assert requests == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "home"]
