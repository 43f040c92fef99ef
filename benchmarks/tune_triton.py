"""Launch configurations of the Triton loops, measured: depth-2 microseconds a step per candidate.

    python benchmarks/tune_triton.py --dtypes bf16,fp16 --shapes 128x1024x50,256x1024x50
    python benchmarks/tune_triton.py --compile-only --jobs 8   # fill Triton's cache in parallel
    python benchmarks/tune_triton.py --interpret               # dry run on CPU (TRITON_INTERPRET=1)
    python benchmarks/tune_triton.py --write                   # and rewrite the op's table

For each dtype and (B, H, T) every candidate ``TritonConfig`` (``pick_config``'s choices, for
step loops in CUDA graphs and launched directly, the latter with the other GEMM choice too,
``CUBLAS_CANDIDATES``, and those of ``CANDIDATES`` with a batch block no larger than the batch
needs; ``--quick``: all but the last) is

1. checked: the op with that configuration against the naive reference at the shape's B and H over
   four steps (gpu_check.py's comparison: outputs, final state, every gradient, its tolerances); a
   configuration that fails or does not launch is reported and not timed;
2. timed in the paper's depth-2 chain (NLSTM-2 of speed.py), forward (inference) and
   forward+backward, with the step loops in CUDA graphs (the kernels' own time) and without (as
   launched from Python), median of ``--repeats`` CUDA-event timings, beside cuDNN's
   ``nn.LSTM(H, H, 2)`` in the same process.

The table gives microseconds a step and each time against ``pick_config``'s choice; the JSON has
every number. ``--compile-only`` compiles every candidate's kernels for the given dtypes in
``--jobs`` processes (Triton caches them on disk), so that the timing run finds them compiled.
``--write [PATH]`` rewrites the launch-configuration table the op reads
(``nestrnn/ops/nested_lstm/triton_configs.json``, or PATH) from the run: each measured dtype, (B, H)
and mode (CUDA graph, direct launches) gets a row with its fastest correct configuration, ahead of
the table's other rows, which keep every shape not measured as it was.
Imports torch, triton and this repository (gpu_check.py and speed.py beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import gpu_check
import speed
import torch
from bench_common import describe_line, describe_machine, environment, parse_shapes, triton_configs

from nestrnn.ops.nested_lstm import planning
from nestrnn.ops.nested_lstm import triton_configs as launch_configs

#: (block_b, block_h, block_k, num_warps, num_stages or None for Triton's default) that compile
#: for sm_90 without register spills in bfloat16 (ptxas -v on Triton's PTX), from 16 to 128 rows
#: and 16 to 64 units a program, and a few other pipelining depths
CANDIDATES = (
    (16, 16, 32, 4, None),
    (16, 16, 64, 4, None),
    (16, 16, 64, 4, 4),
    (16, 32, 64, 4, None),
    (32, 16, 32, 4, None),
    (32, 16, 64, 4, None),
    (32, 16, 64, 4, 4),
    (32, 64, 32, 8, None),
    (32, 64, 64, 8, None),
    (64, 16, 32, 4, None),
    (64, 16, 32, 4, 2),
    (64, 16, 32, 4, 4),
    (64, 16, 64, 4, None),
    (64, 32, 32, 8, None),
    (64, 32, 64, 8, None),
    (64, 32, 64, 8, 2),
    (64, 32, 64, 8, 4),
    (64, 32, 128, 8, None),
    (128, 16, 32, 8, None),
    (128, 16, 64, 8, None),
)
#: float32 keeps its operands in shared memory at twice the size: the smaller tiles only
FP32_CANDIDATES = (
    (16, 16, 32, 4, None),
    (32, 16, 32, 4, None),
    (64, 16, 32, 4, None),
    (16, 16, 64, 4, None),
    (32, 16, 64, 4, None),
    (64, 16, 64, 4, None),
    (32, 32, 32, 4, None),
)
#: the per-step GEMMs by cuBLAS, the kernels doing the rest (pointwise tiles; no K loop), besides
#: pick_config's blocks with cuBLAS
CUBLAS_CANDIDATES = ((32, 32, 32, 4, None, True), (64, 64, 32, 8, None, True))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPEED_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CHECK_STEPS = 4


def triton_loop():
    from nestrnn.ops.nested_lstm import triton_loop as module  # imports Triton

    return module


def triton_graphs():
    from nestrnn.ops.nested_lstm import triton_graphs as module  # imports Triton

    return module


def candidates(dtype: str, batch: int, hidden: int, quick: bool = False):
    """The configurations tried at (batch, hidden): ``pick_config``'s for CUDA graphs first, then
    its for direct launches and the same with the other GEMM choice, then those of the tables whose
    batch block is at most the batch rounded up to a power of two (and at least 16); ``quick``:
    only ``CUBLAS_CANDIDATES`` of the tables."""
    loop = triton_loop()
    unset = loop.TritonConfig(cuda_graph=False)
    graphed, direct = (
        loop.pick_config(batch, hidden, unset, DTYPES[dtype], graphed=mode)
        for mode in (True, False)
    )
    limit = max(16, launch_configs.pow2(batch))
    table = () if quick else FP32_CANDIDATES if dtype == "fp32" else CANDIDATES
    found = [graphed]
    for cfg in (direct, replace(direct, cublas_gemms=not direct.cublas_gemms)):
        if cfg not in found:
            found.append(cfg)
    for entry in (*CUBLAS_CANDIDATES, *table):
        cfg = make_config(entry)
        if cfg.block_b <= limit and cfg not in found:
            found.append(cfg)
    return found


def forced(config):
    """The op launches its kernels with ``config`` (its graph setting aside)."""
    return triton_configs(lambda batch, hidden, given: replace(config, cuda_graph=graph_of(given)))


def graph_of(given) -> bool | None:
    """The CUDA-graph setting of the configuration the op passed (None: the default)."""
    return given.cuda_graph if given is not None else None


def make_config(fields):
    """A TritonConfig from (block_b, block_h, block_k, num_warps, num_stages[, cublas_gemms]),
    graphs off."""
    bb, bh, bk, warps, stages, *cublas = fields
    return triton_loop().TritonConfig(
        bb,
        bh,
        bk,
        warps,
        cuda_graph=False,
        num_stages=stages,
        cublas_gemms=bool(cublas and cublas[0]),
    )


def fields(cfg) -> tuple:
    return (
        cfg.block_b,
        cfg.block_h,
        cfg.block_k,
        cfg.num_warps,
        cfg.num_stages,
        bool(cfg.cublas_gemms),
    )


def label(cfg) -> str:
    stages = "" if cfg.num_stages is None else f" s{cfg.num_stages}"
    cublas = " cuBLAS" if cfg.cublas_gemms else ""
    return f"{cfg.block_b}x{cfg.block_h}x{cfg.block_k} w{cfg.num_warps}{stages}{cublas}"


# ------------------------------------------------------------------------------- compile only


def _compile_one(job: tuple[str, tuple]) -> str:
    """Run one dtype and configuration's kernels once at a tiny size (their compile key is the
    same as at the timed shapes: B and H multiples of 16); returns a line to print."""
    dtype, entry = job
    cfg = make_config(entry)
    case = gpu_check.Case("compile", dtype, (2, 16, 32, 32), 2)
    start = time.perf_counter()
    try:
        with forced(cfg), environment("NESTRNN_TRITON_CUDA_GRAPH", "0"):
            x, weights, h0, c0, _ = gpu_check.make_inputs(case, 0, "cuda")
            gpu_check.run(
                gpu_check.triton_op,
                x,
                weights,
                h0,
                c0,
                None,
                False,
                case.activations(),
                DTYPES[dtype],
            )
        torch.cuda.synchronize()
    except Exception as exc:
        return f"compile {dtype} {label(cfg)}: {type(exc).__name__}: {str(exc)[:200]}"
    failure = planning.failures().get("triton")
    state = f"FAILED ({failure})" if failure else "ok"
    return f"compile {dtype} {label(cfg)}: {state} in {time.perf_counter() - start:.1f} s"


def compile_all(dtypes: list[str], shapes, jobs: int, quick: bool) -> None:
    work = sorted(
        {
            (dt, fields(cfg))
            for dt in dtypes
            for b, h, _ in shapes
            for cfg in candidates(dt, b, h, quick)
        },
        key=str,
    )
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        for line in pool.map(_compile_one, work):
            print(line, flush=True)
    print(f"compiled {len(work)} configurations in {time.perf_counter() - start:.0f} s")


# ------------------------------------------------------------------------------- check and time


def check(dtype: str, cfg, batch: int, hidden: int, device: str) -> bool:
    case = gpu_check.Case(f"tune {label(cfg)}", dtype, (CHECK_STEPS, batch, hidden, hidden), 2)
    with forced(cfg):
        return gpu_check.check_seed(case, 0, device)


def time_config(cfg, model, x, grad_out, timer, repeats: int) -> dict:
    """Microseconds a step of ``model`` under ``cfg``, forward and forward+backward, with the step
    loops always and never in CUDA graphs."""
    with forced(cfg):
        result = speed.per_step_times(model, x, grad_out, timer, repeats, direct_column="direct")
    triton_loop().clear_cuda_graphs()
    failure = planning.failures().get("triton")
    if failure:
        planning.forget_failures()
        raise RuntimeError(f"the kernels failed and another implementation ran: {failure}")
    return result


def lstm_times(shape, dtype, device: str, timer, repeats: int) -> dict:
    batch, hidden, steps = shape
    model = torch.nn.LSTM(hidden, hidden, 2).to(device, dtype)
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    calls = {
        "fwd": lambda: speed.inference(model, x),
        "fwd+bwd": lambda: model(x)[0].backward(grad_out),
    }
    result = {}
    for mode, fn in calls.items():
        fn()
        result[mode] = statistics.median(timer(fn) for _ in range(repeats)) * 1e3 / steps
    return result


def tune_shape(dtype: str, shape, device: str, repeats: int, timer, quick: bool) -> dict:
    batch, hidden, steps = shape
    torch_dtype = DTYPES[dtype]
    model = speed.standard_chain(2)(hidden, "triton").to(device, torch_dtype)
    x = torch.randn(steps, batch, hidden, device=device, dtype=torch_dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    rows = []
    for cfg in candidates(dtype, batch, hidden, quick):
        row = {"config": label(cfg), "fields": fields(cfg)}
        if not check(dtype, cfg, batch, hidden, device):
            row["error"] = "wrong or failed (see the check's line)"
        else:
            try:
                row.update(time_config(cfg, model, x, grad_out, timer, repeats))
            except Exception as exc:  # e.g. out of shared memory: report and go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(f"  {dtype} {batch}x{hidden}x{steps} {row}", flush=True)
    return {
        "dtype": dtype,
        "B": batch,
        "H": hidden,
        "T": steps,
        "rows": rows,
        "lstm2": lstm_times(shape, torch_dtype, device, timer, repeats),
    }


def best(result: dict, mode: str | None = None) -> tuple | None:
    """The fields of the fastest correct configuration of one tuned shape: the least sum of its
    forward and forward+backward times against ``pick_config``'s choice, in ``mode`` ("graph" or
    "direct"; None: the mode the op runs there by default, CUDA graphs up to
    ``AUTO_GRAPH_MAX_BATCH_HIDDEN``, else direct)."""
    if mode is None:
        graphs = result["B"] * result["H"] <= triton_graphs().AUTO_GRAPH_MAX_BATCH_HIDDEN
        mode = "graph" if graphs else "direct"
    columns = (f"fwd_{mode}", f"fwd+bwd_{mode}")
    rows = [row for row in result["rows"] if "error" not in row]
    if not rows:
        return None
    base = result["rows"][0] if "error" not in result["rows"][0] else rows[0]
    row = min(rows, key=lambda r: sum(r[c] / base[c] for c in columns))
    return tuple(row["fields"])


def table_rows(results: list[dict], previous: tuple) -> list[tuple[dict, object]]:
    """The rows of a launch-configuration table (``triton_configs.write_table``) from this
    script's ``results``: per dtype, (B, H) and mode the fastest correct configuration (``best``),
    then the rows of ``previous`` (``triton_configs.load_table``) not replaced by one of those."""
    rows = []
    for result in results:
        name = str(DTYPES[result["dtype"]]).removeprefix("torch.")
        for graphed in (True, False):
            entry = best(result, "graph" if graphed else "direct")
            if entry is None:
                continue
            when = {
                "dtypes": [name],
                "min_batch": result["B"],
                "max_batch": result["B"],
                "min_hidden": result["H"],
                "max_hidden": result["H"],
                "graphed": graphed,
            }
            rows = [(w, c) for w, c in rows if w != when]  # a shape measured twice: the later run
            rows.append((when, make_config(entry)))
    measured = [when for when, _ in rows]
    kept = [(when, make_config(entry)) for when, entry in previous if when not in measured]
    return rows + kept


def write_table(results: list[dict], path: str, machine: str) -> None:
    """Rewrite the launch-configuration table at ``path`` (the op's own where it does not exist
    yet) from ``results`` (``table_rows``); its note gains a line saying where it was measured."""
    source = Path(path) if Path(path).exists() else launch_configs.TABLE_PATH
    previous = launch_configs.load_table(source)
    earlier = json.loads(source.read_text()).get("note", "")
    note = f"Written by benchmarks/tune_triton.py on {machine}, measured shapes first. {earlier}"
    launch_configs.write_table(table_rows(results, previous), Path(path), note.strip())


@contextlib.contextmanager
def tuned(path: str, dtype: str):
    """The op launches the best configuration of ``path`` (this script's JSON) for ``dtype`` (short
    or torch's name) at each (B, H) tuned there, and ``pick_config``'s own choice elsewhere
    (speed.py --triton-configs)."""
    with open(path) as f:
        results = json.load(f)["results"]
    dtype = {long: short for short, long in SPEED_DTYPES.items()}.get(dtype, dtype)
    table = {(r["B"], r["H"]): best(r) for r in results if r["dtype"] == dtype}

    def choose(batch, hidden, given):
        entry = table.get((batch, hidden))
        return given if entry is None else replace(make_config(entry), cuda_graph=graph_of(given))

    with triton_configs(choose):
        yield {key: label(make_config(entry)) for key, entry in table.items() if entry}


COLUMNS = ("fwd_graph", "fwd+bwd_graph", "fwd_direct", "fwd+bwd_direct")


def markdown(results: list[dict], machine: str) -> str:
    out = [
        "# Triton launch configurations, depth 2 (benchmarks/tune_triton.py)",
        "",
        machine,
        "",
        "Microseconds a step; in brackets the time against the first row of each table "
        "(`pick_config`'s choice for CUDA graphs). graph: step loops in CUDA graphs (the "
        "kernels alone); direct: launched "
        "from Python. cuDNN: `nn.LSTM(H, H, 2)` in the same process.",
        "",
    ]
    for res in results:
        lstm = res["lstm2"]
        out += [
            f"## {res['dtype']} B={res['B']} H={res['H']} T={res['T']} "
            f"(cuDNN LSTM-2: fwd {lstm['fwd']:.1f}, f+b {lstm['fwd+bwd']:.1f})",
            "",
            "| config (B x H x K block, warps) | " + " | ".join(COLUMNS) + " |",
            "|---|" + "---|" * len(COLUMNS),
        ]
        base = res["rows"][0]
        for row in res["rows"]:
            if "error" in row:
                out.append(f"| {row['config']} | {row['error']} |" + " |" * (len(COLUMNS) - 1))
                continue
            cells = []
            for col in COLUMNS:
                rel = f" ({row[col] / base[col]:.2f})" if col in base else ""
                cells.append(f"{row[col]:.1f}{rel}")
            out.append(f"| {row['config']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def parse_dtypes(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {list(DTYPES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tune_triton.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dtypes", type=parse_dtypes, default=["bf16", "fp16"])
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=parse_shapes("32x256x50,128x512x50,128x1024x50,256x1024x50,16x768x50"),
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="pick_config's choices and CUBLAS_CANDIDATES only"
    )
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="dry run on CPU under TRITON_INTERPRET=1 (fp32 only)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument(
        "--write",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="rewrite the op's launch-configuration table (or PATH) from the run",
    )
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
        device = "cpu"
        args.dtypes = [dt for dt in args.dtypes if dt == "fp32"] or ["fp32"]
    elif not torch.cuda.is_available():
        parser.error("no CUDA device (--interpret runs on CPU)")
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # as speed.py and gpu_check.py
    torch.backends.cudnn.allow_tf32 = False
    if args.compile_only and device == "cuda":
        compile_all(args.dtypes, args.shapes, args.jobs, args.quick)
        return 0
    machine = describe_line(describe_machine(device))
    print(machine, flush=True)
    timer = speed.Timer(torch.device(device), speed.Interference(), 1.0)
    results = []
    for dtype in args.dtypes:
        for shape in args.shapes:
            results.append(tune_shape(dtype, shape, device, args.repeats, timer, args.quick))
            write(results, machine, args)  # after each shape: a run cut short keeps what it did
    print(markdown(results, machine))
    if args.write is not None:
        path = args.write or str(launch_configs.TABLE_PATH)
        write_table(results, path, machine)
        print(f"wrote {path}")
    return 0


def write(results: list[dict], machine: str, args: argparse.Namespace) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, machine) + "\n")


if __name__ == "__main__":
    sys.exit(main())
