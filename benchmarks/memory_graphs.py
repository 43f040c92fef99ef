"""A user's memory function on CUDA with the whole layer captured in CUDA graphs, measured.

    python benchmarks/memory_graphs.py                       # needs CUDA and nestrnn's dependencies
    python benchmarks/memory_graphs.py --dtypes float32 --shapes 32x256x100

A memory function written in Python runs on NestedLSTM's per-step path, whose every step is a few
dozen small kernel launches. With static shapes the whole layer can be captured, forward and
backward, by ``torch.cuda.make_graphed_callables(layer, (x,))`` (docs/design.md § 7). For each dtype
and (B, H, T), training mode (forward+backward):

1. the graphed layer is checked against the same layer run eagerly on the same input: output,
   final state, the input's and every parameter's gradient (scaled error, tolerance per dtype);
2. eager, graphed, the standard depth-2 chain (``NestedLSTM(H, H, depth=2)``, fused kernels) and
   cuDNN's ``nn.LSTM(H, H, 1)`` (the outer LSTM's own work) are timed interleaved in one process,
   median of ``--repeats`` CUDA-event timings, in milliseconds, with ratios to nn.LSTM.

The memory function is speed.py's ``LeakyMemory`` (the README's example).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import speed
import torch
from bench_common import (
    describe_line,
    describe_machine,
    parse_shapes,
    result_meta,
    scaled_error,
    write_result,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def train_step(model, parameters, x, grad_out):
    """One forward+backward of ``model`` (whose parameters are ``parameters``), from no gradients."""
    for p in (*parameters, x):
        p.grad = None
    out, state = model(x)
    out.backward(grad_out)
    return out, state


def results_of(layer, x, out, state) -> dict[str, torch.Tensor]:
    found = {"output": out, "h_n": state[0], "c_n": state[1], "dx": x.grad}
    found.update({f"d{name}": p.grad for name, p in layer.named_parameters()})
    return {name: t.detach().clone() for name, t in found.items()}


def compare(shape, dtype, repeats: int, timer) -> dict:
    batch, hidden, steps = shape
    torch.manual_seed(0)
    layer = speed.layer(memory=speed.LeakyMemory)(hidden, "auto").to("cuda", dtype)
    x = torch.randn(steps, batch, hidden, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    params = list(layer.parameters())

    eager = results_of(layer, x, *train_step(layer, params, x, grad_out))
    # make_graphed_callables graphs a module in place: the graphed one is a copy, with its own input
    graphed = copy.deepcopy(layer)
    graphed_params = list(graphed.parameters())
    x_graphed = x.detach().clone().requires_grad_()
    torch.cuda.make_graphed_callables(graphed, (x_graphed,))
    got = results_of(graphed, x_graphed, *train_step(graphed, graphed_params, x_graphed, grad_out))
    errors = {name: scaled_error(got[name], want) for name, want in eager.items()}
    worst = max(errors, key=errors.get)
    passed = errors[worst] <= TOL[dtype]
    print(
        f"{'PASS' if passed else 'FAIL'} graphed LeakyMemory {dtype} {batch}x{hidden}x{steps}: "
        f"max scaled error {errors[worst]:.1e} ({worst})",
        flush=True,
    )

    chain = speed.layer(depth=2)(hidden, "auto").to("cuda", dtype)
    lstm = torch.nn.LSTM(hidden, hidden, 1).to("cuda", dtype)
    calls = {
        "LeakyMemory eager": lambda: train_step(layer, params, x, grad_out),
        "LeakyMemory graphed": lambda: train_step(graphed, graphed_params, x_graphed, grad_out),
        "NLSTM-2 (fused)": lambda: train_step(chain, list(chain.parameters()), x, grad_out),
        "nn.LSTM(H, H, 1)": lambda: train_step(lstm, list(lstm.parameters()), x, grad_out),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
        fn()  # a second warm-up: the fused chain's step loops are captured on their second call
    for r in range(repeats):
        names = list(calls)
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated order
            times[name].append(timer(calls[name]))
    ms = {name: statistics.median(values) for name, values in times.items()}
    base = ms["nn.LSTM(H, H, 1)"]
    for name, value in ms.items():
        print(
            f"  {dtype} {batch}x{hidden}x{steps} f+b {name}: {value:.2f} ms "
            f"({value / base:.2f}x nn.LSTM)",
            flush=True,
        )
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "B": batch,
        "H": hidden,
        "T": steps,
        "passed": passed,
        "errors": errors,
        "ms": ms,
    }


def markdown(results: list[dict], machine: str) -> str:
    names = list(results[0]["ms"])
    out = [
        "# A user's memory function in CUDA graphs (benchmarks/memory_graphs.py)",
        "",
        machine,
        "",
        "Forward+backward milliseconds (median, interleaved); in brackets against "
        "`nn.LSTM(H, H, 1)`. graphed: `torch.cuda.make_graphed_callables(layer, (x,))`.",
        "",
        "| dtype | B | H | T | graphed = eager | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for res in results:
        base = res["ms"]["nn.LSTM(H, H, 1)"]
        cells = [f"{res['ms'][n]:.2f} ({res['ms'][n] / base:.2f})" for n in names]
        same = "yes" if res["passed"] else f"NO ({max(res['errors'].values()):.1e})"
        out.append(
            f"| {res['dtype']} | {res['B']} | {res['H']} | {res['T']} | {same} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memory_graphs.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--shapes", type=parse_shapes, default=parse_shapes("32x75x100,32x256x100,128x512x100")
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if speed.MISSING:
        parser.error(f"needs the whole nestrnn package: {speed.MISSING}")
    if not torch.cuda.is_available():
        parser.error("no CUDA device")
    dtypes = []
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {list(DTYPES)}")
        dtypes.append(DTYPES[name])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    machine = describe_line(describe_machine("cuda"))
    print(machine, flush=True)
    timer = speed.Timer(torch.device("cuda"), speed.Interference(), 1.0)
    results = []
    for dtype in dtypes:
        for shape in args.shapes:
            try:
                results.append(compare(shape, dtype, args.repeats, timer))
            except Exception as exc:  # report and go on with the other cases
                print(f"FAIL {dtype} {shape}: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
    if not results:
        return 1
    text = markdown(results, machine)
    print(text)
    if args.json:
        meta = result_meta("cuda", argv, repeats=args.repeats, header=machine)
        write_result(args.json, meta, results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
