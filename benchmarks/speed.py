"""Speed of Nested LSTMs against torch.nn.LSTM, every comparison measured in one process.

    python benchmarks/speed.py                          # CPU, float32, default shapes
    python benchmarks/speed.py --quick                  # (B, H, T) = (32, 256, 100), 3 repeats
    python benchmarks/speed.py --threads 1 --clock process --variants --memories
    python benchmarks/speed.py --device cuda --backend triton --plain-loop torch_loop --split

Rows, each timed forward only and forward+backward, and the rows each is compared with:

    NLSTM-D       the standard nested chain of depth D (the paper's activations, biases), one layer
                  and direction through the op, as NestedLSTM(H, H, depth=D) runs it, with
                  ``--backend`` (``generic``: NestedLSTM's per-step path). Against
                  nn.LSTM(H, H, num_layers=D), which has its parameter count and FLOPs
                  (docs/design.md), and nn.LSTM(num_layers=1).
    --variants    depth-2 variants of the chain on the same backend: the outer candidate tanh, the
                  nested cell activation softsign, a bias-free nested level. Against NLSTM-2.
    --memories    memory functions written by users, on NestedLSTM's generic path (backend
                  "auto"): the README's LeakyMemory and the GRU plugin's GRUMemory (skipped when
                  nestrnn-gru is not installed). Against nn.LSTM(num_layers=1), which does the
                  outer LSTM's work.
    --plain-loop  NLSTM-2 through another implementation (``torch_loop``: the plain per-step
                  PyTorch loop), at most ``--plain-loop-repeats`` times. Against NLSTM-2: its
                  ratio is the speed-up of ``--backend`` over it.
    --split       per shape, a per-step time split of NLSTM-2 (see ``time_split``).
    --regularisers  NestedLSTM(H, H, depth=2) with one recurrent regulariser on (weight drop
                  0.5 on every level, locked input/output dropout 0.1, zoneout 0.5 of the cells
                  and 0.05 of h, segment recomputation every T/4 steps), on ``--backend``.
                  Against the same layer without it ("NLSTM-2 layer"). fwd is evaluation, where
                  dropout and weight drop are off and zoneout is its expectation.

fwd is inference (eval mode, torch.no_grad()); fwd+bwd is training mode with an input that
requires grad (as after an embedding or another layer) and a fixed random output gradient. Input
size = hidden size, batch_first=False, one dtype for inputs and parameters, TF32 off on CUDA.

Every repeat times every model once, in an order rotated from one repeat to the next, so that
drift of the machine hits all alike; a ratio is the median over repeats of the per-repeat ratio.
``--budget`` caps the repeats of a shape from the warm-up times. On CPU a measurement during which
other processes took more than ``--max-interference`` of the machine (/proc/stat) is taken again.

Before timing, every row is compared with the naive reference at a small size (outputs, final
states, every gradient); a wrong kernel is never timed, and neither is a fallback: the
implementation the op runs for each row is checked before and after timing and reported.
Imports torch and nestrnn (and nestrnn_gru when installed). Without nestrnn's own dependencies
(a bare GPU machine) only the op's rows are available.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_common import (
    MACHINE_KEYS,
    describe_line,
    describe_machine,
    environment,
    import_nestrnn,
    parse_shapes,
    result_meta,
    scaled_error,
    write_result,
)

MISSING = import_nestrnn()  # None, or why only the op is available

from nestrnn.memory.base import MemoryFunction  # noqa: E402
from nestrnn.ops.common.levels import standard_activations  # noqa: E402
from nestrnn.ops.nested_lstm import (  # noqa: E402
    LevelActivations,
    LevelWeights,
    nested_lstm,
    nested_lstm_naive,
    plan,
)

DEFAULT_SHAPES = "32x256x100,128x512x100,16x128x100,64x512x50"
QUICK_SHAPES = "32x256x100"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: implementations of the op, and "naive" (its reference); "generic" is NestedLSTM's per-step path
CHAIN_BACKENDS = ("auto", "c_loop", "torch_loop", "triton", "naive")
BACKENDS = (*CHAIN_BACKENDS, "generic")
MODES = ("fwd", "fwd+bwd")
#: depth-2 variants of the standard chain, as NestedLSTM runs ``memory={"name": "nested", OPTION}``
#: with OPTION outer_candidate_activation="tanh", cell_activation="softsign" or bias=False:
#: per-level activations and (level 0, level 1) biases
VARIANTS = {
    "outer candidate tanh": ((LevelActivations(), LevelActivations()), (True, True)),
    "cell softsign": (
        (LevelActivations(candidate="identity"), LevelActivations(cell="softsign")),
        (True, True),
    ),
    "bias-free level": (standard_activations(2), (True, False)),
}


# ---------------------------------------------------------------------------------- timing


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

    def note(self) -> str:
        return (
            f"{self.measured} measurements, {self.retaken} retaken because other processes used "
            f"> {self.max_interference:.0%} of the CPU, {self.contaminated} kept anyway after "
            f"{self.tries} tries"
        )


def seconds(fn: Callable[[], None], device: torch.device) -> float:
    """Wall-clock seconds of one synchronised call (warm-up runs, budgets)."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------- models


class OpChain(torch.nn.Module):
    """One direction of one Nested LSTM layer through the op, as NestedLSTM calls it, from a zero
    state. Level k holds an ``nn.LSTMCell``'s parameters and initialisation (biases or not);
    backend "naive" runs the op's reference instead."""

    def __init__(self, hidden: int, activations, biases, backend: str) -> None:
        super().__init__()
        self.levels = torch.nn.ModuleList(torch.nn.LSTMCell(hidden, hidden, b) for b in biases)
        self.activations, self.backend = tuple(activations), backend

    def weights(self) -> list[LevelWeights]:
        return [LevelWeights(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh) for c in self.levels]

    def forward(self, x: torch.Tensor):
        depth, batch, hidden = len(self.levels), x.shape[1], self.levels[0].hidden_size
        h0, c0 = x.new_zeros(batch, hidden), x.new_zeros(depth, batch, hidden)
        args = (x, self.weights(), h0, c0, None, False, self.activations)
        if self.backend == "naive":
            out, h_n, c_n = nested_lstm_naive(*args)
        else:
            out, h_n, c_n = nested_lstm(*args, backend=self.backend)
        return out, (h_n, c_n)

    def implementation(self, x: torch.Tensor, training: bool) -> str:
        """The implementation the op runs for ``x`` in eager mode (a warning says why, where it
        falls back)."""
        if self.backend == "naive":
            return "naive"
        hidden = self.levels[0].hidden_size
        planned = plan(
            x, None, False, self.activations, training, self.backend, eager=True, hidden=hidden
        )
        return planned.implementation


class LeakyMemory(MemoryFunction):
    """The README's example memory function (there registered as "leaky").

    c_t = a * (f*c_{t-1}) + (1 - a) * tanh(i*g), with a learned per-unit a.
    """

    num_states = 0  # extra (batch, hidden) tensors carried between steps
    outer_candidate_activation = "tanh"  # what the outer LSTM applies to g

    def __init__(self, hidden_size):
        super().__init__(hidden_size)
        self.logit = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, gated_cell, gated_input, state):
        a = torch.sigmoid(self.logit)
        return a * gated_cell + (1 - a) * torch.tanh(gated_input), ()


Build = Callable[[int, str], torch.nn.Module]  # (hidden size, backend) -> model

#: --regularisers rows: NestedLSTM options (checkpoint_every is set to T/4 at each shape)
REGULARISERS = {
    "+ weight drop": {"weight_drop": 0.5},
    "+ locked dropout": {"locked_dropout": True, "input_dropout": 0.1, "output_dropout": 0.1},
    "+ zoneout": {"zoneout_cell": 0.5, "zoneout_hidden": 0.05},
    "+ layer norm": {"layer_norm": True},
    "+ recompute T/4": {"checkpoint_every": 1},
}


def lstm(layers: int) -> Build:
    return lambda hidden, _backend: torch.nn.LSTM(hidden, hidden, layers)


def op_chain(activations, biases) -> Build:
    return lambda hidden, backend: OpChain(hidden, activations, biases, backend)


def standard_chain(depth: int) -> Build:
    """The paper's depth-``depth`` chain with biases, through the op."""
    return op_chain(standard_activations(depth), (True,) * depth)


def layer(**options) -> Build:
    """NestedLSTM(H, H, **options); ``memory`` given as a factory of the hidden size."""
    from nestrnn.layer import NestedLSTM

    memory = options.pop("memory", None)

    def build(hidden: int, backend: str) -> torch.nn.Module:
        extra = {"memory": memory(hidden)} if memory else {}
        return NestedLSTM(hidden, hidden, backend=backend, **options, **extra)

    return build


def implementation_of(model: torch.nn.Module, x: torch.Tensor, training: bool) -> str:
    if isinstance(model, OpChain):
        return model.implementation(x, training)
    if isinstance(model, torch.nn.LSTM):
        return "cuDNN" if x.is_cuda else "torch"
    levels = model.memory_l0.fused_levels()
    if levels is None or model.backend in ("generic", "naive") or model.proj_size:
        return f"NestedLSTM backend {model.backend}"
    # the layer's call of the op (NestedLSTM._run_levels): what the op plans for it
    candidate = model.memory_l0.outer_candidate_activation
    activations = (LevelActivations(candidate=candidate), *(a for _, a in levels))
    zoneout = any(model.zoneout_cell) or bool(model.zoneout_hidden)
    return plan(
        x,
        None,
        False,
        activations,
        training,
        model.backend,
        hidden=model.hidden_size,
        zoneout=zoneout,
        norms=any(model.layer_norm),
    ).implementation


@dataclass(frozen=True)
class Row:
    """A model timed at every shape, and the rows its times are divided by."""

    name: str
    group: str  # "depth", "lstm", "variant", "memory" or "plain loop"
    build: Build
    backend: str = ""  # "" for nn.LSTM (nothing to check)
    baselines: tuple[str, ...] = ()
    max_repeats: int | None = None


def make_rows(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """The rows the options ask for, and notes on rows left out."""
    notes = []
    needs_nlstm2 = args.variants or args.plain_loop or args.split
    depths = sorted({*args.depths, *([2] if needs_nlstm2 else [])})
    rows = []
    for d in depths:
        build = layer(depth=d) if args.backend == "generic" else standard_chain(d)
        rows.append(Row(f"NLSTM-{d}", "depth", build, args.backend, (f"LSTM-{d}", "LSTM-1")))
    rows += [Row(f"LSTM-{d}", "lstm", lstm(d)) for d in sorted({1, *depths})]
    for name, (acts, biases) in VARIANTS.items() if args.variants else ():
        rows.append(Row(name, "variant", op_chain(acts, biases), args.backend, ("NLSTM-2",)))
    if args.memories:
        rows.append(Row("LeakyMemory", "memory", layer(memory=LeakyMemory), "auto", ("LSTM-1",)))
        try:
            from nestrnn_gru import GRUMemory
        except ImportError as err:
            notes.append(f"GRUMemory row skipped: the nestrnn-gru plugin is not importable ({err})")
        else:
            rows.append(Row("GRUMemory", "memory", layer(memory=GRUMemory), "auto", ("LSTM-1",)))
    if args.regularisers:
        rows.append(Row("NLSTM-2 layer", "regulariser", layer(depth=2), args.backend))
        for name, options in REGULARISERS.items():
            build = layer(depth=2, **options)
            rows.append(Row(name, "regulariser", build, args.backend, ("NLSTM-2 layer",)))
    if args.plain_loop:
        name, repeats = f"NLSTM-2 {args.plain_loop}", args.plain_loop_repeats
        rows.append(
            Row(name, "plain loop", standard_chain(2), args.plain_loop, ("NLSTM-2",), repeats)
        )
    return rows, notes


# ---------------------------------------------------------------------------------- correctness


def check_rows(rows: list[Row], device: torch.device, dtype: torch.dtype) -> dict:
    """Compare every row's model with the same model on backend "naive" in float64 at a small
    size: outputs, final states and every gradient. Raises AssertionError on a mismatch, and
    RuntimeError where a row's backend would not run what it names (see ``require_backend``)."""
    steps, batch, hidden = 7, 3, 17
    report = {}
    for row in rows:
        if row.backend in ("", "naive"):
            continue
        # float64 on CPU where the implementation has it (Triton has not); else the timed dtype
        run_dtype = torch.float64 if device.type == "cpu" and row.backend != "triton" else dtype
        tol = 1e-9 if run_dtype == torch.float64 else (2e-3 if dtype == torch.float32 else 1e-1)
        torch.manual_seed(0)
        fast = row.build(hidden, row.backend).to(device, run_dtype)
        ref = row.build(hidden, "naive").to(device, torch.float64)
        ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
        set_recompute_segments((fast, ref), steps)
        x = torch.randn(steps, batch, hidden, device=device, dtype=torch.float64)
        require_backend([row], implementations({row.name: fast}, x.to(dtype)))
        grad_out = torch.randn(steps, batch, hidden, device=device, dtype=torch.float64)
        results = []
        for model, dt in ((fast, run_dtype), (ref, torch.float64)):
            torch.manual_seed(1)  # the same dropout and zoneout masks for both
            xi = x.to(dt).requires_grad_()
            out, (h_n, c_n) = model(xi)
            loss = (out.double() * grad_out).sum() + h_n.double().sum() + c_n.double().sum()
            loss.backward()
            results.append([out, h_n, c_n, xi.grad, *(p.grad for p in model.parameters())])
        worst = max(scaled_error(got, want) for got, want in zip(*results))
        if not worst <= tol:
            raise AssertionError(
                f"{row.name} (backend {row.backend}) differs from the naive reference: scaled "
                f"error {worst:.3g} > {tol:g}; refusing to time a wrong kernel"
            )
        report[row.name] = {"dtype": str(run_dtype).removeprefix("torch."), "max_error": worst}
    return report


def implementations(models: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, dict]:
    return {
        name: {mode: implementation_of(model, x, mode == "fwd+bwd") for mode in MODES}
        for name, model in models.items()
    }


def require_backend(rows: list[Row], planned: dict[str, dict]) -> None:
    """A row whose backend names an implementation must run it (no fallback under its name)."""
    for row in rows:
        for mode, chosen in planned[row.name].items():
            if row.backend in ("c_loop", "torch_loop", "triton") and chosen != row.backend:
                raise RuntimeError(
                    f"{row.name} {mode}: backend {row.backend!r} runs {chosen} here (the warning "
                    "above says why); refusing to time it under that name"
                )


# ---------------------------------------------------------------------------------- one shape


def time_shape(shape, rows, device, dtype, args, timer) -> tuple[dict, int, dict]:
    """Interleaved timing of every row at one shape: times (ms) by row and mode, the repeats
    taken, and the implementation each row ran."""
    batch, hidden, steps = shape
    torch.manual_seed(0)
    models = {row.name: row.build(hidden, row.backend).to(device, dtype) for row in rows}
    set_recompute_segments(models.values(), steps)
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
    x_train = x.clone().requires_grad_()
    grad_out = torch.randn(steps, batch, hidden, device=device, dtype=dtype)

    def run(name: str, mode: str) -> Callable[[], None]:
        """Set the model's mode and clear gradients (untimed); return the call to time."""
        model = models[name]
        model.train(mode == "fwd+bwd")
        if mode == "fwd":
            return lambda: inference(model, x)
        model.zero_grad(set_to_none=True)
        x_train.grad = None
        return lambda: model(x_train)[0].backward(grad_out)

    planned = implementations(models, x)
    require_backend(rows, planned)
    cost = {name: 0.0 for name in models}  # seconds of one repeat, from the last warm-up
    for name in models:
        for _ in range(args.warmup):  # first-call allocation, kernel compilation
            cost[name] = sum(seconds(run(name, mode), device) for mode in MODES)
    repeats = budgeted_repeats(rows, cost, args.repeats, args.budget)
    times = {name: {mode: [] for mode in MODES} for name in models}
    for r in range(repeats):
        for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
            if row.max_repeats is None or r < row.max_repeats:
                for mode in MODES:
                    times[row.name][mode].append(timer(run(row.name, mode)))
    after = implementations(models, x)
    changed = [name for name in planned if after[name] != planned[name]]
    if changed:
        raise RuntimeError(
            f"the implementation changed during the timing of {shape}: "
            + "; ".join(f"{name}: {planned[name]} -> {after[name]}" for name in changed)
        )
    return times, repeats, planned


def set_recompute_segments(models, steps: int) -> None:
    """Models that recompute segments do so every quarter of the shape's steps."""
    for model in models:
        if getattr(model, "checkpoint_every", None):
            model.checkpoint_every = max(1, steps // 4)


def inference(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def budgeted_repeats(rows: list[Row], cost: dict[str, float], repeats: int, budget) -> int:
    """``repeats``, or fewer (at least 3) where the warm-up times say they exceed ``budget`` s."""
    if budget is None:
        return repeats
    capped = sum(cost[r.name] * min(r.max_repeats, repeats) for r in rows if r.max_repeats)
    per_repeat = sum(cost[r.name] for r in rows if r.max_repeats is None)
    fitting = int((budget - capped) / per_repeat) if per_repeat > 0 else repeats
    return max(min(repeats, 3), min(repeats, fitting))


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over the repeats both have of the per-repeat ratio a / b."""
    return statistics.median(x / y for x, y in zip(a, b))


def summarize(shape, rows: list[Row], times: dict, repeats: int, planned: dict) -> list[dict]:
    """One record per row with baselines: its median times and its ratios to each baseline."""
    records = []
    for row in rows:
        if not row.baselines:
            continue
        mine = times[row.name]
        record = {
            "B": shape[0],
            "H": shape[1],
            "T": shape[2],
            "row": row.name,
            "group": row.group,
            "repeats": repeats,
            "implementation": planned[row.name],
        }
        for mode in MODES:
            record[f"{mode}_ms"] = statistics.median(mine[mode])
        record["vs"] = {
            base: {
                **{f"{mode}_ms": statistics.median(times[base][mode]) for mode in MODES},
                **{f"{mode}_ratio": median_ratio(mine[mode], times[base][mode]) for mode in MODES},
            }
            for base in row.baselines
        }
        records.append(record)
    return records


# ---------------------------------------------------------------------------------- split


def step_gemms(shape, dtype, device, backward: bool) -> Callable[[], None]:
    """The per-step GEMMs of a depth-2 step at ``shape``, T times (forward: h W_hh0^T and
    [x~|h~] W1^T; ``backward`` adds dA0 W_hh0 and dA1 W1), as one callable: on CUDA a captured
    CUDA graph (no launch overhead), else a loop of torch.mm calls."""
    batch, hidden, steps = shape

    def rand(*size):
        return torch.randn(*size, device=device, dtype=dtype)

    w0, w1, d = rand(4 * hidden, hidden), rand(4 * hidden, 2 * hidden), rand(batch, 4 * hidden)
    a0, a1, out = rand(batch, hidden), rand(batch, 2 * hidden), rand(batch, 4 * hidden)
    g0, g1 = rand(batch, hidden), rand(batch, 2 * hidden)

    def loop() -> None:
        for _ in range(steps):
            torch.mm(a0, w0.t(), out=out)
            torch.mm(a1, w1.t(), out=out)
            if backward:
                torch.mm(d, w0, out=g0)
                torch.mm(d, w1, out=g1)

    if device.type != "cuda":
        return loop
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        loop()  # warm-up outside the capture (cuBLAS workspaces)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop()
    return graph.replay


def time_split(shape, records, backend, device, dtype, timer, repeats=3) -> dict:
    """Microseconds per step of depth-2 work at ``shape``: NLSTM-2 and cuDNN's LSTM-2 (from the
    table, which times the default), NLSTM-2 with its Triton step loops always and never in CUDA
    graphs (``backend`` triton on CUDA), and the per-step GEMMs alone. op - graph is launch
    overhead; graph - GEMMs is the rest of the kernels' work (pointwise math, memory traffic)
    plus the GEMMs outside the loop."""
    steps = shape[2]
    mine = next(r for r in records if r["row"] == "NLSTM-2")
    split = {"B": shape[0], "H": shape[1], "T": steps}
    for mode in MODES:
        # the default's time; with Triton on CUDA, graphed_op replaces it by the no-graph time
        split[f"{mode}_op"] = mine[f"{mode}_ms"] * 1e3 / steps
        split[f"{mode}_lstm2"] = mine["vs"]["LSTM-2"][f"{mode}_ms"] * 1e3 / steps
        gemms = step_gemms(shape, dtype, device, backward=mode == "fwd+bwd")
        split[f"{mode}_gemms"] = (
            statistics.median(timer(gemms) for _ in range(repeats)) * 1e3 / steps
        )
    split.update(graphed_op(shape, backend, device, dtype, timer, repeats))
    return split


def graphed_op(shape, backend, device, dtype, timer, repeats) -> dict:
    """NLSTM-2's times per step without and with CUDA graphs (the main tables time the default,
    which captures only some shapes), or why there are none."""
    if backend != "triton" or device.type != "cuda":
        return {"graph_note": "CUDA graphs: Triton backend on CUDA only"}
    batch, hidden, steps = shape
    model = standard_chain(2)(hidden, "triton").to(device, dtype)
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    try:
        return per_step_times(model, x, torch.randn_like(x), timer, repeats)
    except RuntimeError as err:
        return {"graph_note": f"CUDA graphs: {err}"}


def per_step_times(model, x, grad_out, timer, repeats, direct_column="op") -> dict:
    """Microseconds a step of ``model`` (an NLSTM row on the triton backend) on ``x``, forward
    (inference) and forward+backward, with the op's step loops never (``direct_column``) and always
    (``graph``) in CUDA graphs; RuntimeError if the op ran another implementation."""
    calls = {"fwd": lambda: inference(model, x), "fwd+bwd": lambda: model(x)[0].backward(grad_out)}
    steps, result = x.shape[0], {}
    for setting, column in (("0", direct_column), ("1", "graph")):
        with environment("NESTRNN_TRITON_CUDA_GRAPH", setting):
            for mode, fn in calls.items():
                fn()  # warm-up (and capture)
                ran = implementation_of(model, x, mode == "fwd+bwd")
                if ran != "triton":
                    raise RuntimeError(f"the op ran {ran}")
                result[f"{mode}_{column}"] = (
                    statistics.median(timer(fn) for _ in range(repeats)) * 1e3 / steps
                )
    return result


# ---------------------------------------------------------------------------------- output


DEPTH_HEAD = (
    "| B | H | T | D | fwd NLSTM-D ms | fwd LSTM-D ms | fwd ratio | fwd vs LSTM-1 "
    "| f+b NLSTM-D ms | f+b LSTM-D ms | f+b ratio | f+b vs LSTM-1 |\n" + "|" + "---|" * 12
)
OTHER_HEAD = (
    "| B | H | T | row | compared with | fwd ms | fwd baseline ms | fwd ratio "
    "| f+b ms | f+b baseline ms | f+b ratio |\n" + "|" + "---|" * 11
)
SPLIT_HEAD = (
    "| B | H | T | fwd op, no graphs | fwd op, CUDA graphs | fwd step GEMMs | fwd cuDNN LSTM-2 "
    "| f+b op, no graphs | f+b op, CUDA graphs | f+b step GEMMs | f+b cuDNN LSTM-2 |\n"
    + "|"
    + "---|" * 11
)


def depth_line(r: dict) -> str:
    depth = r["row"].split("-")[1]
    same, one = r["vs"][f"LSTM-{depth}"], r["vs"]["LSTM-1"]
    return (
        f"| {r['B']} | {r['H']} | {r['T']} | {depth} "
        f"| {r['fwd_ms']:.2f} | {same['fwd_ms']:.2f} | **{same['fwd_ratio']:.2f}** "
        f"| {one['fwd_ratio']:.2f} | {r['fwd+bwd_ms']:.2f} | {same['fwd+bwd_ms']:.2f} "
        f"| **{same['fwd+bwd_ratio']:.2f}** | {one['fwd+bwd_ratio']:.2f} |"
    )


def other_line(r: dict) -> str:
    base, vs = next(iter(r["vs"].items()))
    return (
        f"| {r['B']} | {r['H']} | {r['T']} | {r['row']} | {base} "
        f"| {r['fwd_ms']:.2f} | {vs['fwd_ms']:.2f} | **{vs['fwd_ratio']:.2f}** "
        f"| {r['fwd+bwd_ms']:.2f} | {vs['fwd+bwd_ms']:.2f} | **{vs['fwd+bwd_ratio']:.2f}** |"
    )


def split_line(s: dict) -> str:
    cells = []
    for mode in MODES:
        graph = s.get(f"{mode}_graph")
        cells += [
            f"{s[f'{mode}_op']:.1f}",
            "n/a" if graph is None else f"{graph:.1f}",
            f"{s[f'{mode}_gemms']:.1f}",
            f"{s[f'{mode}_lstm2']:.1f}",
        ]
    return f"| {s['B']} | {s['H']} | {s['T']} | " + " | ".join(cells) + " |"


def summary_lines(records: list[dict]) -> list[str]:
    """The range over shapes of every ratio: the goal checks of the speed issues."""
    lines = []
    for row, base in dict.fromkeys((r["row"], b) for r in records for b in r["vs"]):
        ranges = []
        for mode in MODES:
            ratios = sorted(
                (r["vs"][base][f"{mode}_ratio"], f"{r['B']}x{r['H']}x{r['T']}")
                for r in records
                if r["row"] == row
            )
            (low, at_low), (high, at_high) = ratios[0], ratios[-1]
            ranges.append(f"{mode} {low:.2f} ({at_low}) to {high:.2f} ({at_high})")
        lines.append(f"{row} / {base}: " + ", ".join(ranges))
    return lines


def tables(records: list[dict], splits: list[dict]) -> str:
    """The Markdown tables of a run."""
    parts = [DEPTH_HEAD, *(depth_line(r) for r in records if r["group"] == "depth")]
    others = [r for r in records if r["group"] != "depth"]
    if others:
        parts += ["", OTHER_HEAD, *(other_line(r) for r in others)]
    if splits:
        parts += [
            "",
            "Microseconds per step, depth 2 (see speed.py's time_split):",
            "",
            SPLIT_HEAD,
            *(split_line(s) for s in splits),
        ]
        parts += sorted({s["graph_note"] for s in splits if "graph_note" in s})
    return "\n".join(parts)


def run_header(info: dict, args: argparse.Namespace, planned: dict) -> str:
    """One line: the machine, the settings and the implementation of every row (fwd / f+b)."""
    ran = [
        f"{name}: " + " / ".join(dict.fromkeys(modes.values())) for name, modes in planned.items()
    ]
    blocks = info.get("triton_configs")
    tuned = f"; Triton blocks (tune_triton.py): {blocks}" if blocks else ""
    return (
        f"{describe_line(info)}; {info['threads']} threads; {args.dtype}; backend {args.backend}; "
        f"median of up to {args.repeats} repeats; clock {info['clock']}; implementations: "
        + "; ".join(ran)
        + tuned
    )


def write_results(args, info, check, records, splits, raw, notes, summary) -> None:
    if args.json:
        settings = {k: v for k, v in info.items() if k not in MACHINE_KEYS}
        meta = result_meta(info["device_type"], **settings)
        write_result(
            args.json,
            meta,
            records,
            correctness=check,
            split=splits,
            summary=summary,
            notes=notes,
            raw=raw,
        )
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        header = info.get("header", describe_line(info))
        text = [header, "", tables(records, splits), "", *summary, *notes, info["timer"]]
        Path(args.markdown).write_text("\n".join(text) + "\n")


# ---------------------------------------------------------------------------------- main


def parse_depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"depths {text!r} are not integers") from None
    if min(depths) < 1:
        raise argparse.ArgumentTypeError("depths must be at least 1")
    return depths


def positive(cast):
    """An argparse type: ``cast(text)``, which must be above 0."""

    def parse(text: str):
        value = cast(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value

    parse.__name__ = cast.__name__  # argparse's message: "invalid int value: 'x'"
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="speed.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="of the NLSTM rows: the op's backend, naive, or generic (NestedLSTM's per-step path)",
    )
    p.add_argument(
        "--shapes", type=parse_shapes, default=None, help=f"BxHxT list (default {DEFAULT_SHAPES})"
    )
    p.add_argument("--depths", type=parse_depths, default=[1, 2, 3], help="default 1,2,3")
    p.add_argument("--repeats", type=positive(int), default=None, help="timed runs (default 7)")
    p.add_argument(
        "--warmup",
        type=positive(int),
        default=None,
        help="untimed runs first (default 1; 2 on CUDA, where the op's step loops are "
        "captured in CUDA graphs when their shapes repeat)",
    )
    p.add_argument(
        "--budget",
        type=positive(float),
        default=None,
        help="seconds per shape: fewer repeats (at least 3) where the warm-up says "
        "they would take longer",
    )
    p.add_argument("--threads", type=positive(int), default=None, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "process"],
        help="CPU timing: wall-clock, or this process's CPU time (with --threads 1 "
        "on a shared machine)",
    )
    p.add_argument(
        "--max-interference",
        type=float,
        default=0.05,
        help="retake a CPU measurement when other processes took more than this "
        "share of the machine (default 0.05; 1 disables)",
    )
    p.add_argument("--variants", action="store_true", help="depth-2 variant rows")
    p.add_argument("--memories", action="store_true", help="LeakyMemory and GRUMemory rows")
    p.add_argument(
        "--plain-loop",
        choices=CHAIN_BACKENDS,
        default=None,
        help="an NLSTM-2 row on this backend (torch_loop: the plain loop)",
    )
    p.add_argument("--plain-loop-repeats", type=positive(int), default=3)
    p.add_argument("--split", action="store_true", help="per-step time split at depth 2")
    p.add_argument("--regularisers", action="store_true", help="NLSTM-2 with each regulariser on")
    p.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, 3 repeats")
    p.add_argument(
        "--triton-configs",
        default=None,
        metavar="JSON",
        help="launch the Triton kernels with the best block configuration that "
        "tune_triton.py measured at each (B, H) it tuned (its --json file)",
    )
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--markdown", default=None, help="write the tables to this file")
    args = p.parse_args(argv)
    args.shapes = args.shapes or parse_shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = args.warmup or (2 if args.device == "cuda" else 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.variants and args.backend == "generic":
        p.error("--variants times the op's variants: choose one of the op's backends")
    layer_needed = args.memories or args.backend == "generic"
    if layer_needed and MISSING:
        p.error(
            f"NestedLSTM needs nestrnn's dependencies ({MISSING}): --memories and backend "
            "generic are unavailable"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.triton_configs:
        return run(args)
    import tune_triton

    with tune_triton.tuned(args.triton_configs, args.dtype) as configs:
        print(f"Triton block configurations from {args.triton_configs}: {configs}")
        return run(args, {"triton_configs": {f"{b}x{h}": c for (b, h), c in configs.items()}})


def run(args: argparse.Namespace, extra_info: dict | None = None) -> int:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, notes = make_rows(args)
    try:
        check = check_rows(rows, device, dtype)
    except (AssertionError, RuntimeError) as err:
        sys.exit(f"speed.py: {err}")
    errors = ", ".join(f"{k} {v['max_error']:.1e}" for k, v in check.items())
    print(f"correctness vs naive: OK, max scaled error {errors}" if check else "nothing to check")
    if args.clock == "process" and torch.get_num_threads() != 1:
        print("warning: --clock process with several threads also counts their spin-waiting")
    timer = Timer(device, Interference(), args.max_interference, clock=args.clock)
    info = describe_machine(device.type)
    info.update(
        threads=torch.get_num_threads(),
        dtype=args.dtype,
        backend=args.backend,
        clock="cuda events" if device.type == "cuda" else args.clock,
        nestrnn="op only: " + MISSING if MISSING else "whole package",
        **(extra_info or {}),
    )
    records, raw, failure = [], [], None
    for shape in args.shapes:
        try:
            times, repeats, planned = time_shape(shape, rows, device, dtype, args, timer)
        except RuntimeError as err:  # keep what was measured
            failure = f"speed.py: stopped at {shape}: {err}"
            print(failure, file=sys.stderr)
            break
        if "header" not in info:  # the implementations are known from the first shape on
            info["header"] = run_header(info, args, planned)
            print(info["header"], flush=True)
        records += summarize(shape, rows, times, repeats, planned)
        raw.append({"B": shape[0], "H": shape[1], "T": shape[2], "times_ms": times})
        print(f"{shape}: {repeats} repeats", flush=True)
    splits = []
    if args.split:  # last: a CUDA-graph capture that fails leaves the op on another implementation
        done = {(r["B"], r["H"], r["T"]) for r in records}
        for shape in (s for s in args.shapes if s in done):
            shape_records = [r for r in records if (r["B"], r["H"], r["T"]) == shape]
            splits.append(time_split(shape, shape_records, args.backend, device, dtype, timer))
    print(tables(records, splits))
    summary = summary_lines(records)
    info["timer"] = timer.note()
    print("ratio = median over repeats of the per-repeat time ratio (same process, interleaved)")
    print("\n".join([*summary, *notes, info["timer"]]))
    write_results(args, info, check, records, splits, raw, notes, summary)
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
