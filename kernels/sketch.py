"""Batched Gaussian sketch Y = A @ Omega with Omega drawn inside the kernel.

Omega is an (n, k) standard normal matrix; entry (i, j) is ``tl.randn(seed, i * k + j)``
(Philox), so it is a function of (seed, n-row, column) only: it is never written to memory,
is the same for every matrix of a batch, and the same for the same seed on the same device.
The Gram form Y = A (A^T Omega) is two launches of the same kernel: Z = A^T Omega with Omega
generated, then Y = A Z with the right factor read from memory.

The pure-torch twin (the CPU path and the specification) is ``fastrank.sketch.gaussian_sketch_ref``;
it draws its Omega from a ``torch.Generator`` instead, so results agree in distribution across
devices, not bit for bit. Tests compare this kernel against ``A @ gaussian_omega(...)``, which
writes out exactly the Omega the kernel generates.
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BUILT_FOR_INTERPRETER = _INTERPRET  # tests reload the module when this disagrees with the environment


def sketch_configs():
    """Autotune configs for ``_sketch_kernel``, keyed on power-of-two buckets of (M, N, K).

    Under TRITON_INTERPRET=1 a single config: several configs fail to benchmark with no GPU.
    The GPU list is a small, unmeasured starting grid (no GPU was available when it was written).
    """
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bk, bn, w, s in [
            (64, 64, 32, 4, 3),
            (128, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (32, 32, 32, 2, 2),
        ]
    ]


@triton.jit
def _omega_tile(seed, rows, cols, K):
    # rows: (BLOCK_N,) row indices of Omega, cols: (BLOCK_K,) column indices; one offset per
    # entry, row-major in the (N, K) matrix, so launches of any block shape draw the same Omega.
    offsets = rows[:, None] * K + cols[None, :]
    return tl.randn(seed, offsets)


@triton.autotune(configs=sketch_configs(), key=["M_BUCKET", "N_BUCKET", "K_BUCKET"])
@triton.jit
def _sketch_kernel(
    # pointers
    a_ptr,  # (BATCH, M, N) input, any strides
    b_ptr,  # (BATCH, N, K) right factor, read only when GENERATE_OMEGA is False
    y_ptr,  # (BATCH, M, K) output, fp32 (fp64 for fp64 input)
    # sizes
    M,
    N,
    K,
    seed,
    # strides
    stride_ab,
    stride_am,
    stride_an,
    stride_bb,
    stride_bn,
    stride_bk,
    stride_yb,
    stride_ym,
    stride_yk,
    # autotune keys (power-of-two buckets of M, N, K)
    M_BUCKET,
    N_BUCKET,
    K_BUCKET,
    # meta-parameters
    GENERATE_OMEGA: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_k_blocks
    pid_k = pid % num_k_blocks

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < K
    a_base = a_ptr + batch.to(tl.int64) * stride_ab
    b_base = b_ptr + batch.to(tl.int64) * stride_bb

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        inner = start + tl.arange(0, BLOCK_N)
        inner_mask = inner < N
        a = tl.load(
            a_base + rows[:, None] * stride_am + inner[None, :] * stride_an,
            mask=row_mask[:, None] & inner_mask[None, :],
            other=0.0,
        )
        if GENERATE_OMEGA:
            # masked rows of A are zero, so out-of-range Omega entries never contribute
            right = _omega_tile(seed, inner, cols, K)
        else:
            right = tl.load(
                b_base + inner[:, None] * stride_bn + cols[None, :] * stride_bk,
                mask=inner_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
        if ACC_FP64:
            acc += tl.dot(a.to(tl.float64), right.to(tl.float64))
        else:
            # "ieee": the default tf32 on GPU would round both factors to 10 mantissa bits
            acc += tl.dot(a.to(tl.float32), right.to(tl.float32), input_precision="ieee")

    tl.store(
        y_ptr + batch.to(tl.int64) * stride_yb + rows[:, None] * stride_ym + cols[None, :] * stride_yk,
        acc,
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _omega_kernel(
    # pointers
    out_ptr,  # (N, K) fp32 output: the Omega that _sketch_kernel generates
    # sizes
    N,
    K,
    seed,
    # strides
    stride_on,
    stride_ok,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    omega = _omega_tile(seed, rows, cols, K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_ok, omega, mask=mask)


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _bucket(size):
    return triton.next_power_of_2(max(int(size), 1))


def _check(A, k, seed):
    if A.dim() < 2:
        raise ValueError(f"sketch input must have shape (..., m, n), got {tuple(A.shape)}")
    if A.dtype not in _SUPPORTED:
        raise TypeError(f"sketch input must be fp16, bf16, fp32 or fp64, got {A.dtype}")
    if k < 1:
        raise ValueError(f"sketch size k must be >= 1, got {k}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")


def _launch(a3, b3, y3, seed, generate):
    batch, M, N = a3.shape
    K = y3.shape[-1]
    if generate and N * K >= 2**31:
        raise ValueError(f"Omega of shape ({N}, {K}) has more than 2**31 entries (int32 offsets)")
    b_strides = (0, 0, 0) if b3 is None else b3.stride()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]), batch)

    _sketch_kernel[grid](
        a3, a3 if b3 is None else b3, y3,
        M, N, K, seed,
        *a3.stride(), *b_strides, *y3.stride(),
        _bucket(M), _bucket(N), _bucket(K),
        GENERATE_OMEGA=generate,
        ACC_FP64=y3.dtype == torch.float64,
    )


def gaussian_sketch(A, k, seed, gram=False):
    """Y = A @ Omega (gram=False, Omega: (n, k)) or Y = A @ (A^T @ Omega) (gram=True, Omega: (m, k)).

    A: (..., m, n), fp16/bf16/fp32/fp64, any strides. Returns (..., m, k) in fp32 (fp64 for
    fp64 input), accumulated in that dtype.
    """
    _check(A, k, seed)
    *batch_shape, m, n = A.shape
    a3 = A.reshape(-1, m, n)  # a view whenever the batch dims can be merged
    acc_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    if gram:
        z3 = torch.empty(a3.shape[0], n, k, device=A.device, dtype=acc_dtype)
        _launch(a3.mT, None, z3, seed, generate=True)
        y3 = torch.empty(a3.shape[0], m, k, device=A.device, dtype=acc_dtype)
        _launch(a3, z3, y3, seed, generate=False)
    else:
        y3 = torch.empty(a3.shape[0], m, k, device=A.device, dtype=acc_dtype)
        _launch(a3, None, y3, seed, generate=True)
    return y3.reshape(*batch_shape, m, k)


def gaussian_omega(n, k, seed, device):
    """The (n, k) fp32 Omega that ``_sketch_kernel`` generates for ``seed`` (tests, references)."""
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    out = torch.empty(n, k, device=device, dtype=torch.float32)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 32))
    _omega_kernel[grid](out, n, k, seed, *out.stride(), BLOCK_N=32, BLOCK_K=32)
    return out
