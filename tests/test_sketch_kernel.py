"""Triton Gaussian-sketch kernel against an fp64 reference that uses the same Omega.

Without a GPU the kernel runs on the CPU through the Triton interpreter (fp32/fp16/fp64 only:
the interpreter computes bf16 wrongly); with one, natively on CUDA.
"""
import pytest
import torch

from kernel_loading import DEVICE, load_kernels
from tolerance import assert_close

kernels = load_kernels("sketch")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"), pytest.param(torch.float64, id="fp64")]
SHAPES = [(1, 1, 1), (1, 7, 33), (3, 33, 7), (2, 65, 40)]  # (batch, m, n): odd sizes around the 32 block
LAYOUTS = ["contiguous", "transposed", "strided"]


def make_input(batch, m, n, dtype, layout, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, m, n, generator=generator).to(dtype)
    if layout == "transposed":
        out = values.mT.contiguous().mT
    elif layout == "strided":
        big = torch.full((batch, 2 * m, 3 * n), float("nan"), dtype=dtype)
        big[:, ::2, ::3] = values
        out = big[:, ::2, ::3]
    else:
        out = values
    return out.to(DEVICE)


def result_dtype(dtype):
    return dtype if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k", [1, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sketch_matches_same_omega(dtype, k, shape, layout):
    A = make_input(*shape, dtype, layout)
    Y = kernels.gaussian_sketch(A, k, seed=5)
    omega = kernels.gaussian_omega(shape[2], k, 5, DEVICE).double()
    expected = A.double() @ omega
    assert Y.shape == (*shape[:2], k) and Y.dtype == result_dtype(dtype)
    # the inputs are exact in fp64, so the error is that of the accumulation dtype
    assert_close(Y, expected, result_dtype(dtype), reduction=shape[2], what=f"sketch {shape} k={k}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_sketch_matches_same_omega(dtype, shape, layout):
    k = 17
    A = make_input(*shape, dtype, layout, seed=1)
    Y = kernels.gaussian_sketch(A, k, seed=9, gram=True)
    omega = kernels.gaussian_omega(shape[1], k, 9, DEVICE).double()
    Ad = A.double()
    expected = Ad @ (Ad.mT @ omega)
    assert_close(Y, expected, result_dtype(dtype), reduction=max(shape[1], shape[2]), steps=2, what=f"gram sketch {shape}")


def test_same_seed_same_result_other_seed_other_result():
    A = make_input(2, 40, 37, torch.float32, "contiguous")
    first = kernels.gaussian_sketch(A, 8, seed=3)
    assert torch.equal(first, kernels.gaussian_sketch(A, 8, seed=3))
    assert not torch.equal(first, kernels.gaussian_sketch(A, 8, seed=4))
    assert torch.equal(kernels.gaussian_omega(37, 8, 3, DEVICE), kernels.gaussian_omega(37, 8, 3, DEVICE))


def test_omega_is_standard_normal():
    omega = kernels.gaussian_omega(64, 64, 123, DEVICE).double()
    count = omega.numel()
    # 5 standard errors: fails by chance with probability ~6e-7
    assert abs(omega.mean().item()) < 5 / count**0.5, omega.mean()
    assert abs(omega.var().item() - 1) < 5 * (2 / count) ** 0.5, omega.var()


def test_batch_shares_omega():
    A = make_input(1, 9, 21, torch.float32, "contiguous")
    batched = kernels.gaussian_sketch(A.expand(3, 9, 21), 6, seed=2)
    assert torch.equal(batched[0], batched[2])


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        kernels.gaussian_sketch(torch.zeros(5, device=DEVICE), 2, 0)
    with pytest.raises(ValueError, match="seed"):
        kernels.gaussian_sketch(torch.zeros(3, 3, device=DEVICE), 2, -1)
