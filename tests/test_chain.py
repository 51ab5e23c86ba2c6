import types

import pytest
import torch
from torch.library import opcheck

import fastrank.chain as chain_mod
from fastrank.chain import chain_costs, chain_linear, chain_matmul, chain_matmul_backward, collapsed_weight
from tolerance import assert_close

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_chain(batch, dims, dtype, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dims[0], generator=gen, dtype=torch.float64)
    if transposed:  # non-contiguous: a transposed view of a (n_0, batch) tensor
        x = torch.randn(dims[0], batch, generator=gen, dtype=torch.float64).T
    factors = [
        torch.randn(dims[j + 1], dims[j], generator=gen, dtype=torch.float64) / dims[j] ** 0.5
        for j in range(len(dims) - 1)
    ]
    return x.to(dtype), [f.to(dtype) for f in factors]


def naive(x, factors):
    h = x
    for f in factors:
        h = h @ f.T
    return h


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch,dims", [(1, [1, 1]), (7, [5, 3, 9]), (129, [7, 17, 1, 6]), (33, [12, 12, 12, 12, 12])],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_chain_matmul_matches_fp64(dtype, batch, dims, transposed):
    x, factors = make_chain(batch, dims, dtype, transposed=transposed)
    outputs = chain_matmul(x, factors)
    expected = x.double()
    for j, (out, f) in enumerate(zip(outputs, factors)):
        expected = expected @ f.double().T
        assert out.dtype == dtype
        assert_close(out, expected, dtype, max(dims), steps=j + 1, what=f"X_{j + 1}")
    last = chain_matmul(x, factors, return_all=False)
    assert len(last) == 1 and torch.equal(last[0], outputs[-1])


def test_chain_matmul_rejects_bad_shapes():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"factor 1 must have shape \(n_2, 3\), got \(2, 4\)"):
        chain_matmul(x, [torch.randn(3, 5), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="at least one factor"):
        chain_matmul(x, [])
    with pytest.raises(TypeError, match="float64"):
        chain_matmul(x, [torch.randn(3, 5, dtype=torch.float64)])


@pytest.mark.parametrize("needs_x", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("return_all", [True, False], ids=["all", "last"])
def test_chain_matmul_grads_equal_naive_chain(needs_x, return_all):
    x, factors = make_chain(9, [7, 5, 11, 3], torch.float64, seed=1)
    x.requires_grad_(needs_x)
    for f in factors:
        f.requires_grad_(True)
    grad_out = torch.randn(9, 3, dtype=torch.float64)
    out = chain_matmul(x, factors, return_all=return_all)[-1]
    inputs = ([x] if needs_x else []) + factors
    ours = torch.autograd.grad(out, inputs, grad_out)
    ref = torch.autograd.grad(naive(x, factors), inputs, grad_out)
    for j, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, torch.float64, 11, what=f"grad {j}")


def test_chain_matmul_grads_through_intermediates():
    # Gradients arriving at every intermediate, not only the last.
    x, factors = make_chain(6, [4, 5, 6, 7], torch.float64, seed=2)
    x.requires_grad_(True)
    for f in factors:
        f.requires_grad_(True)
    weights = [torch.randn(6, n, dtype=torch.float64) for n in (5, 6, 7)]

    def loss(outs):
        return sum((o * w).sum() for o, w in zip(outs, weights))

    ours = torch.autograd.grad(loss(chain_matmul(x, factors)), [x, *factors])
    hs, h = [], x
    for f in factors:
        h = h @ f.T
        hs.append(h)
    ref = torch.autograd.grad(loss(hs), [x, *factors])
    for j, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, torch.float64, 7, what=f"grad {j}")


@pytest.mark.parametrize("return_all", [True, False], ids=["all", "last"])
def test_opcheck_chain_ops(return_all):
    x, factors = make_chain(7, [5, 3, 4], torch.float64)
    x.requires_grad_(True)
    for f in factors:
        f.requires_grad_(True)
    opcheck(torch.ops.fastrank.chain_matmul.default, (x, factors, return_all))
    grads = [torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)]
    inputs = [torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)]
    opcheck(torch.ops.fastrank.chain_factor_grads.default, (grads, inputs))


def test_opcheck_chain_matmul_backward():
    x, factors = make_chain(7, [5, 3, 4], torch.float64)
    grad = torch.randn(7, 4, dtype=torch.float64)
    for needs_x in (True, False):
        opcheck(torch.ops.fastrank.chain_matmul_backward.default, (x, factors, grad, needs_x))
    # Transposed factors (the weight chain's layout): their gradients come in their layout, the
    # fake's strides the same.
    transposed = [f.T.contiguous().T for f in factors]
    opcheck(torch.ops.fastrank.chain_matmul_backward.default, (x, transposed, grad, True))
    results = chain_matmul_backward(x, transposed, grad)
    assert all(g.T.is_contiguous() and not g.is_contiguous() for g in results[:2]), [g.stride() for g in results]


@pytest.mark.parametrize("needs_x", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("dims", [[7], [7, 5], [7, 5, 11, 3]], ids=lambda d: f"k{len(d)}")
def test_chain_matmul_backward_equals_naive_chain(dims, needs_x):
    x, factors = make_chain(9, [6] + dims, torch.float64, seed=4)
    grad = torch.randn(9, dims[-1], dtype=torch.float64)
    x.requires_grad_(True)
    for f in factors:
        f.requires_grad_(True)
    ref = torch.autograd.grad(naive(x, factors), factors + ([x] if needs_x else []), grad)
    ours = chain_matmul_backward(x.detach(), [f.detach() for f in factors], grad, needs_x)
    assert len(ours) == len(ref), f"{len(ours)} results, expected {len(ref)}"
    for j, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, torch.float64, 11, what=f"result {j}")


def _saved_shapes(fn):
    """Shapes of the tensors autograd keeps for the backward while ``fn`` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("recomputes", [True, False], ids=["recompute", "keep"])
def test_activation_chain_keeps_one_layer_when_the_backward_recomputes(monkeypatch, recomputes):
    # Where the backward is the fused kernel (narrow chains on CUDA), the layer's activation chain
    # keeps x and the factors only; the gradients are the naive chain's either way.
    force_path(monkeypatch, "activation")
    monkeypatch.setattr(chain_mod, "_recomputes_backward", lambda x, factors: recomputes)
    calls = []
    body = chain_mod._chain_matmul_backward_body
    monkeypatch.setattr(chain_mod, "_chain_matmul_backward_body", lambda *a: calls.append(1) or body(*a))
    x, factors = make_chain(5, [16, 24, 24, 8], torch.float16, seed=6)
    x.requires_grad_(True)
    for f in factors:
        f.requires_grad_(True)
    out, shapes = _saved_shapes(lambda: chain_linear(x, factors))
    intermediates = [shape for shape in shapes if shape in ((5, 24),)]
    assert bool(intermediates) != recomputes, f"saved {shapes}"
    grad = torch.randn(5, 8, dtype=torch.float16)
    ours = torch.autograd.grad(out, [x, *factors], grad)
    assert (len(calls) == 1) == recomputes, f"{len(calls)} calls of the recomputing backward"
    xd = x.detach().double().requires_grad_(True)
    fd = [f.detach().double().requires_grad_(True) for f in factors]
    ref = torch.autograd.grad(naive(xd, fd), [xd, *fd], grad.double())
    for j, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, torch.float16, 24, steps=3, what=f"grad {j}")


def test_cost_model_switches_with_batch():
    dims = [1024] * 5
    act, col = chain_costs(256, dims)
    assert act < col, "B=256, d=1024, L=4 must take the activation chain"
    act, col = chain_costs(16384, dims)
    assert col < act, "B=16384 must take the collapsed product"
    # Forward only: the collapsed form pays R = 3 d^3 once, the chain 4 B d^2.
    act, col = chain_costs(512, dims, grad_input=False, grad_factors=False)
    assert act == 512 * 4 * 1024**2 and col == 3 * 1024**3 + 512 * 1024**2


def force_path(monkeypatch, path):
    costs = (0, 1) if path == "activation" else (1, 0)
    monkeypatch.setattr(chain_mod, "chain_costs", lambda *a, **k: costs)


@pytest.mark.parametrize("path", ["activation", "collapsed"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 7), (129, 7)], ids=str)
def test_chain_linear_grads_equal_naive_chain(monkeypatch, path, shape):
    force_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    factors = [torch.randn(n, m, generator=gen, dtype=torch.float64, requires_grad=True)
               for m, n in [(7, 9), (9, 9), (9, 4)]]
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = chain_linear(x, factors, bias)
    ref_out = naive(x, factors) + bias
    assert_close(out, ref_out, torch.float64, 9)
    grad_out = torch.randn_like(ref_out)
    ours = torch.autograd.grad(out, [x, *factors, bias], grad_out)
    ref = torch.autograd.grad(ref_out, [x, *factors, bias], grad_out)
    for j, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, torch.float64, 129, what=f"grad {j} ({path})")


HALF_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", HALF_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_chain_under_autograd_has_the_upcast_chains_gradients(device, dtype):
    # A half-precision chain that autograd differentiates step by step (on CUDA: widths above the
    # kernels' MAX_ONCHIP_WIDTH, the torch twin through torch.mm(..., out_dtype=torch.float32), an
    # overload torch has no derivative for): each step's gradients are those of the upcast step
    # (a.float() @ b.float()).to(dtype), and a second backward (create_graph) runs.
    generator = torch.Generator().manual_seed(3)
    dims = [300, 257, 301] if device == "cuda" else [33, 17, 40]
    x = torch.randn(5, dims[0], generator=generator).to(device, dtype).requires_grad_(True)
    factors = [(torch.randn(n, m, generator=generator) / m**0.5).to(device, dtype).requires_grad_(True)
               for m, n in zip(dims, dims[1:])]
    weights = [torch.randn(5, n, generator=generator).to(device) for n in dims[1:]]

    def loss(outs):
        return sum((o.float() * w).sum() for o, w in zip(outs, weights))

    outs = chain_matmul(x, factors)
    assert all(o.dtype == dtype for o in outs)
    ours = torch.autograd.grad(loss(outs), [x, *factors], create_graph=True)
    hs, h = [], x
    for f in factors:
        h = (h.float() @ f.T.float()).to(dtype)
        hs.append(h)
    ref = torch.autograd.grad(loss(hs), [x, *factors])
    for j, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == dtype
        if device == "cpu":  # the same fp32 products in the same order
            assert torch.equal(a, b), f"grad {j}: max difference {float((a - b).abs().max())}"
        else:  # cuBLAS's fp32-output half GEMM against its fp32 GEMM on upcast copies
            assert_close(a, b, dtype, max(dims), steps=2, what=f"grad {j}")
    # Second order: the gradient of sum(dL/dx) reaches the factors.
    second = torch.autograd.grad(ours[0].float().sum(), factors)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in second)


def test_half_chain_under_torch_func_grad_equals_autograd():
    # The rounded-once step is an autograd.Function that torch.func transforms can run.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(5, 7, generator=generator).bfloat16()
    factors = [torch.randn(6, 7, generator=generator).bfloat16(), torch.randn(3, 6, generator=generator).bfloat16()]

    def loss(*fs):
        return sum(out.float().square().sum() for out in chain_matmul(x, list(fs)))

    transformed = torch.func.grad(loss, argnums=(0, 1))(*factors)
    leaves = [f.clone().requires_grad_(True) for f in factors]
    loss(*leaves).backward()
    for j, (a, leaf) in enumerate(zip(transformed, leaves)):
        assert torch.equal(a, leaf.grad), f"grad {j}"


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)], ids=["2d", "3d"])
def test_plain_chain_linear_never_takes_the_device_body(monkeypatch, shape):
    # The eager fp32 activation chain is the naive chain under autograd. It must not run through
    # the op's device body: on CUDA that is a Triton kernel without autograd, and the factors'
    # gradients would be lost. Here the body is replaced by one that autograd cannot see.
    def detached_body(x, factors, return_all):
        return [out.detach() for out in chain_mod.chain_matmul_ref(x, factors, return_all)]

    monkeypatch.setattr(chain_mod, "_chain_matmul_body", detached_body)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=generator, requires_grad=True)
    factors = [torch.randn(n, m, generator=generator, requires_grad=True) for m, n in ((7, 6), (6, 5), (5, 3))]
    bias = torch.randn(3, generator=generator, requires_grad=True)
    out = chain_mod._chain_linear_as(x, factors, bias, False, True)
    ours = torch.autograd.grad(out.square().sum(), [x, *factors, bias])
    h = x
    for f in factors[:-1]:
        h = h @ f.T
    ref = torch.autograd.grad((h @ factors[-1].T + bias).square().sum(), [x, *factors, bias])
    for j, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, torch.float32, 7, steps=4, what=f"grad {j}")


def test_collapsed_weight_is_product():
    _, factors = make_chain(1, [6, 4, 5, 3], torch.float64)
    expected = factors[2] @ factors[1] @ factors[0]
    assert_close(collapsed_weight(factors), expected, torch.float64, 5)
    assert collapsed_weight(factors[:1]) is factors[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_collapsed_weight_gradients_arrive_in_each_factor_layout(monkeypatch, dtype):
    # collapsed_weight's chain through the op's autograd formula, as on CUDA where its body is the
    # kernel: X_0 = W_L, then W_{L-1}^T .. W_1^T as views. Each factor's gradient reaches it in the
    # factor's own layout (AccumulateGrad copies any other, a launch on CUDA) and equals the naive
    # product's.
    monkeypatch.setattr(chain_mod, "_runs_kernels", lambda x, factors: True)
    monkeypatch.setattr(chain_mod, "_eager_plain", lambda x: False)
    _, factors = make_chain(1, [6, 4, 5, 3], dtype, seed=3)
    leaves = [f.requires_grad_(True) for f in factors]
    arriving = {}
    for j, leaf in enumerate(leaves):
        leaf.register_hook(lambda grad, j=j: arriving.__setitem__(j, grad.stride()))
    grad = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    weight = collapsed_weight(leaves)
    assert weight.shape == (3, 6) and weight.is_contiguous()
    weight.backward(grad.to(dtype))
    wide = [f.detach().double().requires_grad_(True) for f in factors]
    (wide[2] @ wide[1] @ wide[0]).backward(grad)
    assert_close(weight, (wide[2] @ wide[1] @ wide[0]).detach(), dtype, 5, steps=2, what="product")
    for j, (leaf, reference) in enumerate(zip(leaves, wide)):
        assert arriving[j] == leaf.stride(), f"W_{j + 1}: gradient strides {arriving[j]}, parameter {leaf.stride()}"
        assert_close(leaf.grad, reference.grad, dtype, 5, steps=4, what=f"grad W_{j + 1}")


def test_import_and_use_without_triton():
    # Triton is optional: with it missing, fastrank imports and runs its torch paths.
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastrank\n"
        "layer = fastrank.OverparamLinear(5, 3, depth=3)\n"
        "layer(torch.randn(2, 5)).sum().backward()\n"
        "print(float(fastrank.effective_rank(torch.randn(6, 4), method='randomized', rank=2)) > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_kernels_take_widths_up_to_the_chain_kernels_limit(monkeypatch):
    # fastrank.chain._kernels_take_width: wider fp16 / bf16 train steps on CUDA take plain ops
    # (_plain_half_on_cuda) instead of the chain ops' torch twin.
    monkeypatch.setattr(chain_mod, "_CUDA_KERNELS", types.SimpleNamespace(MAX_ONCHIP_WIDTH=256))
    assert chain_mod._kernels_take_width(256) and not chain_mod._kernels_take_width(257)
    chain_mod._CUDA_KERNELS.MAX_ONCHIP_WIDTH = 1024  # read at each call (CUDA tests raise it)
    assert chain_mod._kernels_take_width(1024) and not chain_mod._kernels_take_width(1025)
    monkeypatch.setattr(chain_mod, "_CUDA_KERNELS", None)  # no Triton: the twin would serve every width
    assert not chain_mod._kernels_take_width(1)


def test_half_steps_route_by_the_dtype_their_products_run_in(monkeypatch):
    # fastrank.chain._routes_half_to_plain (_plain_half_on_cuda's rule on any device): fp16 / bf16
    # inputs, or any input under autocast to a half dtype (fp32 parameters, mixed precision), at
    # depth 2 or at widths the chain kernel does not take; fp32 without autocast never (the fp32
    # route is _eager_plain's).
    monkeypatch.setattr(chain_mod, "_CUDA_KERNELS", types.SimpleNamespace(MAX_ONCHIP_WIDTH=256))
    route = chain_mod._routes_half_to_plain
    fp32, bf16 = torch.randn(3, 8), torch.randn(3, 8).to(torch.bfloat16)
    assert route(bf16, 2, 64) and route(bf16, 4, 300) and not route(bf16, 4, 256)
    assert not route(fp32, 2, 64) and not route(fp32, 4, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert route(fp32, 2, 64) and route(fp32, 3, 257) and route(bf16, 2, 64)
        assert not route(fp32, 3, 256)
        assert not route(fp32.double(), 2, 64)  # autocast leaves fp64 as it is
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert not route(fp32, 2, 64)


def _routed_plain(monkeypatch, module):
    """Make ``module._plain_half_on_cuda`` route every call (as on CUDA at depth 2 or at widths
    the chain kernel does not take); returns the list its ``(depth, widest)`` arguments go to."""
    calls = []

    def route(x, depth, widest):
        calls.append((depth, widest))
        return True

    monkeypatch.setattr(module, "_plain_half_on_cuda", route)
    return calls


def _naive_linear(x, factors, bias, collapse):
    """The naive chain as plain ops: F.linear per factor, the bias on the last; or one F.linear
    with the product W_L ... W_1 of plain matmuls."""
    if collapse:
        weight = factors[0]
        for factor in factors[1:]:
            weight = torch.mm(factor, weight)
        return torch.nn.functional.linear(x, weight, bias)
    for factor in factors[:-1]:
        x = torch.nn.functional.linear(x, factor)
    return torch.nn.functional.linear(x, factors[-1], bias)


@pytest.mark.parametrize("batch", [3, 300], ids=["activation-chain", "collapsed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chain_linear_routed_to_plain_ops_is_the_naive_chain(monkeypatch, dtype, batch):
    # Where _plain_half_on_cuda routes a half-precision train step, chain_linear runs the naive
    # chain's own plain ops under autograd: its output and every gradient equal theirs bit for bit.
    calls = _routed_plain(monkeypatch, chain_mod)
    dims = [13, 29, 6, 11]
    x, factors = make_chain(batch, dims, dtype, seed=5)
    bias = torch.randn(dims[-1], generator=torch.Generator().manual_seed(6)).to(dtype)
    leaves = [t.requires_grad_(True) for t in (x, *factors, bias)]
    out = chain_linear(leaves[0], leaves[1:-1], leaves[-1])
    activation, collapsed = chain_costs(batch, dims)
    assert calls == [(3, 29)]
    twins = [t.detach().clone().requires_grad_(True) for t in leaves]
    expected = _naive_linear(twins[0], twins[1:-1], twins[-1], collapsed <= activation)
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    ours = torch.autograd.grad(out, leaves, grad)
    for j, (a, b) in enumerate(zip(ours, torch.autograd.grad(expected, twins, grad))):
        assert torch.equal(a, b), f"grad {j} differs from the naive chain's"


@pytest.mark.parametrize("batch", [3, 300], ids=["activation-chain", "collapsed"])
def test_chain_linear_routed_to_plain_ops_under_autocast_is_the_naive_chain(monkeypatch, batch):
    # A bf16 input and fp32 factors under autocast to bf16 (an autocast network's hidden state
    # reaching fp32 parameters): routed, the step is the naive chain under the same autocast, bit
    # for bit; a wrong width is still reported by the chain's check.
    _routed_plain(monkeypatch, chain_mod)
    dims = [13, 29, 6, 11]
    x, factors = make_chain(batch, dims, torch.float32, seed=12)
    bias = torch.randn(dims[-1], generator=torch.Generator().manual_seed(13))
    leaves = [x.to(torch.bfloat16).requires_grad_(True), *(t.requires_grad_(True) for t in (*factors, bias))]
    twins = [t.detach().clone().requires_grad_(True) for t in leaves]
    activation, collapsed = chain_costs(batch, dims)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chain_linear(leaves[0], leaves[1:-1], leaves[-1])
        expected = _naive_linear(twins[0], twins[1:-1], twins[-1], collapsed <= activation)
        wrong = [factors[0], factors[2]]  # a 13 -> 29 factor, then one expecting 6 inputs
        with pytest.raises(ValueError, match=r"factor 1 must have shape \(n_2, 29\)"):
            chain_linear(torch.randn(3, 13), [*wrong, torch.randn(4, 11)])
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    ours = torch.autograd.grad(out, leaves, grad)
    for j, (a, b) in enumerate(zip(ours, torch.autograd.grad(expected, twins, grad))):
        assert torch.equal(a, b), f"grad {j} differs from the naive chain's"


@pytest.mark.parametrize("routed", [True, False], ids=["plain-route", "chain-ops"])
@pytest.mark.parametrize("batch", [3, 300], ids=["activation-chain", "collapsed"])
def test_fp64_chain_linear_under_autocast_stays_fp64(monkeypatch, batch, routed):
    # Autocast casts no fp64 operand: chain_linear, by either route, is the fp64 naive chain.
    if routed:
        _routed_plain(monkeypatch, chain_mod)
    dims = [13, 29, 6, 11]
    x, factors = make_chain(batch, dims, torch.float64, seed=15)
    bias = torch.randn(dims[-1], generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, *factors, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chain_linear(leaves[0], leaves[1:-1], leaves[-1])
    expected = _naive_linear(x.detach(), [f.detach() for f in factors], bias.detach(), False)
    assert out.dtype == torch.float64
    assert_close(out, expected, torch.float64, 29)


@pytest.mark.parametrize("batch", [3, 300], ids=["activation-chain", "collapsed"])
def test_layer_routed_to_plain_ops_under_autocast_is_the_naive_chain(monkeypatch, batch):
    # fp32 parameters under autocast to bf16, routed (as on CUDA at depth 2): the step is the naive
    # chain's plain ops under the same autocast, bit for bit, its output bf16 and its gradients fp32.
    import fastrank
    from fastrank.layers import linear as linear_mod

    calls = _routed_plain(monkeypatch, linear_mod)
    torch.manual_seed(10)
    layer = fastrank.OverparamLinear(12, 7, depth=2, width=3)  # hidden 21
    x = torch.randn(batch, 12).requires_grad_(True)
    twins = [t.detach().clone().requires_grad_(True) for t in (x, *layer.factors, layer.bias)]
    activation, collapsed = chain_costs(batch, [12, 21, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = _naive_linear(twins[0], twins[1:-1], twins[-1], collapsed <= activation)
    assert calls == [(2, 21)] and out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    ours = torch.autograd.grad(out, [x, *layer.factors, layer.bias], grad)
    for j, (a, b) in enumerate(zip(ours, torch.autograd.grad(expected, twins, grad))):
        assert a.dtype == torch.float32 and torch.equal(a, b), f"grad {j} differs from the naive chain's"


@pytest.mark.parametrize("batch", [3, 300], ids=["activation-chain", "collapsed"])
def test_layer_routed_to_plain_ops_is_the_naive_chain(monkeypatch, batch):
    # OverparamLinear passes its depth and widest layer (in, hidden or out) to the route, and a
    # routed bf16 train step is the naive chain's plain ops, bit for bit.
    import fastrank
    from fastrank.layers import linear as linear_mod

    calls = _routed_plain(monkeypatch, linear_mod)
    torch.manual_seed(8)
    layer = fastrank.OverparamLinear(12, 7, depth=3, width=3).to(torch.bfloat16)  # hidden 21
    x = torch.randn(batch, 12).to(torch.bfloat16).requires_grad_(True)
    out = layer(x)
    assert calls == [(3, 21)]
    twins = [t.detach().clone().requires_grad_(True) for t in (x, *layer.factors, layer.bias)]
    activation, collapsed = chain_costs(batch, [12, 21, 21, 7])
    expected = _naive_linear(twins[0], twins[1:-1], twins[-1], collapsed <= activation)
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    ours = torch.autograd.grad(out, [x, *layer.factors, layer.bias], grad)
    for j, (a, b) in enumerate(zip(ours, torch.autograd.grad(expected, twins, grad))):
        assert torch.equal(a, b), f"grad {j} differs from the naive chain's"


# ---- second derivatives (backward with create_graph=True) ----------------------------------


def _second_order(chain, x, factors):
    """Gradients, with respect to x and every factor, of the loss plus the squared norms of its
    gradients (an input-gradient penalty as WGAN-GP / R1 form it, and the parameter gradients that
    second-order meta-learning and Hessian-vector products differentiate)."""
    out = chain(x, factors)
    loss = out.square().sum()
    grads = torch.autograd.grad(loss, [x, *factors], create_graph=True)
    return torch.autograd.grad(loss + sum(g.square().sum() for g in grads), [x, *factors])


def _naive_chain(x, factors):
    for factor in factors:
        x = x @ factor.T
    return x


@pytest.fixture
def kernel_like_bodies(monkeypatch):
    """The chain's bodies routed as on CUDA and giving outputs without a graph, as the Triton
    kernels do (here the torch twins, detached)."""
    def detached(body):
        return lambda *args: [t.detach() for t in body(*args)]

    monkeypatch.setattr(chain_mod, "_runs_kernels", lambda x, factors: True)
    monkeypatch.setattr(chain_mod, "_chain_matmul_body", detached(chain_mod.chain_matmul_ref))
    monkeypatch.setattr(chain_mod, "_chain_factor_grads_body", detached(chain_mod.chain_factor_grads_ref))
    monkeypatch.setattr(chain_mod, "_chain_matmul_backward_body", detached(chain_mod.chain_matmul_backward_ref))


@pytest.mark.parametrize("return_all", [False, True])
def test_second_derivatives_through_kernel_bodies_equal_the_naive_chain(kernel_like_bodies, return_all):
    """A backward recorded for a second derivative must not go through bodies whose outputs carry
    no graph, or every term they form is silently dropped."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    factors = [torch.randn(n, m, generator=generator, dtype=torch.float64, requires_grad=True)
               for n, m in ((7, 6), (4, 7), (3, 4))]
    got = _second_order(lambda x, fs: chain_mod.chain_matmul(x, fs, return_all=return_all)[-1], x, factors)
    want = _second_order(_naive_chain, x, factors)
    for j, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"input {j}: {m}")
    # the first derivative alone still takes the bodies (no recomputation)
    out = chain_mod.chain_matmul(x, factors, return_all=return_all)[-1]
    first = torch.autograd.grad(out.square().sum(), [x, *factors])
    expected = torch.autograd.grad(_naive_chain(x, factors).square().sum(), [x, *factors])
    for j, (g, w) in enumerate(zip(first, expected)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"first derivative {j}: {m}")


def _recorded_gradients(loss_of, inputs):
    """First derivatives of ``loss_of()`` with create_graph=True, and the derivatives of the sum of
    their squares (None where an input is not reached)."""
    firsts = torch.autograd.grad(loss_of(), inputs, create_graph=True)
    return firsts, torch.autograd.grad(sum(g.square().sum() for g in firsts), inputs, allow_unused=True)


def _assert_same(got, want, what):
    for j, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"{what} {j}: {g is None} against {w is None}"
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what} {j}: {m}")


@pytest.mark.parametrize("case", ["input made from the factor", "tied factors"])
def test_recorded_backward_is_the_derivative_in_the_chains_own_inputs(kernel_like_bodies, case):
    """The chain's backward is its derivative in its own inputs: where x itself depends on a factor
    (a layer applied twice) or one factor on another (tied weights), the paths through x or the
    other factor are autograd's to add, once (a derivative of the recomputed forward with respect
    to the saved tensors took them a second time)."""
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    if case == "tied factors":
        def loss(chain):
            return chain(x, [W, 2 * W]).pow(3).sum()
    else:
        def loss(chain):
            return chain(x @ W.T, [W]).pow(3).sum()
    fast = lambda x, fs: chain_mod.chain_matmul(x, fs, return_all=False)[-1]  # noqa: E731
    for what, got, want in zip(("first", "second"), _recorded_gradients(lambda: loss(fast), [W, x]),
                               _recorded_gradients(lambda: loss(_naive_chain), [W, x])):
        _assert_same(got, want, f"{case}, {what} derivative")


def test_recorded_backward_for_every_set_of_inputs_needing_grad(kernel_like_bodies):
    """Every combination of inputs needing a gradient, both output modes, with and without a loss
    on the intermediate X_1 (whose recomputation may need no gradient at all: frozen x and F_1)."""
    import itertools

    generator = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (5, 4), (2, 5)]
    for return_all, needs, middle in itertools.product([True, False], itertools.product([True, False], repeat=3), [True, False]):
        if not any(needs) or (middle and not return_all):
            continue
        x, f1, f2 = (torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=need)
                     for shape, need in zip(shapes, needs))
        inputs = [t for t in (x, f1, f2) if t.requires_grad]

        def loss(outputs):
            return outputs[-1].pow(3).sum() + (outputs[0].square().sum() if middle else 0)

        got = _recorded_gradients(lambda: loss(chain_mod.chain_matmul(x, [f1, f2], return_all=return_all)), inputs)
        want = _recorded_gradients(lambda: loss([x @ f1.T, x @ f1.T @ f2.T]), inputs)
        what = f"return_all={return_all}, needs grad {needs}, loss on X_1 {middle}"
        _assert_same(got[0], want[0], f"{what}: first derivative")
        _assert_same(got[1], want[1], f"{what}: second derivative")


def test_recorded_backward_of_the_custom_op(monkeypatch):
    """Under a dispatch mode the chain runs as the custom op, whose registered backward calls ops
    without a derivative of their own: a recorded backward must not go through them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls = []
    op = chain_mod._chain_matmul_op
    monkeypatch.setattr(chain_mod, "_chain_matmul_op", lambda *args: calls.append(1) or op(*args))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    factors = [torch.randn(n, m, generator=generator, dtype=torch.float64, requires_grad=True) for n, m in ((5, 4), (2, 5))]
    for return_all in (True, False):
        calls.clear()
        with PassThrough():
            got = _recorded_gradients(lambda: chain_mod.chain_matmul(x, factors, return_all=return_all)[-1].pow(3).sum(), [x, *factors])
        assert calls  # the custom op served the forward
        want = _recorded_gradients(lambda: _naive_chain(x, factors).pow(3).sum(), [x, *factors])
        _assert_same(got[0], want[0], f"return_all={return_all}: first derivative")
        _assert_same(got[1], want[1], f"return_all={return_all}: second derivative")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", [32, 96], ids=["fused-backward", "composed-backward"])
def test_second_derivatives_on_cuda_kernels_match_fp64(width):
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(33, width, generator=generator, dtype=torch.float64)
    factors64 = [torch.randn(width, width, generator=generator, dtype=torch.float64) / width**0.5 for _ in range(3)]
    x = x64.to("cuda", torch.bfloat16).requires_grad_()
    factors = [f.to("cuda", torch.bfloat16).requires_grad_() for f in factors64]
    got = _second_order(lambda x, fs: chain_matmul(x, fs, return_all=False)[-1], x, factors)
    want = _second_order(_naive_chain, x64.requires_grad_(), [f.requires_grad_() for f in factors64])
    for j, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.bfloat16, width, steps=8, what=f"input {j}")
