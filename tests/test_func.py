"""torch.func and forward-mode AD on NestedLSTM, as on nn.LSTM.

Every transform is checked in float64 against the same transform of the reference (the model with
``backend="naive"``, which runs ``nested_lstm_naive``: plain PyTorch, differentiable at every
order) at depths 1 to 3, and at depth 1 against nn.LSTM; and on a user memory function (the
generic path) against nn.LSTM-free arithmetic of the same transform on its naive path.
"""

from __future__ import annotations

import pytest
import torch
from helpers_memories import Leaky
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

from nestrnn import NestedLSTM

DEPTHS = [1, 2, 3]
EXACT = {"atol": 1e-10, "rtol": 1e-10}


def pair(depth: int | None = None, memory=None) -> tuple[nn.Module, nn.Module]:
    """The model under test and its reference, with the same parameters, in float64. Two layers,
    bidirectional: both directions and a layer fed by another."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = NestedLSTM(3, 4, depth=depth, memory=memory, **kwargs)
    reference = NestedLSTM(3, 4, depth=depth, memory=memory, backend="naive", **kwargs)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def lstm_pair() -> tuple[nn.Module, nn.Module]:
    """NestedLSTM(depth=1) and nn.LSTM with the same parameters."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = NestedLSTM(3, 4, num_layers=2, bidirectional=True, depth=1, dtype=torch.float64)
    ours.load_state_dict(lstm.state_dict(), strict=True)
    return ours, lstm


def inputs(batch: int = 2) -> torch.Tensor:
    return torch.randn(4, batch, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def outputs(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every result of the model as one tensor: output, h_n and c_n."""
    out, (h, c) = m(x)
    return torch.cat([out.flatten(), h.flatten(), c.flatten()])


def loss(m: nn.Module, params: dict, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out, (_, c) = functional_call(m, params, (x,))
    return (out - target).square().sum() + c.tanh().sum()


# Each transform of a model: a function of the model giving tensors (or a tuple of them).
def looped(f, in_dims=0):
    """What ``vmap(f, in_dims)`` computes, as a loop: for nn.LSTM, which has no batching rule."""

    def run(*args):
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        runs = [
            f(*(a if d is None else a.select(d, n) for a, d in zip(args, dims)))
            for n in range(size)
        ]
        return torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *runs)

    return run


TRANSFORMS = {
    "vmap": lambda m, vmap=vmap: vmap(lambda x: outputs(m, x))(torch.randn(3, 4, 2, 3).double()),
    "vmap_in_dims_2": lambda m, vmap=vmap: vmap(lambda x: outputs(m, x), in_dims=2)(
        torch.randn(4, 2, 3, 3).double()
    ),
    "jacrev": lambda m: jacrev(lambda x: outputs(m, x))(inputs()),
    "jacfwd": lambda m: jacfwd(lambda x: outputs(m, x))(inputs()),
    "hessian": lambda m: hessian(lambda x: outputs(m, x).square().sum())(inputs(1)),
    "jvp": lambda m: jvp(lambda x: outputs(m, x), (inputs(),), (inputs() * 0.5 + 1,)),
    "forward_ad": lambda m: forward_mode(m),
    "jacrev_params": lambda m: jacrev(lambda p: outputs_with(m, p))(dict(m.named_parameters())),
    "jvp_params": lambda m: params_jvp(m),
    "per_sample_grads": lambda m, vmap=vmap: per_sample_grads(m, vmap),
}


def forward_mode(m: nn.Module) -> torch.Tensor:
    """``torch.autograd.forward_ad`` (not torch.func): the tangent of every result."""
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        x = fwad.make_dual(inputs(), inputs() * 0.5 + 1)
        return fwad.unpack_dual(outputs(m, x)).tangent


def outputs_with(m: nn.Module, params: dict) -> torch.Tensor:
    out, (h, c) = functional_call(m, params, (inputs(),))
    return torch.cat([out.flatten(), h.flatten(), c.flatten()])


def params_jvp(m: nn.Module):
    params = {k: v.detach() for k, v in m.named_parameters()}
    tangents = {k: torch.ones_like(v) / (n + 1) for n, (k, v) in enumerate(params.items())}
    return jvp(lambda p: outputs_with(m, p), (params,), (tangents,))


def per_sample_grads(m: nn.Module, vmap=vmap) -> dict:
    """The per-sample gradients recipe of PyTorch's tutorial: vmap of grad over functional_call,
    one sample (a batch of one) per vmapped index."""
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(5, 4, 1, 3, dtype=torch.float64)  # 5 samples of (T=4, B=1, I=3)
    target = torch.randn(5, 4, 1, 8, dtype=torch.float64)
    return vmap(grad(lambda p, x, t: loss(m, p, x, t)), in_dims=(None, 0, 0))(params, x, target)


def assert_exact(got, want) -> None:
    got_leaves = torch.utils._pytree.tree_leaves(got)
    want_leaves = torch.utils._pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g, w, **EXACT)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_transform_equals_the_reference(depth, name):
    ours, reference = pair(depth)
    torch.manual_seed(2)
    got = TRANSFORMS[name](ours)
    torch.manual_seed(2)
    assert_exact(got, TRANSFORMS[name](reference))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_transform_at_depth_one_equals_nn_lstm(name):
    """nn.LSTM has no batching rule: where the transform vmaps, nn.LSTM's side is a loop."""
    ours, lstm = lstm_pair()
    torch.manual_seed(2)
    got = TRANSFORMS[name](ours)
    torch.manual_seed(2)
    vmapping = name.startswith("vmap") or name == "per_sample_grads"
    assert_exact(got, TRANSFORMS[name](lstm, looped) if vmapping else TRANSFORMS[name](lstm))


@pytest.mark.parametrize("name", ["vmap", "jacrev", "jacfwd", "jvp", "forward_ad", "hessian"])
def test_transform_of_a_user_memory_function_equals_the_reference(name):
    ours, reference = pair(memory=Leaky)
    torch.manual_seed(2)
    got = TRANSFORMS[name](ours)
    torch.manual_seed(2)
    assert_exact(got, TRANSFORMS[name](reference))


def test_per_sample_grads_of_a_user_memory_function_equal_the_reference():
    ours, reference = pair(memory=Leaky)
    torch.manual_seed(2)
    got = per_sample_grads(ours)
    torch.manual_seed(2)
    assert_exact(got, per_sample_grads(reference))


@pytest.mark.parametrize("depth", [1, 2])
def test_vmap_over_stacked_models_equals_each_model(depth):
    """Model ensembling (``stack_module_state``): the weights are vmapped too."""
    models = [pair(depth)[0] for _ in range(3)]
    for n, m in enumerate(models):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * n)
    params, buffers = torch.func.stack_module_state(models)
    x = inputs()

    def run(p, b):
        return outputs(lambda x: functional_call(models[0], (p, b), (x,)), x)

    got = vmap(run)(params, buffers)
    assert_exact(got, torch.stack([outputs(m, x) for m in models]))


@pytest.mark.parametrize("depth", [1, 2])
def test_vmap_of_a_model_without_gradients_equals_each_call(depth):
    """The inference path (no parameter requires a gradient) under vmap and no_grad."""
    ours, _ = pair(depth)
    ours.requires_grad_(False)
    xs = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        got = vmap(lambda x: outputs(ours, x))(xs)
        assert_exact(got, torch.stack([outputs(ours, x) for x in xs]))


@pytest.mark.parametrize("depth", DEPTHS)
def test_batched_vector_jacobian_products_equal_a_loop(depth):
    """``torch.autograd.grad(..., is_grads_batched=True)`` (what gradcheck's
    ``check_batched_grad`` runs) through the trained model equals one backward per vector."""
    ours, _ = pair(depth)
    x = inputs().requires_grad_()
    results = outputs(ours, x)
    wrt = [x, *ours.parameters()]
    vectors = torch.randn(3, *results.shape, dtype=torch.float64)
    got = torch.autograd.grad(results, wrt, vectors, is_grads_batched=True, retain_graph=True)
    for n, v in enumerate(vectors):
        want = torch.autograd.grad(results, wrt, v, retain_graph=True)
        assert_exact([g[n] for g in got], want)
