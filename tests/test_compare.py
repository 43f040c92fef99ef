"""``nestrnn compare``: run directories found, grouped by configuration and compared over seeds.

One genuine run of ``nestrnn train`` (the adding task, 2 steps) supplies the files; the other
runs are copies of it with their seed, model family and results edited, as a sweep leaves them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nestrnn.cli import main
from nestrnn.compare import stats
from nestrnn.config import load_config
from nestrnn.engine.trainer import Trainer

scipy_stats = pytest.importorskip("scipy.stats")

FILES = ("config.yaml", "environment.json", "metrics.jsonl", "summary.json")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("compare") / "template"
    overrides = [
        "task.name=adding",
        "task.length=6",
        "task.valid_size=8",
        "task.test_size=8",
        "model.hidden_size=6",
        "train.batch_size=4",
        "train.epochs=2",
        "train.steps_per_epoch=1",
        "train.threads=1",
        "train.progress=false",
    ]
    Trainer(load_config([], overrides), run_dir, echo=None).fit()
    return run_dir


def make_run(
    template: Path,
    path: Path,
    seed: int,
    value: float,
    family: str = "nlstm",
    lr: str | None = None,
    wall: float = 3.0,
    device: str = "cpu",
) -> Path:
    """A copy of the template run with its seed, family, learning rate and results edited."""
    path.mkdir(parents=True)
    for name in FILES:
        shutil.copy(template / name, path / name)
    config = (path / "config.yaml").read_text()
    config = re.sub(r"(?m)^(  seed:) \d+", rf"\1 {seed}", config)
    config = re.sub(r"(?m)^(  family:) \w+", rf"\1 {family}", config)
    config = re.sub(r"(?m)^(  device:) \S+", rf"\1 {device}", config)
    if lr is not None:
        config = re.sub(r"(?m)^(  lr:) \S+", rf"\1 {lr}", config)
    (path / "config.yaml").write_text(config)
    summary = json.loads((path / "summary.json").read_text())
    summary["test"]["mse"] = value
    summary["valid"]["mse"] = value + 0.5
    summary["elapsed_s"] = wall
    (path / "summary.json").write_text(json.dumps(summary))
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record["event"] == "epoch":
            record["valid"]["mse"] = value + 1.0 / record["step"]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


NLSTM = {0: 0.50, 1: 0.55, 2: 0.47}
STACKED = {0: 0.60, 1: 0.58, 2: 0.66}
LSTM = {3: 0.70, 4: 0.61}


@pytest.fixture
def sweep(template: Path, tmp_path: Path) -> Path:
    """Three configurations (the last on other seeds), an unfinished and a stopped run."""
    root = tmp_path / "sweep" / "trials"
    for seed, value in NLSTM.items():
        make_run(template, root / f"0000-seed{seed}", seed, value, device=f"cpu{seed}")
    for seed, value in STACKED.items():
        make_run(template, root / f"0001-seed{seed}", seed, value, family="stacked_lstm")
    for seed, value in LSTM.items():
        make_run(template, root / f"0002-seed{seed}", seed, value, family="lstm")
    (make_run(template, root / "0003-seed0", 0, 0.1, lr="0.1") / "summary.json").unlink()
    stopped = make_run(template, root / "0004-seed0", 0, 0.1, lr="0.2")
    with (stopped / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"event": "stopped", "step": 3, "epoch": 2}) + "\n")
    (make_run(template, root / "0005-seed0", 0, 0.1, lr="0.3") / "summary.json").write_text("{")
    return tmp_path / "sweep"


def compare_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list, str]:
    assert main(["compare", *args, "--json"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_statistics_against_scipy_and_by_hand() -> None:
    summary = stats.describe([1.0, 2.0, 3.0, 4.0])
    assert summary.mean == 2.5 and summary.sd == pytest.approx(1.2909944)
    # by hand: t(0.975, 3) = 3.182446, half-width 3.182446 * 1.290994 / 2 = 2.054261
    assert summary.ci95 == pytest.approx((0.445739, 4.554261), abs=1e-6)
    assert stats.describe([5.0]) == stats.Summary(1, 5.0, None, None)
    # differences 1, 2, 2: t = 5 on 2 df, two-sided p = 1 - t / sqrt(t^2 + 2) by hand
    paired = stats.paired_t([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert paired.p_value == pytest.approx(1 - 5 / 27**0.5)
    a, b = [0.5, 0.55, 0.47, 0.52], [0.6, 0.58, 0.66]
    welch = scipy_stats.ttest_ind(a, b, equal_var=False).pvalue
    assert stats.welch_t(a, b).p_value == pytest.approx(welch)
    assert stats.compare_seeds([(0, 1.0), (1, 2.0)], [(1, 2.5), (0, 1.2)]).name == "paired"
    assert stats.compare_seeds([(0, 1.0), (1, 2.0)], [(0, 2.5), (2, 1.2)]).name == "welch"
    assert stats.compare_seeds([(0, 1.0), (0, 2.0)], [(0, 2.5), (0, 1.2)]).name == "welch"
    # undefined, not NaN: one pair, constant differences, no spread at all
    assert stats.paired_t([1.0], [2.0]).p_value is None
    assert stats.paired_t([1.0, 2.0], [0.0, 1.0]).p_value is None
    assert stats.welch_t([1.0, 1.0], [2.0, 2.0]).p_value is None


def test_groups_seeds_and_tests_against_the_baseline(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, err = compare_json(capsys, str(sweep))
    assert [r["label"] for r in rows] == [
        "model.family=nlstm",
        "model.family=stacked_lstm",
        "model.family=lstm",
    ]
    assert [r["n"] for r in rows] == [3, 3, 2]  # train.device differs: still one configuration
    nlstm, stacked, lstm = rows
    assert set(nlstm) >= {
        "label",
        "config",
        "runs",
        "n",
        "metric",
        "mean",
        "sd",
        "ci95",
        "baseline",
        "p_value",
        "wall_s_mean",
        "steps",
    }
    assert nlstm["config"] == {"model.family": "nlstm"} and nlstm["metric"] == "mse"
    assert nlstm["baseline"] and nlstm["p_value"] is None and nlstm["test"] is None
    described = scipy_stats.describe(list(NLSTM.values()))
    assert nlstm["mean"] == pytest.approx(described.mean)
    assert nlstm["sd"] == pytest.approx(described.variance**0.5)
    low, high = scipy_stats.t.interval(
        0.95, 2, described.mean, scipy_stats.sem(list(NLSTM.values()))
    )
    assert nlstm["ci95"] == pytest.approx([low, high])
    assert stacked["test"] == "paired"  # matched by train.seed
    expected = scipy_stats.ttest_rel([STACKED[s] for s in (0, 1, 2)], [NLSTM[s] for s in (0, 1, 2)])
    assert stacked["p_value"] == pytest.approx(expected.pvalue)
    assert lstm["test"] == "welch" and lstm["p_value"] is None  # seeds 3, 4 do not pair
    welch = scipy_stats.ttest_ind(list(LSTM.values()), list(NLSTM.values()), equal_var=False)
    assert lstm["welch_p_value"] == pytest.approx(welch.pvalue)
    assert nlstm["wall_s_mean"] == 3.0 and nlstm["steps"] == 2
    assert len(nlstm["runs"]) == 3 and nlstm["runs"][0].endswith("0000-seed0")
    # not finished: said on stderr, with the reason
    assert "0003-seed0: unfinished: no summary.json" in err
    assert "0004-seed0: stopped at step 3" in err
    assert "0005-seed0: unreadable: " in err and "is not a run summary" in err
    # another baseline, by label fragment or by path; another metric and split
    rows, _ = compare_json(capsys, str(sweep), "--baseline", "model.family=stacked_lstm")
    assert [r["baseline"] for r in rows] == [False, True, False]
    assert rows[0]["p_value"] == pytest.approx(expected.pvalue)
    rows, _ = compare_json(capsys, str(sweep), "--baseline", str(sweep / "trials" / "0002-seed4"))
    assert rows[2]["baseline"]
    rows, _ = compare_json(capsys, str(sweep), "--split", "valid", "--metric", "mse")
    assert rows[0]["mean"] == pytest.approx(described.mean + 0.5)


def test_text_and_markdown_tables(
    sweep: Path, template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["configuration", "n", "test"]
    assert "(paired)" in lines[2] and "(welch)" in lines[3] and "baseline" in lines[1]
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns
    assert main(["compare", str(sweep), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| configuration | n |") and out.count("\n| ") == 3
    single = make_run(template, tmp_path / "one", 0, 0.5)
    assert main(["compare", str(single)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "CI need 2+ seeds" in out
    assert re.search(r"model.family=nlstm\s+1\s+0.5000\s+-\s+-", out)


def test_plot_writes_learning_curves(sweep: Path, tmp_path: Path, capsys) -> None:
    from matplotlib.image import imread

    out = tmp_path / "figs" / "curves.png"
    assert main(["compare", str(sweep), "--plot", str(out)]) == 0
    height, width, _ = imread(out).shape
    assert width > 100 and height > 100
    assert f"wrote {out}" in capsys.readouterr().out
    svg = tmp_path / "curves.svg"
    assert main(["compare", str(sweep), "--json", "--plot", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "model.family=lstm" in svg.read_text()
    json.loads(capsys.readouterr().out)  # --json stays parseable with --plot


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["EMPTY"], "no run directories (with config.yaml) under"),
        (["MISSING"], "no "),
        (["SWEEP", "--metric", "bleu"], "unknown metric 'bleu'; the runs have: error, mse"),
        (["SWEEP", "--baseline", "model.family=gru"], "matches no configuration; they are:"),
        (["SWEEP", "--baseline", "model.family="], "matches 3 configurations"),
        (["SWEEP", "--plot", "x.gif"], "give a .png, .svg or .pdf file"),
    ],
)
def test_errors_are_one_line(sweep, tmp_path, capsys, args, message) -> None:
    (tmp_path / "empty").mkdir()
    paths = {
        "EMPTY": str(tmp_path / "empty"),
        "MISSING": str(tmp_path / "missing"),
        "SWEEP": str(sweep),
    }
    assert main(["compare", *(paths.get(a, a) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nestrnn compare: error: ") and message in err


def test_without_scipy_names_the_extra(sweep: Path) -> None:
    """The command line (all that ``nestrnn train`` loads) does not import scipy; compare without
    it is a one-line error naming the extra."""
    code = (
        "import sys; from nestrnn.cli import build_parser, main; build_parser(); "
        "assert 'scipy' not in sys.modules, 'the command line imported scipy'; "
        "sys.modules['scipy'] = None; sys.exit(main(sys.argv[1:]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "compare", str(sweep)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (
        "nestrnn compare: error: comparing runs needs scipy: pip install 'nestrnn[compare]' "
        "(or scipy>=1.10)"
    )
