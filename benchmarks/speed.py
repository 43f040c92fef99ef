"""Speed of NestedLSTM (depth 1, 2, 3) against torch.nn.LSTM (num_layers 1, 2, 3), same process.

    python benchmarks/speed.py                       # CPU, float32, default shapes
    python benchmarks/speed.py --quick               # one small shape, few repeats
    python benchmarks/speed.py --device cuda --backend triton --json out.json
    python benchmarks/speed.py --shapes 32x256x100,128x512x100 --repeats 9 --markdown out.md

A depth-D Nested LSTM has the parameter count and FLOPs of a D-layer stacked LSTM of the same hidden
size (DESIGN.md section 1), so NLSTM-D is compared with nn.LSTM(num_layers=D); the ratio against
nn.LSTM(num_layers=1) is reported too. Input size = hidden size, batch_first=False, inputs and
parameters in one dtype (float32 by default), TF32 off on CUDA.

What is timed, per shape (B, H, T):
    fwd     forward only, inference (eval mode, torch.no_grad())
    fwd+bwd forward and backward in training mode; the input requires grad (as it does after an
            embedding or a previous layer); the backward gets a fixed random output gradient
Every repeat times every model once, in an order rotated from one repeat to the next, so that
drift of the machine hits all models alike; the table reports the median time per model and the
median over repeats of the per-repeat ratio NLSTM-D / LSTM-D (and NLSTM-D / LSTM-1).

On a shared Linux machine a measurement during which other processes took a noticeable share of
the CPU (read from /proc/stat) is thrown away and taken again (``--max-interference``), since two
OpenMP threads competing with a third process can slow a kernel several times.

Before timing, the backend is checked against the naive reference at a small size (outputs, final
states and every gradient); a wrong kernel is never timed. Only torch and nestrnn are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from nestrnn import NestedLSTM
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nestrnn import NestedLSTM

DEFAULT_SHAPES = "32x256x100,128x512x100,16x128x100,64x512x50"
QUICK_SHAPES = "32x256x100"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------- helpers


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'32x256x100,128x512x100' -> [(B, H, T), ...]."""
    shapes = []
    for part in text.split(","):
        b, h, t = (int(v) for v in part.lower().split("x"))
        shapes.append((b, h, t))
    return shapes


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


class Interference:
    """CPU time used by OTHER processes (Linux /proc; reports 0 elsewhere).

    Busy jiffies of the whole machine (/proc/stat) minus those of this process (/proc/self/stat),
    as a fraction of the machine's capacity over an interval.
    """

    def __init__(self) -> None:
        self.enabled = Path("/proc/stat").exists() and Path("/proc/self/stat").exists()
        self.cpus = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if self.enabled else 100

    def _read(self) -> tuple[float, int, int]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        values = [int(v) for v in fields]
        busy = sum(values) - values[3] - values[4]  # minus idle and iowait
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        mine = int(own[11]) + int(own[12])  # utime + stime of all threads
        return time.perf_counter(), busy, mine

    def start(self) -> tuple[float, int, int]:
        return self._read() if self.enabled else (0.0, 0, 0)

    def fraction(self, mark: tuple[float, int, int], slack_ticks: int = 1) -> float:
        """Share of the machine that other processes used since ``mark`` (``slack_ticks``
        forgiven: jiffies are 10 ms, too coarse for short measurements)."""
        if not self.enabled:
            return 0.0
        t0, busy0, mine0 = mark
        t1, busy1, mine1 = self._read()
        others = max(0, (busy1 - busy0) - (mine1 - mine0) - slack_ticks)
        return others / (max(t1 - t0, 1e-9) * self.tick * self.cpus)

    def wait_quiet(self, threshold: float, max_wait: float, window: float = 0.2) -> bool:
        """Sleep until other processes used at most ``threshold`` of the machine during one
        ``window``; give up after ``max_wait`` seconds. Returns whether it got quiet."""
        if not self.enabled or threshold >= 1:
            return True
        deadline = time.perf_counter() + max_wait
        while True:
            mark = self.start()
            time.sleep(window)
            if self.fraction(mark, slack_ticks=0) <= threshold:
                return True
            if time.perf_counter() > deadline:
                return False


class Timer:
    """Times one call: CUDA events on CUDA; on CPU wall-clock (``clock="wall"``) or the CPU time
    of this process (``clock="process"``: meaningful with one thread, it leaves out the time other
    processes hold the core).

    On CPU every measurement first waits (up to ``max_wait`` s) for the machine to be quiet, and is
    taken again (up to ``tries`` times) when other processes used more than ``max_interference``
    of it meanwhile; ``retaken`` and ``contaminated`` (kept after the last try) count those.
    """

    def __init__(
        self,
        device: torch.device,
        interference: Interference,
        max_interference: float,
        clock: str = "wall",
        tries: int = 5,
        max_wait: float = 20.0,
    ):
        self.device = device
        self.interference = interference
        self.max_interference = max_interference
        self.clock = time.process_time if clock == "process" else time.perf_counter
        self.tries, self.max_wait = tries, max_wait
        self.measured = self.retaken = self.contaminated = 0

    def __call__(self, fn: Callable[[], None]) -> float:
        """Milliseconds for one call of ``fn``."""
        self.measured += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end)
        ms = 0.0
        for _ in range(self.tries):
            self.interference.wait_quiet(self.max_interference, self.max_wait)
            mark = self.interference.start()
            t0 = self.clock()
            fn()
            ms = (self.clock() - t0) * 1e3
            if self.interference.fraction(mark) <= self.max_interference:
                return ms
            self.retaken += 1
        self.contaminated += 1
        return ms


# ---------------------------------------------------------------------------------- models


def make_nested(hidden: int, depth: int, backend: str, device, dtype) -> torch.nn.Module:
    return NestedLSTM(hidden, hidden, num_layers=1, depth=depth, backend=backend).to(device, dtype)


def make_lstm(hidden: int, layers: int, device, dtype) -> torch.nn.Module:
    return torch.nn.LSTM(hidden, hidden, num_layers=layers).to(device, dtype)


def check_correctness(backend: str, device: torch.device, dtype: torch.dtype, depths) -> dict:
    """Compare NestedLSTM(backend) with NestedLSTM(backend='naive') at a small size: outputs,
    final states and every gradient. Raises AssertionError on a mismatch."""
    torch.manual_seed(0)
    steps, batch, hidden = 7, 3, 16
    # float64 on CPU where the backend supports it; otherwise the benchmark dtype vs naive fp64
    run_dtype = torch.float64 if device.type == "cpu" else dtype
    tol = 1e-9 if run_dtype == torch.float64 else (2e-3 if dtype == torch.float32 else 1e-1)
    report = {}
    for depth in depths:
        fast = make_nested(hidden, depth, backend, device, run_dtype)
        ref = make_nested(hidden, depth, "naive", device, torch.float64)
        ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
        x = torch.randn(steps, batch, hidden, device=device, dtype=run_dtype)
        grad_out = torch.randn(steps, batch, hidden, device=device, dtype=torch.float64)
        results = []
        for model, dt in ((fast, run_dtype), (ref, torch.float64)):
            xi = x.to(dt).requires_grad_()
            out, (h_n, c_n) = model(xi)
            loss = (out.double() * grad_out).sum() + h_n.double().sum() + c_n.double().sum()
            loss.backward()
            grads = [xi.grad] + [p.grad for p in model.parameters()]
            results.append([out, h_n, c_n, *grads])
        worst = 0.0
        for got, want in zip(*results):
            want = want.double()
            err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
            worst = max(worst, err)
        if not worst <= tol:
            raise AssertionError(
                f"backend {backend!r} depth {depth} differs from the naive reference: "
                f"scaled error {worst:.3g} > {tol:g}; refusing to time a wrong kernel"
            )
        report[f"depth{depth}"] = worst
    return {"dtype": str(run_dtype).replace("torch.", ""), "tolerance": tol, "max_error": report}


# ---------------------------------------------------------------------------------- timing


def time_shape(shape, depths, backend, device, dtype, repeats, timer, warmup) -> dict:
    """Interleaved timing of every model at one shape. Returns per-model times (ms)."""
    batch, hidden, steps = shape
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {}
    for d in depths:
        models[f"NLSTM-{d}"] = make_nested(hidden, d, backend, device, dtype)
    for d in sorted({1, *depths}):
        models[f"LSTM-{d}"] = make_lstm(hidden, d, device, dtype)
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
    x_train = x.clone().requires_grad_()
    grad_out = torch.randn(steps, batch, hidden, device=device, dtype=dtype)

    def fwd(model):
        def run():
            with torch.no_grad():
                model(x)

        return run

    def fwd_bwd(model):
        def run():
            out, _ = model(x_train)
            out.backward(grad_out)

        return run

    runs = {name: (fwd(m), fwd_bwd(m)) for name, m in models.items()}
    names = list(models)
    for name in names:  # warm-up (first-call allocation, Triton compilation)
        for _ in range(warmup):
            models[name].eval()
            runs[name][0]()
            models[name].train()
            runs[name][1]()
    times = {name: {"fwd": [], "fwd+bwd": []} for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            model = models[name]
            model.eval()
            times[name]["fwd"].append(timer(runs[name][0]))
            model.train()
            for p in model.parameters():
                p.grad = None
            x_train.grad = None
            times[name]["fwd+bwd"].append(timer(runs[name][1]))
    return times


def summarize(shape, depths, times) -> list[dict]:
    """Median times and median per-repeat ratios for one shape."""
    rows = []
    for d in depths:
        row = {"B": shape[0], "H": shape[1], "T": shape[2], "depth": d}
        for mode in ("fwd", "fwd+bwd"):
            nl, same, one = (times[k][mode] for k in (f"NLSTM-{d}", f"LSTM-{d}", "LSTM-1"))
            row[f"{mode}_ms_nlstm"] = statistics.median(nl)
            row[f"{mode}_ms_lstm_same"] = statistics.median(same)
            row[f"{mode}_ms_lstm1"] = statistics.median(one)
            row[f"{mode}_ratio_vs_lstm_same"] = statistics.median(a / b for a, b in zip(nl, same))
            row[f"{mode}_ratio_vs_lstm1"] = statistics.median(a / b for a, b in zip(nl, one))
        rows.append(row)
    return rows


TABLE_HEAD = (
    "| B | H | T | D | fwd NLSTM-D ms | fwd LSTM-D ms | fwd ratio | fwd vs LSTM-1 "
    "| f+b NLSTM-D ms | f+b LSTM-D ms | f+b ratio | f+b vs LSTM-1 |\n" + "|" + "---|" * 12
)


def format_row(r: dict) -> str:
    return (
        f"| {r['B']} | {r['H']} | {r['T']} | {r['depth']} "
        f"| {r['fwd_ms_nlstm']:.2f} | {r['fwd_ms_lstm_same']:.2f} "
        f"| **{r['fwd_ratio_vs_lstm_same']:.2f}** | {r['fwd_ratio_vs_lstm1']:.2f} "
        f"| {r['fwd+bwd_ms_nlstm']:.2f} | {r['fwd+bwd_ms_lstm_same']:.2f} "
        f"| **{r['fwd+bwd_ratio_vs_lstm_same']:.2f}** | {r['fwd+bwd_ratio_vs_lstm1']:.2f} |"
    )


def format_table(rows: list[dict]) -> str:
    return "\n".join([TABLE_HEAD, *(format_row(r) for r in rows)])


# ---------------------------------------------------------------------------------- main


def cpu_loop() -> str:
    """Which time loop the fused op runs on CPU (float32/float64), and why."""
    from nestrnn.ops.nested_lstm import native

    status = native.status()
    return "C kernel loop" if status.available else f"PyTorch loop ({status.reason})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--backend", default="auto", help="NestedLSTM backend (auto/fused/triton)")
    parser.add_argument("--shapes", default=None, help=f"BxHxT list (default {DEFAULT_SHAPES})")
    parser.add_argument("--depths", default="1,2,3", help="Nested LSTM depths (default 1,2,3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--max-interference",
        type=float,
        default=0.05,
        help="retry a CPU measurement when other processes took more than this "
        "share of the machine (default 0.05; 1 disables)",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "process"],
        help="CPU timing: wall-clock (default) or this process's CPU time (use with --threads 1 "
        "on a shared machine)",
    )
    parser.add_argument(
        "--own-depth1",
        action="store_true",
        help="time the hand-written kernel at depth 1 too (by default depth 1 runs torch's LSTM)",
    )
    parser.add_argument(
        "--cpu-loop",
        default="auto",
        choices=["auto", "torch"],
        help="time loop of the fused op on CPU: auto (the C kernel where it builds) or torch "
        "(the PyTorch loop, as on a machine without a C compiler)",
    )
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, 3 repeats")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the table to this file")
    parser.add_argument("--skip-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_loop == "torch":
        os.environ["NESTRNN_NATIVE"] = "0"
    dtype = DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))
    depths = [int(d) for d in args.depths.split(",")]
    repeats = args.repeats or (3 if args.quick else 7)

    if args.own_depth1:  # diagnostic: keep depth 1 off torch's LSTM kernel (checked below too)
        from nestrnn.ops.nested_lstm import fused

        fused._torch_lstm_applies = lambda *a: False
    check = None
    if not args.skip_check:
        check = check_correctness(args.backend, device, dtype, depths)
        print(
            f"correctness vs naive ({check['dtype']}): OK, max scaled error "
            + ", ".join(f"{k} {v:.1e}" for k, v in check["max_error"].items())
        )

    if args.clock == "process" and torch.get_num_threads() != 1:
        print("warning: --clock process with several threads also counts their spin-waiting")
    timer = Timer(device, Interference(), args.max_interference, clock=args.clock)
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "dtype": args.dtype,
        "backend": args.backend,
        "repeats": repeats,
        "clock": "cuda events" if device.type == "cuda" else args.clock,
        "depth1_kernel": "hand-written (--own-depth1)" if args.own_depth1 else "backend default",
        "cpu_loop": cpu_loop() if device.type == "cpu" else None,
        "python": platform.python_version(),
    }
    print(
        f"{info['device']} | torch {info['torch']} | {info['threads']} threads | {args.dtype} | "
        f"backend {args.backend} | {repeats} repeats, median | clock {info['clock']}"
        + (f" | {info['cpu_loop']}" if info["cpu_loop"] else "")
    )
    all_rows, raw = [], []
    print(TABLE_HEAD, flush=True)
    for shape in shapes:
        times = time_shape(shape, depths, args.backend, device, dtype, repeats, timer, args.warmup)
        rows = summarize(shape, depths, times)
        all_rows += rows
        raw.append({"B": shape[0], "H": shape[1], "T": shape[2], "times_ms": times})
        print("\n".join(format_row(r) for r in rows), flush=True)
    info["measurements"] = timer.measured
    info["retaken_for_interference"] = timer.retaken
    info["contaminated_kept"] = timer.contaminated
    note = (
        f"{timer.measured} measurements, {timer.retaken} retaken because other processes used "
        f"> {args.max_interference:.0%} of the CPU, {timer.contaminated} kept anyway after "
        f"{timer.tries} tries"
    )
    print("ratio = median over repeats of NLSTM-D / LSTM-D time (same process, interleaved)")
    print(note)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"info": info, "correctness": check, "results": all_rows, "raw": raw}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"{info['device']}, torch {info['torch']}, {info['threads']} threads, "
            f"{args.dtype}, backend {args.backend}, median of {repeats} repeats, "
            f"clock {info['clock']}"
            + (f", {info['cpu_loop']}" if info["cpu_loop"] else "")
            + f"; {note}\n\n"
        )
        Path(args.markdown).write_text(header + format_table(all_rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
