"""On CUDA the chain ops reach the Triton kernels: eager layers, torch.compile (fullgraph, and
``mode="reduce-overhead"``, i.e. CUDA graphs) and ``torch.library.opcheck``.

Launches are counted by wrapping the launchers of ``fastrank.kernels.chain`` and
``fastrank.kernels.sketch``; the registered CUDA bodies look them up at call time.
"""

import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn

import fastrank
from tolerance import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def launches(monkeypatch):
    from fastrank.kernels import chain as chain_kernels
    from fastrank.kernels import _launch as launch_module
    from fastrank.kernels import sketch as sketch_kernels

    counts = Counter()

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    # Every call through the JIT path, which these launcher functions are part of (a launch plan's
    # replay skips them; tests/test_launch_fast_path.py covers replays).
    def no_plan(self, tensors, flags, index, scalars=()):  # what PlanCache.replay returns without a plan
        return None, launch_module.call_key(tensors, flags)[0]

    monkeypatch.setattr(launch_module.PlanCache, "replay", no_plan)
    counting(chain_kernels, "_launch_chain")
    counting(chain_kernels, "_launch_factor_grads")
    counting(chain_kernels, "_launch_backward")
    counting(sketch_kernels, "_launch")
    return counts


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        fastrank.OverparamLinear(48, 64, depth=3), nn.ReLU(), fastrank.OverparamLinear(64, 24, depth=2)
    ).to("cuda", dtype)


@pytest.mark.parametrize("batch", [5, 4096], ids=["activation-chain", "collapsed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_layers_launch_the_kernels(launches, dtype, batch):
    # Eager fp32 layers run the naive chain under plain autograd (fastrank.chain._eager_plain: on an
    # H100 the kernels' launches cost more host time than they save); fp16 / bf16 take the kernels.
    kernels = dtype != torch.float32
    model = _model(dtype)
    reference = copy.deepcopy(model).double()
    x = torch.randn(batch, 48, device="cuda", dtype=dtype, requires_grad=True)
    xr = x.detach().double().requires_grad_(True)
    out = model(x)
    assert (launches["_launch_chain"] >= 1) == kernels, f"chain kernel launches: {dict(launches)}"
    out.float().square().sum().backward()
    # Widths (48, 64, 24) keep the block in registers: the backward of the activation chain and
    # of the collapsed product's weight chain is the fused recomputing kernel.
    assert (launches["_launch_backward"] >= 1) == kernels, f"backward kernel launches: {dict(launches)}"
    reference(xr).square().sum().backward()
    steps = 5
    assert_close(out, reference(xr), dtype, 64, steps=steps, what="output")
    for (name, p), pr in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, pr.grad, dtype, batch, steps=2 * steps, what=f"grad {name}")


def _assert_trains_as_fp64(layer, batch, dtype, steps, autocast=False):
    """One train step of ``layer`` (a summed square loss) against its fp64 copy on the same input:
    output, input gradient and every parameter's gradient within the tolerance of ``steps``
    roundings of ``dtype`` forward (twice that backward). ``autocast``: the input in the layer's
    dtype and the forward under torch.autocast to ``dtype`` (its output ``dtype``, each gradient in
    its parameter's dtype). Returns the input."""
    width = layer.in_features
    reference = copy.deepcopy(layer).double()
    x_dtype = next(layer.parameters()).dtype if autocast else dtype
    x = torch.randn(batch, width, device="cuda", dtype=x_dtype, requires_grad=True)
    xr = x.detach().double().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype, enabled=autocast):
        out = layer(x)
    out.float().square().sum().backward()
    expected = reference(xr)
    expected.square().sum().backward()
    assert out.dtype == dtype, f"output dtype {out.dtype}"
    assert_close(out, expected, dtype, width, steps=steps, what="output")
    assert_close(x.grad, xr.grad, dtype, width, steps=2 * steps, what="grad x")
    for (name, p), pr in zip(layer.named_parameters(), reference.parameters()):
        assert p.grad.dtype == p.dtype, f"grad {name}: {p.grad.dtype}"
        assert_close(p.grad, pr.grad, dtype, batch, steps=2 * steps, what=f"grad {name}")
    return x


@pytest.mark.parametrize("batch", [5, 4096], ids=["activation-chain", "collapsed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_wide_half_layers_train_through_plain_ops(launches, dtype, batch):
    # Widths above the chain kernel's MAX_ONCHIP_WIDTH (fastrank.chain._plain_half_on_cuda): the
    # layer and chain_linear run plain cuBLAS matmuls under autograd, not the chain ops' torch twin
    # (an fp32-output matmul and a cast per step, which tests/test_chain.py checks on CUDA through
    # fastrank.chain_matmul); at widths the kernel takes they launch it.
    torch.manual_seed(0)
    _assert_trains_as_fp64(fastrank.OverparamLinear(300, 257, depth=3).to("cuda", dtype), batch, dtype, steps=3)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(batch, 300, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    factors = [(torch.randn(n, m, device="cuda", generator=gen) / m**0.5).to(dtype).requires_grad_(True)
               for m, n in ((300, 257), (257, 257), (257, 40))]
    fastrank.chain_linear(x, factors).float().square().sum().backward()
    assert sum(launches.values()) == 0, f"Triton launches at width 300: {dict(launches)}"
    narrow = fastrank.OverparamLinear(256, 256, depth=3).to("cuda", dtype)
    narrow(torch.randn(batch, 256, device="cuda", dtype=dtype)).float().square().sum().backward()
    assert launches["_launch_chain"] >= 1, f"no chain kernel at width 256: {dict(launches)}"


@pytest.mark.parametrize("batch", [5, 4096], ids=["activation-chain", "collapsed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_depth_two_layers_train_through_plain_ops(launches, dtype, batch):
    # fastrank.chain._plain_half_on_cuda: an eager half-precision depth-2 train step runs cuBLAS
    # through autograd (on an H200 the kernels cost more host time there); depth 3 keeps the kernels.
    torch.manual_seed(0)
    x = _assert_trains_as_fp64(fastrank.OverparamLinear(48, 40, depth=2).to("cuda", dtype), batch, dtype, steps=2)
    assert sum(launches.values()) == 0, f"Triton launches at depth 2: {dict(launches)}"
    deeper = fastrank.OverparamLinear(48, 40, depth=3).to("cuda", dtype)
    deeper(x).float().square().sum().backward()
    assert launches["_launch_chain"] >= 1, f"no chain kernel at depth 3: {dict(launches)}"


@pytest.mark.parametrize("batch", [5, 4096], ids=["activation-chain", "collapsed"])
@pytest.mark.parametrize("depth", [2, 3])
def test_autocast_layers_train_as_half_layers_do(launches, depth, batch):
    # Mixed precision: fp32 parameters under torch.autocast to bf16. The step takes a bf16
    # layer's route (fastrank.chain._routes_half_to_plain: plain cuBLAS ops at depth 2, the
    # kernels at depth 3); its output is bf16 and its gradients fp32, within bf16 rounding of the
    # fp64 chain's (the input and each factor cast once, each product rounded once).
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(48, 40, depth=depth).to("cuda")
    _assert_trains_as_fp64(layer, batch, torch.bfloat16, steps=2 * depth + 1, autocast=True)
    assert (sum(launches.values()) > 0) == (depth > 2), f"Triton launches at depth {depth}: {dict(launches)}"


def _train_step_from_a_cuda_graph(layer, x):
    """One train step of ``layer`` on ``x`` (a summed square loss) captured in a CUDA graph after
    three warm-up steps on a side stream (as torch.cuda.graphs documents) and replayed once.
    Returns the gradients of x and of every parameter, and the calls of the chain launchers
    (``fastrank.kernels.chain``) and of Triton's JIT path during the capture."""
    from fastrank.kernels import _launch
    from fastrank.kernels import chain as chain_kernels

    params = list(layer.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).float().square().sum().backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    calls = Counter()
    originals = {name: getattr(chain_kernels, name)
                 for name in ("chain_matmul", "chain_factor_grads", "chain_matmul_backward")}

    def counted(name):
        def launcher(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return launcher

    graph = torch.cuda.CUDAGraph()
    jit = _launch.jit_calls()
    try:
        for name in originals:
            setattr(chain_kernels, name, counted(name))
        with torch.cuda.graph(graph):
            step()
    finally:
        for name, original in originals.items():
            setattr(chain_kernels, name, original)
    calls["jit"] = _launch.jit_calls() - jit
    graph.replay()
    torch.cuda.synchronize()
    return [x.grad.clone()] + [p.grad.clone() for p in params], calls


@pytest.mark.parametrize(
    ("d", "batch", "depth"),
    [(64, 1, 4), (64, 1024, 4), (48, 5, 2), (256, 64, 4), (256, 1024, 8)],
    ids=["d64-B1-L4-fused-backward", "d64-B1024-L4-collapsed", "d48-B5-L2", "d256-B64-L4", "d256-B1024-L8"],
)
def test_half_layers_train_from_cuda_graphs(d, batch, depth):
    # A capture takes the launches its warm-up took: the kernels at depth 3 and more, cuBLAS
    # through autograd at depth 2 (fastrank.chain._plain_half_on_cuda), and the same plans (split
    # counters of its own: on an H200 the d=64, B=1, L=4 capture was invalidated). The replayed
    # gradients equal the fp64 chain's within bf16 rounding.
    dtype = torch.bfloat16
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(d, d, depth=depth).to("cuda", dtype)
    reference = copy.deepcopy(layer).double()
    x = torch.randn(batch, d, device="cuda", dtype=dtype, requires_grad=True)
    grads, calls = _train_step_from_a_cuda_graph(layer, x)
    kernels = calls["chain_matmul"] + calls["chain_factor_grads"] + calls["chain_matmul_backward"]
    assert calls["jit"] == 0, f"JIT launches inside the capture: {dict(calls)}"
    assert (kernels > 0) == (depth > 2), f"chain launchers called in the capture: {dict(calls)}"
    xr = x.detach().double().requires_grad_(True)
    reference(xr).square().sum().backward()
    expected = [xr.grad] + [p.grad for p in reference.parameters()]
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads, expected):
        assert_close(got, want, dtype, max(d, batch), steps=2 * depth + 2, what=f"grad {name} replayed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eval_graph_replays_read_the_updated_parameters(dtype):
    # An eval-mode forward captured in a CUDA graph after an eager warm-up (which fills the collapse
    # cache), replayed after in-place optimizer steps: the replay is the updated layer's output.
    # The graph computes the collapse from the parameters' memory; a cached weight in it would
    # stay the warm-up's.
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(48, 40, depth=3).to("cuda", dtype)
    opt = torch.optim.SGD(layer.parameters(), lr=3e-3)  # moves the output by about 100%, stays finite
    x = torch.randn(5, 48, device="cuda", dtype=dtype)
    layer.eval()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                layer(x)
        torch.cuda.current_stream().wait_stream(stream)
        warm = layer._cache.value
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
    assert layer._cache.value is warm, "the capture stored its collapse in the cache"
    from tolerance import relative_error, tolerance

    for step in range(2):
        before = out.clone()
        layer.train()
        opt.zero_grad()
        layer(torch.randn(7, 48, device="cuda", dtype=dtype)).float().square().sum().backward()
        opt.step()
        layer.eval()
        graph.replay()
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, *layer.collapsed_parameters())
        torch.cuda.synchronize()
        # the step moved the output by more than the tolerance (else a stale replay would pass)
        assert relative_error(before, expected) > 10 * tolerance(dtype, 48, steps=4), f"step {step}"
        assert_close(out, expected, dtype, 48, steps=4, what=f"replay after step {step}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chain_linear_grads_on_cuda(dtype):
    # fastrank.chain_linear's activation chain at widths the chain kernel takes (fp32: the naive
    # chain under autograd, never the kernel body, which autograd cannot differentiate).
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(5, 48, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    factors = [(torch.randn(n, m, device="cuda", generator=gen) / m**0.5).to(dtype).requires_grad_(True)
               for m, n in ((48, 64), (64, 40), (40, 24))]
    bias = torch.randn(24, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    out = fastrank.chain_linear(x, factors, bias)
    grads = torch.autograd.grad(out.float().square().sum(), [x, *factors, bias])
    leaves = [t.detach().double().requires_grad_(True) for t in (x, *factors, bias)]
    h = leaves[0]
    for f in leaves[1:-1]:
        h = h @ f.T
    ref = torch.autograd.grad((h + leaves[-1]).square().sum(), leaves)
    for j, (a, b) in enumerate(zip(grads, ref)):
        assert a is not None, f"grad {j} is None"
        assert_close(a, b, dtype, 64, steps=6, what=f"grad {j}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compile_fullgraph_launches_the_kernels(launches, dtype):
    # Compiled layers take the chain ops (their CUDA bodies). The backward at widths (48, 64, 24):
    # in bf16 the fused recomputing kernel; in fp32 with TF32 off (torch's default) the widths are
    # above MAX_BACKWARD_WIDTH_IEEE, so the chain kernel recomputes and the grouped factor
    # gradients follow.
    from fastrank.kernels import chain as chain_kernels

    model = _model(dtype)
    reference = copy.deepcopy(model).double()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(5, 48, device="cuda", dtype=dtype, requires_grad=True)
    out = compiled(x)
    out.float().square().sum().backward()
    fused = dtype != torch.float32 or chain_kernels.cuda_matmul_allows_tf32()
    backward = "_launch_backward" if fused else "_launch_factor_grads"
    assert launches["_launch_chain"] >= 1 and launches[backward] >= 1, dict(launches)
    assert_close(out, reference(x.detach().double()), dtype, 64, steps=5, what="compiled output")


def test_reduce_overhead_cuda_graphs(launches):
    # CUDA graph capture: nothing may be copied from pageable host memory during a launch.
    model = _model()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    # A step size at which the chain's training is stable (with a summed loss and lr 0.01 both
    # copies diverge to NaN within 4 steps, and NaN compares unequal to NaN).
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(4):
        x = torch.randn(5, 48, device="cuda", generator=gen)
        for net, optimizer in ((compiled, opt), (eager, opt_eager)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    assert launches["_launch_chain"] >= 1, dict(launches)
    for (name, p), pe in zip(model.named_parameters(), eager.parameters()):
        assert bool(torch.isfinite(pe).all()), f"{name}: the eager reference diverged"
        assert_close(p, pe, torch.float32, 64, steps=20, what=f"{name} after 4 steps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reduce_overhead_warm_up_keeps_no_buffer_in_the_graph_pool(monkeypatch, dtype):
    # torch.compile's CUDA graph trees send every allocation of a graph's warm-up into their pool
    # and raise when a live tensor there is no graph output (check_memory_pool): the split
    # counters, the fused backward's workspaces and the unused-pointer buffers the launchers keep
    # (emptied here, so that this process makes its first ones in the warm-up) are made outside it. Each step's gradients,
    # warm-up, capture and replays, equal the fp64 chain's within the dtype's rounding (fp32 with
    # TF32 off: the composed backward; bf16: the fused kernel, which takes split counters).
    from torch._dynamo.utils import counters

    from fastrank.kernels import _launch
    from fastrank.kernels import chain as chain_kernels

    monkeypatch.setattr(chain_kernels, "_SPLIT_COUNTERS", {})
    monkeypatch.setattr(chain_kernels, "_WORKSPACES", {})
    monkeypatch.setattr(_launch, "_UNUSED", {})
    for cache in _launch._CACHES:  # a plan recorded earlier names its buffers as constants
        cache.clear()
    counters.clear()
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(48, 40, depth=4).to("cuda", dtype)
    reference = copy.deepcopy(layer).double()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True, dynamic=False)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for step in range(4):
        x = torch.randn(5, 48, device="cuda", generator=gen).to(dtype)
        layer.zero_grad(set_to_none=True)
        compiled(x).float().square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        reference.zero_grad(set_to_none=True)
        reference(x.double()).square().sum().backward()
        for (name, _), got, want in zip(layer.named_parameters(), grads, [p.grad for p in reference.parameters()]):
            assert_close(got, want, dtype, 48, steps=10, what=f"grad {name}, step {step}")
    assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor skipped the CUDA graphs"


def test_opcheck_on_cuda(launches):
    from fastrank.chain import _chain_factor_grads_op, _chain_matmul_backward_op, _chain_matmul_op
    from fastrank.kernels import chain as chain_kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(9, 17, device="cuda", generator=gen, requires_grad=True)
    factors = [torch.randn(n, m, device="cuda", generator=gen, requires_grad=True) for m, n in ((17, 33), (33, 5))]
    torch.library.opcheck(_chain_matmul_op, (x, factors, True))
    torch.library.opcheck(_chain_matmul_op, (x, factors, False))
    grads = [torch.randn(9, 33, device="cuda", generator=gen), torch.randn(9, 5, device="cuda", generator=gen)]
    torch.library.opcheck(_chain_factor_grads_op, (grads, [x.detach(), grads[0]]))
    # Widths 17, 33, 5 in fp32 with TF32 off (torch's default): above MAX_BACKWARD_WIDTH_IEEE, the
    # composed path (chain kernel, grouped grads), as a width of 80 is in any precision; widths of
    # at most 16: the fused kernel.
    torch.library.opcheck(_chain_matmul_backward_op, (x.detach(), [f.detach() for f in factors], grads[1], True))
    wide = [torch.randn(80, 17, device="cuda", generator=gen), torch.randn(5, 80, device="cuda", generator=gen)]
    torch.library.opcheck(_chain_matmul_backward_op, (x.detach(), wide, grads[1], False))
    narrow_x = torch.randn(9, 13, device="cuda", generator=gen)
    narrow = [torch.randn(n, m, device="cuda", generator=gen) for m, n in ((13, 16), (16, 5))]
    assert chain_kernels.fuses_backward(narrow_x, narrow)
    torch.library.opcheck(_chain_matmul_backward_op, (narrow_x, narrow, torch.randn(9, 5, device="cuda", generator=gen), True))
    A = torch.randn(3, 20, 12, device="cuda", generator=gen)
    torch.library.opcheck(torch.ops.fastrank.gaussian_sketch.default, (A, 5, 3, False))
    assert launches["_launch_chain"] >= 1 and launches["_launch_factor_grads"] >= 1 and launches["_launch"] >= 1
    assert launches["_launch_backward"] >= 1, dict(launches)


def test_sketch_op_does_not_depend_on_triton():
    # Without Triton the torch body serves CUDA and draws the kernel's Omega (philox_omega).
    from fastrank.sketch import gaussian_sketch, gaussian_sketch_ref

    A = torch.randn(2, 40, 33, device="cuda")
    kernel = gaussian_sketch(A, 7, seed=11)
    twin = gaussian_sketch_ref(A, 7, 11)
    assert_close(kernel, twin.double(), torch.float32, 33, what="kernel vs torch body on CUDA")


def _device_activities_of_one_train_step(module: nn.Module, x: torch.Tensor) -> int:
    """Kernels, copies and memsets one train step puts on the device (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        module.zero_grad(set_to_none=True)
        module(x).float().square().mean().backward()

    for _ in range(3):  # compile, autotune, allocate
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type.name == "CUDA")


@pytest.mark.parametrize(("d", "batch", "extra"), [(256, 64, 3), (256, 4096, 3), (64, 4096, 2)],
                         ids=["activation-chain", "collapsed", "collapsed-narrow"])
def test_train_step_launches_few_more_than_nn_linear(d, batch, extra):
    # On an H100 (2026-11-26, bf16, d = 256, B = 64): 14 device activities against nn.Linear's 12
    # (the chain kernel forward and backward, the grouped factor gradients); 26 before the streamed
    # chain kernel. The collapsed form: the weight chain, its reverse chain and the grouped factor
    # gradients (on an H200, 2026-12-04, 16 kernels against 12 at B = 1024, one of them
    # AccumulateGrad's copy of W_1's transposed gradient, since removed); at d <= 64 the weight
    # chain and the fused backward, nn.Linear's + 2.
    torch.manual_seed(0)
    x = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
    plain = _device_activities_of_one_train_step(nn.Linear(d, d).to("cuda", torch.bfloat16), x)
    layer = fastrank.OverparamLinear(d, d, depth=4).to("cuda", torch.bfloat16)
    chain = _device_activities_of_one_train_step(layer, x)
    assert chain <= plain + extra, f"one OverparamLinear train step: {chain} device activities, nn.Linear: {plain}"
