"""One-command correctness check of the op's Triton kernels on a real GPU.

    python benchmarks/gpu_check.py                  # from the repository root; needs CUDA
    python benchmarks/gpu_check.py --quick          # fewer cases
    python benchmarks/gpu_check.py --dtypes bf16    # a subset (gpu.sh runs one process per dtype)
    python benchmarks/gpu_check.py --groups regular # only some groups of cases (see below)
    python benchmarks/gpu_check.py --interpret      # dry run on CPU under TRITON_INTERPRET=1

Runs ``nested_lstm(..., backend="triton")`` on the real Triton compiler against the naive reference
(``nested_lstm_naive`` in float64 on the same device, fed the same rounded inputs), on outputs,
final states and every gradient (x, h0, c0, every weight and bias). For each dtype:

    timed     dense, the paper's activations, depths 1-3, at batch sizes that give the block
              configurations of gpu.sh's timed shapes (speed.py then finds these kernels compiled
              in Triton's cache)
    modes     depths 1-3, dense / packed / reverse / packed+reverse, tiny and with several
              programs and masked tails in every dimension
    variant   per-level activations that put every activation in every role; bias-free levels;
              in fp16/bf16 also with smooth stand-ins for relu and hardtanh (see below)
    graph     CUDA-graph mode (NESTRNN_TRITON_CUDA_GRAPH=1): a capture, then replays with new inputs;
              and the default (auto): a direct run, a capture when the shapes repeat, a replay
    regular   zoneout (training's 0/1 masks, evaluation's rates expanded with stride 0) and layer
              normalisation at some or all levels (its parameters' gradients judged too), alone
              and together, dense / packed / reverse, whole rows up to H = 1024, in a CUDA graph
              and directly (bf16 with LN has a tolerance of its own, TOL_LN)

A case fails when an error exceeds the tolerance or when the Triton kernels did not run (the op
falls back to another implementation when they fail; the reason is printed). In fp16 and bf16 the
gradients of a case with relu or hardtanh are printed but not judged: the GEMMs' rounded operands
move a pre-activation next to a kink to its other side, where the derivative differs by 1, so
single gradient elements differ from the float64 reference by O(1) however exact the kernels (the
same errors come out of Triton's interpreter on CPU); their smooth stand-ins are judged instead. One PASS/FAIL line per
case and seed, with the largest scaled error (max |got - want| / max(1, max |want|)); exit status 1
on any failure. Only torch, triton and this repository need to be importable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
from bench_common import (
    activation_variant,
    describe_line,
    describe_machine,
    environment,
    import_nestrnn,
    result_meta,
    scaled_error,
    triton_configs,
    write_result,
)

import_nestrnn()

# the module (the package's ``plan`` is the function): a failed kernel is recorded there, and this
# diagnostic forgets it after reporting so that every case gets its own try
from nestrnn.ops.common.levels import LevelNorms, standard_activations  # noqa: E402
from nestrnn.ops.nested_lstm import (  # noqa: E402
    LevelWeights,
    nested_lstm,
    nested_lstm_naive,
    plan,
    planning,
)

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: with layer normalisation: LN divides by each row's std, which amplifies the rounding of the
#: level inputs (GEMM operands in the input dtype; the reference keeps them in float64); the same
#: inputs give the same error with and without a CUDA graph, so it is the precision, not a kernel
TOL_LN = {**TOL, torch.bfloat16: 1e-1}
#: activations with a kink, and smooth stand-ins for them (see the module docstring)
SMOOTH = {"relu": "softsign", "hardtanh": "tanh"}
FORWARD = ("output", "h_n", "c_n")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY = (6, 3, 5, 17)  # (T, B, I, H)
TILED = (8, 70, 64, 200)  # several batch and unit tiles, masked tails, several reduction chunks
#: batch sizes whose block configurations (at H = 64) are those of gpu.sh's timed shapes: B = 16,
#: 32, >= 64, and B * H >= 256 * 1024 (triton_configs.json, read by triton_configs.measured_blocks)
TIMED_BATCHES = (16, 32, 128, 4096)
MODES = ((False, False), (True, False), (False, True), (True, True))  # (packed, reverse)
#: which of a level's two biases exist
BIASES = {"both": (True, True), "none": (False, False), "ih": (True, False), "hh": (False, True)}
GROUPS = ("timed", "modes", "variant", "graph", "cublas", "regular")


@dataclass(frozen=True)
class Case:
    """One comparison with the reference (one line of output per seed)."""

    group: str
    dtype: str
    size: tuple[int, int, int, int]
    depth: int
    packed: bool = False
    reverse: bool = False
    variant: int | None = None  # index in bench_common.ACTIVATION_VARIANTS; None: the paper's
    biases: tuple[str, ...] | None = None  # a key of BIASES per level; None: all "both"
    cuda_graph: str = "0"  # NESTRNN_TRITON_CUDA_GRAPH: "0", "1" or "auto"
    seeds: tuple[int, ...] = (0,)
    smooth: bool = False  # the variant's relu and hardtanh replaced by SMOOTH
    cublas: bool = False  # the per-step GEMMs by cuBLAS (TritonConfig.cublas_gemms)
    zoneout: str | None = None  # "masks" (training's 0/1 draws) or "rates" (evaluation's)
    norms: tuple[bool, ...] | None = None  # the levels with layer normalisation

    def label(self) -> str:
        T, B, I, H = self.size
        mode = "packed" if self.packed else "dense"
        extra = [f"variant {self.variant}"] if self.variant is not None else []
        extra += ["smooth"] * self.smooth
        extra += [f"biases {','.join(self.biases)}"] if self.biases else []
        extra += ["reverse"] * self.reverse
        extra += {"0": [], "1": ["CUDA graph"], "auto": ["CUDA graph auto"]}[self.cuda_graph]
        extra += ["cuBLAS GEMMs"] * self.cublas
        extra += [f"zoneout {self.zoneout}"] if self.zoneout else []
        if self.norms:
            extra.append("LN at " + ",".join(str(k) for k, on in enumerate(self.norms) if on))
        return f"{self.group} {self.dtype} D={self.depth} T={T} B={B} I={I} H={H} " + " ".join(
            [mode, *extra]
        )

    def activations(self):
        if self.variant is None:
            return standard_activations(self.depth)
        levels = activation_variant(self.variant, self.depth)
        if not self.smooth:
            return levels
        return tuple(type(level)(*(SMOOTH.get(name, name) for name in level)) for level in levels)

    def judged(self, errors: dict[str, float]) -> dict[str, float]:
        """The errors that decide the case (see the module docstring)."""
        kinked = any(name in SMOOTH for level in self.activations() for name in level)
        if self.dtype == "fp32" or not kinked:
            return errors
        return {name: errors[name] for name in FORWARD}


def cases(dtype: str, quick: bool, cuda: bool) -> list[Case]:
    """The cases for one dtype (see the module docstring). Without CUDA neither the timed cases
    (the interpreter's block configurations differ) nor the CUDA-graph cases, and the tiled
    cuBLAS cases at depth 1 only."""
    depths = (1, 2, 3)
    timed = [Case("timed", dtype, (4, b, 64, 64), d) for b in TIMED_BATCHES for d in depths]
    if quick:
        modes = [Case("modes", dtype, TINY, d, True, True) for d in depths]
        variants = [Case("variant", dtype, TINY, 3, True, True, 0, ("none", "both", "ih"))]
        graphs = [Case("graph", dtype, (6, 4, 5, 24), 2, True, True, cuda_graph="1", seeds=(0, 1))]
    else:
        modes = [Case("modes", dtype, TINY, d, *mode) for d in depths for mode in MODES]
        modes += [Case("modes", dtype, TILED, d, *mode) for d in depths for mode in MODES[::3]]
        modes.append(Case("modes", dtype, TINY, 2, True, False, biases=("none", "none")))
        variants = [
            Case("variant", dtype, TINY, 3, True, True, 0, ("none", "both", "ih")),
            Case("variant", dtype, TINY, 3, False, False, 1, ("hh", "none", "both")),
            Case("variant", dtype, TILED, 2, True, False, 1, ("both", "none")),
            Case("variant", dtype, TINY, 1, False, True, 0, ("none",)),
        ]
        graphs = [
            Case("graph", dtype, (6, 4, 5, 24), 2, True, reverse, cuda_graph="1", seeds=(0, 1, 2))
            for reverse in (False, True)
        ]
        graphs.append(Case("graph", dtype, (6, 4, 5, 24), 3, cuda_graph="1", seeds=(0, 1)))
    graphs.append(
        Case("graph", dtype, (6, 4, 5, 24), 2, True, True, cuda_graph="auto", seeds=(0, 1, 2))
    )
    if dtype != "fp32":
        variants += [replace(case, smooth=True) for case in variants]
    cublas = [
        Case("cublas", dtype, TILED, d, *mode, cublas=True) for d in depths for mode in MODES[::3]
    ]
    cublas += [
        Case(
            "cublas",
            dtype,
            TINY,
            3,
            True,
            True,
            0,
            ("none", "both", "ih"),
            cublas=True,
            smooth=dtype != "fp32",
        ),
        Case(
            "cublas", dtype, (6, 4, 5, 24), 2, True, True, cuda_graph="1", seeds=(0, 1), cublas=True
        ),
    ]
    # the graph case's inputs also run directly: the same errors there mean the same numerics
    direct = Case(
        "regular",
        dtype,
        (6, 4, 5, 24),
        2,
        True,
        True,
        seeds=(0, 1),
        zoneout="masks",
        norms=(True, True),
    )
    regular = [
        Case("regular", dtype, TINY, 2, True, True, zoneout="masks"),
        Case("regular", dtype, TINY, 3, False, True, zoneout="rates"),
        Case("regular", dtype, TINY, 3, True, True, norms=(True, True, True)),
        Case("regular", dtype, TINY, 2, True, False, zoneout="masks", norms=(False, True)),
        Case("regular", dtype, TILED, 2, zoneout="masks", norms=(True, False)),
        Case("regular", dtype, (4, 16, 64, 1024), 2, norms=(True, True), zoneout="rates"),
        direct,
        replace(direct, cuda_graph="1"),
    ]
    if not cuda:  # the interpreter takes tens of seconds a tiled case at depths 2 and 3 (their
        # GEMMs by torch.mm are checked at every depth, tiles forced small, by test_op_triton.py)
        cublas = [c for c in cublas[:-1] if c.size != TILED or c.depth == 1]
        return modes + variants + cublas + [c for c in regular[:4] if c.cuda_graph == "0"]
    return timed + modes + variants + graphs + cublas + regular


# ------------------------------------------------------------------------------- one case


def make_inputs(case: Case, seed: int, device: str):
    """fp64 x, LevelWeights, h0, c0 (scaled like nn.LSTM's init), batch_sizes, the zoneout keep
    weights (D+1, T, B, H) or None and the layer-normalisation parameters (one LevelNorms or None
    a level) or None."""
    T, B, I, H = case.size
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    weights = []
    for k, kind in enumerate(case.biases or ("both",) * case.depth):
        has_ih, has_hh = BIASES[kind]
        fan_in = I if k == 0 else H
        weights.append(
            LevelWeights(
                rnd(4 * H, fan_in, scale=fan_in**-0.5),
                rnd(4 * H, H, scale=H**-0.5),
                rnd(4 * H, scale=0.5) if has_ih else None,
                rnd(4 * H, scale=0.5) if has_hh else None,
            )
        )
    batch_sizes = None
    if case.packed:  # non-increasing, first step full, last step one row
        lengths = torch.linspace(T, 1, B).round().long()
        batch_sizes = torch.tensor([(lengths > t).sum().item() for t in range(T)])
    zoneout = None
    if case.zoneout == "masks":
        zoneout = torch.bernoulli(torch.full((case.depth + 1, T, B, H), 0.5), generator=g)
    elif case.zoneout == "rates":  # per state and unit, expanded along T and B with stride 0
        rates = torch.rand(case.depth + 1, 1, 1, H, generator=g, dtype=torch.float64)
        zoneout = rates.expand(case.depth + 1, T, B, H)
    norms = None
    if case.norms is not None:  # away from the identity init, so that every parameter matters
        sizes, centres = (4 * H, 4 * H, H, H), (1, 0, 1, 0)
        norms = [
            LevelNorms(*(c + rnd(n, scale=0.3) for n, c in zip(sizes, centres))) if on else None
            for on in case.norms
        ]
    zoneout = None if zoneout is None else zoneout.to(device)
    return rnd(T, B, I), weights, rnd(B, H), rnd(case.depth, B, H), batch_sizes, zoneout, norms


def run(
    fn, x, weights, h0, c0, batch_sizes, reverse, activations, dtype, zoneout, norms, seed=99
) -> dict:
    """Outputs and every gradient of ``fn`` in ``dtype`` (fp64 copies), by name."""

    def leaf(t):
        return None if t is None else t.detach().to(dtype).requires_grad_()

    leaves = [leaf(t) for t in (x, h0, c0)]
    wts = [LevelWeights(*map(leaf, lw)) for lw in weights]
    lns = (
        None if norms is None else [None if n is None else LevelNorms(*map(leaf, n)) for n in norms]
    )
    keep = None if zoneout is None else zoneout.to(dtype)
    out = fn(
        leaves[0],
        wts,
        leaves[1],
        leaves[2],
        batch_sizes,
        reverse,
        activations,
        zoneout=keep,
        norms=lns,
    )
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
        for o in out
    )
    loss.backward()
    res = dict(zip(("output", "h_n", "c_n"), (o.detach().double() for o in out)))
    res.update(zip(("dx", "dh0", "dc0"), (t.grad.double() for t in leaves)))
    for k, lw in enumerate(wts):
        for name, p in zip(LevelWeights._fields, lw):
            if p is not None:
                res[f"l{k}.{name}"] = p.grad.double()
    for k, ln in enumerate(lns or ()):
        for name, p in zip(LevelNorms._fields, ln or ()):
            res[f"l{k}.ln.{name}"] = p.grad.double()
    return res


def triton_op(x, weights, h0, c0, batch_sizes, reverse, activations, **regularisers):
    return nested_lstm(
        x, weights, h0, c0, batch_sizes, reverse, activations, backend="triton", **regularisers
    )


def scaled_errors(ref: dict, got: dict) -> dict[str, float]:
    """max |got - want| / max(1, max |want|) per name; a missing or NaN result is infinite."""
    errs = {}
    for name, want in ref.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            errs[name] = float("inf")
            continue
        err = scaled_error(have, want)
        errs[name] = err if err == err else float("inf")
    return errs


def cublas_gemms(on: bool):
    """With ``on``, the op's Triton loops leave their per-step GEMMs to cuBLAS."""
    if not on:
        return contextlib.nullcontext()
    from nestrnn.ops.nested_lstm.triton_loop import TritonConfig  # imports Triton

    return triton_configs(
        lambda batch, hidden, given: replace(given or TritonConfig(), cublas_gemms=True)
    )


def check_seed(case: Case, seed: int, device: str) -> bool:
    """Print one PASS/FAIL line for ``case`` with inputs from ``seed``; True when it passed."""
    dtype, acts = DTYPES[case.dtype], case.activations()
    x, weights, h0, c0, bs, zoneout, norms = make_inputs(case, seed, device)

    def rounded(t):  # the reference gets exactly the op's (rounded) inputs, computed in float64
        return None if t is None else t.to(dtype).double()

    x, h0, c0, zoneout = map(rounded, (x, h0, c0, zoneout))
    weights = [LevelWeights(*map(rounded, lw)) for lw in weights]
    if norms is not None:
        norms = [None if n is None else LevelNorms(*map(rounded, n)) for n in norms]
    label = f"{case.label()} seed={seed}"
    regularised = {"zoneout": zoneout is not None, "norms": norms is not None}
    planned = plan(x.to(dtype), bs, case.reverse, acts, True, "triton", **regularised)
    if planned.implementation != "triton":
        print(f"FAIL {label}: Triton cannot run here ({planned.note})")
        return False
    inputs = (x, weights, h0, c0, bs, case.reverse, acts)
    ref = run(nested_lstm_naive, *inputs, torch.float64, zoneout, norms)
    start = time.perf_counter()
    try:
        with environment("NESTRNN_TRITON_CUDA_GRAPH", case.cuda_graph), cublas_gemms(case.cublas):
            got = run(triton_op, *inputs, dtype, zoneout, norms)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # report and go on with the other cases
        print(f"FAIL {label}: {type(exc).__name__}: {exc}")
        return False
    ms = (time.perf_counter() - start) * 1e3
    failure = planning.failures().get("triton")
    planning.forget_failures()
    if failure is not None:
        print(f"FAIL {label}: the Triton kernels failed, another implementation ran: {failure}")
        return False
    errs = scaled_errors(ref, got)
    judged = case.judged(errs)
    worst = max(judged, key=judged.get)
    tol = (TOL_LN if case.norms else TOL)[dtype]
    passed = judged[worst] <= tol
    print(
        f"{'PASS' if passed else 'FAIL'} {label}: max scaled error {errs[worst]:.2e} ({worst}); "
        f"output {errs['output']:.1e}, h_n {errs['h_n']:.1e}, c_n {errs['c_n']:.1e}, "
        f"dx {errs['dx']:.1e} [{ms:.0f} ms incl. compile]",
        flush=True,
    )
    if len(judged) < len(errs):
        unjudged = max(e for name, e in errs.items() if name not in judged)
        print(f"     gradients not judged (relu/hardtanh in {case.dtype}): max {unjudged:.1e}")
    if not passed:
        bad = ", ".join(f"{k} {v:.1e}" for k, v in judged.items() if v > tol)
        print(f"     over tolerance {tol:.0e}: {bad}")
    return passed


# ------------------------------------------------------------------------------- main


def subset_of(choices, what: str):
    """An argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",")]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown[0]!r}; choose from {list(choices)}"
            )
        return names

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer modes, variants and graphs")
    parser.add_argument(
        "--dtypes",
        type=subset_of(DTYPES, "dtype"),
        default=list(DTYPES),
        help=f"comma-separated subset of {','.join(DTYPES)} (default: all)",
    )
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="dry run on CPU under TRITON_INTERPRET=1: the quick cases but the timed and CUDA-graph "
        "ones and the tiled cuBLAS ones deeper than 1, no bf16",
    )
    parser.add_argument(
        "--groups",
        type=subset_of(GROUPS, "group"),
        default=list(GROUPS),
        help=f"comma-separated subset of {','.join(GROUPS)} (default: all)",
    )
    parser.add_argument("--json", default=None, help="write every check's outcome to this file")
    args = parser.parse_args(argv)
    if args.interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--interpret must be given before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        device = "cpu"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it to check the real compiler")
    elif not torch.cuda.is_available():
        parser.error("no CUDA device (the CPU tests run the kernels under TRITON_INTERPRET=1)")
    else:
        device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 kernels then use exact IEEE dots
    from nestrnn.ops.nested_lstm import triton_loop  # imports Triton: after TRITON_INTERPRET is set

    print(describe_line(describe_machine(device)), flush=True)
    failed: list[str] = []
    rows: list[dict] = []
    total = 0
    for dtype in args.dtypes:
        if device == "cpu" and dtype == "bf16":
            print("SKIP bf16: computed wrongly by the interpreter")
            continue
        for case in cases(dtype, args.quick or args.interpret, cuda=device == "cuda"):
            if case.group not in args.groups:
                continue
            triton_loop.clear_cuda_graphs()
            for seed in case.seeds:
                total += 1
                passed = check_seed(case, seed, device)
                rows.append({"dtype": dtype, "case": case.label(), "seed": seed, "passed": passed})
                if not passed:
                    failed.append(f"{case.label()} seed={seed}")
            if case.cuda_graph != "0" and triton_loop.cuda_graph_count() == 0:
                print(f"FAIL {case.label()}: no CUDA graph was captured")
                failed.append(f"{case.label()}: no graph")
    if device == "cpu":
        print("SKIP timed and CUDA-graph cases: no CUDA device")
    if args.json:
        settings = {"quick": args.quick, "interpret": args.interpret, "failed": failed}
        write_result(args.json, result_meta(device, argv, **settings), rows)
    if failed:
        print(f"FAILED {len(failed)} of {total}:\n  " + "\n  ".join(failed))
        return 1
    print(f"ALL PASS ({total} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
