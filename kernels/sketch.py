"""Batched Gaussian sketch Y = A @ Omega: Omega drawn once per call into a small buffer, then a
tensor-core GEMM that reads A once.

Omega
-----
Omega is standard normal and entry (i, j) is a function of (seed, i, j) only, the same for any
block shape and for every matrix of a batch: with q = j // 4 and t = j % 4, Philox-4x32-10 of
counter (i, q, 0, 0) and key (seed, 0) gives four words r0..r3; each becomes an odd multiple of
2**-24 in (0, 1), u = (2 * (r >> 9) + 1) * 2**-24 (exact in fp32, never 0: no clamp before the
log), and the two Box-Muller pairs give the four entries of the group:

    Omega[i, 4q + 0] = sqrt(-2 log u0) cos(2 pi u1)    Omega[i, 4q + 2] = sqrt(-2 log u2) cos(2 pi u3)
    Omega[i, 4q + 1] = sqrt(-2 log u0) sin(2 pi u1)    Omega[i, 4q + 3] = sqrt(-2 log u2) sin(2 pi u3)

in fp32 (``_omega_quads``; each sin(2 pi u) is evaluated as cos(2 pi (u - 1/4)), u - 1/4 being
exact). Row and group are separate 32-bit counters, so any n, k < 2**32 works.
``fastrank.sketch.philox_omega`` is the torch transcription (the twin's Omega on CUDA); the
integer part agrees bit for bit, the fp32 log / sqrt / cos to their last bits.

Why a buffer and not Omega drawn inside the GEMM (the numbers)
--------------------------------------------------------------
Plain form, A (B, m, n), Omega (n, k), element size s (4 fp32, 2 bf16), output fp32:
    FLOPs = 2 B m n k;  HBM bytes = B m n s (A, once) + B m k 4 (Y) + n k s (Omega, written once);
    Omega from L2 = cdiv(m, BLOCK_M) * n * k * s per matrix (every row block reads all of it).
X 1,000,000 x 4096 at k = 256 on an H100 SXM (3.35 TB/s HBM, ~495 TFLOP/s TF32 dense, ~990 bf16):
    fp32: A 16.4 GB -> 4.89 ms; A + Y 17.4 GB -> 5.20 ms; 2.10 TFLOP -> 4.24 ms at the TF32 peak.
    bf16: A  8.2 GB -> 2.45 ms; A + Y  9.2 GB -> 2.75 ms; 2.10 TFLOP -> 2.12 ms at the bf16 peak.
Both sit just under the ridge (128 and 256 FLOP per byte of A against ridges of 148 and 296), so
the work per element of A must stay a handful of tensor-core operations. Drawing Omega inside the
GEMM repeats it for every row block: cdiv(m, 128) * n * k = 8.2e9 normals = 2.0e9 Philox calls of
~100 integer / SFU instructions, ~2e11 thread instructions = ~7 ms of the whole chip's issue slots
(132 SMs x 128 lanes x 1.75 GHz), more than the 4.9 ms read. The buffer costs n k = 1.0e6 normals
(microseconds) and the re-reads come from L2 (32.8 GB fp32, 16.4 GB bf16 at BLOCK_M = 128, k = 256;
H100 L2 bandwidth is not published, microbenchmarks put it at 2-3x HBM).

Expected (NOT measured; ``benchmarks/test_sketch_kernel_bench.py`` measures it), bytes of X read
once per second against 3.35 TB/s: at k = 256 the bf16 and fp32-TF32 sketches are within ~15% of
both the HBM and the tensor-core bound, so expect 70-85% for bf16 (the fp32 Y write alone caps it
at 89%) and 65-85% for fp32 with TF32 (94%). From k ~ 320 (fp32, TF32) and k ~ 345 (bf16) on
they are compute-bound even at the dense peaks: at k = 512, 8.47 ms (TF32) and 4.24 ms (bf16),
at most 58% of HBM bandwidth. With TF32 off (torch's default for fp32 matmuls, followed here)
fp32 runs on the FMA units: ~67 TFLOP/s, 31 ms at k = 256, at most 16% of HBM bandwidth.
fp64 stays fp64 (DMMA, mma.sync).

Measured on an H100 (2026-11-26, benchmarks/results/h100/, X 65,536 x 4096, k = 256): 2.02 TB/s of
X in bf16 and 2.14 TB/s in fp32 with TF32 (60% and 64% of 3.35 TB/s), against 2.39 / 2.43 TB/s for
torch.matmul(X, Omega) and 2.76 / 2.96 TB/s for one read of X (X.sum()).

The GEMM
--------
One program per (matrix, BLOCK_M row block, BLOCK_K column block), all on grid axis 0 with the
column blocks of a row block adjacent: BLOCK_K is up to 256 (``sketch_block_k``), so for k <= 256
a program covers every column and reads its rows of A once; above, the programs sharing a row
block run together and the second read comes from L2. tl.dot in A's dtype (fp16 / bf16: Omega is
written in that dtype, i.e. rounded once; fp32: TF32 exactly when torch's fp32 CUDA matmul uses
it, ``fastrank._backend.cuda_matmul_allows_tf32``; fp64: fp64), fp32 accumulation (fp64 for fp64).
Omega is stored transposed, (k, n) contiguous, so that the reduction dimension of both operands
is the contiguous one (TF32 wgmma takes only K-major operands from shared memory).

Strides: Triton compiles an integer argument equal to 1 in as a constant and marks those
divisible by 16, so a row-major A with 16-divisible rows is a specialization whose tiles of A and
Omega all move as 16-byte cp.async copies into shared memory, pipelined over num_stages (the
sm_90 compile gate: no scalar global load left). Other layouts (transposed, strided) are other
specializations of the same kernel, compiled when they occur, never packed (a ``.contiguous()``
of a 16 GB input would double the traffic); the Gram form's transposed read of A still gets
16-byte copies for fp16 / bf16, 4-byte ones for fp32.

The Gram form Y = A (A^T Omega), Omega (m, k), is two launches: Z = A^T Omega (Z rounded to
bf16 for bf16 input; kept in fp32 for fp16, whose range Z can leave, and then multiplied in TF32
with A's tiles converted, exact for fp16 values), then Y = A Z. Z has only n x k entries, so with few row blocks the first
launch splits its (long) reduction into chunks whose fp32 partial products torch adds up
(``_reduction_splits``).

The pure-torch twin, ``fastrank.sketch.gaussian_sketch_ref``, is the CPU path and the
specification; the tests compare this kernel against an fp64 product with its Omega.
"""
import torch
import triton
import triton.language as tl

from fastrank._backend import cuda_matmul_allows_tf32
from fastrank.kernels._launch import (
    PlanCache, PlanRecorder, autotune_bench, cdiv, device_guard, interpreting, size_bucket,
)
from fastrank.sketch import _accumulation_dtype, _check_inputs

BUILT_FOR_INTERPRETER = interpreting()  # tests reload the module when this disagrees with the environment

# Largest dynamic shared memory per block on sm_90, bytes (CUDA C++ Programming Guide, compute
# capability 9.0: 227 KB), the compile gate's limit.
_SHARED_MEMORY_SM90 = 232448


def sketch_configs(interpreter=None):
    """Autotune configs for ``_sketch_kernel`` (BLOCK_M x BLOCK_N tiles of A, warps, stages),
    keyed on power-of-two buckets of (M, N, K), BLOCK_K and the precision (the dtypes are keys
    of every Triton autotuner); ``_prune_sketch_configs`` keeps, for the launch's
    element size, precision and BLOCK_K, those that pass the sm_90 compile gate.

    Under TRITON_INTERPRET=1 (``interpreter``: default, how this module was built) a single
    config: several configs fail to benchmark with no GPU.
    On the GPU the usual candidates for a bandwidth-bound GEMM tile, NOT MEASURED yet; the gate
    (``python -m fastrank.kernels.report --arch 90``) compiled each with 16-byte cp.async copies
    of both operands and wgmma for fp16 / bf16 / TF32.
    """
    if BUILT_FOR_INTERPRETER if interpreter is None else interpreter:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 32, 8, 4),
            (128, 64, 8, 3),
            (128, 64, 8, 4),
            (64, 64, 4, 4),
            (64, 32, 4, 4),
            (256, 64, 8, 3),
            (128, 128, 8, 3),
        ]
    ]


def _prune_sketch_configs(configs, named_args, **kwargs):
    """What the sm_90 compile gate (Triton 3.9) accepts, by rule:

    - shared memory: num_stages x (BLOCK_M x BLOCK_N + BLOCK_N x BLOCK_K) elements <= 227 KB;
    - accumulator at most 128 registers a thread (256 x 256 in fp32 at 8 warps spilled 2.8 KB);
    - BLOCK_K = 256 with 8 warps (4 warps, 64 x 64 tiles: 180 B spilled in the transposed launch);
    - fp32 "ieee" (FMA: both tiles in registers) with 8 warps only (4 warps: 8-224 B spilled) and,
      at BLOCK_K = 64, BLOCK_N = 64 (Triton 3.6: 128 x 32 tiles spilled 8 B);
    - fp64 (mma.sync, operands in registers) with BLOCK_N = 32 (64: 16 B spilled).
    """
    meta = {**named_args, **kwargs}
    element, block_k = meta["ELEMENT_SIZE"], meta["BLOCK_K"]
    fp64, ieee = meta["ACC_FP64"], meta["INPUT_PRECISION"] == "ieee" and element == 4
    kept = []
    for config in configs:
        bm, bn, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
        if config.num_stages * (bm * bn + bn * block_k) * element > _SHARED_MEMORY_SM90:
            continue
        if bm * block_k * (2 if fp64 else 1) > 128 * 32 * warps:
            continue
        if block_k == 256 and warps != 8:
            continue
        if ieee and (warps != 8 or (block_k >= 64 and bn != 64)):
            continue
        if fp64 and bn != 32:
            continue
        kept.append(config)
    return kept


@triton.jit
def _open_uniform(bits):
    """uint32 Philox word -> odd multiple of 2**-24 in (0, 1), exact in fp32."""
    return ((bits >> 9) * 2 + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def _omega_quads(seed, rows, quads):
    """Omega[rows, 4 * quads + t] for t = 0..3, as four (len(rows), len(quads)) fp32 blocks.

    One Philox-4x32-10 call per (row, group): counter (row, group, 0, 0), key (seed, 0); its four
    words make two Box-Muller pairs (see the module docstring).
    """
    c0 = (rows[:, None] + quads[None, :] * 0).to(tl.uint32)
    c1 = (quads[None, :] + rows[:, None] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # sin(2 pi u) as cos(2 pi (u - 1/4)) (u - 1/4 is exact in fp32): with tl.sin beside tl.cos
    # the libdevice code spilled 4-8 B in every tile tried on sm_90 (Triton 3.9); with cos only,
    # 64 x 4 groups at 4 warps take 32 registers and spill nothing
    u1 = _open_uniform(r1)
    u3 = _open_uniform(r3)
    radius01 = tl.sqrt(-2.0 * tl.log(_open_uniform(r0)))
    radius23 = tl.sqrt(-2.0 * tl.log(_open_uniform(r2)))
    return (
        radius01 * tl.cos(6.283185307179586 * u1),
        radius01 * tl.cos(6.283185307179586 * (u1 - 0.25)),
        radius23 * tl.cos(6.283185307179586 * u3),
        radius23 * tl.cos(6.283185307179586 * (u3 - 0.25)),
    )


@triton.jit(do_not_specialize=["seed"])  # one compile for every seed; a plan passes it per call
def _omega_kernel(
    # pointers
    out_ptr,  # (N, K) Omega, any strides, any float dtype (each fp32 entry rounded once to it)
    # sizes
    N,
    K,
    seed,
    # strides
    stride_on,
    stride_ok,
    # meta-parameters
    BLOCK_N: tl.constexpr,  # rows of Omega per program
    BLOCK_Q: tl.constexpr,  # groups of four columns per program
):
    """One program per (BLOCK_N rows) x (4 * BLOCK_Q columns) tile of Omega; one Philox call per
    four entries."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    quads = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    z0, z1, z2, z3 = _omega_quads(seed, rows, quads)
    row_mask = rows[:, None] < N
    row_offsets = out_ptr + rows.to(tl.int64)[:, None] * stride_on
    cols = quads.to(tl.int64) * 4  # column of the group's first entry
    out_dtype = out_ptr.dtype.element_ty
    tl.store(row_offsets + (cols + 0)[None, :] * stride_ok, z0.to(out_dtype), mask=row_mask & ((cols + 0) < K)[None, :])
    tl.store(row_offsets + (cols + 1)[None, :] * stride_ok, z1.to(out_dtype), mask=row_mask & ((cols + 1) < K)[None, :])
    tl.store(row_offsets + (cols + 2)[None, :] * stride_ok, z2.to(out_dtype), mask=row_mask & ((cols + 2) < K)[None, :])
    tl.store(row_offsets + (cols + 3)[None, :] * stride_ok, z3.to(out_dtype), mask=row_mask & ((cols + 3) < K)[None, :])


@triton.autotune(
    configs=sketch_configs(),
    # BLOCK_K and the precision change which configs are valid: a config tuned for another
    # BLOCK_K (k = 129 and k = 256 share a bucket) could spill, so they are part of the key
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "BLOCK_K", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_sketch_configs},
    do_bench=autotune_bench,
)
@triton.jit
def _sketch_kernel(
    # pointers
    a_ptr,  # (BATCH, M, N) input, any strides
    b_ptr,  # (BATCH, N, K) right factor in A's dtype (Omega: batch stride 0) or fp32, any strides
    y_ptr,  # (SPLITS, BATCH, M, K) output: fp32 (fp64 for fp64 input), or A's dtype (Gram pass 1)
    # sizes
    M,
    N,
    K,
    split_size,  # reduction elements per split (a multiple of every BLOCK_N; N when SPLITS is 1)
    batch_size,  # BATCH
    # strides (in elements; products with indices are formed in int64)
    stride_ab,
    stride_am,
    stride_an,
    stride_bb,
    stride_bn,
    stride_bk,
    stride_ys,
    stride_yb,
    stride_ym,
    stride_yk,
    # autotune keys (power-of-two buckets of M, N, K)
    M_BUCKET,
    N_BUCKET,
    K_BUCKET,
    # meta-parameters
    ACC_FP64: tl.constexpr,  # fp64 input: fp64 operands and accumulator
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands ("tf32" / "ieee")
    ELEMENT_SIZE: tl.constexpr,  # bytes per element of A (read by the prune function only)
    BLOCK_K: tl.constexpr,  # output columns per program (sketch_block_k)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (reduction split, matrix, BLOCK_M row block, BLOCK_K column block), all on
    grid axis 0 (axes 1 and 2 stop at 65535), column blocks fastest: programs that share a row
    block of A run together, so it is read from HBM once."""
    pid = tl.program_id(0)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(M, BLOCK_M) * num_k_blocks
    matrix = pid // tiles  # split * batch_size + batch
    split = matrix // batch_size
    batch = matrix % batch_size
    tile = pid % tiles
    pid_m = tile // num_k_blocks
    pid_k = tile % num_k_blocks

    # int64 offsets: a 1,000,000 x 4096 input passes 2**31 elements from row 524,288 on.
    first_row = pid_m * BLOCK_M
    first_col = pid_k * BLOCK_K
    reduction_start = split * split_size
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    inner = tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    a_rows = (
        a_ptr + batch.to(tl.int64) * stride_ab + first_row.to(tl.int64) * stride_am
        + reduction_start.to(tl.int64) * stride_an + rows64[:, None] * stride_am
    )  # (BLOCK_M, 1): the program's rows at the split's first reduction index
    b_cols = (
        b_ptr + batch.to(tl.int64) * stride_bb + first_col.to(tl.int64) * stride_bk
        + reduction_start.to(tl.int64) * stride_bn + cols64[None, :] * stride_bk
    )  # (1, BLOCK_K)
    row_mask = rows < M - first_row
    col_mask = cols < K - first_col
    length = tl.minimum(split_size, N - reduction_start)  # reduction indices of this split

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for start in range(0, length, BLOCK_N):
        inner64 = (start + inner).to(tl.int64)
        inner_mask = inner < length - start
        a = tl.load(a_rows + inner64[None, :] * stride_an, mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        b = tl.load(b_cols + inner64[:, None] * stride_bn, mask=inner_mask[:, None] & col_mask[None, :], other=0.0)
        if a_ptr.dtype.element_ty != b_ptr.dtype.element_ty:  # fp16 A times the fp32 Z of the Gram form
            a = a.to(b_ptr.dtype.element_ty)
        if ACC_FP64:
            acc += tl.dot(a, b)
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    y_block = (
        y_ptr + split.to(tl.int64) * stride_ys + batch.to(tl.int64) * stride_yb
        + first_row.to(tl.int64) * stride_ym + first_col.to(tl.int64) * stride_yk
    )
    tl.store(
        y_block + rows64[:, None] * stride_ym + cols64[None, :] * stride_yk,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


# ----------------------------------------------------------------------------- launchers
_BLOCK_K_CHOICES = (256, 128, 64, 32)  # 256: a 128 x 256 fp32 accumulator is 128 registers a thread at 8 warps
_BLOCK_K_FP64 = 64  # an fp64 accumulator takes two registers an entry
_BLOCK_K_IEEE = 64  # fp32 "ieee" (FMA): BLOCK_K = 256 tiles spilled 52-224 B on sm_90, 128 ones 8 B with Triton 3.6
_OMEGA_BLOCK_N, _OMEGA_BLOCK_Q = 64, 4  # _omega_kernel tile: 64 rows x 16 columns, 256 Philox calls (64 x 8: 4 B spilled)
_SPLIT_GRANULE = 256  # split sizes are multiples of this (and so of every BLOCK_N)
# Launches under this many FLOPs (2 M N K per matrix: ~35 us at the bf16 dense peak of an H100)
# take the first config that passes the prune instead of autotuning: the autotuner's first call
# compiles and times every config (seconds), which a small launch never pays back.
_AUTOTUNE_MIN_FLOPS = 2**35
_MIN_SPLIT = 4096  # reduction elements a split keeps at least (its pipeline must fill)


def sketch_block_k(k: int, widest: int = 256) -> int:
    """Output columns per program for a sketch of ``k`` columns: the widest block up to ``widest``
    that pads k by at most an eighth more than the narrowest (32) does (k = 256 -> 256,
    k = 300 -> 64, k = 384 -> 128, k = 512 -> 256)."""
    choices = [b for b in _BLOCK_K_CHOICES if b <= widest]

    def padded(block):
        return -(-k // block) * block

    least = padded(choices[-1])
    return next(b for b in choices if padded(b) * 8 <= least * 9)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another


def _reduction_splits(programs: int, reduction: int, sm_count: int) -> int:
    """How many chunks to cut a launch's reduction into: enough for two programs per SM, each
    chunk at least _MIN_SPLIT long; 1 when the launch already fills the GPU."""
    if programs >= 2 * sm_count or reduction < 2 * _MIN_SPLIT:
        return 1
    return max(1, min(-(-2 * sm_count // programs), reduction // _MIN_SPLIT))


def sketch_grid(splits: int, batch: int, M: int, K: int, block_m: int, block_k: int) -> tuple[int]:
    """Programs of one launch: every (split, matrix, row block, column block), all on axis 0."""
    return (splits * batch * cdiv(M, block_m) * cdiv(K, block_k),)


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 operands: TF32 exactly where torch's fp32 CUDA matmul uses it."""
    if dtype == torch.float32 and not cuda_matmul_allows_tf32():
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16 / bf16 operands


def _launch(a3, b3, out, splits=None, autotune=None, recorder=None):
    """out (batch, M, K) = a3 (batch, M, N) @ b3 (batch or 1, N, K) through ``_sketch_kernel``.

    a3 and b3 share a dtype, or a3 is fp16 and b3 fp32 (then a3's tiles are converted to fp32 and
    the dot takes TF32, which holds every fp16 value exactly); out is fp32 / fp64 or a3's dtype. ``splits`` cuts the reduction
    into that many chunks (default: ``_reduction_splits``); their fp32 (fp64) partial products
    are then added by torch. ``autotune`` (default: from ``_AUTOTUNE_MIN_FLOPS``) False launches
    the first config that passes the prune. ``recorder`` (a ``PlanRecorder``) records the launch.
    """
    if recorder is None:
        recorder = PlanRecorder((), active=False)
    batch, M, N = a3.shape
    K = out.shape[-1]
    if batch == 0:
        return out
    fp64 = a3.dtype == torch.float64
    precision = _input_precision(a3.dtype)
    widest = _BLOCK_K_FP64 if fp64 else _BLOCK_K_IEEE if precision == "ieee" else 256
    block_k = sketch_block_k(K, widest)
    if splits is None:
        programs = batch * cdiv(M, 128) * cdiv(K, block_k)  # 128: the usual BLOCK_M
        splits = _reduction_splits(programs, N, _sm_count(a3.device))
    if splits > 1:
        split_size = cdiv(cdiv(N, splits), _SPLIT_GRANULE) * _SPLIT_GRANULE
        splits = cdiv(N, split_size)  # rounding the chunks up can leave fewer
    else:
        split_size = N
    if splits == 1:
        target = out.unsqueeze(0)
    else:  # torch adds the partials: not a launch a plan replays
        recorder.plannable = False
        target = torch.empty(splits, *out.shape, device=out.device, dtype=_accumulation_dtype(a3.dtype))
    b_strides = (0 if b3.shape[0] == 1 else b3.stride(0), b3.stride(1), b3.stride(2))

    element = max(a3.element_size(), b3.element_size())  # both tiles sized for the wider, for the prune
    launch_meta = dict(ACC_FP64=fp64, INPUT_PRECISION=precision, ELEMENT_SIZE=element, BLOCK_K=block_k)
    if autotune is None:
        autotune = 2.0 * batch * M * N * K >= _AUTOTUNE_MIN_FLOPS
    if autotune:
        kernel, config_meta = _sketch_kernel, {}
    else:
        configs = sketch_configs()
        if len(configs) > 1:  # as the autotuner, which prunes only a list of several
            configs = _prune_sketch_configs(configs, {}, **launch_meta)
        config = configs[0]
        kernel = _sketch_kernel.fn  # the JIT function under the autotuner
        config_meta = dict(**config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

    def grid(meta):
        return sketch_grid(splits, batch, M, K, meta["BLOCK_M"], block_k)

    with device_guard(a3):
        recorder.launch(
            kernel, grid,
            a3, b3, target,
            M, N, K, split_size, batch,
            *a3.stride(), *b_strides, *target.stride(),
            size_bucket(M), size_bucket(N), size_bucket(K),
            tuned_choice=False,  # the autotuner's key holds both operands' dtypes; launch_tuned's only A's
            **launch_meta,
            **config_meta,
        )
    if splits > 1:
        out.copy_(target.sum(0))
    return out


def _write_omega(out, seed, recorder=None):
    """Fill ``out`` (N, K), any strides and float dtype, with Omega for ``seed``; ``recorder`` (a
    ``PlanRecorder`` with one per-call scalar, the seed) records the launch."""
    N, K = out.shape
    grid = (cdiv(N, _OMEGA_BLOCK_N), cdiv(K, 4 * _OMEGA_BLOCK_Q))
    if recorder is None:
        recorder = PlanRecorder((), active=False)
    with device_guard(out):
        recorder.launch(_omega_kernel, grid, out, N, K, seed, *out.stride(), per_call={"seed": 0},
                        BLOCK_N=_OMEGA_BLOCK_N, BLOCK_Q=_OMEGA_BLOCK_Q)
    return out


def _check_seed(seed):
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")


def gaussian_omega(n, k, seed, device, dtype=torch.float32):
    """The (n, k) Omega of ``seed`` as the sketch kernel reads it: a transposed view of a (k, n)
    contiguous buffer, each fp32 entry rounded once to ``dtype``."""
    _check_seed(seed)
    return _write_omega(torch.empty(k, n, device=device, dtype=dtype).T, seed)


# Launch plans of gaussian_sketch (fastrank.kernels._launch): a repeated call with the same tensor
# metadata replays the launches recorded at the second call with that metadata, the seed read per call.
_SKETCH_PLANS = PlanCache()


def gaussian_sketch(A, k, seed, gram=False):
    """Y = A @ Omega (gram=False, Omega: (n, k)) or Y = A @ (A^T @ Omega) (gram=True, Omega: (m, k)).

    A: (..., m, n), fp16/bf16/fp32/fp64, any strides. Returns (..., m, k) in fp32 (fp64 for
    fp64 input). Products take A's dtype on the tensor cores (Omega rounded once to fp16 / bf16;
    fp32 in TF32 when torch's fp32 matmul uses TF32) and accumulate in the output dtype; the
    Gram form rounds Z = A^T Omega to A's dtype (to TF32 in the product for fp16, whose range
    Z can leave). Runs on A's device (a CUDA device guard is taken).
    """
    if isinstance(A, torch.Tensor) and type(k) is int and type(seed) is int and 0 <= seed < 2**31:
        tensors = (A,)
        replayed, key = _SKETCH_PLANS.replay(tensors, (k, gram, _input_precision(A.dtype)), A.get_device(), (seed,))
        if replayed is not None:
            return replayed[0]
    else:
        key = None
    _check_inputs(A, k, seed)
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"gaussian_sketch: the kernel takes fp16, bf16, fp32 or fp64 input, got {A.dtype}")
    recorder = _SKETCH_PLANS.recorder(key, (A,), scalars=1) if key is not None else PlanRecorder((), 1, False)
    *batch_shape, m, n = A.shape
    # a view whenever the batch dims can be merged; else a packed copy, which a replay makes again
    a3 = A.reshape(-1, m, n)
    if a3.data_ptr() != A.data_ptr():
        a3 = recorder.contiguous(A).view(-1, m, n)
    acc_dtype = _accumulation_dtype(A.dtype)
    omega_buffer = recorder.empty((k, m if gram else n), A)
    omega = _write_omega(omega_buffer.T, seed, recorder)[None]  # one Omega for the batch
    y3 = recorder.empty((a3.shape[0], m, k), A, acc_dtype)
    if gram:
        # Z stored (batch, k, n): the second launch reads it with the reduction index contiguous.
        # fp16 keeps Z in fp32: a sum over m rows of A leaves fp16's range (65504) for m = 10**6
        # rows of entries ~ 50; bf16 has fp32's range.
        z_dtype = torch.float32 if A.dtype == torch.float16 else A.dtype
        z3 = recorder.empty((a3.shape[0], k, n), A, z_dtype).mT
        _launch(a3.mT, omega, z3, recorder=recorder)
        _launch(a3, z3, y3, recorder=recorder)
    else:
        _launch(a3, omega, y3, recorder=recorder)
    result = y3.reshape(*batch_shape, m, k)
    if key is not None:
        _SKETCH_PLANS.record(key, recorder, [result])
    return result
