"""The train / eval / sample / tasks commands, run as subprocesses (``python -m nestrnn.cli``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from helpers_tasks import POEM_CHARS, TINY, run_cli, write_poems, write_text

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


def test_train_eval_and_resume(tmp_path: Path) -> None:
    out = _ok(run_cli(["train", *ADDING, "--run-dir", "run"], tmp_path))
    assert "task adding" in out and "model nlstm (depth 2, 1 layer), hidden 8" in out
    assert "epoch 1/2 | train mse" in out and "epoch 2/2" in out
    assert "finished (completed)" in out and "test (best checkpoint): mse" in out
    run = tmp_path / "run"
    assert {"config.yaml", "environment.json", "metrics.jsonl", "last.pt", "best.pt"} <= {
        p.name for p in run.iterdir()
    }

    evaluated = json.loads(_ok(run_cli(["eval", "run", "--split", "test", "--json"], tmp_path)))
    summary = json.loads((run / "summary.json").read_text())
    assert evaluated["metrics"]["mse"] == pytest.approx(summary["test"]["mse"])
    assert "adding valid (best.pt" in _ok(run_cli(["eval", "run", "--split", "valid"], tmp_path))

    # stop after 3 steps, resume, and get the same records as the run above
    stopped = _ok(run_cli(["train", *ADDING, "train.max_steps=3", "--run-dir", "split"], tmp_path))
    assert "finished (max steps)" in stopped and "--resume" in stopped
    _ok(run_cli(["train", "--resume", "split", "train.max_steps=0"], tmp_path))

    def records(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] in ("train", "epoch")]

    assert records("split") == records("run")


def test_sample_from_a_text_run(tmp_path: Path) -> None:
    corpus = write_text(tmp_path / "corpus.txt", repeats=10)
    _ok(
        run_cli(
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
                "lm",
            ],
            tmp_path,
        )
    )
    out = _ok(
        run_cli(
            ["sample", "lm", "--prime", "To be", "--length", "30", "--temperature", "0.5"], tmp_path
        )
    )
    assert out.startswith("To be") and len(out.rstrip("\n")) >= 5
    greedy = ["sample", "lm", "--prime", "To", "--length", "10", "--temperature", "0"]
    assert _ok(run_cli(greedy, tmp_path)) == _ok(run_cli(greedy, tmp_path))
    bad = run_cli(["sample", "lm", "--prime", "Zebra"], tmp_path)
    assert bad.returncode == 2 and "does not know" in bad.stderr


@pytest.mark.slow
def test_sample_refuses_a_prime_a_vocabulary_with_unk_does_not_know(tmp_path: Path) -> None:
    """The poems' vocabulary has <unk>; a prime symbol outside it is still an error, not <unk>."""
    data = write_poems(tmp_path / "poems")
    _ok(
        run_cli(
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
                "poems-run",
            ],
            tmp_path,
        )
    )
    known = POEM_CHARS[:3]
    assert _ok(run_cli(["sample", "poems-run", "--prime", known, "--length", "5"], tmp_path))
    bad = run_cli(["sample", "poems-run", "--prime", known + "猫狗"], tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (
        "nestrnn sample: error: the text has symbols the model does not know: '狗', '猫'\n"
    )


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    result = run_cli(["train", "optim.lrr=0.1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "nestrnn train: error: unknown config key 'optim.lrr' (in the command line); "
        "did you mean 'optim.lr'?"
    )
    result = run_cli(["train", "train.epochs=many"], tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "'train.epochs' must be an integer, got 'many'" in result.stderr
    missing = run_cli(
        ["train", "task.name=ptb_char", "task.download=false", f"task.data_dir={tmp_path}"],
        tmp_path,
    )
    assert missing.returncode == 2 and "ptb.char.train.txt is missing" in missing.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_print_config_and_params(tmp_path: Path) -> None:
    out = _ok(run_cli(["train", "--print-config", "model.family=lstm"], tmp_path))
    assert "family: lstm" in out and "# " in out
    (tmp_path / "printed.yaml").write_text(out)
    again = _ok(run_cli(["train", "-c", "printed.yaml", "--print-config"], tmp_path))
    assert again == out
    table = _ok(run_cli(["train", "--print-params", "model.target_params=20000"], tmp_path))
    assert "nlstm" in table and "stacked_lstm" in table and "<- this run" in table
    assert not (tmp_path / "runs").exists()


def test_tasks_command(tmp_path: Path) -> None:
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
    data = json.loads(_ok(run_cli(["tasks", "--json"], tmp_path)))
    mnist = next(t for t in data["tasks"] if t["name"] == "mnist_glimpses")
    assert mnist["primary_metric"] == "error"
    assert {"name": "glimpse_size", "default": 7}.items() <= next(
        o for o in mnist["options"] if o["name"] == "glimpse_size"
    ).items()


def test_sample_refuses_a_non_language_model(tmp_path: Path) -> None:
    _ok(
        run_cli(
            ["train", *ADDING, "train.epochs=1", "train.test=false", "--run-dir", "run"], tmp_path
        )
    )
    result = run_cli(["sample", "run"], tmp_path)
    assert result.returncode == 2 and "not a language model" in result.stderr


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
def test_print_params_needs_no_data(config: str, tmp_path: Path, counting_server) -> None:
    """--print-params sizes the models without the data: no download, no file written."""
    url, requests = counting_server
    data, home = tmp_path / "data", tmp_path / "home"
    data.mkdir()
    home.mkdir()
    env = {"NESTRNN_DATA_DIR": str(data), "HOME": str(home), "NESTRNN_CACHE_DIR": str(home / "c")}
    env |= {f"NESTRNN_{name}_URL": url for name in ("PTB", "TEXT8", "MNIST")}
    table = _ok(run_cli(["train", "-c", config, "--print-params"], tmp_path, env=env))
    assert "nlstm" in table and "stacked_lstm" in table and "<- this run" in table
    assert requests == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "home"]
