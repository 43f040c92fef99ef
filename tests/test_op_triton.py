"""The Triton-fused nested-LSTM op against the naive reference: outputs, final states, every gradient.

Runs the kernels under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, so CI needs no
GPU. The variable is read when the kernels are decorated, so it must be set before the first
``import triton`` / kernel-module import in the pytest process: this module sets it at import time
(``setdefault``, so ``TRITON_INTERPRET=0 pytest ...`` on a GPU machine runs the same checks on CUDA
with the real compiler); ``tests/conftest.py`` sets it for the whole session too. Setting it has
no effect on modules that do not use Triton.

bfloat16 is computed wrongly by the interpreter, so bf16 and CUDA-graph tests run only on CUDA
without the interpreter (``benchmarks/gpu_check.py`` is the one-command GPU check).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip(
    "triton", reason="triton is not installed (optional dependency nestrnn[triton])"
)

from nestrnn.ops.nested_lstm.common import LevelWeights
from nestrnn.ops.nested_lstm.fused_triton import TritonConfig, nested_lstm_triton

from nestrnn.ops.nested_lstm import nested_lstm
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
ON_CUDA = not INTERPRET
cuda_only = pytest.mark.skipif(
    not ON_CUDA, reason="needs a CUDA device with TRITON_INTERPRET unset (interpreter run)"
)

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
NAMES = ("output", "h_n", "c_n", "grad x", "grad h0", "grad c0")
PACKED = torch.tensor([3, 3, 2, 1, 1])  # T = 5, B = 3


def make_case(T, B, In, H, D, bias=True, zero_state=False, seed=0):
    """fp64 leaves: x, h0, c0 and the flat list of D LevelWeights (biases None when ``bias`` off)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    weights = []
    for k in range(D):
        weights.append(
            LevelWeights(
                rnd(4 * H, In if k == 0 else H) * 0.5,
                rnd(4 * H, H) * 0.5,
                rnd(4 * H) * 0.5 if bias else None,
                rnd(4 * H) * 0.5 if bias else None,
            )
        )
    x = rnd(T, B, In)
    h0 = torch.zeros(B, H, dtype=torch.float64) if zero_state else rnd(B, H)
    c0 = torch.zeros(D, B, H, dtype=torch.float64) if zero_state else rnd(D, B, H)
    return x, weights, h0, c0


def run_op(fn, x, weights, h0, c0, batch_sizes, reverse, dtype, device):
    """Run ``fn`` on copies of the leaves in ``dtype``; backprop a fixed random projection."""
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (x, h0, c0)]
    wts = [
        LevelWeights(
            *[None if p is None else p.detach().to(device, dtype).requires_grad_() for p in lw]
        )
        for lw in weights
    ]
    out = fn(leaves[0], wts, leaves[1], leaves[2], batch_sizes, reverse)
    g = torch.Generator().manual_seed(1234)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(device)).sum()
               for o in out)  # fmt: skip
    loss.backward()
    results = {name: o.detach().double().cpu() for name, o in zip(NAMES[:3], out)}
    for name, leaf in zip(NAMES[3:], leaves):
        results[name] = leaf.grad.double().cpu()
    for k, lw in enumerate(wts):
        for name, p in zip(LevelWeights._fields, lw):
            if p is not None:
                results[f"level {k} {name}"] = p.grad.double().cpu()
    return results


def check(dtype, T, B, In, H, D, batch_sizes=None, reverse=False, bias=True, zero_state=False,
          config=None, seed=0):  # fmt: skip
    x, weights, h0, c0 = make_case(T, B, In, H, D, bias, zero_state, seed)
    # the reference sees exactly the values the op sees (rounded to ``dtype``), in fp64
    rounded = [t.to(dtype).double() for t in (x, h0, c0)]
    weights = [LevelWeights(*[None if p is None else p.to(dtype).double() for p in lw])
               for lw in weights]  # fmt: skip
    ref = run_op(nested_lstm_naive, rounded[0], weights, rounded[1], rounded[2], batch_sizes,
                 reverse, torch.float64, "cpu")  # fmt: skip

    def triton_fn(*args):
        return nested_lstm_triton(*args, config=config)

    got = run_op(triton_fn, rounded[0], weights, rounded[1], rounded[2], batch_sizes, reverse,
                 dtype, DEVICE)  # fmt: skip
    assert ref.keys() == got.keys()
    n_weights = sum(p is not None for lw in weights for p in lw)
    assert len(got) == 6 + n_weights  # every gradient is there
    bad = []
    for name, want in ref.items():
        err = (got[name] - want).abs().max().item() / max(1.0, want.abs().max().item())
        if not err <= TOL[dtype]:
            bad.append(f"{name}: scaled max error {err:.2e}")
    assert not bad, f"{dtype} D={D} H={H}: " + "; ".join(bad)


# (depth, hidden, batch_sizes, reverse, bias, zero_state): depths 1-3, H incl. non-powers of two
FP32_CASES = [
    (1, 8, None, False, True, False),
    (1, 17, PACKED, True, True, False),
    (2, 17, None, False, True, False),
    (2, 3, PACKED, False, False, False),
    (2, 8, None, True, True, True),
    (3, 17, PACKED, True, True, False),
    (3, 8, None, False, False, False),
    (3, 3, None, True, True, False),
]


@pytest.mark.parametrize(("depth", "hidden", "batch_sizes", "reverse", "bias", "zero_state"),
                         FP32_CASES)  # fmt: skip
def test_fp32_matches_naive(depth, hidden, batch_sizes, reverse, bias, zero_state):
    check(torch.float32, 5, 3, 4, hidden, depth, batch_sizes, reverse, bias, zero_state)


FP16_CASES = [
    (1, 17, None, False, True),
    (2, 8, PACKED, True, True),
    (3, 17, None, False, False),
    (3, 3, PACKED, False, True),
]


@pytest.mark.parametrize(("depth", "hidden", "batch_sizes", "reverse", "bias"), FP16_CASES)
def test_fp16_matches_naive(depth, hidden, batch_sizes, reverse, bias):
    check(torch.float16, 5, 3, 6, hidden, depth, batch_sizes, reverse, bias)


@pytest.mark.parametrize(("depth", "batch_sizes", "reverse"), [(2, PACKED, False), (3, None, True)])
def test_many_programs_and_k_chunks(depth, batch_sizes, reverse):
    """Force several batch tiles, several unit tiles and several reduction chunks (masked tails)."""
    if ON_CUDA:
        config = TritonConfig(block_b=16, block_h=16, block_k=16)
        check(torch.float32, 5, 20, 6, 40, depth, None, reverse, config=config)
    else:
        config = TritonConfig(block_b=2, block_h=16, block_k=16)
        check(torch.float32, 5, 3, 6, 17, depth, batch_sizes, reverse, config=config)


@cuda_only
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_bf16_matches_naive(depth):
    check(torch.bfloat16, 5, 3, 6, 17, depth, PACKED, depth == 2)


@cuda_only
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_graph_matches_naive(reverse):
    config = TritonConfig(cuda_graph=True)
    for seed in (0, 1):  # second call replays the cached graph with new inputs
        check(torch.float32, 5, 3, 6, 17, 2, PACKED, reverse, config=config, seed=seed)


def test_chunked_sequence_equals_whole():
    """Returned state fed back in gives the whole-sequence result (truncated BPTT)."""
    x, weights, h0, c0 = make_case(4, 2, 3, 8, 2)
    x, h0, c0 = (t.float().to(DEVICE) for t in (x, h0, c0))
    weights = [LevelWeights(*[p.float().to(DEVICE) for p in lw]) for lw in weights]
    with torch.no_grad():
        y, h_n, c_n = nested_lstm_triton(x, weights, h0, c0)
        y1, h1, c1 = nested_lstm_triton(x[:2], weights, h0, c0)
        y2, h2, c2 = nested_lstm_triton(x[2:], weights, h1, c1)
    torch.testing.assert_close(torch.cat([y1, y2]), y)
    torch.testing.assert_close(h2, h_n)
    torch.testing.assert_close(c2, c_n)


def test_dispatcher_uses_triton_backend():
    x, weights, h0, c0 = make_case(3, 2, 3, 8, 2)
    x, h0, c0 = (t.float().to(DEVICE) for t in (x, h0, c0))
    weights = [LevelWeights(*[p.float().to(DEVICE) for p in lw]) for lw in weights]
    with torch.no_grad():
        got = nested_lstm(x, weights, h0, c0, backend="triton")
        want = nested_lstm_naive(x, weights, h0, c0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unsupported_dtypes_raise():
    x, weights, h0, c0 = make_case(2, 2, 3, 8, 1)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        nested_lstm_triton(x.to(DEVICE), [LevelWeights(*[p.to(DEVICE) for p in lw]) for lw in weights],
                           h0.to(DEVICE), c0.to(DEVICE))  # fmt: skip
    mixed = [LevelWeights(*[p.float().to(DEVICE) for p in lw]) for lw in weights]
    with pytest.raises(ValueError, match="one dtype"):
        nested_lstm_triton(x.half().to(DEVICE), mixed, h0.half().to(DEVICE), c0.half().to(DEVICE))
    if INTERPRET:
        bf = [LevelWeights(*[p.bfloat16() for p in lw]) for lw in weights]
        with pytest.raises(ValueError, match="bfloat16"):
            nested_lstm_triton(x.bfloat16(), bf, h0.bfloat16(), c0.bfloat16())


def test_importing_nestrnn_does_not_import_triton():
    code = (
        "import sys, importlib\n"
        "for name in ('nestrnn', 'nestrnn.ops', 'nestrnn.ops.nested_lstm'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        if name == 'nestrnn.ops.nested_lstm': raise\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_cuda_graph_buffer_logic_emulated(monkeypatch):
    """The CUDA-graph path's static buffers (copy in, fill, clone out, cache reuse) on CPU.

    A stand-in for the captured graph re-runs the step loop on the static buffers, which is what a
    replay does; so this checks everything but the capture itself (that is ``cuda_only`` below and
    in ``benchmarks/gpu_check.py``).
    """
    from nestrnn.ops.nested_lstm import fused_triton as ft

    made = []

    class FakeGraphed:
        def __init__(self, loop, meta, static):
            self.loop, self.meta, self.static = loop, meta, static
            loop(meta, static)  # warm-up run, as the real one does
            made.append(self)

        def __call__(self, inputs, fill=None):
            for name, value in inputs.items():
                self.static[name].copy_(value)
            if fill is not None:
                fill(self.static)
            self.loop(self.meta, self.static)
            return self.static

    monkeypatch.setattr(ft, "_Graphed", FakeGraphed)
    monkeypatch.setattr(ft, "_graph_enabled", lambda meta, bufs: bool(meta.cfg.cuda_graph))
    monkeypatch.setattr(ft, "_GRAPHS", ft.OrderedDict())
    config = TritonConfig(cuda_graph=True)
    for seed in (0, 1):  # the second call reuses both cached "graphs" with new inputs
        check(torch.float32, 4, 3, 4, 8, 2, PACKED[:4], seed == 1, config=config, seed=seed)
        check(torch.float32, 4, 3, 4, 8, 2, PACKED[:4], seed == 1, config=config, seed=seed + 5)
    assert len(made) == 4  # forward + backward, for each direction


_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _probe(x_ptr, BLOCK: triton.language.constexpr):
        offs = triton.language.arange(0, BLOCK)
        triton.language.store(x_ptr + offs, triton.language.load(x_ptr + offs) + 1.0)

    target = GPUTarget("cuda", 90, 32)
    triton.compile(ASTSource(fn=_probe, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                             constexprs={"BLOCK": 16}), target=target)
except Exception as exc:
    print("SETUP", type(exc).__name__, str(exc)[:300])
    sys.exit(0)

from nestrnn.ops.nested_lstm import triton_kernels as K
from nestrnn.ops.nested_lstm.fused_triton import pick_config

FP32 = {"xproj_ptr", "gates_ptr", "c_ptr", "dA_ptr", "dh_ptr", "dc_ptr", "bias_ptr"}

def compile_one(fn, dtype, consts, num_warps):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "bs_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32 else "*" + dtype
        else:
            sig[name] = "i32"
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                   options={"num_warps": num_warps})

for dtype, prec, depth, batch, hidden in (("fp16", "tf32", 3, 5, 200), ("fp32", "ieee", 1, 100, 2000)):
    cfg = pick_config(batch, hidden)
    common = dict(REVERSE=True, HAS_BS=True, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h,
                  BLOCK_K=cfg.block_k, DOT_PREC=prec)
    jobs = [(K.fwd_outer_kernel, dict(common, DEPTH=depth)),
            (K.bwd_inner_kernel, dict(common, DEPTH=depth))]
    jobs += [(K.fwd_nested_kernel, dict(common, LEVEL=k, DEPTH=depth, HAS_BIAS=True))
             for k in range(1, depth)]
    jobs += [(K.bwd_level_kernel, dict(common, LEVEL=k)) for k in range(depth - 1)]
    for fn, consts in jobs:
        try:
            compile_one(fn, dtype, consts, cfg.num_warps)
            print("OK", fn.__name__, dtype, consts)
        except Exception as exc:
            print("FAIL", fn.__name__, dtype, consts, type(exc).__name__, str(exc)[:2000])
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The real compiler (not the interpreter) turns every kernel into sm_90 code; no GPU needed.

    Catches what the interpreter lets through (dot sizes < 16, branch type mismatches, ...).
    Skipped when this Triton build cannot compile for CUDA offline.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    script = tmp_path / "compile_sm90.py"  # @triton.jit needs its source in a file
    script.write_text(_COMPILE_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=root)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    if any(line.startswith("SETUP") for line in lines):
        pytest.skip(f"cannot compile for CUDA offline here: {lines[0]}")
    failed = [line for line in lines if line.startswith("FAIL")]
    assert not failed, "\n".join(failed)
    assert sum(line.startswith("OK") for line in lines) == 8  # 6 kernels at depth 3, 2 at depth 1


def test_layer_with_triton_backend_matches_generic_path():
    """The whole layer (2 layers, bidirectional, packed) through the kernels, as users run it."""
    from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

    from nestrnn import NestedLSTM

    torch.manual_seed(0)
    fused = NestedLSTM(
        3, 5, num_layers=2, bidirectional=True, memory="triton_nested", backend="triton"
    )
    generic = NestedLSTM(3, 5, num_layers=2, bidirectional=True, depth=2, backend="generic")
    generic.load_state_dict(fused.state_dict(), strict=True)  # same parameter names
    sequences = [torch.randn(n, 3) for n in (4, 2, 3)]
    results = []
    for layer in (fused, generic):
        out, (h, c) = layer(pack_sequence(sequences, enforce_sorted=False))
        padded, _ = pad_packed_sequence(out)
        (padded.square().sum() + h.sum() + c.sum()).backward()
        results.append((padded, h, c, [p.grad.clone() for p in layer.parameters()]))
    for got, expected in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for got, expected in zip(results[0][3], results[1][3]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
