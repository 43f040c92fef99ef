"""The Triton kernels' launch configurations: the table they are read from gives exactly the
choices that were measured (the if-chain the table replaced, kept below as the reference), and
``benchmarks/tune_triton.py --write`` rewrites it from measurements.

None of this launches a kernel: choosing a configuration needs neither a GPU nor Triton.
"""

from __future__ import annotations

import pytest
import torch

from nestrnn.ops.nested_lstm import triton_loop as triton_configs

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
