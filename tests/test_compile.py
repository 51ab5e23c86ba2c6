"""torch.compile sees the chain ops as single ops: a model of over-parameterized layers compiles with
fullgraph=True (no graph break) and matches eager, forward and backward, on both associations."""

import copy

import pytest
import torch
import torch.nn as nn

import fastrank
from tolerance import assert_close


@pytest.mark.parametrize("batch", [3, 2000], ids=["activation-chain", "collapsed"])
def test_compile_fullgraph_matches_eager(batch):
    torch.manual_seed(0)
    model = nn.Sequential(
        fastrank.OverparamLinear(16, 32, depth=3), nn.ReLU(), fastrank.OverparamLinear(32, 8, depth=2)
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(batch, 16, requires_grad=True)
    xe = x.detach().clone().requires_grad_(True)
    out, ref = compiled(x), eager(xe)
    assert_close(out, ref, torch.float32, 32, steps=5)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_close(x.grad, xe.grad, torch.float32, batch, steps=5, what="grad x")
    for (name, p), pe in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, pe.grad, torch.float32, batch, steps=5, what=f"grad {name}")
    model.eval()
    eager.eval()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), torch.float32, 32, steps=5, what="eval")


def test_compile_sees_the_custom_op_not_the_eager_function():
    # Eager calls run a torch.autograd.Function (no dispatcher cost); a compiled graph must hold the
    # custom op itself, with its fake kernel and registered autograd.
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(16, 16, depth=3)
    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(3, 16, requires_grad=True))
    assert any("fastrank.chain_matmul" in target for target in seen), seen


def test_compiled_backward_never_runs_the_eager_bodies_on_traced_tensors(monkeypatch):
    # AOTAutograd traces the backward formula with functional / fake tensors, outside Dynamo: the
    # chain calls in it must become custom ops. The eager bodies launch Triton kernels on CUDA, and
    # a fake tensor has no memory to launch on (the CPU body would trace, which hid this on CPU).
    from fastrank import chain as chain_module

    calls = []

    def guarded(body):
        def wrapper(first, *args):
            tensor = first if isinstance(first, torch.Tensor) else first[0]
            calls.append(type(tensor).__name__)
            assert type(tensor) in (torch.Tensor, nn.Parameter), f"eager body ran on a {type(tensor).__name__}"
            assert torch._C._len_torch_dispatch_stack() == 0, "eager body ran under a dispatch mode"
            return body(first, *args)

        return wrapper

    monkeypatch.setattr(chain_module, "_chain_matmul_body", guarded(chain_module._chain_matmul_body))
    monkeypatch.setattr(chain_module, "_chain_factor_grads_body", guarded(chain_module._chain_factor_grads_body))
    torch.manual_seed(0)
    for batch in (3, 2000):  # activation chain and collapsed product
        torch._dynamo.reset()
        layer = fastrank.OverparamLinear(16, 24, depth=3)
        eager = copy.deepcopy(layer)
        x = torch.randn(batch, 16, requires_grad=True)
        xe = x.detach().clone().requires_grad_(True)
        torch.compile(layer, fullgraph=True, dynamic=False)(x).square().sum().backward()
        eager(xe).square().sum().backward()
        assert_close(x.grad, xe.grad, torch.float32, batch, steps=4, what="grad x")
        for p, pe in zip(layer.parameters(), eager.parameters()):
            assert_close(p.grad, pe.grad, torch.float32, batch, steps=4, what="grad factor")
    # The eager fp32 layer runs plain F.linear calls on the CPU, not the bodies: the public op
    # shows that the guard is in place.
    fastrank.chain_matmul(x.detach(), [f.detach() for f in layer.factors])
    assert calls, "the eager chain op never ran the bodies"

    # The same through make_fx, which traces forward and backward with fake tensors and a proxy
    # dispatch mode and never sets torch.compiler.is_compiling().
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = fastrank.OverparamLinear(16, 24, depth=3)

    def step(x, *factors):
        out = torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], factors)), (x,))
        return torch.autograd.grad(out.square().sum(), (x, *factors))

    params = [p.detach().requires_grad_(True) for p in layer.parameters()]
    for batch in (3, 2000):
        x = torch.randn(batch, 16, requires_grad=True)
        graph = make_fx(step, tracing_mode="fake")(x, *params)
        targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        assert any("fastrank.chain_matmul" in t for t in targets), targets
        for got, want in zip(graph(x, *params), step(x, *params)):
            assert_close(got, want, torch.float32, batch, steps=4, what="make_fx gradient")


def test_compiled_narrow_layer_recomputes_in_its_backward(monkeypatch):
    # Where the fused backward serves a chain (narrow chains on CUDA), a compiled layer's forward
    # keeps only x and its backward graph holds the recomputing op. The rule is the kernel module's
    # own (fuses_backward), asked here for CPU tensors: Dynamo must trace it without a graph break.
    pytest.importorskip("triton")
    from fastrank import chain as chain_module
    from fastrank.kernels import chain as chain_kernels

    monkeypatch.setattr(chain_module, "_recomputes_backward", chain_kernels.recomputes_backward)
    calls = []
    twin = chain_module.chain_matmul_backward_ref
    monkeypatch.setattr(chain_module, "chain_matmul_backward_ref", lambda *a: calls.append(1) or twin(*a))
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(16, 24, depth=3)
    eager = copy.deepcopy(layer)
    x = torch.randn(3, 16, requires_grad=True)
    xe = x.detach().clone().requires_grad_(True)
    torch.compile(layer, fullgraph=True, dynamic=False)(x).square().sum().backward()
    assert calls, "the compiled backward did not run the recomputing op"
    eager(xe).square().sum().backward()
    assert_close(x.grad, xe.grad, torch.float32, 24, steps=4, what="grad x")
    for p, pe in zip(layer.parameters(), eager.parameters()):
        assert_close(p.grad, pe.grad, torch.float32, 24, steps=4, what="grad factor")


# ---- dynamic sizes: torch.export's Dim and torch.compile(dynamic=True) ------------------------

_DYNAMIC_LAYERS = {
    "linear": (lambda: fastrank.OverparamLinear(12, 10, depth=3), (12,)),
    "linear residual": (lambda: fastrank.OverparamLinear(12, 12, depth=4, residual=True), (12,)),
    "gpt-2 conv1d": (lambda: fastrank.OverparamConv1D(6, 12, depth=2), (5, 12)),
    "conv2d": (lambda: fastrank.OverparamConv2d(3, 4, kernel_sizes=(3, 1), padding=1), (3, 6, 7)),
    "conv1d": (lambda: fastrank.OverparamConv1d(3, 4, kernel_sizes=(3, 1), padding=1), (3, 9)),
}


# (layer, dtype, device): every layer kind on the CPU; on CUDA, bf16 chains (the Triton kernels
# behind the custom ops, whose fake kernels see the symbolic batch)
_DYNAMIC_CASES = [(name, torch.float32, "cpu") for name in _DYNAMIC_LAYERS] + [
    pytest.param(name, torch.bfloat16, "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
    for name in ("linear", "linear residual", "gpt-2 conv1d")
]
_DYNAMIC_IDS = [f"{name}-{str(dtype)[6:]}-{device}" for name, dtype, device in
                (case.values if hasattr(case, "values") else case for case in _DYNAMIC_CASES)]


def _dynamic_case(name: str, mode: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    make, shape = _DYNAMIC_LAYERS[name]
    torch.manual_seed(0)
    layer = make().to(device, dtype).train(mode == "train")
    generator = torch.Generator().manual_seed(1)
    return layer, lambda batch: torch.randn(batch, *shape, generator=generator).to(device, dtype)


def _check_against_eager(layer, call, x, mode, what):
    """``call(x)`` against the layer's eager call: outputs, and in train mode every gradient."""
    xe = x.detach().clone().requires_grad_(mode == "train")
    x = x.detach().clone().requires_grad_(mode == "train")
    out, ref = call(x), layer(xe)
    assert_close(out, ref, x.dtype, 64, steps=5, what=f"{what}: output")
    if mode == "train":
        params = list(layer.parameters())
        got = torch.autograd.grad(out.square().sum(), [x, *params])
        want = torch.autograd.grad(ref.square().sum(), [xe, *params])
        for j, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, x.dtype, 64 * x.shape[0], steps=5, what=f"{what}: gradient {j}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "dtype", "device"), _DYNAMIC_CASES, ids=_DYNAMIC_IDS)
def test_export_with_a_dynamic_batch_serves_every_batch(name, dtype, device, mode):
    """torch.export with the batch as a Dim (its documented recipe; non-strict, the default): the
    layers' cost model costs the symbolic batch instead of keying a remembered choice on it (which
    raised 'unhashable type: non-nested SymInt'), and the program matches eager at batches on both
    sides of the association's threshold."""
    layer, batch_of = _dynamic_case(name, mode, dtype, device)
    program = torch.export.export(layer, (batch_of(5),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    assert not layer._path_choices  # the trace remembered nothing
    exported = program.module()
    for batch in (1, 7, 3000):
        _check_against_eager(layer, exported, batch_of(batch), mode, f"{name}, batch {batch}")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("name", "dtype", "device"), _DYNAMIC_CASES, ids=_DYNAMIC_IDS)
def test_compile_dynamic_compiles_once_per_side_of_the_threshold(name, dtype, device, mode):
    """torch.compile(dynamic=True): a traced call compares the symbolic batch with the cost model's
    threshold (an inequality guard) instead of specializing it through the remembered choice's key,
    so batches on one side of it share a graph (before: one compile per batch size, up to
    Dynamo's recompile limit, then eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    layer, batch_of = _dynamic_case(name, mode, dtype, device)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    batches = (5, 6, 7, 9, 13, 17, 33, 300)
    for batch in batches:
        _check_against_eager(layer, compiled, batch_of(batch), mode, f"{name}, batch {batch}")
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert not layer._path_choices or all(type(key[0]) is int for key in layer._path_choices)
