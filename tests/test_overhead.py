"""The light per-call paths: the eval cache check, the eager plain-autograd chain, and what they
must keep. No timings here (the small-layer cases of the chain suite time them)."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastrank
from fastrank import chain as chain_module
from fastrank.layers import OverparamConv2d, OverparamLinear


def naive(layer, x):
    h = x
    for factor in layer.factors:
        h = h @ factor.T
    return h + layer.bias


def fresh_eval_output(layer, x):
    """What the layer computes with no cache at all."""
    with torch.no_grad():
        return F.linear(x, *layer.collapsed_parameters())


def served(layer, x):
    with torch.no_grad():
        return layer(x)


# ---- the eval cache never goes stale ------------------------------------------------------------


def _edit_in_place(layer):
    with torch.no_grad():
        layer.factors[1].mul_(1.5)


def _edit_bias_in_place(layer):
    with torch.no_grad():
        layer.bias.add_(1.0)


def _optimizer_step(layer):
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, layer.in_features)).square().sum().backward()
    opt.step()
    layer.eval()


def _load_state_dict(layer):
    layer.load_state_dict(OverparamLinear(6, 6, depth=3).state_dict())


def _load_state_dict_assign(layer):
    layer.load_state_dict(OverparamLinear(6, 6, depth=3).state_dict(), assign=True)


def _replace_factor(layer):
    layer.factors[0] = nn.Parameter(torch.randn(6, 6))


def _replace_bias(layer):
    layer.bias = nn.Parameter(torch.randn(6))


def _write_parameter_dict(layer):
    # FSDP2 swaps sharded and unsharded parameters this way, bypassing registration hooks.
    layer.factors._parameters["1"] = nn.Parameter(torch.randn(6, 6))


def _drop_bias(layer):
    layer.bias = None


def _to_double_and_back(layer):
    # fp32 -> fp16 -> fp32 rounds the factors and gives them new storage under the same objects
    layer.half().float()


def _data_assignment(layer):
    layer.factors[2].data = torch.randn(6, 6)


def _swap_tensors(layer):
    torch.utils.swap_tensors(layer.factors[0], nn.Parameter(torch.randn(6, 6)))


def _swap_on_conversion(layer):
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.half().float()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def _load_state_dict_swapping(layer):
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.load_state_dict(OverparamLinear(6, 6, depth=3).state_dict())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


EDITS = [
    _edit_in_place, _edit_bias_in_place, _optimizer_step, _load_state_dict, _load_state_dict_assign,
    _replace_factor, _replace_bias, _write_parameter_dict, _drop_bias, _to_double_and_back, _data_assignment, _swap_tensors,
    _swap_on_conversion, _load_state_dict_swapping,
]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__.lstrip("_") for e in EDITS])
def test_eval_cache_never_serves_stale_weights(edit):
    torch.manual_seed(0)
    layer = OverparamLinear(6, 6, depth=3).eval()
    x = torch.randn(4, 6)
    before = served(layer, x)
    assert torch.equal(served(layer, x), before)  # served from the cache
    edit(layer)
    after = served(layer, x)
    expected = fresh_eval_output(layer, x)
    assert not torch.equal(expected, before), "the edit changed nothing: the test would prove nothing"
    assert torch.equal(after, expected), f"stale by {(after - expected).abs().max():.3e}"


def test_eval_cache_survives_replacements_whose_ids_come_back():
    # A replaced tensor's id may be reused by a later one; the cache must not take it for the old.
    torch.manual_seed(1)
    layer = OverparamLinear(6, 6, depth=2).eval()
    x = torch.randn(2, 6)
    for _ in range(20):
        served(layer, x)
        layer.factors[0] = nn.Parameter(torch.randn(6, 6))
        layer.factors[0] = nn.Parameter(torch.randn(6, 6))
        assert torch.equal(served(layer, x), fresh_eval_output(layer, x))


def test_requires_grad_changes_switch_between_cache_and_autograd():
    torch.manual_seed(2)
    layer = OverparamLinear(6, 6, depth=3).eval()
    x = torch.randn(4, 6)
    for p in layer.parameters():
        p.requires_grad_(False)
    frozen = layer(x)  # grad mode on, nothing needs grad: the cache serves
    assert frozen.grad_fn is None
    for p in layer.parameters():
        p.requires_grad_(True)
    out = layer(x)
    assert out.grad_fn is not None, "parameters need grad again: the call must be differentiable"
    out.sum().backward()
    assert all(f.grad is not None for f in layer.factors)
    assert torch.allclose(out.detach(), frozen, rtol=1e-5, atol=1e-6)


def test_eval_cache_is_reset_by_pickling_and_deepcopy():
    torch.manual_seed(3)
    layer = OverparamLinear(6, 6, depth=3).eval()
    x = torch.randn(4, 6)
    served(layer, x)
    for copied in (copy.deepcopy(layer), _pickled(layer)):
        assert copied._cache.value is None
        with torch.no_grad():
            copied.factors[0].mul_(2)
        assert torch.equal(served(copied, x), fresh_eval_output(copied, x))


def _pickled(layer):
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_conv_eval_cache_never_serves_stale_kernels():
    torch.manual_seed(4)
    layer = OverparamConv2d(4, 5, kernel_sizes=(3, 1), padding=1).eval()
    x = torch.randn(2, 4, 7, 7)
    before = served(layer, x)
    assert torch.equal(served(layer, x), before)
    with torch.no_grad():
        layer.factors[1].mul_(-1)
    with torch.no_grad():
        expected = F.conv2d(x, *layer.collapsed_parameters(), padding=1)
    assert torch.equal(served(layer, x), expected)


# ---- whatever changes the parameters, within one eval window -------------------------------------
# Each edit runs with the layer in eval mode and its cache filled, as when a training step runs
# between evaluations without a call to train() / eval() (the fused optimizers update parameters
# without bumping their version counters).


def _make_linear():
    return OverparamLinear(6, 5, depth=3)


def _make_conv():
    return OverparamConv2d(3, 4, kernel_sizes=(3, 1), padding=1)


def _input_for(layer):
    return torch.randn(4, 6) if isinstance(layer, OverparamLinear) else torch.randn(2, 3, 7, 7)


def _reference(layer, x):
    with torch.no_grad():
        if isinstance(layer, OverparamLinear):
            return F.linear(x, *layer.collapsed_parameters())
        return F.conv2d(x, *layer.collapsed_parameters(), padding=1)


def _optimizer(name, **options):
    def step(layer):
        opt = getattr(torch.optim, name)(layer.parameters(), lr=0.1, **options)
        layer(_input_for(layer)).square().sum().backward()  # eval mode, grad enabled: no cache
        opt.step()

    step.__name__ = f"{name}_{'_'.join(options) or 'default'}"
    return step


def _foreach_ops(layer):
    with torch.no_grad():
        torch._foreach_mul_(list(layer.parameters()), 1.25)
        torch._foreach_add_(list(layer.parameters()), 0.01)


def _copy_under_no_grad(layer):
    with torch.no_grad():
        layer.factors[0].copy_(torch.randn_like(layer.factors[0]))


def _vector_to_parameters(layer):
    vector = torch.nn.utils.parameters_to_vector(layer.parameters())
    torch.nn.utils.vector_to_parameters(vector * 1.5, layer.parameters())


def _data_assigned_twice(layer):
    # The second assignment may land at the address the first one freed: an address alone would
    # take it for the storage the cache was made of.
    for _ in range(2):
        layer.factors[0].data = torch.randn_like(layer.factors[0])


def test_eval_cache_keeps_the_storage_it_was_made_of():
    # With a caching allocator (CUDA's), storage freed by ``p.data = ...`` is handed to the next
    # allocation of its size, which a later ``p.data = ...`` may take: only while the storage the
    # cache was made of stays alive can its address not come back.
    from torch.multiprocessing.reductions import StorageWeakRef

    torch.manual_seed(14)
    layer = _make_linear().eval()
    x = _input_for(layer)
    served(layer, x)
    old = StorageWeakRef(layer.factors[0].untyped_storage())
    layer.factors[0].data = torch.randn_like(layer.factors[0])
    assert not old.expired(), "the cache let the storage it was made of go"
    assert torch.equal(served(layer, x), _reference(layer, x))
    layer.eval()
    assert old.expired(), "a dropped cache still holds old storage"


def _swap_tensors_same_shape(layer):
    torch.utils.swap_tensors(layer.factors[1], nn.Parameter(torch.randn_like(layer.factors[1])))


def _load_state_dict_of_another(layer):
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for q in other.parameters():
            q.mul_(-1)
    layer.load_state_dict(other.state_dict())


def _load_state_dict_assign_of_another(layer):
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for q in other.parameters():
            q.mul_(-1)
    layer.load_state_dict(other.state_dict(), assign=True)


def _half_and_back(layer):
    with torch.no_grad():
        layer.factors[0].add_(1e-3 * torch.randn_like(layer.factors[0]))  # not representable in fp16
    layer.clear_cache()
    served(layer, _input_for(layer))  # cache made of the edited fp32 factors
    layer.half().float()


WINDOW_EDITS = [
    _optimizer("SGD", fused=True), _optimizer("Adam", fused=True), _optimizer("AdamW", fused=True),
    _optimizer("Adagrad", fused=True), _optimizer("SGD", foreach=True), _optimizer("AdamW", foreach=True),
    _optimizer("AdamW", foreach=False), _foreach_ops, _copy_under_no_grad, _vector_to_parameters,
    _data_assigned_twice, _swap_tensors_same_shape, _load_state_dict_of_another,
    _load_state_dict_assign_of_another, _half_and_back,
]


@pytest.mark.parametrize("edit", WINDOW_EDITS, ids=[e.__name__.lstrip("_") for e in WINDOW_EDITS])
@pytest.mark.parametrize("make", [_make_linear, _make_conv], ids=["linear", "conv"])
def test_eval_cache_sees_every_change_within_an_eval_window(make, edit):
    torch.manual_seed(11)
    layer = make().eval()
    x = _input_for(layer)
    before = served(layer, x)
    assert torch.equal(served(layer, x), before) and layer._cache.value is not None  # cached
    edit(layer)
    assert not layer.training
    after, expected = served(layer, x), _reference(layer, x)
    assert not torch.equal(expected, before), "the edit changed nothing: the test would prove nothing"
    assert torch.equal(after, expected), f"stale by {(after - expected).abs().max():.3e}"


@pytest.mark.parametrize("make", [_make_linear, _make_conv], ids=["linear", "conv"])
def test_eval_cache_does_not_serve_while_a_cuda_graph_is_captured(make, monkeypatch):
    # A graph must read the parameters' memory, which an optimizer updates in place between
    # replays, not a cached collapse: while capturing, a CUDA cache is not fresh (simulated here:
    # a cache marked as a CUDA one, the stream marked as capturing; tests/test_cuda_routing.py
    # captures a real one).
    from fastrank.layers import base

    torch.manual_seed(13)
    layer = make().eval()
    x = _input_for(layer)
    served(layer, x)
    cache = layer._cache
    inputs = list(layer._collapse_inputs())
    assert cache.value is not None and cache.fresh(inputs) and not cache.on_cuda
    monkeypatch.setattr(base, "_capturing", lambda: True)
    assert cache.fresh(inputs), "a CPU cache does not depend on CUDA captures"
    cache.on_cuda = True
    assert not cache.fresh(inputs), "a CUDA cache served while capturing"
    monkeypatch.setattr(base, "_capturing", lambda: False)
    assert cache.fresh(inputs)


def test_train_and_eval_calls_drop_the_cache():
    # Writes through .data bypass every counter; a cache never outlives the eval window it was
    # made in, so the next evaluation sees them.
    torch.manual_seed(12)
    layer = _make_linear().eval()
    x = _input_for(layer)
    before = served(layer, x)
    layer.train()
    layer.factors[0].data.mul_(2.0)  # a hand-written update, as in old training loops
    layer.eval()
    assert torch.equal(served(layer, x), _reference(layer, x))
    assert not torch.equal(served(layer, x), before)
    layer.factors[1].data.mul_(2.0)
    layer.eval()  # eval() again, as an evaluation loop does before each evaluation
    assert torch.equal(served(layer, x), _reference(layer, x))


@pytest.mark.parametrize("make", [_make_linear, _make_conv], ids=["linear", "conv"])
def test_training_mode_never_caches(make):
    # A forward under no_grad in training mode (reentrant gradient checkpointing, a held-out batch)
    # is followed by a step: nothing it made may be served after the step.
    torch.manual_seed(13)
    layer = make().double().train()
    x = _input_for(layer).double()
    served(layer, x)
    with torch.no_grad():
        layer.weight
    assert layer._cache.value is None
    layer(x).square().sum().backward()
    for factor in layer.factors:  # a hand-written update: no optimizer, no version counter
        factor.data.add_(-0.1 * factor.grad)
    # fp64: the activation chain and the collapsed weight differ by rounding only, a stale
    # weight by the step.
    torch.testing.assert_close(served(layer, x), _reference(layer, x), rtol=1e-12, atol=1e-12)


# ---- bad inputs still get the layer's own message on the fast eval path --------------------------


def test_fast_eval_path_reports_bad_inputs_like_the_checked_path():
    layer = OverparamLinear(6, 4, depth=2).eval()
    served(layer, torch.randn(3, 6))  # the cache is valid: the next calls take the fast path
    with pytest.raises(ValueError, match="in_features=6"):
        served(layer, torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        served(layer, torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        served(layer, torch.ones(3, 6, dtype=torch.long))
    conv = OverparamConv2d(3, 4, kernel_sizes=(3, 1), padding=1).eval()
    served(conv, torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="in_channels=3"):
        served(conv, torch.randn(1, 2, 5, 5))


def test_fast_train_path_reports_bad_inputs_like_the_checked_path():
    layer = OverparamLinear(6, 4, depth=2)
    layer(torch.randn(3, 6, requires_grad=True))  # the path choice is remembered
    with pytest.raises(ValueError, match="in_features=6"):
        layer(torch.randn(3, 5, requires_grad=True))
    with pytest.raises(ValueError, match="in_features=6"):
        layer(torch.randn(2, 3, 4))  # 24 elements: a reshape to (4, 6) would hide the wrong width
    with pytest.raises(ValueError, match="in_features=6"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 6, dtype=torch.long))


@pytest.mark.parametrize("shape", [(6,), (2, 3, 6), (1, 6)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_train_path_matches_the_naive_chain_in_every_mode(shape, frozen, mode):
    # Frozen parameters in eval mode with x requiring grad take the cached weight (the general path).
    torch.manual_seed(9)
    layer = OverparamLinear(6, 6, depth=3, dtype=torch.float64).train(mode == "train")
    layer.requires_grad_(not frozen)
    reference = copy.deepcopy(layer)
    for batch in (shape, (500, 6)):  # the activation chain and the collapsed product
        x = torch.randn(*batch, dtype=torch.float64, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        out, expected = layer(x), naive(reference, xr)
        assert out.shape == expected.shape
        assert (out - expected).norm() <= 1e-12 * expected.norm()
        out.square().sum().backward()
        expected.square().sum().backward()
        pairs = [(x.grad, xr.grad, "x")]
        if not frozen:
            pairs += [(layer.bias.grad, reference.bias.grad, "bias")]
            pairs += [(f.grad, r.grad, f"factor {j}") for j, (f, r) in enumerate(zip(layer.factors, reference.factors))]
        for got, want, what in pairs:
            err = ((got - want).norm() / want.norm()).item()
            assert err <= 1e-10, f"grad {what} at x {tuple(batch)}: relative error {err:.2e}"
        layer.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)


# ---- the eager plain path: the naive chain's gradients, the custom op under compile ---------------


@pytest.mark.parametrize("batch", [1, 3, 64, 500], ids=lambda b: f"B={b}")
@pytest.mark.parametrize("depth", [1, 2, 4, 8], ids=lambda L: f"L={L}")
def test_eager_path_gradients_equal_the_naive_chain_fp64(batch, depth):
    torch.manual_seed(5)
    layer = OverparamLinear(16, 16, depth=depth, dtype=torch.float64)
    reference = copy.deepcopy(layer)
    x = torch.randn(batch, 16, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    out, expected = layer(x), naive(reference, xr)
    assert (out - expected).norm() <= 1e-12 * expected.norm()
    out.square().sum().backward()
    expected.square().sum().backward()
    pairs = [(x.grad, xr.grad, "x"), (layer.bias.grad, reference.bias.grad, "bias")]
    pairs += [(f.grad, r.grad, f"factor {j}") for j, (f, r) in enumerate(zip(layer.factors, reference.factors))]
    for got, want, what in pairs:
        err = ((got - want).norm() / want.norm()).item()
        assert err <= 1e-10, f"grad {what}: relative error {err:.2e}"


def test_eager_cpu_train_step_runs_plain_autograd_not_the_function():
    # On the CPU the chain is differentiated by autograd itself: no Python backward.
    layer = OverparamLinear(16, 16, depth=3)
    x = torch.randn(2, 16, requires_grad=True)
    names = set()
    stack = [layer(x).grad_fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ in names:
            continue
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert not any("ChainMatmul" in name for name in names), names
    assert "AddmmBackward0" in names, names  # the bias rides on the last step


@pytest.mark.parametrize("batch", [1, 2000], ids=["activation-chain", "collapsed"])
def test_compile_still_sees_the_custom_op(batch):
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(6)
    layer = OverparamLinear(16, 16, depth=3)
    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(batch, 16, requires_grad=True))
    assert any("fastrank.chain_matmul" in target for target in seen), seen


def test_make_fx_traces_the_custom_op_not_the_plain_path():
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = OverparamLinear(16, 16, depth=3)
    names = [n for n, _ in layer.named_parameters()]

    def step(x, *params):
        out = torch.func.functional_call(layer, dict(zip(names, params)), (x,))
        return torch.autograd.grad(out.square().sum(), (x, *params))

    params = [p.detach().requires_grad_(True) for p in layer.parameters()]
    graph = make_fx(step, tracing_mode="fake")(torch.randn(3, 16, requires_grad=True), *params)
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert any("fastrank.chain_matmul" in t for t in targets), targets


def test_half_precision_and_autocast_round_each_step_as_the_chain_op():
    # fp16 / bf16 and autocast do not take the fp32 / fp64 plain path: each step accumulates in
    # fp32 and rounds once, as the torch twin (and the kernels) specify.
    torch.manual_seed(8)
    layer = OverparamLinear(8, 8, depth=3, dtype=torch.bfloat16)
    x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    twin = chain_module.chain_matmul_ref(x.detach(), [f.detach() for f in layer.factors])[-1] + layer.bias.detach()
    assert torch.equal(out.detach(), twin)
    out.float().sum().backward()
    assert all(f.grad is not None and f.grad.dtype == torch.bfloat16 for f in layer.factors)
    layer = OverparamLinear(8, 8, depth=3)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    factors = [f.detach().bfloat16() for f in layer.factors]
    twin = chain_module.chain_matmul_ref(x.detach().bfloat16(), factors)[-1] + layer.bias.detach().bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out.detach(), twin)
    out.float().sum().backward()
    assert all(f.grad is not None and f.grad.dtype == torch.float32 for f in layer.factors)


def test_public_chain_linear_matches_the_layer():
    torch.manual_seed(7)
    layer = OverparamLinear(12, 10, depth=3, dtype=torch.float64)
    for shape in [(12,), (5, 12), (2, 3, 12)]:
        x = torch.randn(*shape, dtype=torch.float64)
        assert torch.allclose(fastrank.chain_linear(x, list(layer.factors), layer.bias), layer(x), rtol=1e-12)
