"""The timescale statistics on signals with known answers, and recording cells per level."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from nestrnn import NestedLSTM, analysis
from nestrnn.config import ModelConfig
from nestrnn.models import TokenModel


def ar1(phi: float, steps: int = 20_000, series: int = 8, seed: int = 0) -> np.ndarray:
    """``x_t = phi x_{t-1} + e_t``, started from its stationary distribution."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((steps, series))
    x = np.empty_like(noise)
    x[0] = noise[0] / math.sqrt(1 - phi**2)
    for t in range(1, steps):
        x[t] = phi * x[t - 1] + noise[t]
    return x


# --------------------------------------------------------------------------- statistics


def test_slow_ar1_has_a_longer_timescale_than_white_noise() -> None:
    slow = analysis.timescale(ar1(0.9), "slow", max_lag=400)
    white = analysis.timescale(
        np.random.default_rng(1).standard_normal((20_000, 8)), "white", max_lag=400
    )
    assert slow.efold_lag > 5 * white.efold_lag
    assert slow.tau_int > 5 * white.tau_int
    assert slow.relative_change < white.relative_change
    assert slow.median_unit_efold > 5 * white.median_unit_efold


@pytest.mark.parametrize("phi", [0.5, 0.9, 0.97])
def test_ar1_timescales_match_theory(phi: float) -> None:
    row = analysis.timescale(ar1(phi), max_lag=1000)
    # integrated autocorrelation time (1 + phi) / (1 - phi); e-folding lag -1 / ln(phi)
    assert row.tau_int == pytest.approx((1 + phi) / (1 - phi), rel=0.2)
    # linear interpolation between integer lags overestimates a little at short lags
    assert row.efold_lag == pytest.approx(-1 / math.log(phi), rel=0.1, abs=0.15)
    assert not row.efold_censored
    # E|x_t - x_{t-1}| = sqrt(2/pi) * sd(x_t - x_{t-1}) = sqrt(2/pi) * sqrt(2 / (1 + phi))
    assert row.mean_abs_change == pytest.approx(
        math.sqrt(2 / math.pi) * math.sqrt(2 / (1 + phi)), rel=0.05
    )


def test_white_noise_timescales() -> None:
    row = analysis.timescale(np.random.default_rng(2).standard_normal((20_000, 4)))
    assert row.tau_int == pytest.approx(1.0, abs=0.2)
    # the ACF falls from 1 to ~0 at lag 1: crossing 1/e at 1 - 1/e
    assert row.efold_lag == pytest.approx(1 - 1 / math.e, abs=0.05)


def test_mean_abs_change_and_std_of_a_ramp() -> None:
    x = np.stack([0.5 * np.arange(100.0), -2.0 * np.arange(100.0)], axis=1)
    row = analysis.timescale(x)
    assert row.mean_abs_change == pytest.approx(1.25)
    assert row.std == pytest.approx((0.5 + 2.0) / 2 * np.arange(100.0).std())
    assert row.steps == 100 and row.series == 2


def test_detrending_separates_drift_from_memory() -> None:
    rng = np.random.default_rng(3)
    drift = 0.05 * np.arange(4000.0)[:, None] + rng.standard_normal((4000, 4))
    row = analysis.timescale(drift, max_lag=1000)
    assert row.efold_lag > 100  # the drift alone looks like a very long memory
    assert row.efold_lag_detrended == pytest.approx(1 - 1 / math.e, abs=0.1)
    assert row.tau_int_detrended == pytest.approx(1.0, abs=0.25)
    slow = analysis.timescale(ar1(0.9, 4000, 4), max_lag=1000)
    assert slow.efold_lag_detrended == pytest.approx(slow.efold_lag, rel=0.15)


def test_constant_series_are_left_out_of_the_acf() -> None:
    x = ar1(0.8, steps=2000, series=3)
    x[:, 1] = 3.0
    row = analysis.timescale(x, max_lag=100)
    assert row.constant_series == 1 and row.series == 3
    assert math.isfinite(row.tau_int)
    all_constant = analysis.timescale(np.ones((50, 2)))
    assert all_constant.constant_series == 2 and all_constant.efold_censored


def test_autocorrelation_estimator() -> None:
    t = np.arange(4000)
    x = np.sin(2 * np.pi * t / 40)[:, None]
    acf, keep = analysis.autocorrelation(x, max_lag=40)
    assert keep.all() and acf.shape == (41, 1)
    assert acf[0, 0] == pytest.approx(1.0)
    assert acf[20, 0] == pytest.approx(-1.0, abs=0.02)  # half a period: anti-correlated
    assert acf[40, 0] == pytest.approx(1.0, abs=0.02)


def test_efold_lag_interpolates_and_reports_censoring() -> None:
    lag, censored = analysis.efold_lag(np.array([1.0, 0.5, 0.2]))
    assert lag == pytest.approx(1 + (0.5 - 1 / math.e) / (0.5 - 0.2)) and not censored
    lag, _ = analysis.efold_lag(np.array([1.0, 0.0]))
    assert lag == pytest.approx(1 - 1 / math.e)
    lag, censored = analysis.efold_lag(np.array([1.0, 0.9, 0.8]))
    assert lag == 2.0 and censored


def test_integrated_time_of_an_exponential_acf() -> None:
    a = 0.8
    tau, window = analysis.integrated_time(a ** np.arange(500))
    assert tau == pytest.approx((1 + a) / (1 - a), rel=0.01)
    assert window >= 5 * tau * 0.99


def test_statistics_need_enough_steps() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        analysis.timescale(np.zeros((2, 3)))


# --------------------------------------------------------------------------- recording


def test_recording_a_nested_lstm_matches_the_whole_sequence() -> None:
    torch.manual_seed(0)
    rnn = NestedLSTM(5, 7, num_layers=2, depth=3, batch_first=True).eval()
    x = torch.randn(3, 12, 5)
    recording = analysis.record_cells(rnn, x)
    assert recording.kind == "nested"
    assert recording.cells.shape == (6, 12, 3, 7)
    assert recording.level_names() == [
        "L0 outer c0",
        "L0 inner c1",
        "L0 inner c2",
        "L1 outer c0",
        "L1 inner c1",
        "L1 inner c2",
    ]
    with torch.no_grad():
        out, (h, c) = rnn(x)
    # c: (depth, layers, B, H); recorded levels are layer by layer
    last = c.transpose(0, 1).reshape(6, 3, 7).numpy()
    np.testing.assert_allclose(recording.cells[:, -1], last, atol=1e-5)
    np.testing.assert_allclose(
        recording.hidden[-1, :, :, :], out.transpose(0, 1).numpy(), atol=1e-5
    )
    rows = analysis.timescales(recording)
    assert [r.name for r in rows] == recording.level_names()


def test_recording_stacked_lstm_layers() -> None:
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True)
    recording = analysis.record_cells(lstm, torch.randn(2, 9, 4))
    assert recording.kind == "stacked"
    assert recording.level_names() == ["layer 0 (lower)", "layer 1 (upper)"]
    assert recording.cells.shape == (2, 9, 2, 6)
    single = analysis.record_cells(torch.nn.LSTM(4, 6, batch_first=True), torch.randn(1, 5, 4))
    assert single.level_names() == ["cell"]


def test_recording_a_token_model_with_a_warm_state() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(family="nlstm", depth=2, backend="generic")
    model = TokenModel(cfg, vocab_in=11, n_out=11, hidden_size=8).eval()
    tokens = torch.randint(0, 11, (2, 30))
    state = analysis.warm_state(model, tokens[:, :10])
    recording = analysis.record_cells(model, tokens[:, 10:], state)
    with torch.no_grad():
        _, (_, c) = model(tokens, None)
    np.testing.assert_allclose(recording.cells[:, -1], c[:, 0].numpy(), atol=1e-5)
    assert recording.steps == 20
    units = analysis.pick_units(recording, 3)
    assert len(units) == 3 and units == sorted(units) and all(0 <= u < 8 for u in units)


def test_bidirectional_models_are_refused() -> None:
    rnn = NestedLSTM(3, 4, bidirectional=True, batch_first=True)
    with pytest.raises(ValueError, match="bidirectional"):
        analysis.record_cells(rnn, torch.randn(1, 4, 3))


def test_format_table_has_one_row_per_level() -> None:
    rows = [
        analysis.timescale(ar1(0.5, 500, 2), "outer c0"),
        analysis.timescale(ar1(0.9, 500, 2), "inner c1"),
    ]
    table = analysis.format_table(rows).splitlines()
    assert len(table) == 2 + 2
    assert "detrended e-fold" in table[0]
    assert table[2].startswith("outer c0") and table[3].startswith("inner c1")


def test_importing_nestrnn_and_the_commands_does_not_import_matplotlib() -> None:
    code = (
        "import sys, nestrnn, nestrnn.analysis, nestrnn.commands.viz, nestrnn.commands.plot\n"
        "from nestrnn.cli import build_parser\n"
        "build_parser()\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
