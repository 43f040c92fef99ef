"""Launch configurations of the Triton kernels: which blocks, warps, pipelining depth and GEMM
choice a call runs with.

On a GPU the choice is read from a table, ``triton_configs.json`` beside this module, written by
``benchmarks/tune_triton.py --write`` from its measurements: a list of rows, the first whose
conditions all hold gives the configuration. A row is ``{"when": {...}, "config": {...}}``;
conditions (each optional): ``dtypes`` (torch dtype names), ``min_batch``/``max_batch``,
``min_hidden``/``max_hidden``, ``min_batch_hidden``/``max_batch_hidden`` (on B * H), ``graphed``
(the step loop runs in a CUDA graph, or is launched directly). ``config`` has every field of
:class:`TritonConfig` but the graph setting. The table ends with a row without conditions.

Under the interpreter (``TRITON_INTERPRET=1``), where each program and loop iteration costs Python
time, blocks are made as large as allowed instead.

This module imports neither Triton nor a kernel: choosing a configuration needs neither.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

__all__ = [
    "TABLE_PATH",
    "TritonConfig",
    "cuda_graph_setting",
    "load_table",
    "pick_config",
    "whole_rows",
]

TABLE_PATH = Path(__file__).with_name("triton_configs.json")
#: the fields a table row's ``config`` gives, in TritonConfig's order
CONFIG_FIELDS = ("block_b", "block_h", "block_k", "num_warps", "num_stages", "cublas_gemms")
#: the conditions a table row's ``when`` may hold
CONDITIONS = (
    "dtypes",
    "min_batch",
    "max_batch",
    "min_hidden",
    "max_hidden",
    "min_batch_hidden",
    "max_batch_hidden",
    "graphed",
)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the kernels. ``None`` fields are chosen by ``pick_config``."""

    block_b: int | None = None  # batch rows per program (power of two; >= 16 on a GPU)
    block_h: int | None = None  # hidden units per program, all four gates of each (power of two)
    block_k: int | None = None  # reduction chunk of the per-step GEMMs (power of two)
    num_warps: int | None = None  # warps per program
    cuda_graph: bool | None = None  # step loops as CUDA graphs (None: the env variable, else auto)
    num_stages: int | None = None  # software-pipelining depth of the K loops (None: Triton's)
    cublas_gemms: bool | None = None  # per-step GEMMs by cuBLAS, the kernels doing the rest


def pow2(n: int) -> int:
    """``n`` rounded up to a power of two (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def pick_config(
    batch: int,
    hidden: int,
    config: TritonConfig | None = None,
    dtype: torch.dtype = torch.float32,
    graphed: bool = False,
) -> TritonConfig:
    """Fill in ``config``'s unset fields for a call with ``batch`` rows, ``hidden`` units and
    operands in ``dtype``, for a step loop run in a CUDA graph (``graphed``) or launched directly
    (no autotuning: it fails in the interpreter).

    On a GPU from the measured table (``measured_blocks``); under the interpreter blocks are made
    as large as allowed. ``config`` is what a caller fixes (benchmarks/tune_triton.py, tests).
    """
    cfg = config or TritonConfig()
    if interpreting():
        size = min(max(16, pow2(hidden)), 64)
        block_b = _batch_block(batch)
        chosen = (block_b, size, size, 4 if block_b * size <= 512 else 8, None, False)
    else:
        chosen = measured_blocks(batch, hidden, dtype, graphed)
    given = (cfg.block_b, cfg.block_h, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.cublas_gemms)
    block_b, block_h, block_k, num_warps, num_stages, cublas = cast(
        Any, (mine if mine is not None else default for mine, default in zip(given, chosen))
    )
    for name, value in (("block_b", block_b), ("block_h", block_h), ("block_k", block_k)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"TritonConfig.{name} must be a power of two, got {value}")
    cuda_graph = cfg.cuda_graph if cfg.cuda_graph is not None else cuda_graph_setting()
    return TritonConfig(block_b, block_h, block_k, num_warps, cuda_graph, num_stages, cublas)


def whole_rows(cfg: TritonConfig, hidden: int) -> TritonConfig:
    """The configuration of a call with layer normalisation, from ``pick_config``'s: each program
    holds whole rows (``block_h`` covers H) so that the kernels reduce a row's mean and variance
    in registers.

    On a GPU the step GEMMs go to cuBLAS (a whole-row ``tl.dot`` tile would not fit), which frees
    ``block_b`` from ``tl.dot``'s minimum of 16: a program takes one row, with a warp per 64 units
    (4 to 16). Of 1, 2, 4 and 8 rows a program with 4 or 8 warps, that was the fastest training
    step on an H200 at (B, H) = (32, 256) and (128, 512), float32 and bfloat16
    (benchmarks/README.md). Under the interpreter only ``block_h`` changes.
    """
    block_h = max(16, pow2(hidden))
    if interpreting():
        return replace(cfg, block_h=block_h)
    num_warps = max(4, min(16, block_h // 64))
    return replace(cfg, block_b=1, block_h=block_h, num_warps=num_warps, cublas_gemms=True)


def _batch_block(batch: int) -> int:
    """Rows a program: the batch rounded up to a power of two, from 16 (tl.dot) to 64."""
    return min(max(16, pow2(batch)), 64)


def measured_blocks(
    batch: int, hidden: int, dtype: torch.dtype, graphed: bool, table: Path = TABLE_PATH
) -> tuple:
    """(block_b, block_h, block_k, num_warps, num_stages, cublas_gemms) on a GPU: the first row of
    ``table`` that matches, its blocks no wider than the hidden size needs (``tl.dot`` needs every
    block dimension >= 16)."""
    small = max(16, pow2(hidden))
    for when, config in load_table(table):
        if _matches(when, batch, hidden, dtype, graphed):
            block_b, block_h, block_k, num_warps, num_stages, cublas = config
            return block_b, min(block_h, small), min(block_k, small), num_warps, num_stages, cublas
    raise LookupError(f"{table} has no row for B={batch} H={hidden} {dtype}")


def _matches(when: dict, batch: int, hidden: int, dtype: torch.dtype, graphed: bool) -> bool:
    size = batch * hidden
    name = str(dtype).removeprefix("torch.")
    return (
        name in when.get("dtypes", (name,))
        and when.get("min_batch", batch) <= batch <= when.get("max_batch", batch)
        and when.get("min_hidden", hidden) <= hidden <= when.get("max_hidden", hidden)
        and when.get("min_batch_hidden", size) <= size <= when.get("max_batch_hidden", size)
        and when.get("graphed", graphed) == graphed
    )


@functools.cache
def load_table(path: Path = TABLE_PATH) -> tuple[tuple[dict, tuple], ...]:
    """The rows of a table file as (conditions, config fields in ``CONFIG_FIELDS`` order)."""
    rows = json.loads(Path(path).read_text())["rows"]
    table = []
    for row in rows:
        unknown = set(row["when"]) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"{path}: unknown condition(s) {sorted(unknown)}")
        table.append((row["when"], tuple(row["config"][name] for name in CONFIG_FIELDS)))
    return tuple(table)


def write_table(rows: list[tuple[dict, TritonConfig]], path: Path, note: str = "") -> None:
    """Write ``rows`` ((conditions, configuration) in the order they are tried) as a table file;
    the last row must have no conditions, so that every call finds one."""
    if not rows or rows[-1][0]:
        raise ValueError("the last row of a launch-configuration table must have no conditions")
    for when, _ in rows:
        unknown = set(when) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"unknown condition(s) {sorted(unknown)}")
    document = {
        "note": note,
        "rows": [
            {"when": when, "config": {name: getattr(cfg, name) for name in CONFIG_FIELDS}}
            for when, cfg in rows
        ],
    }
    Path(path).write_text(json.dumps(document, indent=1) + "\n")
    load_table.cache_clear()  # a table read before in this process is read anew


_GRAPH_SETTINGS = {"1": True, "0": False, "auto": None, "": None}


def cuda_graph_setting() -> bool | None:
    """``NESTRNN_TRITON_CUDA_GRAPH``: True (always), False (never) or None (auto, the default)."""
    value = os.environ.get("NESTRNN_TRITON_CUDA_GRAPH", "auto").strip().lower()
    if value not in _GRAPH_SETTINGS:
        raise ValueError(f"NESTRNN_TRITON_CUDA_GRAPH must be 1, 0 or auto, got {value!r}")
    return _GRAPH_SETTINGS[value]
