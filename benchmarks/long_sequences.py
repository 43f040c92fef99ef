"""Peak memory of one training step on long sequences, with and without segment recomputation.

    python benchmarks/long_sequences.py                      # T = 10,000 and 100,000
    python benchmarks/long_sequences.py --steps 1000 --every 100 --limit-gib 4

Each measurement is a fresh process that builds ``NestedLSTM(I, H, depth=D)``, runs one forward
and backward over a (T, B, I) input in training mode, and reports its peak resident memory
(``ru_maxrss``) minus the peak before the step (imports, model, input): the step's own memory. The
process runs under an address-space limit (``--limit-gib``), so a step that does not fit fails
with an allocation error instead of swapping the machine; it is reported as not fitting. Rows:
``checkpoint_every`` off (every step's saved tensors kept for the backward) and on (segments of
``--every`` steps recomputed in the backward from their saved starting state), at each T.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_common import describe_line, describe_machine, result_meta, write_result

CHILD = r"""
import json, resource, sys, time
import torch
from nestrnn import NestedLSTM
steps, batch, hidden, depth, every, threads = (int(a) for a in sys.argv[1:7])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = NestedLSTM(hidden, hidden, depth=depth, checkpoint_every=every or None)
x = torch.randn(steps, batch, hidden, requires_grad=True)
grad = torch.randn(steps, batch, hidden)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    out, _ = model(x)
    out.backward(grad)
except RuntimeError as error:  # the allocator's "can't allocate memory" under the limit
    print(json.dumps({"fits": False, "error": str(error).splitlines()[0][:200]}))
    sys.exit(0)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"fits": True, "step_mib": (peak - before) / 1024, "peak_mib": peak / 1024,
                  "seconds": seconds}))
"""


def measure(steps: int, args: argparse.Namespace, every: int) -> dict:
    """One step in a fresh process under the address-space limit."""
    limit = int(args.limit_gib * 2**30)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, "-c", CHILD, str(steps), str(args.batch), str(args.hidden)]
    command += [str(args.depth), str(every), str(args.threads)]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, preexec_fn=limit_memory, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        result = {"fits": False, "error": reason[:200]}
    else:
        result = json.loads(lines[-1])
    result.update(T=steps, checkpoint_every=every or None, wall_s=time.perf_counter() - started)
    return result


def line(r: dict) -> str:
    every = r["checkpoint_every"] or "off"
    if not r["fits"]:
        return f"| {r['T']:,} | {every} | did not fit | - | {r['error']} |"
    return f"| {r['T']:,} | {every} | {r['step_mib']:,.0f} | {r['seconds']:.1f} | |"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="long_sequences.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--steps", default="10000,100000", help="sequence lengths T (comma-separated)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128, help="hidden size = input size")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--every", type=int, default=1000, help="checkpoint_every of the second row")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-gib", type=float, default=12.0, help="address-space limit")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--markdown", default=None, help="write the table to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for every in (0, args.every):
            rows.append(measure(steps, args, every))
            print(line(rows[-1]), flush=True)
    info = describe_machine("cpu")
    head = (
        f"{describe_line(info)}; NestedLSTM({args.hidden}, {args.hidden}, depth={args.depth}), "
        f"batch {args.batch}, {args.threads} thread(s), float32, one forward+backward; "
        f"address space limited to {args.limit_gib:g} GiB\n\n"
        "| T | checkpoint_every | step memory (MiB) | seconds | |\n|---|---|---|---|---|"
    )
    table = "\n".join([head, *(line(r) for r in rows)])
    print(table)
    settings = {k: getattr(args, k) for k in ("batch", "hidden", "depth", "threads", "limit_gib")}
    if args.json:
        write_result(args.json, result_meta("cpu", argv, **settings), rows)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
