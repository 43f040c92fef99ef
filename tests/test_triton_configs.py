"""The Triton kernels' launch configurations: the table they are read from gives exactly the
choices that were measured (the if-chain the table replaced, kept below as the reference), and
``benchmarks/tune_triton.py --write`` rewrites it from measurements.

None of this launches a kernel: choosing a configuration needs neither a GPU nor Triton.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from nestrnn.ops.nested_lstm import triton_configs

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BATCHES = (1, 3, 15, 16, 17, 31, 32, 33, 48, 64, 65, 100, 128, 255, 256, 1024, 4096)
HIDDENS = (1, 3, 8, 15, 16, 17, 31, 32, 33, 64, 100, 256, 512, 768, 1000, 1024, 2048, 4096, 8192)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def reference_blocks(batch: int, hidden: int, dtype: torch.dtype, graphed: bool) -> tuple:
    """The GPU choice as code chose it before the table: (block_b, block_h, block_k, num_warps,
    num_stages, cublas_gemms)."""
    small = max(16, _pow2(hidden))
    block_b = min(max(16, _pow2(batch)), 64)
    if dtype == torch.float32:
        chosen = (16, 16, 64, 4, None) if batch <= 32 else (32, 32, 32, 4, None)
        cublas = graphed or batch * hidden >= 128 * 1024
    elif block_b == 16:
        chosen, cublas = (16, 16, 64, 4, 4), graphed
    elif block_b == 32:
        chosen, cublas = (32, 16, 32, 4, None), graphed
    elif graphed:
        chosen, cublas = (32, 32, 32, 4, None), True
    elif batch * hidden >= 256 * 1024:
        chosen, cublas = (64, 32, 128, 8, None), False
    else:
        chosen, cublas = (64, 16, 64, 4, None), False
    block_b, block_h, block_k, num_warps, num_stages = chosen
    return block_b, min(block_h, small), min(block_k, small), num_warps, num_stages, cublas


def fields(cfg) -> tuple:
    return (cfg.block_b, cfg.block_h, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.cublas_gemms)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_table_gives_the_measured_choices_on_a_gpu(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's choice, not the interpreter's
    for batch in BATCHES:
        for hidden in HIDDENS:
            for graphed in (False, True):
                got = fields(triton_configs.pick_config(batch, hidden, None, dtype, graphed))
                assert got == reference_blocks(batch, hidden, dtype, graphed), (
                    batch,
                    hidden,
                    graphed,
                )


# ------------------------------------------------------------------ tune_triton.py --write

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def tune(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return importlib.import_module("tune_triton")


def measured_row(fields, graph, direct):
    """One configuration's line of a tuned shape, as tune_triton.py records it."""
    return {
        "config": str(fields),
        "fields": fields,
        "fwd_graph": graph[0],
        "fwd+bwd_graph": graph[1],
        "fwd_direct": direct[0],
        "fwd+bwd_direct": direct[1],
    }


def test_rewriting_the_table_without_measurements_keeps_every_choice(tune, tmp_path):
    path = tmp_path / "table.json"
    tune.write_table([], str(path), "a test machine")  # no such file yet: starts from the op's
    assert triton_configs.load_table(path) == triton_configs.load_table()
    for dtype in DTYPES:
        for batch in (1, 16, 17, 32, 33, 256, 4096):
            for hidden in (1, 17, 256, 1024, 8192):
                for graphed in (False, True):
                    got = triton_configs.measured_blocks(batch, hidden, dtype, graphed, path)
                    assert got == reference_blocks(batch, hidden, dtype, graphed)
    assert json.loads(path.read_text())["note"].startswith("Written by benchmarks/tune_triton.py")


def test_the_table_takes_the_fastest_measured_configuration(tune, tmp_path):
    """Fabricated measurements at one shape: the fastest correct configuration of each mode
    becomes that shape's row; every other shape keeps its choice; a later run at another shape
    keeps the first one's rows."""
    fused = measured_row([32, 16, 32, 4, None, False], (10.0, 20.0), (10.0, 20.0))
    cublas = measured_row([64, 64, 32, 8, None, True], (9.0, 15.0), (30.0, 40.0))
    broken = {"config": "broken", "fields": [16, 16, 16, 4, None, True], "error": "wrong"}
    shape = {"dtype": "bf16", "B": 32, "H": 256, "T": 50, "rows": [fused, broken, cublas]}
    path = tmp_path / "table.json"
    tune.write_table([shape], str(path), "m")

    def blocks(batch, hidden, dtype=torch.bfloat16, graphed=True):
        return triton_configs.measured_blocks(batch, hidden, dtype, graphed, path)

    assert blocks(32, 256) == (64, 64, 32, 8, None, True)  # in graphs: cuBLAS's
    assert blocks(32, 256, graphed=False) == (32, 16, 32, 4, None, False)  # directly: fused
    for other in ((32, 256, torch.float16), (31, 256, torch.bfloat16), (32, 512, torch.bfloat16)):
        for graphed in (False, True):
            assert blocks(*other, graphed) == reference_blocks(*other, graphed)

    later = {**shape, "B": 128, "rows": [cublas, fused]}
    tune.write_table([later], str(path), "m")
    assert blocks(32, 256) == (64, 64, 32, 8, None, True)  # kept
    assert blocks(128, 256, graphed=False) == (32, 16, 32, 4, None, False)
    assert json.loads(path.read_text())["note"].count("Written by") == 2


def test_a_table_row_with_an_unknown_condition_is_refused(tmp_path):
    cfg = triton_configs.TritonConfig(16, 16, 16, 4, None, None, False)
    with pytest.raises(ValueError, match="unknown condition"):
        triton_configs.write_table([({"depth": 2}, cfg), ({}, cfg)], tmp_path / "t.json")
    with pytest.raises(ValueError, match="last row"):
        triton_configs.write_table([({"max_batch": 2}, cfg)], tmp_path / "t.json")
