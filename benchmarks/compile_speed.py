"""Training speed of ``torch.compile(NestedLSTM)`` against the same model in eager mode.

    python benchmarks/compile_speed.py                  # 1 thread, CPU time
    python benchmarks/compile_speed.py --threads 2      # wall clock
    python benchmarks/compile_speed.py --shapes 32x256x100 --depth 3 --markdown out.md

Per shape (B, H, T): a depth-D NestedLSTM(H, H) and a compiled copy with the same weights each
take training steps (forward, a mean-square loss, backward, an SGD update). The first compiled
step's time (the compilation) is reported alone; then eager and compiled steps alternate and the
medians are compared. Only torch and nestrnn are imported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_common import import_nestrnn, parse_shapes, result_meta, write_result

MISSING = import_nestrnn()  # None, or why NestedLSTM is unavailable


def training_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    out, _ = model(x)
    (out - target).square().mean().backward()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= 0.01 * parameter.grad
            parameter.grad = None


def measure(shape: tuple[int, int, int], depth: int, repeats: int, clock) -> dict:
    from nestrnn import NestedLSTM  # the whole package (main checks that it imported)

    batch, hidden, steps = shape
    torch.manual_seed(0)
    eager = NestedLSTM(hidden, hidden, 1, depth=depth)
    model = NestedLSTM(hidden, hidden, 1, depth=depth)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model)
    x, target = torch.randn(steps, batch, hidden), torch.randn(steps, batch, hidden)
    start = time.perf_counter()
    training_step(compiled, x, target)
    first = time.perf_counter() - start
    training_step(eager, x, target)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for name, m in (("eager", eager), ("compiled", compiled)):
            start = clock()
            training_step(m, x, target)
            times[name].append((clock() - start) * 1e3)
    eager_ms, compiled_ms = (statistics.median(times[k]) for k in ("eager", "compiled"))
    return {"first_step_s": first, "eager_ms": eager_ms, "compiled_ms": compiled_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--shapes", type=parse_shapes, default="32x256x100,128x512x100", help="BxHxT list"
    )
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="1: CPU time, else wall clock")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if MISSING:
        parser.error(f"NestedLSTM needs nestrnn's dependencies ({MISSING})")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    lines = [
        f"torch {torch.__version__}, {args.threads} thread(s), depth {args.depth}, "
        f"median of {args.repeats} interleaved steps",
        "",
        "| B | H | T | first compiled step s | eager ms | compiled ms | compiled / eager |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for shape in args.shapes:
        r = measure(shape, args.depth, args.repeats, clock)
        rows.append(dict(zip("BHT", shape), **r))
        lines.append(
            f"| {' | '.join(map(str, shape))} | {r['first_step_s']:.1f} | {r['eager_ms']:.1f} "
            f"| {r['compiled_ms']:.1f} | **{r['compiled_ms'] / r['eager_ms']:.3f}** |"
        )
        print(lines[-1], flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.json:
        settings = {"threads": args.threads, "depth": args.depth, "repeats": args.repeats}
        write_result(args.json, result_meta("cpu", argv, **settings), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
