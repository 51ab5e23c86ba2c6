"""Triton Gaussian-sketch kernel against an fp64 reference built from the torch twin's Omega.

Without a GPU the kernel runs on the CPU through the Triton interpreter; with one, natively on
CUDA. The reference Omega is ``fastrank.sketch.philox_omega`` (a torch transcription of the
kernel's generator), never the kernel itself.
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

from fastrank.sketch import philox_omega

kernels = load_kernels("sketch")

# bf16 input is converted to fp32 before the dot, which the interpreter computes correctly.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float64, id="fp64"),
]
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


def reference_omega(n, k, seed):
    return philox_omega(n, k, seed, device=DEVICE, dtype=torch.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k", [1, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sketch_matches_fp64(dtype, k, shape, layout):
    A = make_input(*shape, dtype, layout)
    Y = kernels.gaussian_sketch(A, k, seed=5)
    expected = A.double() @ reference_omega(shape[2], k, 5)
    assert Y.shape == (*shape[:2], k) and Y.dtype == result_dtype(dtype)
    # the inputs are exact in fp64 and Omega agrees to the last bits of log / cos: the error is
    # that of the accumulation dtype (Omega's own fp32 rounding for fp64 input)
    assert_close(Y, expected, torch.float32, reduction=shape[2], what=f"sketch {shape} k={k}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_sketch_matches_fp64(dtype, shape, layout):
    k = 17
    A = make_input(*shape, dtype, layout, seed=1)
    Y = kernels.gaussian_sketch(A, k, seed=9, gram=True)
    Ad = A.double()
    expected = Ad @ (Ad.mT @ reference_omega(shape[1], k, 9))
    assert_close(Y, expected, torch.float32, reduction=max(shape[1], shape[2]), steps=2,
                 what=f"gram sketch {shape}")


def test_fp64_sketch_is_exact_for_its_omega():
    # fp64 input accumulates in fp64: against the kernel's own written-out Omega the only error
    # left is fp64 rounding.
    A = make_input(2, 33, 40, torch.float64, "transposed")
    Y = kernels.gaussian_sketch(A, 9, seed=4)
    omega = kernels.gaussian_omega(40, 9, 4, DEVICE).double()
    assert_close(Y, A @ omega, torch.float64, reduction=40, what="fp64 sketch")


def test_written_omega_matches_the_torch_transcription():
    for n, k, seed in [(37, 8, 3), (64, 65, 123), (5, 70, 2**31 - 1)]:
        omega = kernels.gaussian_omega(n, k, seed, DEVICE)
        reference = philox_omega(n, k, seed, device=DEVICE)
        err = (omega - reference).abs().max().item()
        assert err < 1e-5, f"Omega({n}, {k}, seed={seed}) differs from philox_omega by {err:.2e}"


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


def test_grid_fits_cuda_limits():
    # CUDA grids stop at 2**31 - 1 programs on axis 0 and 65535 on axes 1 and 2: the batch must
    # not sit on axis 1 or 2 (70,000 small matrices are a normal batch).
    for batch, m, k in [(70_000, 16, 8), (1, 1_000_000, 512), (3, 5, 5)]:
        grid = kernels.sketch_grid(batch, m, k, 32, 32)
        assert len(grid) == 1 or all(axis <= 65535 for axis in grid[1:]), grid
        assert grid[0] == batch * -(-m // 32) * -(-k // 32) <= 2**31 - 1, grid


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        kernels.gaussian_sketch(torch.ones(5, device=DEVICE), 2, 0)
    with pytest.raises(ValueError, match="seed"):
        kernels.gaussian_sketch(torch.ones(3, 3, device=DEVICE), 2, -1)
    with pytest.raises(ValueError, match="sketch size k must be >= 1, got 0"):
        kernels.gaussian_sketch(torch.ones(3, 3, device=DEVICE), 0, 1)


# Offsets past 2**31 elements: rows 2**30 elements apart in a lazily allocated 4 GiB fp16 buffer
# (only the touched pages are ever backed). int32 offsets wrap there and read outside the tensor,
# which can crash the process: the check runs in a child process.
_LARGE_OFFSETS = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from kernel_loading import load_kernels
    from fastrank.sketch import philox_omega
    kernels = load_kernels("sketch")
    device = {device!r}
    base = torch.empty(2**31 + 64, dtype=torch.float16, device=device)
    A = base.as_strided((3, 40), (2**30, 1))
    A.copy_(torch.randn(3, 40, generator=torch.Generator().manual_seed(0)))
    omega = philox_omega(40, 5, 1, device=device, dtype=torch.float64)
    plain = kernels.gaussian_sketch(A, 5, seed=1)
    expected = A.double() @ omega
    gram = kernels.gaussian_sketch(A.T, 5, seed=1, gram=True)  # inner stride 2**30
    expected_gram = A.T.double() @ (A.double() @ omega)
    for name, got, ref in [("plain", plain, expected), ("gram", gram, expected_gram)]:
        err = ((got.double() - ref).norm() / ref.norm()).item()
        print(name, err)
        assert err < 1e-5, (name, err)
    """
)


def test_offsets_beyond_int32():
    script = _LARGE_OFFSETS.format(tests=str(Path(__file__).parent), device=DEVICE)
    env = dict(os.environ, TRITON_INTERPRET="1" if INTERPRET else "0")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, (
        f"sketch with offsets past 2**31 failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr[-2000:]}"
    )


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_cuda_batch_beyond_grid_axis_limit():
    A = torch.randn(70_000, 4, 3, device="cuda")
    Y = kernels.gaussian_sketch(A, 2, seed=0)
    expected = A.double() @ reference_omega(3, 2, 0)
    assert_close(Y, expected, torch.float32, reduction=3, what="70,000-matrix batch")


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_runs_on_the_input_device():
    A = torch.randn(2, 33, 40, device="cuda:1")
    with torch.cuda.device(0):
        Y = kernels.gaussian_sketch(A, 5, seed=1)
    assert Y.device == A.device
    expected = A.double() @ reference_omega(40, 5, 1).to("cuda:1")
    assert_close(Y, expected, torch.float32, reduction=40, what="sketch on cuda:1")
