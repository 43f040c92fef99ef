"""Compile every Triton kernel of the nested-LSTM op for a CUDA GPU offline (no GPU needed).

    python benchmarks/compile_check.py             # sm_90, every variant
    python benchmarks/compile_check.py --quick     # every kernel and branch, each dtype
    python benchmarks/compile_check.py --arch 80   # another architecture

Runs the real Triton compiler (Triton IR, LLVM, ptxas) on each kernel of
``nestrnn/ops/nested_lstm/triton_kernels.py`` in the variants the op launches: float32, float16 and
bfloat16 operands; depths 1-3; dense and packed+reverse; the paper's activations and two variants
that put every activation in every role; biased and bias-free nested levels; the launch configurations
``triton_loop.pick_config`` chooses at the shapes of ``gpu.sh``, for direct launches and CUDA
graphs; with and without zoneout (the cuBLAS variants); with layer normalisation at some levels
(``NORMS``, in the whole-row configurations ``triton_configs.whole_rows`` makes of those). This
catches what the interpreter
lets through (dot sizes below 16, mismatched branch types, constexpr arithmetic a Triton version
does not fold) without a GPU.

Prints one OK or FAIL line per compiled variant (FAIL with the compiler's message) and a summary.
Exit status: 0 all compiled, 1 some failed, 3 this Triton build cannot compile for CUDA offline
(a ``SETUP`` line says why). Imports triton, torch and the kernel modules only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be decorated for the real compiler

import torch
import triton
from bench_common import activation_variant, import_nestrnn

import_nestrnn()

from nestrnn.activations import activation_code  # noqa: E402
from nestrnn.ops.common.levels import LevelActivations, standard_activations  # noqa: E402
from nestrnn.ops.nested_lstm import triton_kernels  # noqa: E402
from nestrnn.ops.nested_lstm.triton_configs import whole_rows  # noqa: E402
from nestrnn.ops.nested_lstm.triton_loop import TritonConfig, pack_codes, pick_config  # noqa: E402

SETUP_FAILED = 3
DTYPES = ("fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: buffers that are float32 whatever the input dtype (see triton_kernels' module docstring)
FP32_BUFFERS = {
    "gates_ptr",
    "cells_ptr",
    "act_cells_ptr",
    "dA_ptr",
    "dh_ptr",
    "dc_ptr",
    "bias_ptr",
    "g_ptr",
    "ln_ptr",
    "nz_ptr",
    "nc_ptr",
    "rs_ptr",
    "dnz_ptr",
    "dnc_ptr",
}  # g_ptr: the cuBLAS GEMM's result, where torch gives it in float32; the rest LN's
#: (B, H) of the timed shapes of gpu.sh and of gpu_check.py's cases, for their block configurations
SHAPES = ((32, 256), (128, 1024), (256, 1024), (16, 768), (3, 17), (20, 200))


@dataclass(frozen=True)
class Variant:
    """One way the op launches its kernels."""

    dtype: str
    depth: int
    packed_reverse: bool
    activations: tuple[LevelActivations, ...]
    nested_bias: bool
    config: TritonConfig
    zoneout: bool = False
    norms: int = 0  # bit k: level k layer-normalised

    def common(self) -> dict:
        """Constexprs every kernel takes."""
        return dict(
            REVERSE=self.packed_reverse,
            HAS_BS=self.packed_reverse,
            BLOCK_B=self.config.block_b,
            BLOCK_H=self.config.block_h,
            BLOCK_K=self.config.block_k,
            DOT_PREC="ieee" if self.dtype == "fp32" else "tf32",
            CUBLAS=bool(self.config.cublas_gemms),
            ZONEOUT=self.zoneout,
            NORMS=self.norms,
        )

    def backward(self) -> dict:
        """Constexprs of the backward kernels."""
        return dict(self.common(), OP_COPY=bool(self.config.cublas_gemms) and self.dtype != "fp32")

    def packed(self, field: str) -> int:
        return pack_codes([getattr(level, field) for level in self.activations])

    def level(self, k: int) -> dict:
        acts = self.activations[k]
        return dict(GATE_ACT=activation_code(acts.gate), CAND_ACT=activation_code(acts.candidate))

    def jobs(self) -> Iterator[tuple[triton.JITFunction, dict]]:
        """Every kernel launch of a forward and a backward, with its constexprs."""
        common, depth, cells = self.common(), self.depth, self.packed("cell")
        yield (
            triton_kernels.fwd_outer_kernel,
            dict(common, DEPTH=depth, CELL_ACTS=cells, **self.level(0)),
        )
        for k in range(1, depth):
            yield (
                triton_kernels.fwd_nested_kernel,
                dict(
                    common,
                    LEVEL=k,
                    DEPTH=depth,
                    CELL_ACTS=cells,
                    HAS_BIAS=self.nested_bias,
                    **self.level(k),
                ),
            )
        yield (
            triton_kernels.bwd_inner_kernel,
            dict(
                self.backward(),
                DEPTH=depth,
                GATE_ACTS=self.packed("gate"),
                CAND_ACTS=self.packed("candidate"),
                CELL_ACTS=cells,
            ),
        )
        for k in range(depth - 1):
            yield triton_kernels.bwd_level_kernel, dict(self.backward(), LEVEL=k, **self.level(k))


def signature(fn: triton.JITFunction, dtype: str, consts: dict) -> dict[str, str]:
    """Triton's type string of every argument: constexpr, int32 scalar or typed pointer."""
    types = {}
    for name in fn.arg_names:
        if name in consts:
            types[name] = "constexpr"
        elif name == "bs_ptr":
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name in FP32_BUFFERS else f"*{dtype}"
        else:
            types[name] = "i32"
    return types


def compile_kernel(fn, dtype: str, consts: dict, config: TritonConfig, target) -> None:
    from triton.compiler import ASTSource

    source = ASTSource(fn=fn, signature=signature(fn, dtype, consts), constexprs=consts)
    options = {"num_warps": config.num_warps}
    if config.num_stages is not None:
        options["num_stages"] = config.num_stages
    triton.compile(source, target=target, options=options)


def config_for(batch: int, hidden: int, dtype: str, graphed: bool = False) -> TritonConfig:
    """``pick_config``'s choice on a GPU for a call in ``dtype``, launched directly or in a graph."""
    return pick_config(batch, hidden, dtype=getattr(torch, TORCH_DTYPES[dtype]), graphed=graphed)


def variants(quick: bool) -> list[Variant]:
    """The variants to compile. ``quick``: packed+reverse at one block configuration; depth 1 with
    the paper's activations, depth 3 with each of ``ACTIVATION_VARIANTS`` (bias-free nested levels
    with the first): every kernel and constexpr branch but the dense forward direction."""
    cublas = [  # the kernels reading cuBLAS's GEMMs: every kernel, each dtype
        Variant(
            dtype,
            3,
            True,
            activation_variant(1, 3),
            True,
            replace(config_for(*SHAPES[0], dtype), cublas_gemms=True),
        )
        for dtype in DTYPES
    ]
    cublas += [replace(v, zoneout=True) for v in cublas]  # every kernel's zoneout branches
    # LN at levels 0 and 2 (every kernel with and without it), with zoneout, as a call with LN
    # runs on a GPU: whole rows, here of H = 256 (the first shape)
    normed = [
        replace(v, norms=0b101, config=whole_rows(v.config, SHAPES[0][1]))
        for v in cublas
        if v.zoneout
    ]
    if quick:
        return (
            cublas
            + normed
            + [
                Variant(dtype, depth, True, acts, bias, config_for(*SHAPES[0], dtype))
                for dtype in DTYPES
                for depth, acts, bias in (
                    (1, standard_activations(1), True),
                    (3, activation_variant(0, 3), False),
                    (3, activation_variant(1, 3), True),
                )
            ]
        )
    result = cublas + normed
    for dtype, (batch, hidden), graphed in itertools.product(DTYPES, SHAPES, (False, True)):
        config = whole_rows(config_for(batch, hidden, dtype, graphed), hidden)
        acts = activation_variant(1, 3)
        result += [
            Variant(dtype, 3, mode, acts, True, config, True, 0b101) for mode in (False, True)
        ]
    for dtype, depth, mode in itertools.product(DTYPES, (1, 2, 3), (False, True)):
        configs = {config_for(b, h, dtype, graphed) for b, h in SHAPES for graphed in (False, True)}
        for config in sorted(configs, key=str):
            for acts, bias in (
                (standard_activations(depth), True),
                (activation_variant(0, depth), False),
                (activation_variant(1, depth), True),
            ):
                result.append(Variant(dtype, depth, mode, acts, bias, config))
    return result


def probe(target) -> str | None:
    """Why this Triton cannot compile for ``target`` offline (None when it can)."""
    try:
        compile_kernel(_probe_kernel, "fp32", {"BLOCK": 16}, TritonConfig(num_warps=4), target)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


@triton.jit
def _probe_kernel(x_ptr, BLOCK: triton.language.constexpr):
    offsets = triton.language.arange(0, BLOCK)
    triton.language.store(x_ptr + offsets, triton.language.load(x_ptr + offsets) + 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compile_check.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    parser.add_argument("--quick", action="store_true", help="fewer variants (see variants())")
    args = parser.parse_args(argv)
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, offline compile for sm_{args.arch}", flush=True)
    why_not = probe(target)
    if why_not is not None:
        print(f"SETUP cannot compile for CUDA offline here: {why_not}")
        return SETUP_FAILED
    done: set[tuple] = set()
    failed = 0
    start = time.perf_counter()
    for variant in variants(args.quick):
        for fn, consts in variant.jobs():
            key = (
                fn.__name__,
                variant.dtype,
                tuple(sorted(consts.items())),
                variant.config.num_warps,
                variant.config.num_stages,
            )
            if key in done:  # e.g. bwd_level_kernel does not depend on the depth
                continue
            done.add(key)
            label = f"{fn.__name__} {variant.dtype} {consts}"
            try:
                compile_kernel(fn, variant.dtype, consts, variant.config, target)
                print(f"OK {label}", flush=True)
            except Exception as exc:
                failed += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:3000]}", flush=True)
    seconds = time.perf_counter() - start
    print(f"{len(done) - failed} of {len(done)} kernel variants compiled in {seconds:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
