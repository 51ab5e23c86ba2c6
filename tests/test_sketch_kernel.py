"""Triton Gaussian-sketch kernel against an fp64 reference built from the torch twin's Omega.

Without a GPU the kernel runs on the CPU through the Triton interpreter; with one, natively on
CUDA. The reference Omega is ``fastrank.sketch.philox_omega`` (a torch transcription of the
kernel's generator), never the kernel itself.

Tolerances: the kernel multiplies in A's dtype (Omega rounded once to fp16 / bf16, TF32 for fp32
where torch's matmul uses it), so the per-dtype bound of tests/tolerance.py is that of the
operands' precision (``operand_dtype``).
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

from fastrank._backend import cuda_matmul_allows_tf32, cuda_matmul_tf32
from fastrank.sketch import philox_omega

kernels = load_kernels("sketch")

# The interpreter computes bf16 dots wrongly and truncates casts to bf16: bf16 runs on CUDA only.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(INTERPRET, reason="bf16 dot: CUDA only")),
    pytest.param(torch.float64, id="fp64"),
]
# (batch, m, n): odd sizes around the 32 block of the interpreter and the 64 / 128 blocks of the GPU
SHAPES = [(1, 1, 1), (1, 7, 33), (3, 33, 7), (2, 65, 40), (1, 129, 130)]
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


def operand_dtype(dtype):
    """The precision the kernel's products take for ``dtype`` input, as a tolerance-table entry.

    fp16 / bf16: that dtype (Omega is rounded to it, and the Gram form's Z to bf16, or for fp16 to
    TF32, which keeps fp16's 10 explicit mantissa bits). fp32: fp32, or fp16's unit roundoff where
    TF32 is on. fp64: fp32, the precision of Omega itself (drawn in fp32; the reference's Omega
    agrees with the kernel's to the last bits of fp32 log / cos, not to fp64).
    """
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    if dtype == torch.float32 and cuda_matmul_allows_tf32():
        return torch.float16
    return torch.float32


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k", [1, 33, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sketch_matches_fp64(dtype, k, shape, layout):
    if k == 300 and shape[1] > 33:
        pytest.skip("k=300 (BLOCK_K 64, five column blocks) runs on the small shapes only: interpreter time")
    A = make_input(*shape, dtype, layout)
    Y = kernels.gaussian_sketch(A, k, seed=5)
    expected = A.double() @ reference_omega(shape[2], k, 5)
    assert Y.shape == (*shape[:2], k) and Y.dtype == result_dtype(dtype)
    assert_close(Y, expected, operand_dtype(dtype), reduction=shape[2], what=f"sketch {shape} k={k}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_sketch_matches_fp64(dtype, shape, layout):
    k = 17
    A = make_input(*shape, dtype, layout, seed=1)
    Y = kernels.gaussian_sketch(A, k, seed=9, gram=True)
    Ad = A.double()
    expected = Ad @ (Ad.mT @ reference_omega(shape[1], k, 9))
    assert Y.shape == (*shape[:2], k) and Y.dtype == result_dtype(dtype)
    assert_close(Y, expected, operand_dtype(dtype), reduction=max(shape[1], shape[2]), steps=2,
                 what=f"gram sketch {shape}")


def test_fp16_gram_sketch_beyond_fp16_range():
    # Z = A^T Omega sums 700 rows of entries ~ 2000: |Z| reaches ~ 1e5, past fp16's 65504
    # (an fp16 Z would hold inf); the product Y is fp32 and must match fp64 at fp16's tolerance.
    A = (make_input(1, 700, 24, torch.float32, "contiguous", seed=4) * 2000).to(torch.float16)
    Y = kernels.gaussian_sketch(A, 9, seed=2, gram=True)
    Ad = A.double()
    Z = Ad.mT @ reference_omega(700, 9, 2)
    assert Z.abs().max() > torch.finfo(torch.float16).max, "the case must leave fp16's range"
    assert torch.isfinite(Y).all()
    assert_close(Y, Ad @ Z, torch.float16, reduction=700, steps=2, what="fp16 gram sketch past fp16 range")


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_reduction_matches_fp64(dtype, splits):
    # The Gram form's first launch cuts a long reduction into chunks (multiples of 256) when its
    # output has few blocks; 700 = 256 + 256 + 188: two full chunks and a ragged one (or 512 + 188).
    A = make_input(1, 700, 40, dtype, "contiguous", seed=2).mT  # (1, 40, 700), reduction stride 40
    right = make_input(1, 700, 9, dtype, "transposed", seed=3)
    out = torch.empty(1, 40, 9, device=DEVICE, dtype=dtype)  # rounded to A's dtype, as Z is
    kernels._launch(A, right, out, splits=splits, autotune=splits == 3)  # both launch paths
    expected = A.double() @ right.double()
    assert_close(out, expected, operand_dtype(dtype), reduction=700, what=f"{splits} splits")


def test_small_launches_take_a_gated_config_without_autotuning():
    # the first config the prune keeps for each launch the compile gate covers (what a small
    # launch runs instead of autotuning) exists, and a 1,000,000 x 4096 sketch autotunes
    configs = kernels.sketch_configs(interpreter=False)
    for element, fp64, precisions, block_ks in [(2, False, ["tf32"], [32, 64, 128, 256]),
                                                 (4, False, ["tf32"], [32, 64, 128, 256]),
                                                 (4, False, ["ieee"], [32, 64]), (8, True, ["tf32"], [32, 64])]:
        for precision in precisions:
            for block_k in block_ks:
                meta = dict(ACC_FP64=fp64, INPUT_PRECISION=precision, ELEMENT_SIZE=element, BLOCK_K=block_k)
                assert kernels._prune_sketch_configs(configs, {}, **meta), meta
    assert 2.0 * 1_000_000 * 4096 * 256 >= kernels._AUTOTUNE_MIN_FLOPS > 2.0 * 4096 * 4096 * 64


def test_reduction_splits_fill_the_gpu():
    # Gram form of X 1,000,000 x 4096 at k = 512 on 132 SMs: Z = X^T Omega has 32 x 2 blocks of
    # 128 x 256, so its million-long reduction is cut in 5 (320 programs >= 2 per SM).
    assert kernels._reduction_splits(64, 1_000_000, 132) == 5
    assert kernels._reduction_splits(7813, 4096, 132) == 1  # the plain sketch fills the GPU
    assert kernels._reduction_splits(4, 6000, 132) == 1  # too short to split
    assert kernels._reduction_splits(4, 10_000, 132) == 2  # chunks stay >= 4096 long


def test_block_k_covers_k_with_little_padding():
    assert [kernels.sketch_block_k(k) for k in (1, 33, 128, 256, 300, 384, 512, 1024)] == [
        32, 64, 128, 256, 64, 128, 256, 256]
    assert kernels.sketch_block_k(256, widest=64) == 64 and kernels.sketch_block_k(512, widest=128) == 128 and kernels.sketch_block_k(300, widest=64) == 64


def test_fp32_follows_torchs_tf32_setting():
    A = make_input(2, 65, 40, torch.float32, "contiguous")
    expected = A.double() @ reference_omega(40, 33, 5)
    results = {}
    for enabled in (False, True):
        with cuda_matmul_tf32(enabled):
            assert kernels._input_precision(torch.float32) == ("tf32" if enabled else "ieee")
            assert kernels._input_precision(torch.float16) == "tf32"  # ignored for 16-bit operands
            results[enabled] = kernels.gaussian_sketch(A, 33, seed=5)
            assert_close(results[enabled], expected, operand_dtype(torch.float32), reduction=40,
                         what=f"sketch with tf32 {'on' if enabled else 'off'}")
    if not INTERPRET:  # the interpreter computes every fp32 dot in full fp32
        assert not torch.equal(results[False], results[True]), "TF32 on and off gave the same result"


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
    omega = kernels.gaussian_omega(256, 64, 123, DEVICE).double()
    # 5 standard errors: each check fails by chance with probability ~6e-7. Every position t of
    # the four entries one Philox call gives (cos / sin of two Box-Muller pairs) separately.
    for t in range(4):
        column = omega[:, t::4].reshape(-1)
        count = column.numel()
        assert abs(column.mean().item()) < 5 / count**0.5, (t, column.mean())
        assert abs(column.var().item() - 1) < 5 * (2 / count) ** 0.5, (t, column.var())


def test_omega_entries_are_uncorrelated():
    # Pairs that share a Philox call (same pair: cos / sin of one angle; other pair), neighbouring
    # groups and neighbouring rows: sample correlations within 5 standard errors (1 / sqrt(count)) of 0.
    omega = kernels.gaussian_omega(512, 64, 7, DEVICE).double()
    pairs = {
        "cos/sin of one pair": (omega[:, 0::4], omega[:, 1::4]),
        "first/second pair": (omega[:, 0::4], omega[:, 2::4]),
        "sin of pair 1/sin of pair 2": (omega[:, 1::4], omega[:, 3::4]),
        "neighbouring groups": (omega[:, 0:-4], omega[:, 4:]),
        "neighbouring rows": (omega[:-1], omega[1:]),
    }
    for name, (first, second) in pairs.items():
        count = first.numel()
        correlation = (first * second).mean().item()
        assert abs(correlation) < 5 / count**0.5, f"{name}: correlation {correlation:.4f} over {count} pairs"
    # squares too: cos and sin of one angle share a radius, and Box-Muller makes them independent anyway
    squares = (omega[:, 0::4].square() - 1) * (omega[:, 1::4].square() - 1)
    assert abs(squares.mean().item()) < 5 * 2 / squares.numel() ** 0.5, squares.mean()


def test_omega_entry_depends_on_seed_row_and_column_only():
    # same entries whatever the size asked for (the kernel's tiles and the group of four cut differently)
    big = kernels.gaussian_omega(130, 67, 11, DEVICE)
    assert torch.equal(kernels.gaussian_omega(7, 5, 11, DEVICE), big[:7, :5])
    assert torch.equal(kernels.gaussian_omega(129, 66, 11, DEVICE), big[:129, :66])
    assert torch.equal(philox_omega(7, 5, 11, device=DEVICE), philox_omega(130, 67, 11, device=DEVICE)[:7, :5])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_omega_buffer_is_the_fp32_omega_rounded_once(dtype):
    omega = kernels.gaussian_omega(70, 40, 3, DEVICE, dtype)
    assert omega.dtype == dtype and omega.shape == (70, 40)
    assert torch.equal(omega, kernels.gaussian_omega(70, 40, 3, DEVICE).to(dtype))


def test_sketch_reads_omega_at_its_row_and_column():
    # A = identity picks Omega's rows: the GEMM reads the (k, n) buffer where philox_omega puts
    # each entry, for a k spanning several column blocks and an n spanning several reduction steps.
    eye = torch.eye(70, device=DEVICE, dtype=torch.float64)
    Y = kernels.gaussian_sketch(eye, 300, seed=8)
    assert torch.equal(Y, kernels.gaussian_omega(70, 300, 8, DEVICE).double())
    assert_close(Y, reference_omega(70, 300, 8), torch.float32, reduction=1, what="identity sketch")


def test_batch_shares_omega():
    A = make_input(1, 9, 21, torch.float32, "contiguous")
    batched = kernels.gaussian_sketch(A.expand(3, 9, 21), 6, seed=2)
    assert torch.equal(batched[0], batched[2])


def test_batch_dims_that_do_not_merge_are_packed():
    # (3, 2, m, n) whose two batch dims cannot be merged into one stride: packed (reshape's copy,
    # which a launch plan records), with the batch's order kept.
    generator = torch.Generator().manual_seed(5)
    A = torch.randn(2, 3, 9, 21, generator=generator).to(DEVICE).transpose(0, 1)
    assert A.reshape(-1, 9, 21).data_ptr() != A.data_ptr()  # the case: reshape copies
    Y = kernels.gaussian_sketch(A, 6, seed=4)
    assert Y.shape == (3, 2, 9, 6)
    assert torch.equal(Y, kernels.gaussian_sketch(A.contiguous(), 6, seed=4))
    for gram in (False, True):
        expected = kernels.gaussian_sketch(A.contiguous(), 6, seed=4, gram=gram)
        assert torch.equal(kernels.gaussian_sketch(A, 6, seed=4, gram=gram), expected)


def test_grid_fits_cuda_limits():
    # CUDA grids stop at 2**31 - 1 programs on axis 0 and 65535 on axes 1 and 2: the batch must
    # not sit on axis 1 or 2 (70,000 small matrices are a normal batch).
    for splits, batch, m, k in [(1, 70_000, 16, 8), (1, 1, 1_000_000, 512), (3, 3, 5, 5)]:
        grid = kernels.sketch_grid(splits, batch, m, k, 32, 32)
        assert len(grid) == 1 or all(axis <= 65535 for axis in grid[1:]), grid
        assert grid[0] == splits * batch * -(-m // 32) * -(-k // 32) <= 2**31 - 1, grid


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
    from tolerance import tolerance
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
    # fp16 operands (Omega and Z rounded to fp16): the fp16 bounds of tests/tolerance.py
    for name, got, ref, steps in [("plain", plain, expected, 1), ("gram", gram, expected_gram, 2)]:
        err = ((got.double() - ref).norm() / ref.norm()).item()
        print(name, err)
        assert err <= tolerance(torch.float16, 40, steps), (name, err)
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
