"""``nestrnn viz`` and ``nestrnn plot`` on tiny runs trained here (benchmarks/quality.py:
tests/test_benchmarks.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread

from nestrnn import figures
from nestrnn.cli import main
from nestrnn.config import load_config
from nestrnn.engine.trainer import Trainer

WORDS = ["the", "king", "is", "dead", "long", "live", "queen", "and", "to", "be", "or", "not"]

TINY = [
    "model.hidden_size=12",
    "model.embedding_dim=6",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.batch_size=4",
    "train.bptt=16",
    "train.eval_batch_size=4",
    "train.eval_max_batches=2",
    "train.threads=1",
    "train.progress=false",
    "train.log_every=1",
]


def write_corpus(path: Path, chars: int = 6000) -> Path:
    rng = random.Random(0)
    lines = []
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train(run_dir: Path, overrides: list[str]) -> Path:
    Trainer(load_config([], [*TINY, *overrides]), run_dir, echo=None).fit()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("viz")
    corpus = write_corpus(root / "corpus.txt")
    text = ["task.name=text_file", f"task.path={corpus}"]
    return {
        "corpus": corpus,
        "nlstm": train(root / "nlstm", [*text, "model.family=nlstm", "model.depth=2"]),
        "stacked": train(root / "stacked", [*text, "model.family=stacked_lstm", "model.depth=2"]),
        "adding": train(
            root / "adding",
            [
                "task.name=adding",
                "task.length=12",
                "task.valid_size=16",
                "task.test_size=16",
                "model.family=nlstm",
                "model.depth=3",
            ],
        ),
    }


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, decoded."""
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image.shape[1], image.shape[0]


def test_viz_of_a_nested_lstm(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "figs"
    args = [
        str(runs["nlstm"]),
        "--length",
        "40",
        "--num-units",
        "3",
        "--warmup",
        "10",
        "--timescale-length",
        "60",
        "--streams",
        "2",
        "--out",
        str(out),
    ]
    assert main(["viz", *args]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith(("outer c0", "inner c1"))]
    assert len(table) == 2
    assert png_size(out / "cells.png") == figures.cells_size(3, 2, 40)
    assert png_size(out / "text.png") == figures.text_size(3, 2, 40)
    assert png_size(out / "heatmap.png") == figures.heatmap_size(2, 12, 40)
    assert png_size(out / "autocorrelation.png") == figures.acf_size()
    record = json.loads((out / "timescales.json").read_text(encoding="utf-8"))
    assert [level["name"] for level in record["levels"]] == ["outer c0", "inner c1"]
    assert record["kind"] == "nested" and record["family"] == "nlstm"
    assert record["steps"] == 60 and record["sequences"] == 2
    for level in record["levels"]:
        assert level["mean_abs_change"] >= 0 and level["tau_int"] > 0
        assert len(level["acf"]) == record["max_lag"] + 1
    assert len(record["plot"]["units"]) == 3 and len(record["plot"]["symbols"]) == 40


def test_viz_of_a_stacked_lstm_with_text_and_units(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "figs"
    text = "The king is dead.\nLong live the queen."
    args = [
        str(runs["stacked"]),
        "--text",
        text,
        "--units",
        "0,5,11",
        "--out",
        str(out),
        "--timescale-length",
        "50",
        "--warmup",
        "5",
    ]
    assert main(["viz", *args]) == 0
    assert png_size(out / "cells.png") == figures.cells_size(3, 2, len(text))
    record = json.loads((out / "timescales.json").read_text(encoding="utf-8"))
    assert [level["name"] for level in record["levels"]] == ["layer 0 (lower)", "layer 1 (upper)"]
    assert record["plot"]["units"] == [0, 5, 11]
    assert record["plot"]["symbols"].startswith("The␣king")


def test_viz_timescales_only(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ts"
    args = [str(runs["nlstm"]), "--timescales-only", "--timescale-length", "50", "--out", str(out)]
    assert main(["viz", *args]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["timescales.json"]


def test_viz_default_output_folder_and_a_non_language_task(runs: dict[str, Path]) -> None:
    assert main(["viz", str(runs["adding"]), "--num-units", "2", "--heat-units", "5"]) == 0
    out = runs["adding"] / "figures"
    assert not (out / "text.png").exists()
    assert png_size(out / "cells.png") == figures.cells_size(2, 3, 12)
    record = json.loads((out / "timescales.json").read_text(encoding="utf-8"))
    assert [level["name"] for level in record["levels"]] == ["outer c0", "inner c1", "inner c2"]


def test_viz_user_errors(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert main(["viz", str(runs["nlstm"]), "--units", "0,99", "--out", str(tmp_path)]) == 2
    assert "units 0..11" in capsys.readouterr().err
    assert main(["viz", str(runs["adding"]), "--text", "hello", "--out", str(tmp_path)]) == 2
    assert "language-model" in capsys.readouterr().err
    assert main(["viz", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def test_plot_overlays_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    assert main(["plot", str(runs["nlstm"]), str(runs["stacked"]), "--out", str(out)]) == 0
    assert png_size(out) == figures.curves_size(1)
    two = tmp_path / "two.png"
    args = [
        "plot",
        str(runs["nlstm"]),
        "--metric",
        "bpc,loss",
        "--smooth",
        "0.5",
        "--out",
        str(two),
    ]
    assert main(args) == 0
    assert png_size(two) == figures.curves_size(2)
    assert main(["plot", str(runs["nlstm"])]) == 0
    assert (runs["nlstm"] / "figures" / "curves.png").is_file()


def test_plot_user_errors(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert (
        main(["plot", str(runs["nlstm"]), "--metric", "accuracy", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "bpc" in capsys.readouterr().err  # names the metrics the run has
    assert main(["plot", str(tmp_path)]) == 2
