"""Triton chain kernels against float64 references.

Without a GPU the kernels run on the CPU through the Triton interpreter; with one, natively on
CUDA (and the bf16 / large-shape cases run too).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernel_loading import DEVICE, INTERPRET, load_kernels
from tolerance import assert_close

chain_kernels = load_kernels("chain")
chain_matmul = chain_kernels.chain_matmul
chain_matmul_ref = chain_kernels.chain_matmul_ref
chain_factor_grads = chain_kernels.chain_factor_grads
chain_factor_grads_ref = chain_kernels.chain_factor_grads_ref
MAX_ONCHIP_WIDTH, MAX_ONCHIP_WIDTH_IEEE = chain_kernels.MAX_ONCHIP_WIDTH, chain_kernels.MAX_ONCHIP_WIDTH_IEEE

requires_cuda = pytest.mark.skipif(
    DEVICE != "cuda", reason="needs a CUDA device (runs natively, not interpreted)"
)
# The interpreter computes bf16 dots and arithmetic wrongly (Triton 3.9): bf16 is tested on GPU only.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=requires_cuda),
]
# The torch twins run every dtype on the CPU.
ALL_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
BATCHES = [1, 7, 33]
# Widths up to MAX_RESIDENT_WIDTH (64): the register-resident kernel; 40 pads to 64 (wider chains are
# streamed: WIDE_CHAINS below).
CHAINS = [[5, 17], [17, 40, 5], [32, 5, 40, 17], [40, 17, 32, 5, 40]]  # k = 1, 2, 3, 4
LAYOUTS = ["contiguous", "transposed", "strided"]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (2-D), stored contiguous, as a transposed view, or strided."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":
        return t.T.contiguous().T
    if layout == "strided":  # every other row and column of a larger tensor
        big = torch.full((2 * t.shape[0], 2 * t.shape[1]), float("nan"), dtype=t.dtype, device=t.device)
        big[::2, ::2] = t
        return big[::2, ::2]
    raise ValueError(layout)


def make_chain(batch, dims, dtype, layout="contiguous", seed=0, device=DEVICE):
    """x (batch, n_0) and factors F_j (n_j, n_{j-1}) scaled to keep every X_j of order one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dims[0], generator=gen, dtype=torch.float64)
    factors = [
        torch.randn(dims[j + 1], dims[j], generator=gen, dtype=torch.float64) / dims[j] ** 0.5
        for j in range(len(dims) - 1)
    ]
    x = _layout(x.to(dtype).to(device), layout)
    return x, [_layout(f.to(dtype).to(device), layout) for f in factors]


def fp64_chain(x, factors):
    """X_1 .. X_k in float64 from the same (rounded) inputs, no rounding in between."""
    outputs, block = [], x.double()
    for f in factors:
        block = block @ f.double().T
        outputs.append(block)
    return outputs


def check_chain(outputs, x, factors, dtype, what):
    expected = fp64_chain(x, factors)
    assert len(outputs) == len(expected), f"{what}: {len(outputs)} outputs, expected {len(expected)}"
    reduction = max([x.shape[1]] + [f.shape[0] for f in factors])
    for j, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.dtype == dtype, f"{what} X_{j + 1}: dtype {out.dtype}, expected {dtype}"
        assert out.is_contiguous(), f"{what} X_{j + 1}: output is not contiguous"
        assert_close(out, ref, dtype, reduction, steps=j + 1, what=f"{what} X_{j + 1}")


# --------------------------------------------------------------------------------------------
# chain matmul
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims", CHAINS, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"M{b}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_matmul_matches_fp64(dtype, batch, dims, layout):
    x, factors = make_chain(batch, dims, dtype, layout)
    outputs = chain_matmul(x, factors, return_all=True)
    check_chain(outputs, x, factors, dtype, f"kernel {layout}")
    last = chain_matmul(x, factors, return_all=False)
    assert len(last) == 1, f"return_all=False gave {len(last)} outputs"
    assert torch.equal(last[0], outputs[-1]), (
        f"return_all=False differs from return_all=True by "
        f"{(last[0].double() - outputs[-1].double()).abs().max().item():.3e}"
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_chain_matmul_ref_meets_the_same_tolerance(dtype):
    # The tolerance is not loose: the torch twin in the same dtype passes it, and the kernel is
    # held to it (no second, wider tolerance for the kernel).
    for dims in CHAINS:
        x, factors = make_chain(33, dims, dtype)
        check_chain(chain_matmul_ref(x, factors), x, factors, dtype, "twin")


@pytest.mark.parametrize("return_all", [True, False], ids=["all", "last"])
def test_chain_matmul_fallback(monkeypatch, return_all):
    # Widths above the threshold take one torch.matmul per step and never launch the kernel.
    monkeypatch.setattr(chain_kernels, "MAX_ONCHIP_WIDTH", 8)
    monkeypatch.setattr(chain_kernels, "MAX_ONCHIP_WIDTH_IEEE", 8)
    monkeypatch.setattr(chain_kernels, "_chain_matmul_kernel", None)  # a launch would raise
    x, factors = make_chain(7, [5, 17, 5], torch.float32, "transposed")
    outputs = chain_matmul(x, factors, return_all=return_all)
    expected = fp64_chain(x, factors)
    if not return_all:
        expected = expected[-1:]
    for j, (out, ref) in enumerate(zip(outputs, expected)):
        assert_close(out, ref, torch.float32, 17, steps=2, what=f"fallback output {j}")


@pytest.mark.parametrize("return_all", [True, False], ids=["all", "last"])
@pytest.mark.parametrize("depth", [9, 17], ids=["k9", "k17"])
def test_chain_matmul_longer_than_one_launch(depth, return_all):
    # More factors than one launch takes: consecutive launches, each starting from the last X.
    dims = [33, 40, 17, 5, 40, 32, 17, 40, 5, 33] * 2
    x, factors = make_chain(7, dims[: depth + 1], torch.float32, "transposed")
    outputs = chain_matmul(x, factors, return_all=return_all)
    expected = fp64_chain(x, factors)
    if not return_all:
        expected = expected[-1:]
    assert len(outputs) == len(expected), f"{len(outputs)} outputs, expected {len(expected)}"
    for j, (out, ref) in enumerate(zip(outputs, expected)):
        step = j + 1 if return_all else depth
        assert_close(out, ref, torch.float32, 40, steps=step, what=f"k={depth} output {j}")


def test_chain_matmul_float64_takes_torch_path(monkeypatch):
    monkeypatch.setattr(chain_kernels, "_chain_matmul_kernel", None)
    x, factors = make_chain(7, [5, 17, 3], torch.float64)
    for out, ref in zip(chain_matmul(x, factors), fp64_chain(x, factors)):
        assert_close(out, ref, torch.float64, 17)


# Chains wider than MAX_RESIDENT_WIDTH stream their row block through the destinations (K-loop over
# the input width, N-loop over output chunks). fp32 takes them only with TF32 allowed, which the fp32
# tolerance does not cover: the half dtypes test the streamed kernel.
HALF_DTYPES = DTYPES[1:]
WIDE_CHAINS = [[129, 200, 65], [1, 129], [200, 257, 7, 129], [65, 1, 257, 33]]  # k = 2, 1, 3, 3


def _wide_layout(x, factors, layout):
    """The chain in ``layout``: the test LAYOUTS for x and every factor, or "weight chain" (x a
    transposed view, factors row-major: how a layer collapses its weight) or "mixed factors" (every
    other factor a transposed view: the launcher packs those)."""
    if layout == "weight chain":
        return _layout(x, "transposed"), factors
    if layout == "mixed factors":
        return x, [_layout(f, "transposed") if j % 2 else f for j, f in enumerate(factors)]
    return _layout(x, layout), [_layout(f, layout) for f in factors]


@pytest.mark.parametrize("layout", LAYOUTS + ["weight chain", "mixed factors"])
@pytest.mark.parametrize("dims", WIDE_CHAINS, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("batch", [1, 33], ids=lambda b: f"M{b}")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_chain_matmul_wide_matches_fp64(monkeypatch, dtype, batch, dims, layout):
    monkeypatch.setattr(chain_kernels, "chain_matmul_ref", None)  # a torch fallback would raise
    monkeypatch.setattr(chain_kernels, "MAX_ONCHIP_WIDTH", 1024)  # 257 streams too (routed only up to 256)
    x, factors = make_chain(batch, dims, dtype)
    x, factors = _wide_layout(x, factors, layout)
    assert chain_kernels._resident_block([x.shape[1]] + [f.shape[0] for f in factors]) == 0, "not streamed"
    outputs = chain_matmul(x, factors, return_all=True)
    check_chain(outputs, x, factors, dtype, f"streamed {layout}")
    last = chain_matmul(x, factors, return_all=False)
    assert torch.equal(last[0], outputs[-1]), (
        f"return_all=False differs from return_all=True by "
        f"{(last[0].double() - outputs[-1].double()).abs().max().item():.3e}"
    )


@pytest.mark.parametrize("layout", ["contiguous", "weight chain"])
@pytest.mark.parametrize("tile", chain_kernels.STREAMED_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_every_streamed_tile_matches_fp64(monkeypatch, dtype, tile, layout):
    # Each (BLOCK_M, BLOCK_NC) the CUDA autotuner may choose, alone: output chunks narrower than,
    # as wide as and wider than the layers (256 is one chunk at the 256-wide step, partial at the
    # others), row blocks wider than M = 33's tail.
    import triton

    from fastrank.kernels import _launch

    monkeypatch.setattr(chain_kernels, "chain_matmul_ref", None)
    kernel = chain_kernels._chain_matmul_kernel
    block_m, block_nc = tile
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_NC": block_nc, "BLOCK_K": chain_kernels.STREAMED_BLOCK_K},
                           num_warps=8 if block_nc == 256 else 4, num_stages=2)  # as on CUDA (4 warps spill at 256)
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setitem(_launch._CHOICES, kernel, _launch._Choices(kernel))
    monkeypatch.setattr(chain_kernels, "_CHAIN_PLANS", chain_kernels.PlanCache())
    x, factors = make_chain(33, [129, 256, 200, 75], dtype)
    x, factors = _wide_layout(x, factors, layout)
    outputs = chain_matmul(x, factors, return_all=True)
    check_chain(outputs, x, factors, dtype, f"streamed {block_m} x {block_nc}, {layout}")
    assert kernel.best_config is config, f"{kernel.best_config} ran, expected {config}"


@pytest.mark.parametrize("element_size", [2, 4], ids=["16-bit", "fp32"])
def test_streamed_configs_on_cuda_fit_the_width(monkeypatch, element_size):
    # What the CUDA autotuner may choose for a streamed launch (the compile gate compiles exactly
    # these): output chunks no wider than the widest layer's bucket, 256-column chunks in 16-bit
    # with 8 warps only, nothing the gate saw spill.
    monkeypatch.setattr(chain_kernels, "BUILT_FOR_INTERPRETER", False)
    configs = chain_kernels._cuda_configs("chain")
    meta = dict(BLOCK_N=0, INPUT_PRECISION="tf32", ELEMENT_SIZE=element_size, X_ROWS_CONTIGUOUS=False)
    chosen = {}
    for bucket in (128, 256, 512):
        pruned = chain_kernels._prune_chain_configs(configs, {"WIDTH_BUCKET": bucket}, **meta)
        chosen[bucket] = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_NC"], c.num_warps) for c in pruned}
        assert all(c.num_stages == 2 and c.kwargs["BLOCK_K"] == chain_kernels.STREAMED_BLOCK_K for c in pruned)
        assert not {(element_size, *tile) for tile in chosen[bucket]} & chain_kernels._STREAMED_SPILLS, bucket
        assert max(block_nc for _, block_nc, _ in chosen[bucket]) <= bucket, chosen[bucket]
    wide = {tile for tile in chosen[256] if tile[1] == 256}
    assert wide == ({(16, 256, 8), (32, 256, 8), (64, 256, 8)} if element_size == 2 else set()), wide
    assert chosen[128] == chosen[256] - wide and chosen[512] == chosen[256], chosen


def test_chain_matmul_wide_longer_than_one_launch(monkeypatch):
    # 10 streamed steps: a launch of 8 through alternating scratch buffers, then one of 2.
    monkeypatch.setattr(chain_kernels, "chain_matmul_ref", None)
    dims = [129, 70, 200, 65, 129, 7, 200, 129, 65, 70, 129]
    x, factors = make_chain(7, dims, torch.float16, "transposed")
    last = chain_matmul(x, factors, return_all=False)
    assert_close(last[0], fp64_chain(x, factors)[-1], torch.float16, 200, steps=10, what="k=10 last")
    outputs = chain_matmul(x, factors, return_all=True)
    assert torch.equal(last[0], outputs[-1]), "return_all=False differs from return_all=True"
    check_chain(outputs, x, factors, torch.float16, "k=10")


def test_chain_matmul_wide_fp32_ieee_takes_torch_path(monkeypatch):
    # fp32 with TF32 off stays on the torch path above MAX_ONCHIP_WIDTH_IEEE.
    monkeypatch.setattr(chain_kernels, "cuda_matmul_allows_tf32", lambda: False)
    monkeypatch.setattr(chain_kernels, "_chain_matmul_kernel", None)  # a launch would raise
    x, factors = make_chain(7, [MAX_ONCHIP_WIDTH_IEEE + 1, 17], torch.float32)
    check_chain(chain_matmul(x, factors), x, factors, torch.float32, "ieee fallback")


def test_chain_matmul_rejects_bad_inputs():
    x = torch.randn(4, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"factor 1 must have shape \(n_2, 3\), got \(2, 4\)"):
        chain_matmul(x, [torch.randn(3, 5, device=DEVICE), torch.randn(2, 4, device=DEVICE)])
    with pytest.raises(TypeError, match="float16"):
        chain_matmul(x, [torch.randn(3, 5, device=DEVICE, dtype=torch.float16)])
    with pytest.raises(ValueError, match="2-D"):
        chain_matmul(x[0], [torch.randn(3, 5, device=DEVICE)])
    with pytest.raises(ValueError, match="at least one factor"):
        chain_matmul(x, [])


# --------------------------------------------------------------------------------------------
# factor gradients
# --------------------------------------------------------------------------------------------


def make_grad_pairs(batch, dims, dtype, layout="contiguous", seed=1):
    """Pairs (G_j (M, n_j), X_{j-1} (M, n_{j-1})) as the backward of a chain produces them."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(batch, n, generator=gen, dtype=torch.float64) for n in dims[1:]]
    inputs = [torch.randn(batch, n, generator=gen, dtype=torch.float64) for n in dims[:-1]]
    grads = [_layout(g.to(dtype).to(DEVICE), layout) for g in grads]
    inputs = [_layout(i.to(dtype).to(DEVICE), layout) for i in inputs]
    return grads, inputs


def check_factor_grads(results, grads, inputs, dtype, what):
    assert len(results) == len(grads), f"{what}: {len(results)} results, expected {len(grads)}"
    for j, (out, g, i) in enumerate(zip(results, grads, inputs)):
        assert out.dtype == dtype, f"{what} dF_{j + 1}: dtype {out.dtype}, expected {dtype}"
        assert_close(out, g.double().T @ i.double(), dtype, g.shape[0], what=f"{what} dF_{j + 1}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims", CHAINS, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"M{b}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_factor_grads_matches_fp64(dtype, batch, dims, layout):
    grads, inputs = make_grad_pairs(batch, dims, dtype, layout)
    check_factor_grads(chain_factor_grads(grads, inputs), grads, inputs, dtype, f"kernel {layout}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_chain_factor_grads_ref_meets_the_same_tolerance(dtype):
    for dims in CHAINS:
        grads, inputs = make_grad_pairs(33, dims, dtype)
        check_factor_grads(chain_factor_grads_ref(grads, inputs), grads, inputs, dtype, "twin")


def test_chain_factor_grads_long_reduction():
    # M spans several BLOCK_K steps with a ragged tail.
    grads, inputs = make_grad_pairs(301, [17, 40, 5], torch.float16, "transposed")
    check_factor_grads(chain_factor_grads(grads, inputs), grads, inputs, torch.float16, "M=301")


def test_chain_factor_grads_more_pairs_than_one_launch():
    dims = [5, 17, 40, 33, 7, 40, 17, 5, 33, 40, 17, 9]  # 11 pairs: two grouped launches
    grads, inputs = make_grad_pairs(33, dims, torch.float16, "transposed")
    check_factor_grads(chain_factor_grads(grads, inputs), grads, inputs, torch.float16, "11 pairs")


def _transposed_ends(grads, inputs):
    """The weight chain's backward layout: X_0 = W_1^T and the last G = dP^T are transposed views."""
    return grads[:-1] + [_layout(grads[-1], "transposed")], [_layout(inputs[0], "transposed")] + inputs[1:]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "weight chain"])
@pytest.mark.parametrize("split_k", [1, 2, 3], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_factor_grads_split_k(dtype, split_k, layout):
    # M = 301 rows in SPLIT_ALIGN-row splits (3: 128 + 128 + 45); fp32 partials added in split order.
    dims = [17, 40, 5, 33]
    grads, inputs = make_grad_pairs(301, dims, dtype, "transposed" if layout == "transposed" else "contiguous")
    if layout == "weight chain":
        grads, inputs = _transposed_ends(grads, inputs)
    assert chain_kernels.split_plan(301, 1, 132, split_k)[0] == split_k
    results = chain_factor_grads(grads, inputs, split_k=split_k)
    check_factor_grads(results, grads, inputs, dtype, f"split {split_k} {layout}")
    again = chain_factor_grads(grads, inputs, split_k=split_k)
    for j, (first, second) in enumerate(zip(results, again)):
        assert torch.equal(first, second), f"split {split_k}: dF_{j + 1} differs between two runs"
    for key, counters in chain_kernels._SPLIT_COUNTERS.items():
        assert int(counters.abs().sum()) == 0, f"split counters of {key} not reset: {counters.nonzero().flatten().tolist()}"


def test_chain_factor_grads_split_matches_unsplit_up_to_summation_order():
    # Same values as one fp32 accumulation over M: within the tolerance of each other, not only of fp64.
    grads, inputs = make_grad_pairs(256, [33, 9, 40], torch.float16)
    whole = chain_factor_grads(grads, inputs, split_k=1)
    split = chain_factor_grads(grads, inputs, split_k=4)
    for j, (a, b) in enumerate(zip(split, whole)):
        assert_close(a, b.double(), torch.float16, 256, what=f"split vs unsplit dF_{j + 1}")


def test_split_plan():
    # No split while the tiles fill the SMs or M is short; otherwise enough to fill them.
    assert chain_kernels.split_plan(8192, 256, 132) == (1, 8192)  # d = 1024, L = 4: 256 tiles
    assert chain_kernels.split_plan(256, 16, 132) == (1, 256)  # d = 256, M = 256: too short to split
    splits, rows = chain_kernels.split_plan(8192, 16, 132)  # d = 256, M = 8192: 16 tiles
    assert splits * 16 >= 132 and rows % chain_kernels.SPLIT_ALIGN == 0 and (splits - 1) * rows < 8192 <= splits * rows
    splits, rows = chain_kernels.split_plan(1 << 20, 1, 132)
    assert splits == chain_kernels.MAX_SPLITS, splits
    splits, rows = chain_kernels.split_plan(600, 1, 132)  # at least SPLIT_MIN_ROWS rows a split
    assert splits == 2 and rows >= chain_kernels.SPLIT_MIN_ROWS
    assert chain_kernels.split_plan(33, 1, 132, split_k=3) == (1, 33)  # one SPLIT_ALIGN block: no split
    assert chain_kernels.split_plan(200, 1, 132, split_k=4) == (4, 64)


def test_chain_factor_grads_fallback(monkeypatch):
    monkeypatch.setattr(chain_kernels, "MAX_GROUPED_WIDTH", 8)
    monkeypatch.setattr(chain_kernels, "_factor_grads_kernel", None)  # a launch would raise
    grads, inputs = make_grad_pairs(7, [5, 17, 5], torch.float32, "strided")
    check_factor_grads(chain_factor_grads(grads, inputs), grads, inputs, torch.float32, "fallback")


def test_chain_factor_grads_rejects_bad_inputs():
    g = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="equal counts"):
        chain_factor_grads([g], [])
    with pytest.raises(ValueError, match="equal M"):
        chain_factor_grads([g], [torch.randn(5, 2, device=DEVICE)])
    with pytest.raises(TypeError, match="float16"):
        chain_factor_grads([g], [torch.randn(4, 2, device=DEVICE, dtype=torch.float16)])
    assert chain_factor_grads([], []) == []


# --------------------------------------------------------------------------------------------
# fused backward of a narrow chain
# --------------------------------------------------------------------------------------------

chain_matmul_backward = chain_kernels.chain_matmul_backward
chain_matmul_backward_ref = chain_kernels.chain_matmul_backward_ref


def make_backward(batch, dims, dtype, layout="contiguous", seed=3):
    """x, factors (as make_chain) and dX_k (M, n_k)."""
    x, factors = make_chain(batch, dims, dtype, layout, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(batch, dims[-1], generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return x, factors, _layout(grad, layout)


def fp64_backward(x, factors, grad, needs_x):
    """[dF_1 .. dF_k] (+ dX_0) of X_k in float64 from the same (rounded) inputs, by autograd."""
    x64 = x.double().requires_grad_(needs_x)
    factors64 = [f.double().requires_grad_(True) for f in factors]
    out = fp64_chain(x64, factors64)[-1]
    return list(torch.autograd.grad(out, factors64 + ([x64] if needs_x else []), grad.double()))


def check_backward(results, x, factors, grad, needs_x, dtype, what):
    expected = fp64_backward(x, factors, grad, needs_x)
    names = [f"dF_{j + 1}" for j in range(len(factors))] + (["dX_0"] if needs_x else [])
    assert len(results) == len(expected), f"{what}: {len(results)} results, expected {len(expected)}"
    # Every result is k roundings deep (reverse steps, forward steps, its own), each reducing over
    # at most the widest layer or M rows.
    reduction = max([x.shape[0], x.shape[1]] + [f.shape[0] for f in factors])
    # dF_j in F_j's layout: the transposed view of a contiguous buffer for a transposed factor
    layouts = [chain_kernels._transposed_view(f) for f in factors] + ([False] if needs_x else [])
    for name, out, ref, transposed in zip(names, results, expected, layouts):
        assert out.dtype == dtype, f"{what} {name}: dtype {out.dtype}, expected {dtype}"
        assert out.shape == ref.shape, f"{what} {name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        assert (out.T if transposed else out).is_contiguous(), f"{what} {name}: strides {out.stride()}"
        assert_close(out, ref, dtype, reduction, steps=len(factors), what=f"{what} {name}")


def assert_counters_reset():
    for key, counters in chain_kernels._SPLIT_COUNTERS.items():
        assert int(counters.abs().sum()) == 0, f"counters of {key} not reset: {counters.nonzero().flatten().tolist()}"


@pytest.fixture
def fused_fp32(monkeypatch):
    """fp32 through the fused kernel at every resident width. The interpreter's dot is exact fp32
    whatever the precision, so there fp32 takes the TF32 path (which the kernel fuses at every
    width); on CUDA torch's setting stands (TF32 off: fused up to MAX_BACKWARD_WIDTH_IEEE, composed
    above, both checked against the same reference)."""
    if INTERPRET:
        monkeypatch.setattr(chain_kernels, "cuda_matmul_allows_tf32", lambda: True)


@pytest.mark.parametrize("needs_x", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("dims", CHAINS, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"M{b}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_matmul_backward_matches_fp64(fused_fp32, dtype, batch, dims, needs_x):
    x, factors, grad = make_backward(batch, dims, dtype)
    assert chain_kernels.recomputes_backward(x, factors)
    if INTERPRET or dtype != torch.float32:
        assert chain_kernels.fuses_backward(x, factors)
    results = chain_matmul_backward(x, factors, grad, needs_x)
    check_backward(results, x, factors, grad, needs_x, dtype, "fused")
    assert_counters_reset()


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_matmul_backward_any_strides(fused_fp32, dtype, layout):
    x, factors, grad = make_backward(33, [40, 17, 32, 5], dtype, layout)
    check_backward(chain_matmul_backward(x, factors, grad), x, factors, grad, True, dtype, layout)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_chain_matmul_backward_ref_meets_the_same_tolerance(dtype):
    for dims in CHAINS:
        x, factors, grad = make_backward(33, dims, dtype, seed=5)
        x, factors, grad = x.cpu(), [f.cpu() for f in factors], grad.cpu()
        check_backward(chain_matmul_backward_ref(x, factors, grad, True), x, factors, grad, True, dtype, "twin")


@pytest.mark.parametrize("needs_x", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("dims", [[40, 17, 32, 5], [33, 33, 33, 33, 33], [5, 17], [13, 16, 5]],
                         ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_matmul_backward_of_transposed_factors_is_one_launch(fused_fp32, monkeypatch, dtype, dims, needs_x):
    # The weight chain's layout (x = W_L row-major, the factors W_j^T as transposed views): the
    # fused kernel reads the factors as they are and writes their gradients in their layout, so
    # nothing is packed and autograd copies nothing. On CUDA, fp32 with TF32 off fuses up to
    # MAX_BACKWARD_WIDTH_IEEE (13 x 16 x 5) and composes the wider chains, in the same layouts.
    x, factors, grad = make_backward(7, dims, dtype)
    factors = [f.T.contiguous().T for f in factors]  # the same values as transposed views
    assert all(chain_kernels._transposed_view(f) for f in factors)
    if INTERPRET or dtype != torch.float32 or max(dims) <= chain_kernels.MAX_BACKWARD_WIDTH_IEEE:
        assert chain_kernels.fuses_backward(x, factors)
    if chain_kernels.fuses_backward(x, factors):
        monkeypatch.setattr(chain_kernels, "compose_chain_backward", lambda *args: pytest.fail("composed"))
    results = chain_matmul_backward(x, factors, grad, needs_x)
    check_backward(results, x, factors, grad, needs_x, dtype, "transposed factors")
    assert_counters_reset()


def test_chain_matmul_backward_mixing_layouts_takes_the_composed_kernels():
    x, factors, grad = make_backward(9, [17, 40, 5, 33], torch.float16)
    factors[1] = factors[1].T.contiguous().T  # one transposed view among row-major factors
    results = chain_matmul_backward(x, factors, grad)
    check_backward(results, x, factors, grad, True, torch.float16, "mixed layouts")


def test_chain_matmul_backward_several_blocks_per_program(monkeypatch):
    # 161 rows in blocks of 32 over 2 programs: 3 blocks each, their partials added in place, then
    # summed by the last program in program order, the same result on every run.
    monkeypatch.setattr(chain_kernels, "MAX_BACKWARD_PROGRAMS", 2)
    x, factors, grad = make_backward(161, [17, 40, 5, 33], torch.float16)
    first = chain_matmul_backward(x, factors, grad)
    check_backward(first, x, factors, grad, True, torch.float16, "2 programs")
    second = chain_matmul_backward(x, factors, grad)
    for j, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {j} differs between two runs"
    assert_counters_reset()


def test_split_launches_while_capturing_take_their_own_counters(monkeypatch):
    # A CUDA graph's capture stream has no counters yet (torch.cuda.graph captures on a stream of
    # its own): the split and fused launches still run as in the warm-up, each with a fresh zeroed
    # buffer that no eager launch or other graph shares; the stream's shared buffer comes back after.
    x, factors, grad = make_backward(33, [17, 40, 5, 33], torch.float16)
    grads, inputs = make_grad_pairs(301, [17, 40, 5, 33], torch.float16, "contiguous")
    eager_backward = chain_matmul_backward(x, factors, grad)
    eager_grads = chain_factor_grads(grads, inputs, split_k=3)
    monkeypatch.setattr(chain_kernels, "_SPLIT_COUNTERS", {})
    monkeypatch.setattr(chain_kernels, "_WORKSPACES", {})
    monkeypatch.setattr(chain_kernels, "SHARE_WORKSPACES", True)
    monkeypatch.setattr(chain_kernels, "_capturing", lambda device: True)
    composed = []
    monkeypatch.setattr(chain_kernels, "compose_chain_backward", lambda *args: composed.append(args))
    captured = [chain_kernels._split_counters(x.device, 8) for _ in range(2)]
    assert captured[0].data_ptr() != captured[1].data_ptr() and not chain_kernels._SPLIT_COUNTERS
    assert all(int(c.abs().sum()) == 0 for c in captured)
    for again, before in ((chain_matmul_backward(x, factors, grad), eager_backward),
                          (chain_factor_grads(grads, inputs, split_k=3), eager_grads)):
        for j, (a, b) in enumerate(zip(again, before)):
            assert torch.equal(a, b), f"result {j} differs while capturing"
    assert not composed, "the fused backward fell back to the composed kernels while capturing"
    assert not chain_kernels._SPLIT_COUNTERS, "a capture registered its counters for the stream"
    assert not chain_kernels._WORKSPACES, "a capture registered its workspace for the stream"
    monkeypatch.setattr(chain_kernels, "_capturing", lambda device: False)
    shared = chain_kernels._split_counters(x.device, 8)
    assert chain_kernels._split_counters(x.device, 8) is shared


def test_a_capture_never_takes_the_streams_counters(monkeypatch):
    # torch.compile's CUDA graph trees warm up and capture on one stream: a capture that took the
    # stream's registered buffer would share it with the stream's eager launches and keep using it
    # after a larger one replaced it. Captures get buffers of their own (a launch plan's fetch on
    # CUDA asks the same question first; on the CPU, which never captures, it looks up alone); a
    # replaced buffer is kept (launches queued on its stream may still use it).
    device = torch.device("cpu")
    monkeypatch.setattr(chain_kernels, "_SPLIT_COUNTERS", {})
    monkeypatch.setattr(chain_kernels, "_RETIRED_COUNTERS", [])
    monkeypatch.setattr(chain_kernels, "_capturing", lambda device: False)
    shared = chain_kernels._split_counters(device, 8)
    fetch = chain_kernels._split_counter_fetch(device, 8)
    assert fetch() is shared and chain_kernels._split_counters(device, 8) is shared
    monkeypatch.setattr(chain_kernels, "_capturing", lambda device: True)
    own = [chain_kernels._split_counters(device, 8) for _ in range(2)]
    assert all(c is not shared and int(c.abs().sum()) == 0 for c in own)
    assert own[0].data_ptr() != own[1].data_ptr()
    assert chain_kernels._SPLIT_COUNTERS == {(device, 0): shared}
    monkeypatch.setattr(chain_kernels, "_capturing", lambda device: False)
    wider = chain_kernels._split_counters(device, 4096)
    assert wider.numel() >= 4096 and chain_kernels._RETIRED_COUNTERS == [shared]
    assert fetch() is wider


def _backward_unshared(monkeypatch, x, factors, grad):
    """The fused backward with a workspace of its own, through launch plans of its own."""
    with monkeypatch.context() as patched:
        patched.setattr(chain_kernels, "SHARE_WORKSPACES", False)
        patched.setattr(chain_kernels, "_BACKWARD_PLANS", chain_kernels.PlanCache())
        return chain_matmul_backward(x, factors, grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fused_backward_on_the_streams_shared_workspace(monkeypatch, dtype):
    # The fused backward's scratch (recomputed intermediates, per-program partial sums) is the
    # current stream's shared workspace up to SHARED_WORKSPACE_BYTES: whatever an earlier launch
    # left there (here: NaN bytes), the results equal a fresh allocation's, bit for bit, through
    # the JIT, the call recording a launch plan and the plan's replays (on CUDA; the interpreter
    # takes the JIT every time); each launch really writes there; a larger call replaces it (the
    # old one kept); above the limit a call allocates its own. Widths <= 16: fp32 with TF32 off
    # (torch's default on CUDA) fuses up to MAX_BACKWARD_WIDTH_IEEE.
    monkeypatch.setattr(chain_kernels, "_WORKSPACES", {})
    monkeypatch.setattr(chain_kernels, "_RETIRED_WORKSPACES", [])
    monkeypatch.setattr(chain_kernels, "SHARE_WORKSPACES", True)
    monkeypatch.setattr(chain_kernels, "_BACKWARD_PLANS", chain_kernels.PlanCache())
    # the second case's scratch outgrows the stream's first workspace (64 KiB)
    cases = [make_backward(33, [13, 16, 5, 11], dtype), make_backward(1100, [13, 16, 5, 11], dtype, seed=4),
             make_backward(45, [16, 9, 13], dtype, "transposed", seed=5)]
    for j, (x, factors, grad) in enumerate(cases):
        assert chain_kernels.fuses_backward(x, factors), f"case {j} is not the fused backward"
    for round_ in range(3):  # the JIT, the JIT recording the plan, the plan
        for j, (x, factors, grad) in enumerate(cases):
            what = f"case {j}, call {round_}"
            workspace = chain_kernels._workspace(x.device, 1)
            workspace.fill_(255)  # NaN in every float format
            before = workspace.clone()
            shared = chain_matmul_backward(x, factors, grad)
            check_backward(shared, x, factors, grad, True, dtype, what)
            for i, (a, b) in enumerate(zip(shared, _backward_unshared(monkeypatch, x, factors, grad))):
                assert torch.equal(a, b), f"{what}: result {i} differs from a fresh workspace's"
            assert len(chain_kernels._WORKSPACES) == 1, "one stream, one workspace"
            (used,) = chain_kernels._WORKSPACES.values()
            if used is workspace:
                assert not torch.equal(used, before), f"{what}: the launch did not write the shared workspace"
            else:  # replaced by a larger one, which the launch used
                assert any(w is workspace for w in chain_kernels._RETIRED_WORKSPACES), f"{what}: a replaced workspace was dropped"
    assert chain_kernels._RETIRED_WORKSPACES, "a larger call did not replace the workspace"
    monkeypatch.setattr(chain_kernels, "_WORKSPACES", {})
    monkeypatch.setattr(chain_kernels, "SHARED_WORKSPACE_BYTES", 1024)
    monkeypatch.setattr(chain_kernels, "_BACKWARD_PLANS", chain_kernels.PlanCache())
    x, factors, grad = cases[0]
    for _ in range(3):
        for a, b in zip(chain_matmul_backward(x, factors, grad), _backward_unshared(monkeypatch, x, factors, grad)):
            assert torch.equal(a, b)
    assert not chain_kernels._WORKSPACES, "a workspace above the limit was shared"


def test_a_plans_fetch_reads_the_streams_buffer_of_the_call(monkeypatch):
    # A launch plan's fetch finds the stream's buffer in the module's dict as it is at the call
    # (a dict replaced after the recording is the one read), else makes it.
    device = torch.device("cpu")
    monkeypatch.setattr(chain_kernels, "_capturing", lambda device: False)
    monkeypatch.setattr(chain_kernels, "SHARE_WORKSPACES", True)
    fetches = {"_SPLIT_COUNTERS": chain_kernels._split_counter_fetch(device, 8),
               "_WORKSPACES": chain_kernels._shared_workspace(device)(512)[1]}
    for name, fetch in fetches.items():
        replaced = torch.zeros(4096, dtype=torch.int32 if name == "_SPLIT_COUNTERS" else torch.uint8)
        monkeypatch.setattr(chain_kernels, name, {(device, 0): replaced})
        assert fetch() is replaced, f"{name}: the fetch read the dict of its recording"
        monkeypatch.setattr(chain_kernels, name, {})
        made = fetch()
        assert made is not replaced and getattr(chain_kernels, name) == {(device, 0): made}, name


@requires_cuda
def test_each_stream_has_its_own_workspace(monkeypatch):
    # Launches on two streams may run at once: each stream's fused backwards take that stream's
    # workspace, and the results on both equal those on the default stream.
    monkeypatch.setattr(chain_kernels, "_WORKSPACES", {})
    x, factors, grad = make_backward(161, [17, 40, 5, 33], torch.float16)
    expected = chain_matmul_backward(x, factors, grad)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    results = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            results.append([chain_matmul_backward(x, factors, grad) for _ in range(3)])
    torch.cuda.synchronize()
    assert len(chain_kernels._WORKSPACES) == 3, f"workspaces by stream: {list(chain_kernels._WORKSPACES)}"
    assert len({w.data_ptr() for w in chain_kernels._WORKSPACES.values()}) == 3
    for s, calls in enumerate(results):
        for c, got in enumerate(calls):
            for j, (a, b) in enumerate(zip(got, expected)):
                assert torch.equal(a, b), f"stream {s}, call {c}: result {j} differs from the default stream's"


def test_two_threads_on_one_stream_share_its_first_counters(monkeypatch):
    # Making a stream's buffer waits (on CUDA for a thread of its own): a second thread asking
    # meanwhile gets the same buffer, and none is dropped unretired (it would be freed under the
    # launch that took it).
    import threading
    import time

    device = torch.device("cpu")
    monkeypatch.setattr(chain_kernels, "_SPLIT_COUNTERS", {})
    monkeypatch.setattr(chain_kernels, "_RETIRED_COUNTERS", [])
    monkeypatch.setattr(chain_kernels, "_capturing", lambda device: False)

    def slow(device, make):
        time.sleep(0.05)
        return make()

    monkeypatch.setattr(chain_kernels, "persistent_buffer", slow)
    got = []
    threads = [threading.Thread(target=lambda: got.append(chain_kernels._split_counters(device, 8))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got[0] is got[1] and chain_kernels._SPLIT_COUNTERS == {(device, 0): got[0]}
    assert chain_kernels._RETIRED_COUNTERS == []


def test_chain_matmul_backward_fp32_ieee_fuses_narrow_chains_only(monkeypatch):
    # TF32 off: FMA tiles in registers, fused up to MAX_BACKWARD_WIDTH_IEEE, composed above.
    monkeypatch.setattr(chain_kernels, "cuda_matmul_allows_tf32", lambda: False)
    limit = chain_kernels.MAX_BACKWARD_WIDTH_IEEE
    for dims, fused in (([limit, 9, limit], True), ([limit + 1, 5], False)):
        x, factors, grad = make_backward(7, dims, torch.float32)
        assert chain_kernels.recomputes_backward(x, factors)
        assert chain_kernels.fuses_backward(x, factors) == fused, f"{dims}: expected fused={fused}"
        check_backward(chain_matmul_backward(x, factors, grad), x, factors, grad, True, torch.float32, f"{dims}")


def test_chain_matmul_backward_eight_factors_in_one_launch():
    dims = [33, 40, 17, 5, 40, 32, 17, 40, 5]
    x, factors, grad = make_backward(7, dims, torch.float16)
    assert chain_kernels.fuses_backward(x, factors)
    check_backward(chain_matmul_backward(x, factors, grad), x, factors, grad, True, torch.float16, "k=8")


@pytest.mark.parametrize(
    "dims", [[33, 40, 17, 5, 40, 32, 17, 40, 5, 9], [17, 65, 5]], ids=["k9", "wider-than-resident"]
)
def test_chain_matmul_backward_composes_the_kernels_elsewhere(monkeypatch, dims):
    # Longer or wider chains recompute with the chain kernel and group their factor gradients.
    monkeypatch.setattr(chain_kernels, "_chain_backward_kernel", None)  # a launch would raise
    monkeypatch.setattr(chain_kernels, "MAX_ONCHIP_WIDTH", 1024)
    x, factors, grad = make_backward(7, dims, torch.float16)
    assert not chain_kernels.recomputes_backward(x, factors) and not chain_kernels.fuses_backward(x, factors)
    check_backward(chain_matmul_backward(x, factors, grad, False), x, factors, grad, False, torch.float16, "composed")


def test_chain_matmul_backward_rejects_bad_inputs():
    x, factors, grad = make_backward(4, [5, 3], torch.float32)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(4, 3\).*got \(4, 5\)"):
        chain_matmul_backward(x, factors, grad.new_zeros(4, 5))
    with pytest.raises(TypeError, match="grad_output is torch.float16"):
        chain_matmul_backward(x, factors, grad.half())
    with pytest.raises(ValueError, match="factor 0 must have shape"):
        chain_matmul_backward(x, [factors[0].T], grad)


# --------------------------------------------------------------------------------------------
# CUDA only: bf16, large shapes, non-contiguous, both sides of the on-chip threshold
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize(
    "batch,dims",
    [
        (8192, [128, 128, 128, 128, 128]),  # streamed (fp32 "ieee": above its threshold)
        (4099, [33, 100, 77, 127]),  # odd widths below the threshold
        (1000, [512, 1024, 512]),  # streamed (fp32 "ieee": one matmul per step)
        (1000, [512, 1040, 512]),  # above MAX_ONCHIP_WIDTH: one matmul per step
        (1024, [1024, 1024, 1024, 1024]),  # the weight chain of a d=1024, L=4 layer; 64 x 64 tiles
        (65536, [64, 64, 64]),  # many programs
    ],
    ids=["8192x128^4", "4099-odd", "1000-streamed", "1000-fallback", "1024^4", "65536x64^2"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_chain(dtype, batch, dims, layout, monkeypatch):
    monkeypatch.setattr(chain_kernels, "MAX_ONCHIP_WIDTH", 1024)  # the streamed kernel at its widest
    x, factors = make_chain(batch, dims, dtype, layout)
    check_chain(chain_matmul(x, factors), x, factors, dtype, f"cuda {layout}")
    grads, inputs = make_grad_pairs(batch, dims, dtype, layout)
    check_factor_grads(chain_factor_grads(grads, inputs), grads, inputs, dtype, f"cuda {layout}")


# --------------------------------------------------------------------------------------------
# offsets past 2**31 elements
# --------------------------------------------------------------------------------------------

# Rows 2**30 elements apart in a lazily allocated 6 GiB fp16 buffer (only the touched pages are ever
# backed). int32 offsets wrap there and read outside the tensor, which can crash the process: the
# check runs in a child process.
_LARGE_OFFSETS = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from kernel_loading import load_kernels
    from tolerance import assert_close
    kernels = load_kernels("chain")
    device = {device!r}
    gen = torch.Generator().manual_seed(0)
    base = torch.empty(3 * 2**30 + 2**21, dtype=torch.float16, device=device)  # 6 GiB, untouched but for the views
    x = base.as_strided((3, 40), (2**30, 1))                       # rows at 0, 2**30, 2**31
    x.copy_(torch.randn(3, 40, generator=gen))
    factor = base[2**20:].as_strided((24, 40), (1, 2**26))         # F[r, c] at r + c * 2**26
    factor.copy_(torch.randn(24, 40, generator=gen) / 40**0.5)
    out = kernels.chain_matmul(x, [factor])[0]
    assert_close(out, x.double() @ factor.double().T, torch.float16, 40, what="chain")
    grad = base[2**19:].as_strided((3, 24), (2**30, 1))
    grad.copy_(torch.randn(3, 24, generator=gen))
    dF = kernels.chain_factor_grads([grad], [x])[0]
    assert_close(dF, grad.double().T @ x.double(), torch.float16, 3, what="factor grads")
    print("ok")
    """
)


def test_offsets_beyond_int32():
    script = _LARGE_OFFSETS.format(tests=str(Path(__file__).parent), device=DEVICE)
    env = dict(os.environ, TRITON_INTERPRET="1" if INTERPRET else "0")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, (
        f"chain kernels with offsets past 2**31 failed (exit {result.returncode}):\n"
        f"{result.stdout}\n{result.stderr[-2000:]}"
    )


# --------------------------------------------------------------------------------------------
# precision: fp32 uses TF32 exactly when torch's own matmul would
# --------------------------------------------------------------------------------------------


@pytest.fixture
def restore_matmul_precision():
    matmul = torch.backends.cuda.matmul
    saved = getattr(matmul, "fp32_precision", None)
    saved_generic = getattr(torch.backends, "fp32_precision", None)
    yield
    if saved is not None:
        matmul.fp32_precision = saved
        torch.backends.fp32_precision = saved_generic
    else:
        matmul.allow_tf32 = False


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no new precision API")
@pytest.mark.parametrize("setting,expected", [("tf32", "tf32"), ("ieee", "ieee"), ("none", "ieee")])
def test_input_precision_reads_the_new_api(restore_matmul_precision, setting, expected):
    # Reading the legacy allow_tf32 after the new API was used raises on torch >= 2.9.
    torch.backends.cuda.matmul.fp32_precision = setting
    assert chain_kernels._input_precision(torch.float32) == expected
    assert chain_kernels._input_precision(torch.float16) == "tf32"  # ignored for half operands


def test_input_precision_follows_the_legacy_setter(restore_matmul_precision):
    torch.backends.cuda.matmul.allow_tf32 = True
    assert chain_kernels._input_precision(torch.float32) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert chain_kernels._input_precision(torch.float32) == "ieee"


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_runs_on_the_input_device():
    x, factors = make_chain(65, [40, 17, 33], torch.float16, device="cuda:1")
    with torch.cuda.device(0):
        outputs = chain_matmul(x, factors)
        grads = chain_factor_grads(outputs, [x, outputs[0]])
    assert all(o.device == x.device for o in outputs + grads)
    check_chain(outputs, x, factors, torch.float16, "cuda:1")
    check_factor_grads(grads, outputs, [x, outputs[0]], torch.float16, "cuda:1")


def test_runs_on_chip_names_the_inputs_the_kernel_takes(monkeypatch):
    # The layers run the naive chain under plain autograd wherever the kernel would fall back to its
    # torch twin; this is the rule they ask. fp32 follows torch's TF32 setting.
    wide = [torch.empty(MAX_ONCHIP_WIDTH + 1, 16)]
    narrow = [torch.empty(MAX_ONCHIP_WIDTH, 16), torch.empty(16, MAX_ONCHIP_WIDTH)]
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.empty(5, 16, dtype=dtype)
        assert chain_kernels.runs_on_chip(x, [f.to(dtype) for f in narrow])
        assert not chain_kernels.runs_on_chip(x, [f.to(dtype) for f in wide])
        assert not chain_kernels.runs_on_chip(torch.empty(0, 16, dtype=dtype), [f.to(dtype) for f in narrow])
    assert not chain_kernels.runs_on_chip(torch.empty(5, 16, dtype=torch.float64), narrow)
    ieee = [torch.empty(MAX_ONCHIP_WIDTH_IEEE + 1, 16)]
    monkeypatch.setattr(chain_kernels, "cuda_matmul_allows_tf32", lambda: False)
    assert not chain_kernels.runs_on_chip(torch.empty(5, 16), ieee)
    assert chain_kernels.runs_on_chip(torch.empty(5, 16), [torch.empty(MAX_ONCHIP_WIDTH_IEEE, 16)])
    monkeypatch.setattr(chain_kernels, "cuda_matmul_allows_tf32", lambda: True)
    assert chain_kernels.runs_on_chip(torch.empty(5, 16), ieee)


def test_launches_reuse_the_autotuners_choice(monkeypatch):
    # The first launch of an autotune key goes through the autotuner; later ones call the JIT
    # function with its choice (fastrank.kernels._launch.launch_tuned). A new dtype or size bucket
    # is a new key.
    from fastrank.kernels import _launch

    kernel = chain_kernels._chain_matmul_kernel
    _launch._CHOICES.pop(kernel, None)
    runs = []
    original = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: runs.append(1) or original(*args, **kwargs))
    x, factors = make_chain(7, [5, 17, 5], torch.float32)
    first = chain_matmul(x, factors)
    second = chain_matmul(x, factors)
    assert len(runs) == 1, f"{len(runs)} launches through the autotuner, expected 1"
    for j, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"X_{j + 1} differs between the autotuned and the direct launch"
    check_chain(second, x, factors, torch.float32, "direct launch")
    half_x, half_factors = make_chain(7, [5, 17, 5], torch.float16)
    chain_matmul(half_x, half_factors)
    assert len(runs) == 2, "a new dtype must go through the autotuner"
    wide_x, wide_factors = make_chain(33, [5, 17, 5], torch.float32)
    check_chain(chain_matmul(wide_x, wide_factors), wide_x, wide_factors, torch.float32, "M=33")
    assert len(runs) == 3, "a new size bucket must go through the autotuner"


def test_every_autotuner_times_its_configs_with_the_short_budget(monkeypatch):
    # Each @triton.autotune of the kernels benchmarks through fastrank.kernels._launch.autotune_bench,
    # which asks triton.testing.do_bench for AUTOTUNE_WARMUP_MS + AUTOTUNE_REP_MS (not Triton's 25 + 100).
    import triton.testing
    from triton.runtime.autotuner import Autotuner

    sketch_kernels = load_kernels("sketch")
    autotuners = {name: value for module in (chain_kernels, sketch_kernels)
                  for name, value in vars(module).items() if isinstance(value, Autotuner)}
    assert sorted(autotuners) == ["_chain_backward_kernel", "_chain_matmul_kernel", "_factor_grads_kernel", "_sketch_kernel"]
    bench = chain_kernels.autotune_bench
    assert bench is sketch_kernels.autotune_bench
    for name, kernel in autotuners.items():
        assert kernel.do_bench is bench, name
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: calls.append(kwargs) or [fn(), 2.0, 3.0])
    assert bench(lambda: 1.0, quantiles=(0.5, 0.2, 0.8)) == [1.0, 2.0, 3.0]
    from fastrank.kernels import _launch

    assert (_launch.AUTOTUNE_WARMUP_MS, _launch.AUTOTUNE_REP_MS) == (5, 20)
    assert calls == [{"warmup": 5, "rep": 20, "quantiles": (0.5, 0.2, 0.8)}]


def test_autotunings_record_what_each_new_key_timed(monkeypatch):
    # fastrank.kernels._launch.autotunings(): per newly tuned key, the kernel, its key arguments,
    # the dtype, each config's median and the chosen one (the fastest), for the GPU scripts' JSON.
    import triton

    from fastrank.kernels import _launch

    kernel = chain_kernels._chain_matmul_kernel
    slow = triton.Config({"BLOCK_M": 32, "BLOCK_NC": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
    fast = triton.Config({"BLOCK_M": 16, "BLOCK_NC": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
    monkeypatch.setattr(kernel, "configs", [slow, fast])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "early_config_prune", None)  # timed as given (the prune rebuilds configs)
    monkeypatch.setitem(_launch._CHOICES, kernel, _launch._Choices(kernel))
    monkeypatch.setattr(chain_kernels, "_CHAIN_PLANS", chain_kernels.PlanCache())
    monkeypatch.setattr(_launch, "_AUTOTUNINGS", [])
    medians = iter([0.75, 0.25, 0.5, 0.125])  # slow, fast for the first key; the same for the second

    def fake_bench(kernel_call, quantiles):
        kernel_call()  # compiles and runs the config, as do_bench would
        median = next(medians)
        return [median, median, median]

    monkeypatch.setattr(kernel, "do_bench", fake_bench)
    x, factors = make_chain(7, [5, 17, 5], torch.float32)
    check_chain(chain_matmul(x, factors), x, factors, torch.float32, "tuned between two configs")
    check_chain(chain_matmul(x, factors), x, factors, torch.float32, "the remembered choice")
    assert len(_launch.autotunings()) == 1, "a known key is not tuned again"
    wide_x, wide_factors = make_chain(33, [5, 17, 5], torch.float32)
    chain_matmul(wide_x, wide_factors)
    first, second = _launch.autotunings()
    assert first["kernel"] == "_chain_matmul_kernel" and first["dtype"] == "torch.float32", first
    assert first["key"]["M_BUCKET"] == 16 and second["key"]["M_BUCKET"] == 64, (first["key"], second["key"])
    assert first["key"]["NUM_FACTORS"] == 2 and first["key"]["BLOCK_N"] == 32, first["key"]
    assert [t["ms"] for t in first["timings_ms"]] == [0.75, 0.25], first["timings_ms"]
    assert [t["BLOCK_M"] for t in first["timings_ms"]] == [32, 16], first["timings_ms"]
    assert first["chosen"] == {"BLOCK_M": 16, "BLOCK_NC": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    assert second["chosen"]["BLOCK_M"] == 16 and first["bench_s"] >= 0, second


@requires_cuda
def test_a_new_autotune_key_benchmarks_every_config_with_the_short_budget(monkeypatch):
    import triton.testing

    from fastrank.kernels import _launch

    kernel = chain_kernels._chain_matmul_kernel
    monkeypatch.setattr(kernel, "cache", {})  # the autotuner's choices: none, so this key is tuned
    _launch._CHOICES.pop(kernel, None)
    calls = []
    do_bench = triton.testing.do_bench
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, **kwargs: calls.append((kwargs["warmup"], kwargs["rep"])) or do_bench(fn, **kwargs))
    x, factors = make_chain(3001, [48, 80, 48], torch.float16)
    check_chain(chain_matmul(x, factors), x, factors, torch.float16, "a freshly tuned key")
    assert len(calls) >= 2 and set(calls) == {(5, 20)}, calls


def test_factor_grads_launches_key_on_the_dtype_of_their_tuples(monkeypatch):
    # The factor-gradient kernel takes every tensor in tuples, whose entries' dtypes the autotuner
    # does not key on: its key names the element size and precision, and launch_tuned the dtype.
    from fastrank.kernels import _launch

    kernel = chain_kernels._factor_grads_kernel
    assert {"ELEMENT_SIZE", "INPUT_PRECISION"} <= set(kernel.keys), kernel.keys
    for name in ("_chain_matmul_kernel", "_chain_backward_kernel"):
        assert "INPUT_PRECISION" in getattr(chain_kernels, name).keys, name
    _launch._CHOICES.pop(kernel, None)
    runs = []
    original = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: runs.append(1) or original(*args, **kwargs))
    for dtype in (torch.float32, torch.float32, torch.float16):
        grads, inputs = make_grad_pairs(33, [17, 40, 5], dtype)
        check_factor_grads(chain_factor_grads(grads, inputs), grads, inputs, dtype, str(dtype))
    assert len(runs) == 2, f"{len(runs)} launches through the autotuner, expected one per dtype"
