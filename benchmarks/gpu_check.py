"""One-command correctness check of the Triton-fused nested-LSTM op on a real GPU.

    python benchmarks/gpu_check.py            # from the repository root; needs CUDA
    python benchmarks/gpu_check.py --quick    # fewer cases
    python benchmarks/gpu_check.py --interpret   # dry run of this script on CPU (TRITON_INTERPRET)

Compares ``nested_lstm_triton`` (real Triton compiler, not the interpreter) with the naive reference
(``nested_lstm_naive`` in float64 on the same device, fed the same rounded inputs) in float32,
bfloat16 and float16, depths 1-3, plain / packed / reverse / packed+reverse, on outputs, final
states and every gradient (x, h0, c0, all weights and biases); then CUDA-graph mode (capture and a
replay with new inputs). Prints PASS/FAIL per case with the largest scaled error
(max |got - want| / max(1, max |want|)) and exits non-zero on any failure.

Only torch, triton and this repository need to be importable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

try:
    import nestrnn.ops.nested_lstm  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nestrnn.ops.nested_lstm.common import LevelWeights
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_case(T, B, In, H, D, packed, bias, seed, device):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    weights = [
        LevelWeights(
            rnd(4 * H, In if k == 0 else H, scale=1.0 / (In if k == 0 else H) ** 0.5),
            rnd(4 * H, H, scale=1.0 / H**0.5),
            rnd(4 * H, scale=0.5) if bias else None,
            rnd(4 * H, scale=0.5) if bias else None,
        )
        for k in range(D)
    ]
    batch_sizes = None
    if packed:  # non-increasing, first step full, last step one row
        lengths = torch.linspace(T, 1, B).round().long()
        batch_sizes = torch.tensor(
            [(lengths > t).sum().item() for t in range(T)], dtype=torch.int64
        )
    return rnd(T, B, In), weights, rnd(B, H), rnd(D, B, H), batch_sizes


def run(fn, x, weights, h0, c0, batch_sizes, reverse, dtype, seed=99):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, h0, c0)]
    wts = [
        LevelWeights(*[None if p is None else p.detach().to(dtype).requires_grad_() for p in lw])
        for lw in weights
    ]
    out = fn(leaves[0], wts, leaves[1], leaves[2], batch_sizes, reverse)
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
    return res


def compare(ref, got):
    errs = {}
    for name, want in ref.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            errs[name] = float("inf")
            continue
        err = (have - want).abs().max().item() / max(1.0, want.abs().max().item())
        errs[name] = err if err == err else float("inf")  # NaN counts as a failure
    return errs


DEVICE = "cuda"


def check_case(label, dtype, T, B, In, H, D, packed, reverse, bias=True, config=None, seeds=(0,)):
    from nestrnn.ops.nested_lstm.fused_triton import nested_lstm_triton

    ok = True
    for seed in seeds:
        x, weights, h0, c0, bs = make_case(T, B, In, H, D, packed, bias, seed, DEVICE)
        # the reference gets exactly the op's (rounded) inputs, computed in float64
        x, h0, c0 = (t.to(dtype).double() for t in (x, h0, c0))
        weights = [LevelWeights(*[None if p is None else p.to(dtype).double() for p in lw])
                   for lw in weights]  # fmt: skip
        ref = run(nested_lstm_naive, x, weights, h0, c0, bs, reverse, torch.float64)
        start = time.perf_counter()
        try:
            got = run(
                lambda *a: nested_lstm_triton(*a, config=config),
                x, weights, h0, c0, bs, reverse, dtype,
            )  # fmt: skip
            if DEVICE == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # report and go on with the other cases
            print(f"FAIL {label} seed={seed}: {type(exc).__name__}: {exc}")
            ok = False
            continue
        ms = (time.perf_counter() - start) * 1e3
        errs = compare(ref, got)
        worst = max(errs, key=errs.get)
        passed = errs[worst] <= TOL[dtype]
        ok &= passed
        print(
            f"{'PASS' if passed else 'FAIL'} {label} seed={seed}: max scaled error "
            f"{errs[worst]:.2e} ({worst}); output {errs['output']:.1e}, h_n {errs['h_n']:.1e}, "
            f"c_n {errs['c_n']:.1e}, dx {errs['dx']:.1e} [{ms:.0f} ms incl. compile]"
        )
        if not passed:
            bad = ", ".join(f"{k} {v:.1e}" for k, v in errs.items() if v > TOL[dtype])
            print(f"     over tolerance {TOL[dtype]:.0e}: {bad}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and modes")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated subset")
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="dry run on CPU under TRITON_INTERPRET=1 (tiny sizes, no bf16, no CUDA graphs)",
    )
    args = parser.parse_args(argv)

    global DEVICE
    if args.interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--interpret must be given before triton is imported")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE = "cpu"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to check the real compiler (or use --interpret)")
        return 2
    elif not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (the CPU tests run under TRITON_INTERPRET=1)")
        return 2
    import triton

    from nestrnn.ops.nested_lstm.fused_triton import TritonConfig

    where = (
        "CPU interpreter"
        if DEVICE == "cpu"
        else f"{torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})"
    )
    print(f"torch {torch.__version__}, triton {triton.__version__}, {where}")
    sizes = [(6, 3, 5, 17), (8, 20, 64, 200)]  # (T, B, I, H): tiny + many programs / masked tails
    modes = [(False, False), (True, False), (False, True), (True, True)]  # (packed, reverse)
    if args.quick or DEVICE == "cpu":
        sizes = sizes[:1] if DEVICE == "cpu" else sizes[1:]
        modes = [(False, False), (True, True)]
    ok = True
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname.strip()]
        if DEVICE == "cpu" and dtype == torch.bfloat16:
            print("SKIP bf16: computed wrongly by the interpreter")
            continue
        for D in (1, 2, 3):
            for T, B, In, H in sizes:
                for packed, reverse in modes:
                    label = (
                        f"{dname} D={D} T={T} B={B} I={In} H={H} "
                        f"{'packed' if packed else 'dense'}{' reverse' if reverse else ''}"
                    )
                    ok &= check_case(label, dtype, T, B, In, H, D, packed, reverse)
        ok &= check_case(f"{dname} D=2 no bias", dtype, 6, 3, 5, 17, 2, True, False, bias=False)
        ok &= check_case(
            f"{dname} D=3 tiles 16x16x16", dtype, 5, 33, 7, 40, 3, True, True,
            config=TritonConfig(block_b=16, block_h=16, block_k=16),
        )  # fmt: skip
    if DEVICE == "cpu":
        print("SKIP CUDA graphs: no CUDA device")
        print("ALL PASS" if ok else "SOME CASES FAILED")
        return 0 if ok else 1
    graph = TritonConfig(cuda_graph=True)
    for reverse in (False, True):
        ok &= check_case(
            f"fp32 D=2 CUDA graph (capture + replay){' reverse' if reverse else ''}",
            torch.float32, 6, 4, 5, 24, 2, True, reverse, config=graph, seeds=(0, 1, 2),
        )  # fmt: skip
    ok &= check_case(
        "bf16 D=3 CUDA graph", torch.bfloat16, 6, 4, 5, 24, 3, False, False, config=graph,
        seeds=(0, 1),
    )  # fmt: skip
    print("ALL PASS" if ok else "SOME CASES FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
