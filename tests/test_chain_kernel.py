"""Triton chain kernels against float64 references.

Without a GPU the kernels run on the CPU through the Triton interpreter; with one, natively on
CUDA (and the bf16 / large-shape cases run too).
"""

import pytest
import torch

from kernel_loading import DEVICE, load_kernels
from tolerance import assert_close

chain_kernels = load_kernels("chain")
chain_matmul = chain_kernels.chain_matmul
chain_matmul_ref = chain_kernels.chain_matmul_ref
chain_factor_grads = chain_kernels.chain_factor_grads
chain_factor_grads_ref = chain_kernels.chain_factor_grads_ref

requires_cuda = pytest.mark.skipif(
    DEVICE != "cuda", reason="needs a CUDA device (runs natively, not interpreted)"
)
# The interpreter computes bf16 dots and arithmetic wrongly (Triton 3.9): bf16 is tested on GPU only.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=requires_cuda),
]
BATCHES = [1, 7, 33]
# Widths straddle the interpreter's 32-wide chunk: 40 pads to 64 and takes the staged path.
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


@pytest.mark.parametrize("dtype", DTYPES)
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
    monkeypatch.setattr(chain_kernels, "_chain_matmul_kernel", None)  # a launch would raise
    x, factors = make_chain(7, [5, 17, 5], torch.float32, "transposed")
    outputs = chain_matmul(x, factors, return_all=return_all)
    expected = fp64_chain(x, factors)
    if not return_all:
        expected = expected[-1:]
    for j, (out, ref) in enumerate(zip(outputs, expected)):
        assert_close(out, ref, torch.float32, 17, steps=2, what=f"fallback output {j}")


def test_chain_matmul_float64_takes_torch_path(monkeypatch):
    monkeypatch.setattr(chain_kernels, "_chain_matmul_kernel", None)
    x, factors = make_chain(7, [5, 17, 3], torch.float64)
    for out, ref in zip(chain_matmul(x, factors), fp64_chain(x, factors)):
        assert_close(out, ref, torch.float64, 17)


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_factor_grads_ref_meets_the_same_tolerance(dtype):
    for dims in CHAINS:
        grads, inputs = make_grad_pairs(33, dims, dtype)
        check_factor_grads(chain_factor_grads_ref(grads, inputs), grads, inputs, dtype, "twin")


def test_chain_factor_grads_long_reduction():
    # M spans several BLOCK_K steps with a ragged tail.
    grads, inputs = make_grad_pairs(301, [17, 40, 5], torch.float16, "transposed")
    check_factor_grads(chain_factor_grads(grads, inputs), grads, inputs, torch.float16, "M=301")


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
# CUDA only: bf16, large shapes, non-contiguous, both sides of the on-chip threshold
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize(
    "batch,dims",
    [
        (8192, [256, 256, 256, 256, 256]),  # on chip, several column chunks
        (4099, [129, 200, 77, 255]),  # odd widths below the threshold
        (1000, [512, 1024, 512]),  # above the threshold: torch.matmul per step
        (65536, [64, 64, 64]),  # many programs
    ],
    ids=["8192x256^4", "4099-odd", "1000-fallback", "65536x64^2"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_chain(dtype, batch, dims, layout):
    x, factors = make_chain(batch, dims, dtype, layout)
    check_chain(chain_matmul(x, factors), x, factors, dtype, f"cuda {layout}")
    grads, inputs = make_grad_pairs(batch, dims, dtype, layout)
    check_factor_grads(chain_factor_grads(grads, inputs), grads, inputs, dtype, f"cuda {layout}")
