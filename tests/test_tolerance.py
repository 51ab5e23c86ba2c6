"""The tolerance of tests/tolerance.py is tight enough to catch real mistakes.

A correct fp32-accumulated chain (the torch twin) passes it in every dtype; a result of zeros, a
chain with one factor transposed, a chain with a step left out, or a factor gradient computed in
half precision without fp32 accumulation do not.
"""

import pytest
import torch

from tolerance import assert_close, relative_error, tolerance

from fastrank.chain import chain_factor_grads_ref, chain_matmul_ref

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
WIDTH, DEPTH, BATCH = 256, 4, 33  # the widest on-chip chain: the loosest bound the kernels get


def make_square_chain(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, WIDTH, generator=gen, dtype=torch.float64).to(dtype)
    factors = [
        (torch.randn(WIDTH, WIDTH, generator=gen, dtype=torch.float64) / WIDTH**0.5).to(dtype)
        for _ in range(DEPTH)
    ]
    return x, factors


def fp64_last(x, factors):
    block = x.double()
    for f in factors:
        block = block @ f.double().T
    return block


def assert_fails(actual, expected, dtype, what):
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(actual, expected, dtype, WIDTH, steps=DEPTH, what=what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_chain_passes(dtype):
    x, factors = make_square_chain(dtype)
    assert_close(chain_matmul_ref(x, factors)[-1], fp64_last(x, factors), dtype, WIDTH, steps=DEPTH)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_fail(dtype):
    x, factors = make_square_chain(dtype)
    assert_fails(torch.zeros(BATCH, WIDTH, dtype=dtype), fp64_last(x, factors), dtype, "zeros")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", range(DEPTH))
def test_transposed_factor_fails(dtype, which):
    x, factors = make_square_chain(dtype)
    mutated = list(factors)
    mutated[which] = mutated[which].T
    assert_fails(chain_matmul_ref(x, mutated)[-1], fp64_last(x, factors), dtype, f"F_{which + 1} transposed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", range(DEPTH))
def test_dropped_step_fails(dtype, which):
    x, factors = make_square_chain(dtype)
    mutated = factors[:which] + factors[which + 1 :]
    assert_fails(chain_matmul_ref(x, mutated)[-1], fp64_last(x, factors), dtype, f"step {which + 1} dropped")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_accumulation_fails(dtype):
    # dF = G^T X over M = 4096 rows: summed in the half dtype itself (no fp32 accumulator) the error
    # grows far beyond one rounding; the fp32-accumulated twin stays within the bound.
    gen = torch.Generator().manual_seed(1)
    M = 4096
    grad = torch.randn(M, 8, generator=gen, dtype=torch.float64).to(dtype)
    inp = torch.randn(M, 8, generator=gen, dtype=torch.float64).abs().to(dtype)  # no cancellation
    expected = grad.double().T @ inp.double()
    assert_close(chain_factor_grads_ref([grad], [inp])[0], expected, dtype, M)
    running = torch.zeros(8, 8, dtype=dtype)
    for row in range(M):  # sequential half-precision sum, as a kernel without fp32 accumulation
        running = running + grad[row][:, None] * inp[row][None, :]
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(running, expected, dtype, M, what="half accumulation")


def test_bound_is_far_below_one():
    # The bound that the widest kernel case gets is a few percent even in bf16.
    assert tolerance(torch.bfloat16, WIDTH, DEPTH) < 0.05
    assert relative_error(torch.zeros(3), torch.ones(3)) == 1.0
