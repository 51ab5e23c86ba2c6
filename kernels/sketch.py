"""Batched Gaussian sketch Y = A @ Omega with Omega drawn inside the kernel.

Omega is an (n, k) standard normal matrix whose entry (i, j) is a function of (seed, i, j) only:
Philox-4x32-10 with counter (i, j, 0, 0) and key (seed, 0), its first two outputs turned into two
uniforms in (0, 1) and one Box-Muller normal (``_omega_tile``). It is never written to memory, is
the same for every matrix of a batch and for any block shape, and needs no offset arithmetic
(row and column are separate 32-bit counters, so any n, k < 2**32 works).

The Gram form Y = A (A^T Omega) is two launches of the same kernel: Z = A^T Omega with Omega
generated, then Y = A Z with the right factor read from memory.

The pure-torch twin, ``fastrank.sketch.gaussian_sketch_ref``, is the CPU path and the
specification; on CUDA it materializes the same Omega with ``fastrank.sketch.philox_omega`` (a
torch transcription of ``_omega_tile``), so CUDA results do not depend on whether Triton is
installed, and the tests compare this kernel against it.
"""
import torch
import triton
import triton.language as tl

from fastrank.kernels._launch import device_guard, interpreting, size_bucket
from fastrank.sketch import _accumulation_dtype, _check_inputs

BUILT_FOR_INTERPRETER = interpreting()  # tests reload the module when this disagrees with the environment


def sketch_configs():
    """Autotune configs for ``_sketch_kernel``, keyed on power-of-two buckets of (M, N, K).

    Under TRITON_INTERPRET=1 a single config: several configs fail to benchmark with no GPU.
    The GPU list is a small, unmeasured starting grid.
    """
    if BUILT_FOR_INTERPRETER:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4)]
    # The sm_90 compile gate (Triton 3.9) found spills in 128-wide tiles (fp32 / fp64) and, while
    # Omega is generated (Philox keeps ~6 values live per element), in every BLOCK_K=64 tile: those
    # are pruned for the generating pass (_prune_sketch_configs).
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bk, bn, w, s in [
            (32, 32, 32, 4, 2),
            (64, 32, 32, 4, 2),
            (32, 64, 32, 4, 2),
            (64, 64, 32, 8, 2),
        ]
    ]


@triton.jit
def _omega_tile(seed, rows, cols):
    """Omega[rows, cols] as a (len(rows), len(cols)) fp32 block.

    Philox counter (row, col, 0, 0), key (seed, 0); outputs c0, c1 -> odd multiples of 2**-24 in
    (0, 1) (exact in fp32, never 0: no clamp before the log) -> one Box-Muller normal.
    """
    c0 = (rows[:, None] + cols[None, :] * 0).to(tl.uint32)
    c1 = (cols[None, :] + rows[:, None] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, _, _ = tl.philox(seed, c0, c1, zero, zero)
    u1 = ((r0 >> 9) * 2 + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    u2 = ((r1 >> 9) * 2 + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08
    radius = tl.sqrt(-2.0 * tl.log(u1))
    return radius * tl.cos(6.283185307179586 * u2)


def _prune_sketch_configs(configs, named_args, **kwargs):
    """BLOCK_K=32 only while Omega is generated (4-52 B spills at 64 on sm_90)."""
    if {**named_args, **kwargs}["GENERATE_OMEGA"]:
        return [config for config in configs if config.kwargs["BLOCK_K"] == 32]
    return configs


@triton.autotune(
    configs=sketch_configs(),
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_sketch_configs},
)
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
    # strides (in elements; products with indices are formed in int64)
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
    """One program per (matrix, BLOCK_M row block, BLOCK_K column block); the batch is folded into
    grid axis 0 (axes 1 and 2 stop at 65535)."""
    pid = tl.program_id(0)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(M, BLOCK_M) * num_k_blocks
    batch = pid // tiles
    tile = pid % tiles
    pid_m = tile // num_k_blocks
    pid_k = tile % num_k_blocks

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < K
    # int64 offsets: a 1,000,000 x 4096 input passes 2**31 elements from row 524,288 on.
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    a_rows = a_ptr + batch.to(tl.int64) * stride_ab + rows64[:, None] * stride_am
    b_base = b_ptr + batch.to(tl.int64) * stride_bb

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        inner = start + tl.arange(0, BLOCK_N)
        inner_mask = inner < N
        inner64 = inner.to(tl.int64)
        a = tl.load(
            a_rows + inner64[None, :] * stride_an,
            mask=row_mask[:, None] & inner_mask[None, :],
            other=0.0,
        )
        if GENERATE_OMEGA:
            # masked columns of A are zero, so out-of-range Omega entries never contribute
            right = _omega_tile(seed, inner, cols)
        else:
            right = tl.load(
                b_base + inner64[:, None] * stride_bn + cols64[None, :] * stride_bk,
                mask=inner_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
        if ACC_FP64:
            acc += tl.dot(a.to(tl.float64), right.to(tl.float64))
        else:
            # "ieee": the default tf32 on GPU would round both factors to 10 mantissa bits
            acc += tl.dot(a.to(tl.float32), right.to(tl.float32), input_precision="ieee")

    tl.store(
        y_ptr + batch.to(tl.int64) * stride_yb + rows64[:, None] * stride_ym + cols64[None, :] * stride_yk,
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
    omega = _omega_tile(seed, rows, cols)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offsets = rows.to(tl.int64)[:, None] * stride_on + cols.to(tl.int64)[None, :] * stride_ok
    tl.store(out_ptr + offsets, omega, mask=mask)


def sketch_grid(batch: int, M: int, K: int, block_m: int, block_k: int) -> tuple[int]:
    """Programs of one launch: every (matrix, row block, column block), all on axis 0."""
    return (batch * triton.cdiv(M, block_m) * triton.cdiv(K, block_k),)


def _launch(a3, b3, y3, seed, generate):
    batch, M, N = a3.shape
    K = y3.shape[-1]
    if batch == 0:
        return
    b_strides = (0, 0, 0) if b3 is None else b3.stride()

    def grid(meta):
        return sketch_grid(batch, M, K, meta["BLOCK_M"], meta["BLOCK_K"])

    with device_guard(a3):
        _sketch_kernel[grid](
            a3, a3 if b3 is None else b3, y3,
            M, N, K, seed,
            *a3.stride(), *b_strides, *y3.stride(),
            size_bucket(M), size_bucket(N), size_bucket(K),
            GENERATE_OMEGA=generate,
            ACC_FP64=y3.dtype == torch.float64,
        )


def gaussian_sketch(A, k, seed, gram=False):
    """Y = A @ Omega (gram=False, Omega: (n, k)) or Y = A @ (A^T @ Omega) (gram=True, Omega: (m, k)).

    A: (..., m, n), fp16/bf16/fp32/fp64, any strides. Returns (..., m, k) in fp32 (fp64 for
    fp64 input), accumulated in that dtype. Runs on A's device (a CUDA device guard is taken).
    """
    _check_inputs(A, k, seed)
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"gaussian_sketch: the kernel takes fp16, bf16, fp32 or fp64 input, got {A.dtype}")
    *batch_shape, m, n = A.shape
    a3 = A.reshape(-1, m, n)  # a view whenever the batch dims can be merged
    acc_dtype = _accumulation_dtype(A.dtype)
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
    """The (n, k) fp32 Omega that ``_sketch_kernel`` generates for ``seed``, written out."""
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    out = torch.empty(n, k, device=device, dtype=torch.float32)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 32))
    with device_guard(out):
        _omega_kernel[grid](out, n, k, seed, *out.stride(), BLOCK_N=32, BLOCK_K=32)
    return out
