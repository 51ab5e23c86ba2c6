"""Triton kernels for the chain matmul, its grouped factor gradients and its fused backward.

The over-parameterized layer is built on one primitive, the *chain matmul*::

    X_0 = x                      (M, n_0)
    X_j = X_{j-1} @ F_j^T        F_j: (n_j, n_{j-1}),  j = 1..k

returning ``[X_1, ..., X_k]`` (or only ``X_k``). Its backward needs the group of factor gradients
``dF_j = G_j^T @ X_{j-1}``; for narrow chains (widths up to MAX_RESIDENT_WIDTH) one fused kernel
computes the whole backward from x, the factors and ``dX_k``, recomputing the intermediates. This
module holds, for each of the three:

* the ``@triton.jit`` kernel,
* a thin launcher (check shapes and dtypes, allocate outputs, launch).

The pure-torch twins (``chain_matmul_ref``, ``chain_factor_grads_ref``,
``chain_matmul_backward_ref``), readable as the specification, the CPU path and the test
reference, live beside the ops in ``fastrank.chain`` and are re-exported here. Nothing here knows about modules or autograd; ``fastrank.chain`` wraps the
launchers in custom ops.

Rounding (fp16 / bf16)
    Every product accumulates in fp32. The chain kernel rounds the running block to the input dtype
    after every step, so each returned ``X_j`` is exactly one fp32-accumulated matmul of the
    *returned* ``X_{j-1}`` rounded once: what a sequence of ``torch.matmul`` calls in that dtype
    computes, up to the order of the fp32 summation. ``return_all`` does not change the values.
    Split-K factor gradients add their fp32 partial sums in a fixed order and round once.

Passing a variable number of tensors
    Up to :data:`FACTORS_PER_LAUNCH` factors (group members) travel in tuple arguments of that
    many slots (pointers, sizes, strides: one tuple each, which costs a launch less host time than
    as many separate arguments, benchmarks/results/triton_launch_cpu.md); a count says how many are
    live and the kernel picks slot j by a scalar select in a run-time loop (unrolled over 8 slots, a
    BLOCK_N=256 chain config took 47 s to compile for sm_90). Unused slots repeat a live value
    (never 0), so every slot carries the same alignment and divisibility and the selects keep what
    Triton specialized for each entry. Nothing is copied to the device before a launch, so the launches are safe under CUDA
    graph capture (``torch.compile(mode="reduce-overhead")``). Longer chains run as consecutive
    launches of at most that many steps; larger groups as several grouped launches.

Memory layouts (what makes the global loads vectorized)
    A matrix operand is passed as a pointer, its one non-unit stride and a layout flag saying which
    of its two dimensions has unit stride. The unit stride is a compile-time constant in the
    kernels, so Triton knows the contiguous dimension, loads 16-byte vectors along it (when the
    other stride and the sizes are multiples of 16, which Triton specializes on) and, in the
    factor-gradient kernel, pipelines the loads with ``cp.async``. Each tile is loaded in the
    orientation that is contiguous in memory and transposed in registers (``tl.trans``) where the
    dot wants the other one. The layers pass row-major tensors, their transposed views (the weight
    chain's ``W_j^T``, the reverse chain's ``F^T``) and, below a loss such as ``.sum()``, stride-0
    gradients; the launchers pack an operand with neither stride equal to 1 (``.contiguous()``, one
    copy, which a launch plan records and makes again at each replay), cheaper than compiling every
    config once more for general strides. Chain: one flag for x, one for all factors of a launch (a
    launch mixing layouts packs its minority layout); factor gradients: two bits per member, and
    the kernel compiles one tile loop per layout combination present in the launch.

Fallbacks
    Widths above :data:`MAX_ONCHIP_WIDTH` (chain; :data:`MAX_ONCHIP_WIDTH_IEEE` for fp32 with TF32
    off) or :data:`MAX_GROUPED_WIDTH` (factor gradients), and float64, run one matmul per step with
    fp32 accumulation and one rounding, as the kernels do (``torch.mm(..., out_dtype=torch.float32)``
    on CUDA for fp16 / bf16; cuBLAS's own fp16 GEMM may reduce split-K partial sums in half
    precision).

Device
    Launchers take a device guard on the inputs' device; Triton launches on the current device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrank._backend import cuda_matmul_allows_tf32
from fastrank.kernels._launch import (
    PlanCache,
    PlanRecorder,
    autotune_bench,
    capturing,
    cdiv,
    device_guard,
    interpreting,
    next_power_of_2,
    persistent_buffer,
    size_bucket,
    unused_buffer,
)

# The torch twins (the specification of these kernels, and the CPU path) live in the op file.
from fastrank.chain import (  # noqa: F401  (re-exported for the kernel tests)
    _check_backward,
    _check_chain,
    _check_factor_grads,
    _transposed_view,
    chain_factor_grads_ref,
    chain_matmul_backward_ref,
    chain_matmul_ref,
    compose_chain_backward,
)

__all__ = [
    "FACTORS_PER_LAUNCH",
    "MAX_ONCHIP_WIDTH",
    "MAX_ONCHIP_WIDTH_IEEE",
    "MAX_RESIDENT_WIDTH",
    "MAX_GROUPED_WIDTH",
    "MAX_BACKWARD_PROGRAMS",
    "MAX_BACKWARD_WIDTH_IEEE",
    "chain_matmul",
    "chain_matmul_ref",
    "chain_factor_grads",
    "chain_factor_grads_ref",
    "chain_matmul_backward",
    "chain_matmul_backward_ref",
    "fuses_backward",
    "recomputes_backward",
    "runs_on_chip",
]

# Factors (group members) one launch takes as arguments. 8 covers the depths the paper trains
# (2-8) in one launch for the activation chain and for the weight chain (L - 1 steps).
FACTORS_PER_LAUNCH = 8

# Widest layer (max over n_0 .. n_k) that the chain kernel takes (``runs_on_chip``). Up to
# MAX_RESIDENT_WIDTH the running row block stays in registers, padded to BLOCK_N = the next power of
# two, one (BLOCK_N, BLOCK_N) factor tile per step; wider chains stream it through the destination
# buffers (K-loop over the input width, N-loop over output chunks; see _chain_matmul_kernel).
# 256, from an H100 (bf16, benchmarks/results/h100/, 2026-11-26): at d = 256 the streamed kernel ran
# an 8192-row chain of 4 factors in 61 us against 100 us for one torch.matmul per step, and a
# layer's train step launched 14 kernels against 26 (wall time 1.76 ms against 1.95); at d = 1024
# it took 450 us against 111 for the 8192-row chain, and 250 us per weight chain in a layer's step
# (16-64 programs, each rereading every factor from L2). The kernel runs up to 1024 when this is
# raised (the CUDA tests do); wider chains take one cuBLAS matmul per step.
MAX_ONCHIP_WIDTH = 256
# fp32 with TF32 off: tl.dot runs on FMA units (no tensor cores), every tile in registers; the
# compile gate (sm_90, Triton 3.9) spilled in 40 of 48 register-resident configs at BLOCK_N=128.
MAX_ONCHIP_WIDTH_IEEE = 64
# Widest layer whose running block stays in registers (BLOCK_N > 0 in the kernel). Compile gate
# (sm_90, Triton 3.9, benchmarks/results/compile_sm90.md): register-resident blocks spilled in every
# BLOCK_N=256 config and in most BLOCK_N=128 ones.
MAX_RESIDENT_WIDTH = 64

# Widest dimension (max over n_j, n_{j-1}) that the grouped factor-gradient kernel takes; above it
# each dF_j is one matmul (cuBLAS). Measured on an H100 (bf16, in a layer's train step,
# benchmarks/results/h100/): the 4 products of 1024 x 1024 x 1024 took 137 us (63 TFLOP/s) before
# the tiles were vectorized, pipelined and sized for wgmma, 22 us (387 TFLOP/s) after.
MAX_GROUPED_WIDTH = 1024

# Split-K of the factor gradients (reduction over M shared by several programs per output tile).
# A split covers a multiple of SPLIT_ALIGN rows, so every BLOCK_K of the configs divides it and the
# splits' K-loops never overlap; at least SPLIT_MIN_ROWS rows (4 steps of BLOCK_K = 64: a 3-4 stage
# pipeline is full for at least one step); at most MAX_SPLITS splits (the fp32 partials cost
# 8 bytes per output element and split, written once and read once). The launcher splits when one
# program per 128 x 128 tile (the largest tile of the configs) leaves SMs idle. NOT MEASURED.
SPLIT_ALIGN = 64
SPLIT_MIN_ROWS = 256
MAX_SPLITS = 16
_SPLIT_REFERENCE_TILE = 128

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Whether the kernels below were built for the interpreter (Triton decides at decoration time,
# i.e. when this module is imported). Tests compare it with the environment.
BUILT_FOR_INTERPRETER = interpreting()


# --------------------------------------------------------------------------------------------
# autotune configs (one function per backend)
# --------------------------------------------------------------------------------------------


# The streamed chain's tiles on CUDA, (BLOCK_M, BLOCK_NC), with a STREAMED_BLOCK_K reduction step
# (the configs: _cuda_configs); tests run each through the interpreter.
STREAMED_TILES = tuple((block_m, block_nc) for block_m in (16, 32, 64) for block_nc in (64, 128, 256))
STREAMED_BLOCK_K = 64


def _cuda_configs(kernel: str) -> list[triton.Config]:
    """Autotune configs of the CUDA backend for ``kernel`` ("chain" or "factor_grads").

    Under the interpreter a single config (several configs fail without a GPU, and the interpreter
    has nothing to tune). NOT MEASURED on a GPU: the lists are the usual candidates for tiles of
    this size, less those the sm_90 compile gate (``python -m fastrank.kernels.report``) shows to
    spill (see the prune functions).
    """
    if kernel == "chain":
        if BUILT_FOR_INTERPRETER:
            return [triton.Config({"BLOCK_M": 32, "BLOCK_NC": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
        # Register-resident blocks (one stage: the factor loop carries its running block, there is
        # nothing to pipeline); BLOCK_NC and BLOCK_K are clamped to BLOCK_N by the prune function.
        resident = [
            triton.Config({"BLOCK_M": block_m, "BLOCK_NC": 64, "BLOCK_K": 64}, num_warps=warps, num_stages=1)
            for block_m in (32, 64, 128)
            for warps in (4, 8)
        ]
        # Streamed blocks (two stages: the K-loop over the input width prefetches its next tiles).
        # 16- and 32-row blocks give M / 16 programs, the most a weight chain of M = d rows can fill.
        # A program's steps run one after another, each a K-loop per output chunk: at d = 256 a
        # 64-column chunk makes 16 dependent tile products a step, a 256-column one (the whole
        # width, pruned below it) 4. The weight chain of d = 256, L = 4 (16 programs of 16 rows)
        # took 25.4 us replayed from a CUDA graph against 12.3 us for three cuBLAS calls (H200,
        # bf16, 2026-12-04, with the 64- and 128-column chunks only). The 256-column chunks take
        # 8 warps: with 4, every one spilled (4-2148 B; compile gate, sm_90, Triton 3.9).
        streamed = [
            triton.Config({"BLOCK_M": block_m, "BLOCK_NC": block_nc, "BLOCK_K": STREAMED_BLOCK_K}, num_warps=warps,
                          num_stages=2)
            for block_m, block_nc in STREAMED_TILES
            for warps in ((4, 8) if block_nc < 256 else (8,))
        ]
        return resident + streamed
    if kernel == "factor_grads":
        if BUILT_FOR_INTERPRETER:
            return [
                triton.Config({"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
            ]
        # wgmma-sized tiles (a warpgroup owns 64 rows), BLOCK_K 64 (128 bytes of a 16-bit row: one
        # full swizzled shared-memory line), 3-4 stages; 64 x 64 x 32 and 64 x 32 x 32 are the fp32
        # "ieee" (FMA) tiles.
        return [
            triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
            for p, q, k, warps, stages in (
                (128, 128, 64, 8, 3),
                (128, 128, 64, 8, 4),
                (128, 64, 64, 4, 4),
                (128, 64, 64, 8, 3),
                (64, 64, 64, 4, 4),
                (64, 64, 32, 4, 3),
                (64, 32, 32, 4, 3),
            )
        ]
    if kernel == "chain_backward":
        if BUILT_FOR_INTERPRETER:
            return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
        # Register-resident like the chain's resident mode; one stage (each step's operands depend
        # on the step before).
        return [
            triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=1)
            for block_m, warps in ((16, 4), (32, 4), (64, 4), (64, 8))
        ]
    raise ValueError(f"unknown kernel {kernel!r}")


# Streamed chain configs that spill in at least one of the four layouts (compile gate, sm_90,
# Triton 3.9: 4-512 bytes; (2, 16, 128, 8): 12 bytes with Triton 3.6), as (bytes per element,
# BLOCK_M, BLOCK_NC, num_warps). fp32 (TF32) tiles need twice the registers of 16-bit ones: its
# 256-column chunks spilled 76-324 B at 32 and 64 rows (Triton 3.9), 24 B at 16 (Triton 3.6).
_STREAMED_SPILLS = {
    (2, 16, 64, 8), (2, 32, 64, 4), (2, 16, 128, 8),
    (4, 16, 64, 4), (4, 16, 128, 4), (4, 32, 64, 4), (4, 32, 64, 8), (4, 32, 128, 4), (4, 64, 128, 4),
    (4, 16, 256, 8), (4, 32, 256, 8), (4, 64, 256, 8),
}


def _prune_chain_configs(configs, named_args, **kwargs):
    """The configs of the launch's mode. Register-resident (BLOCK_N > 0; the 1-stage configs):
    BLOCK_NC and BLOCK_K clamped to BLOCK_N, less what the sm_90 compile gate shows to spill
    (Triton 3.9): 128-row blocks from BLOCK_N=64 on (and with 4 warps at 32); 32-row blocks with
    8 warps at BLOCK_N=64 (12-28 B in 16-bit) and at BLOCK_N=16 (two elements a thread: no vector
    load in 16-bit, and 4 warps hold the tile as well), and with 4 warps at BLOCK_N=64 for a
    transposed x in 16-bit (4 B since the slots became tuple arguments); 64-row blocks with 4 warps
    at BLOCK_N=64 in fp32 "ieee" (9 KB). Streamed (BLOCK_N == 0): the multi-stage configs, less
    _STREAMED_SPILLS and output chunks wider than the widest layer's bucket (WIDTH_BUCKET: a
    256-column chunk at d = 128 would compute half its columns masked).
    Under the interpreter the single config serves both modes."""
    meta = {**named_args, **kwargs}
    block_n, ieee = meta["BLOCK_N"], meta["INPUT_PRECISION"] == "ieee"
    element_size = meta["ELEMENT_SIZE"]
    pruned, seen = [], set()
    for config in configs:
        block_m, warps, stages = config.kwargs["BLOCK_M"], config.num_warps, config.num_stages
        block_nc, block_k = config.kwargs["BLOCK_NC"], config.kwargs["BLOCK_K"]
        if block_n > 0:
            if stages != 1 and not BUILT_FOR_INTERPRETER:
                continue
            block_nc = block_k = block_n
            if block_m == 128 and (block_n >= 64 or (block_n == 32 and warps == 4)):
                continue
            if block_m == 32 and warps == 8 and block_n in (16, 64):
                continue
            if block_m == 32 and block_n == 64 and element_size == 2 and meta["X_ROWS_CONTIGUOUS"]:
                continue
            if ieee and block_n >= 64 and block_m == 64 and warps == 4:
                continue
        elif not BUILT_FOR_INTERPRETER and (
            stages == 1
            or (element_size, block_m, block_nc, warps) in _STREAMED_SPILLS
            or block_nc > meta["WIDTH_BUCKET"]
        ):
            continue
        key = (block_m, block_nc, block_k, warps, stages)
        if key not in seen:
            seen.add(key)
            pruned.append(
                triton.Config(
                    {**config.kwargs, "BLOCK_NC": block_nc, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages
                )
            )
    return pruned


# Shared memory the factor-gradient pipeline may take, bytes: sm_90's 232448 less room for the
# epilogue's layout conversion.
_FACTOR_GRADS_SMEM_BUDGET = 200 * 1024


def _prune_factor_grads_configs(configs, named_args, **kwargs):
    """fp32 "ieee" (FMA units, every tile in registers) keeps only the BLOCK_K = 32 tiles, the others
    drop them; with several tile loops in one kernel (LAYOUTS not a power of two) "ieee" keeps
    64 x 32 (64 x 64 spilled 36 B with Triton 3.6, sm_90); pipelines over the shared-memory budget go
    (fp32 128 x 128 x 64 with 4 stages)."""
    if BUILT_FOR_INTERPRETER:
        return configs
    meta = {**named_args, **kwargs}
    ieee, element_size = meta["INPUT_PRECISION"] == "ieee", meta["ELEMENT_SIZE"]
    several_loops = meta["LAYOUTS"] & (meta["LAYOUTS"] - 1) != 0
    kept = []
    for config in configs:
        block_p, block_q, block_k = (config.kwargs[name] for name in ("BLOCK_P", "BLOCK_Q", "BLOCK_K"))
        if ieee != (block_k == 32):
            continue
        if ieee and several_loops and block_q == 64:
            continue
        if config.num_stages * (block_p + block_q) * block_k * element_size > _FACTOR_GRADS_SMEM_BUDGET:
            continue
        kept.append(config)
    return kept


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision matching torch's matmul: fp32 uses TF32 exactly where torch would."""
    if dtype == torch.float32 and not cuda_matmul_allows_tf32():
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16 / bf16 operands


def _within(x: Tensor, factors: Sequence[Tensor], limit: int) -> bool:
    """A kernel dtype, rows, and every width n_0 .. n_k in [1, limit]."""
    widths = [x.shape[1]] + [f.shape[0] for f in factors]
    return x.dtype in _KERNEL_DTYPES and x.shape[0] > 0 and min(widths) > 0 and max(widths) <= limit


def _on_chip(x: Tensor, factors: Sequence[Tensor], precision: str) -> bool:
    return _within(x, factors, MAX_ONCHIP_WIDTH if precision == "tf32" else MAX_ONCHIP_WIDTH_IEEE)


def runs_on_chip(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """Whether :func:`chain_matmul` runs the Triton kernel for ``x`` (M, n_0) and ``factors``: a
    kernel dtype and every width within the kernel's limit for torch's current TF32 setting.
    Otherwise it runs its torch twin, one matmul per step."""
    return _on_chip(x, factors, _input_precision(x.dtype))


# --------------------------------------------------------------------------------------------
# argument selection and operand layouts
# --------------------------------------------------------------------------------------------


@triton.jit
def _select(index, values):
    """Entry ``index`` (a run-time scalar) of a tuple argument whose entries share one type."""
    value = values[0]
    for slot in tl.static_range(1, len(values)):
        if index == slot:
            value = values[slot]
    return value


@triton.jit
def _select_int(index, values):
    """Entry ``index`` of a tuple of integers, as int64 (each entry arrives as int32, int64 or
    compile-time 1 depending on its value; a run-time select needs one type)."""
    zero = tl.full([], 0, tl.int64)
    value = values[0] + zero
    for slot in tl.static_range(1, len(values)):
        if index == slot:
            value = values[slot] + zero
    return value


def _padded(values: Sequence, slots: int = FACTORS_PER_LAUNCH) -> tuple:
    """``values`` padded to ``slots`` entries by repeating its last one, as a tuple (one kernel
    argument: each entry of a tuple costs Triton's launch 0.09 us (an int) to 0.42 us (a pointer)
    of host time where a separate argument cost 0.32 / 0.61 us, Triton 3.6 and 3.9, 2-core Xeon).
    The unused slots carry a live value, so they share its alignment and divisibility (a 0 stride
    or size would not tell Triton the same thing about the selected value)."""
    return tuple(values) + (values[-1],) * (slots - len(values))


def _row_major(t: Tensor) -> bool:
    return t.stride(1) == 1 or t.shape[1] == 1


def _column_major(t: Tensor) -> bool:
    return t.stride(0) == 1 or t.shape[0] == 1


def _layout(t: Tensor, recorder: PlanRecorder) -> tuple[Tensor, bool, int]:
    """``(t or a packed copy, whether dim 0 has unit stride, the other stride)``: row-major views
    keep dim 1 as the unit stride, column-major views (transposes) dim 0; anything else is packed
    row-major (one copy, recorded in the call's launch plan)."""
    if _row_major(t):
        return t, False, t.stride(0)
    if _column_major(t):
        return t, True, t.stride(1)
    t = recorder.contiguous(t)
    return t, False, t.stride(0)


@triton.jit
def _load_rows(ptr, stride, rows64, row_mask, cols, col_mask, ROWS_CONTIGUOUS: tl.constexpr):
    """Tile ``[r, c]`` (rows ``rows64``, columns ``cols``) of a matrix with unit stride along its
    columns and ``stride`` between rows, or (ROWS_CONTIGUOUS) unit stride along its rows and
    ``stride`` between columns. Loaded in the orientation that is contiguous in memory (vector loads
    along the unit stride), transposed in registers for the second; zero outside the masks. Through
    L2 (".cg"): the chain kernel's streamed steps read rows this program has just written."""
    if ROWS_CONTIGUOUS:
        tile = tl.load(
            ptr + cols.to(tl.int64)[:, None] * stride + rows64[None, :],
            mask=col_mask[:, None] & row_mask[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        tile = tl.trans(tile)
    else:
        tile = tl.load(
            ptr + rows64[:, None] * stride + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
    return tile


@triton.jit
def _load_factor_t(ptr, stride, k, k_mask, n, n_mask, TRANSPOSED: tl.constexpr):
    """Tile ``[k, n] = F[n, k]`` of F^T for a factor F (n_out, n_in) with unit stride along n_in
    and ``stride`` between rows, or (TRANSPOSED: F is a transposed view) unit stride along n_out
    and ``stride`` between columns. The first is loaded as F's (n, k) rows, contiguous along k, and
    transposed in registers; zero outside the masks."""
    if TRANSPOSED:
        tile = tl.load(
            ptr + k.to(tl.int64)[:, None] * stride + n[None, :],
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
    else:
        tile = tl.load(
            ptr + n.to(tl.int64)[:, None] * stride + k[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        tile = tl.trans(tile)
    return tile


# --------------------------------------------------------------------------------------------
# chain matmul: kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _chain_step_streamed(
    src_ptr,  # X_{j-1}: (M, n_in), unit stride along n_in, or along M when SRC_ROWS_CONTIGUOUS
    src_stride,  # X_{j-1}'s other stride
    factor_ptr,  # F_j: (n_out, n_in), layout as in _load_factor_t
    factor_stride,
    dest_ptr,  # X_j: contiguous (M, n_out)
    rows64,
    row_mask,
    n_in,
    n_out,
    SRC_ROWS_CONTIGUOUS: tl.constexpr,
    FACTORS_TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One step of a streamed chain for one row block: X_j[rows] = X_{j-1}[rows] @ F_j^T in
    (BLOCK_M, BLOCK_NC) output chunks, each a K-loop over n_in, rounded once and stored; then a
    barrier, so the next step's loads (other threads of this program) see every chunk."""
    dtype = dest_ptr.dtype.element_ty
    for n_start in range(0, n_out, BLOCK_NC):
        n = n_start + tl.arange(0, BLOCK_NC)
        n_mask = n < n_out
        acc = tl.zeros((BLOCK_M, BLOCK_NC), dtype=tl.float32)
        for k_start in range(0, n_in, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            k_mask = k < n_in
            block = _load_rows(src_ptr, src_stride, rows64, row_mask, k, k_mask, SRC_ROWS_CONTIGUOUS)
            factor_t = _load_factor_t(factor_ptr, factor_stride, k, k_mask, n, n_mask, FACTORS_TRANSPOSED)
            acc = tl.dot(block, factor_t, acc, input_precision=INPUT_PRECISION)
        tl.store(
            dest_ptr + rows64[:, None] * n_out + n[None, :],
            acc.to(dtype),
            mask=row_mask[:, None] & n_mask[None, :],
        )
    # The barrier makes this program's stores visible to all of its threads; the next step reads
    # them through L2 (".cg" in _load_rows), never from a possibly stale L1 line.
    tl.debug_barrier()


@triton.autotune(
    configs=_cuda_configs("chain"),
    # The layouts too: a layer runs its weight chain (x transposed) and its reverse chain (both
    # transposed) at the same sizes, and their best tiles need not agree. The precision: the prune
    # function keeps other configs for fp32 "ieee" than for TF32 (the autotuner's own key has the
    # dtype of x, not torch's TF32 switch).
    key=["M_BUCKET", "WIDTH_BUCKET", "BLOCK_N", "NUM_FACTORS", "X_ROWS_CONTIGUOUS", "FACTORS_TRANSPOSED",
         "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_chain_configs},
    do_bench=autotune_bench,
)
@triton.jit
def _chain_matmul_kernel(
    # pointers
    x_ptr,  # X_0: (M, n_0), unit stride along n_0 (or along M: X_ROWS_CONTIGUOUS); its element
    #   type is that of every factor and output
    factors,  # 8 pointers, slot j: F_{j+1} (n_{j+1}, n_j), unit stride along n_j (or along n_{j+1}:
    #   FACTORS_TRANSPOSED)
    dests,  # 8 pointers, slot j: X_{j+1}, contiguous (M, n_{j+1}) (an output, or scratch when not
    #   returned); slots j >= NUM_FACTORS are never read
    # sizes
    M,
    widths,  # 9 integers: n_0 .. n_8
    M_BUCKET,  # autotune key only
    WIDTH_BUCKET,  # autotune key only
    # strides (in elements; products with row indices are formed in int64)
    stride_x,  # x's other stride: between rows, or between columns with X_ROWS_CONTIGUOUS
    factor_strides,  # 8 integers, slot j: F_{j+1}'s other stride, between its rows (or columns)
    # meta-parameters
    NUM_FACTORS,  # live slots, 1 .. 8
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= every width n_0 .. n_k: the block stays in registers;
    #   0: the chain is wider than MAX_RESIDENT_WIDTH and streams through the destinations
    BLOCK_NC: tl.constexpr,  # streamed: output columns per dot (resident: BLOCK_N)
    BLOCK_K: tl.constexpr,  # streamed: reduction step over the input width (resident: BLOCK_N)
    X_ROWS_CONTIGUOUS: tl.constexpr,
    FACTORS_TRANSPOSED: tl.constexpr,
    RETURN_ALL: tl.constexpr,  # resident: store every X_j, else only X_k (the streamed mode stores
    #   every step: its destinations carry the running block)
    ELEMENT_SIZE: tl.constexpr,  # bytes per element; read by the prune function only
    INPUT_PRECISION: tl.constexpr,
):
    """Each program streams one BLOCK_M row block of x through all factors.

    Resident (BLOCK_N > 0, widths <= MAX_RESIDENT_WIDTH): the running block never leaves
    registers; each step is one (BLOCK_M, BLOCK_N) x (BLOCK_N, BLOCK_N) dot, rounded to the input
    dtype, stored when returned. Streamed (BLOCK_N == 0): each step (``_chain_step_streamed``)
    reads the previous X from global memory (x, then the destination it wrote one step earlier,
    from L2), runs a K-loop over the input width per BLOCK_NC output chunk, so registers hold one
    (BLOCK_M, BLOCK_NC) fp32 accumulator and two tiles, and writes its own rows of the next
    destination. Destinations that are not returned alternate between two scratch buffers, so a
    step never overwrites what a slower warp may still be reading. No program reads another
    program's rows.

    Roofline (one launch, k steps, e = bytes per element, S = sum_j n_j n_{j-1}):
      FLOPs   2 M S.
      DRAM    e (M n_0 + S + M sum_{returned} n_j) bytes at least (every operand once).
      L2      every program reads every factor: e S ceil(M / BLOCK_M); streamed steps also reread
              their row block once per output chunk: e M sum_j n_{j-1} ceil(n_j / BLOCK_NC).
    The weight chain of an OverparamLinear(d, d, depth=L) (M = d, k = L - 1, bf16), H100 (989
    dense bf16 TFLOP/s, 3.35 TB/s DRAM, 132 SMs):
      d = 256, L = 4: 0.10 GFLOP, 0.9 MB of DRAM traffic (0.1 us and 0.3 us): launch-bound; one
              launch replaces L - 1 cuBLAS calls, so the expected time is one launch plus a few us
              (16 programs of 16 rows), against L - 1 launches.
      d = 1024, L = 4: 6.4 GFLOP (6.5 us at peak). Programs = 1024 / BLOCK_M = 16-64, at most
              half the SMs, and 16-32-row tiles run mma.sync, not wgmma: expected bound by
              parallelism and by the L2 rereads of the factors (384 MB at 16 rows, ~70 us at
              ~5.5 TB/s; 96 MB at 64 rows), i.e. expected 10-20% of the chip, slower than L - 1
              cuBLAS calls.
    Measured on an H100 (2026-11-26, benchmarks/results/h100/): in a layer's train step at d = 1024
    two launches (weight chain and reverse chain) took 498 us of device time, so chains wider than
    256 are not routed here (MAX_ONCHIP_WIDTH); an 8192 x 256 activation chain of 4 factors took
    61 us against 100 us for one torch.matmul per step.
    """
    dtype = x_ptr.dtype.element_ty
    n0 = widths[0]
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)

    if BLOCK_N > 0:
        cols = tl.arange(0, BLOCK_N)
        block = _load_rows(x_ptr, stride_x, rows64, row_mask, cols, cols < n0, X_ROWS_CONTIGUOUS)
        # A run-time loop: unrolled over 8 factors, a BLOCK_N=256 config took 47 s to compile for sm_90.
        for j in range(NUM_FACTORS):
            factor_ptr = _select(j, factors)
            dest_ptr = _select(j, dests)
            n_in = _select_int(j, widths)
            n_out = _select_int(j + 1, widths)
            factor_stride = _select_int(j, factor_strides)
            factor_t = _load_factor_t(factor_ptr, factor_stride, cols, cols < n_in, cols, cols < n_out, FACTORS_TRANSPOSED)
            block = tl.dot(block, factor_t, input_precision=INPUT_PRECISION).to(dtype)
            out_mask = row_mask[:, None] & (cols[None, :] < n_out)
            dest = dest_ptr + rows64[:, None] * n_out + cols[None, :]
            if RETURN_ALL:
                tl.store(dest, block, mask=out_mask)
            elif j == NUM_FACTORS - 1:
                tl.store(dest, block, mask=out_mask)
    else:
        # Step 1 reads x in its own layout; the later steps read the row-major destinations.
        _chain_step_streamed(
            x_ptr, stride_x, factors[0], factor_strides[0], dests[0], rows64, row_mask, n0, widths[1],
            X_ROWS_CONTIGUOUS, FACTORS_TRANSPOSED, BLOCK_M, BLOCK_NC, BLOCK_K, INPUT_PRECISION,
        )
        for j in range(1, NUM_FACTORS):
            src_ptr = _select(j - 1, dests)
            factor_ptr = _select(j, factors)
            dest_ptr = _select(j, dests)
            n_in = _select_int(j, widths)
            n_out = _select_int(j + 1, widths)
            factor_stride = _select_int(j, factor_strides)
            _chain_step_streamed(
                src_ptr, n_in, factor_ptr, factor_stride, dest_ptr, rows64, row_mask, n_in, n_out,
                False, FACTORS_TRANSPOSED, BLOCK_M, BLOCK_NC, BLOCK_K, INPUT_PRECISION,
            )


# --------------------------------------------------------------------------------------------
# chain matmul: launcher
# --------------------------------------------------------------------------------------------


def _resident_block(widths: Sequence[int]) -> int:
    """The kernel's BLOCK_N for a launch through layers of these widths: the padded width when the
    block stays in registers, 0 when it is streamed."""
    widest = max(widths)
    return size_bucket(widest) if widest <= MAX_RESIDENT_WIDTH else 0


def _launch_chain(
    x: Tensor, factors: Sequence[Tensor], dests: list[Tensor | None], return_all: bool, precision: str,
    recorder: PlanRecorder,
) -> None:
    """One launch through at most FACTORS_PER_LAUNCH factors; ``dests[j]`` receives X_{j+1}."""
    k = len(factors)
    M = x.shape[0]
    widths = [x.shape[1]] + [f.shape[0] for f in factors]
    x, x_rows_contiguous, stride_x = _layout(x, recorder)
    # One layout for all factors: transposed views when every factor is one (the reverse chain),
    # else row-major, packing any factor that is not (a launch mixing the two is not one the layers
    # make).
    transposed = all(_column_major(f) for f in factors) and not all(_row_major(f) for f in factors)
    factors = [f if (_column_major(f) if transposed else _row_major(f)) else recorder.contiguous(f) for f in factors]
    strides = [f.stride(1) if transposed else f.stride(0) for f in factors]
    filler = next(d for d in reversed(dests) if d is not None)  # never written: its slot stores nothing

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]),)

    recorder.launch(
        _chain_matmul_kernel,
        grid,
        x,
        _padded(factors),
        _padded([d if d is not None else filler for d in dests]),
        M,
        _padded(widths, FACTORS_PER_LAUNCH + 1),  # n_0 .. n_8
        size_bucket(M),
        size_bucket(max(widths)),
        stride_x,
        _padded(strides),
        NUM_FACTORS=k,
        BLOCK_N=_resident_block(widths),
        X_ROWS_CONTIGUOUS=x_rows_contiguous,
        FACTORS_TRANSPOSED=transposed,
        RETURN_ALL=return_all,
        ELEMENT_SIZE=x.element_size(),
        INPUT_PRECISION=precision,
    )


# Launch plans of the three launchers (fastrank.kernels._launch): a repeated call with the same
# tensor metadata replays the launches recorded at the second call with that metadata.
_CHAIN_PLANS = PlanCache()
_FACTOR_GRAD_PLANS = PlanCache()
_BACKWARD_PLANS = PlanCache()


def chain_matmul(x: Tensor, factors: Sequence[Tensor], return_all: bool = True) -> list[Tensor]:
    """Run ``x`` through the chain ``F_1 .. F_k``, one kernel launch per FACTORS_PER_LAUNCH steps.

    Args:
        x: ``(M, n_0)``, float32 / float16 / bfloat16 (float64 takes the torch path), any strides.
        factors: ``F_j`` of shape ``(n_j, n_{j-1})``, same dtype and device as ``x``, any strides.
        return_all: return ``[X_1, ..., X_k]``; otherwise ``[X_k]`` only.

    Returns:
        Contiguous ``(M, n_j)`` tensors in ``x.dtype`` on x's device; see the module docstring for
        the rounding. Widths above :data:`MAX_ONCHIP_WIDTH` (:data:`MAX_ONCHIP_WIDTH_IEEE` for fp32
        with TF32 off) run one matmul per step instead.
    """
    precision = _input_precision(x.dtype)  # one read of torch's TF32 setting per call
    tensors = (x, *factors)
    replayed, key = _CHAIN_PLANS.replay(tensors, (return_all, precision), x.get_device())
    if replayed is not None:
        return replayed
    _check_chain(x, factors)
    M = x.shape[0]
    if not _on_chip(x, factors, precision):
        return chain_matmul_ref(x, factors, return_all)

    recorder = _CHAIN_PLANS.recorder(key, tensors)
    outputs: list[Tensor] = []
    with device_guard(x):
        block = x
        for start in range(0, len(factors), FACTORS_PER_LAUNCH):
            group = factors[start : start + FACTORS_PER_LAUNCH]
            last_group = start + FACTORS_PER_LAUNCH >= len(factors)
            keep_all = return_all or not last_group  # the next launch starts from this one's X
            group_widths = [block.shape[1]] + [f.shape[0] for f in group]
            if keep_all:
                dests = [recorder.empty((M, n), x) for n in group_widths[1:]]
            else:
                # A streamed chain stages its intermediates in two alternating scratch buffers; a
                # resident one keeps them in registers.
                # Each buffer's size is rounded up to 64 elements: both start 128-byte aligned.
                needs_scratch = len(group) > 1 and _resident_block(group_widths) == 0
                scratch_size = cdiv(M * max(group_widths[1:-1], default=1), 64) * 64
                scratch = recorder.empty((2, scratch_size), x) if needs_scratch else None
                dests = [
                    scratch[j % 2][: M * n].view(M, n) if scratch is not None else None
                    for j, n in enumerate(group_widths[1:-1])
                ] + [recorder.empty((M, group_widths[-1]), x)]
            _launch_chain(block, group, dests, keep_all, precision, recorder)
            if return_all:
                outputs.extend(dests)
            block = dests[-1]
    outputs = outputs if return_all else [block]
    _CHAIN_PLANS.record(key, recorder, outputs)
    return outputs


# --------------------------------------------------------------------------------------------
# factor gradients: kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _factor_grad_tile(
    grad_ptr,  # G: (M, p), unit stride along p, or along M when G_ROWS_CONTIGUOUS
    input_ptr,  # X: (M, q), unit stride along q, or along M when X_ROWS_CONTIGUOUS
    stride_g,  # G's other stride
    stride_x,  # X's other stride
    offs_p,
    p_mask,
    offs_q,
    q_mask,
    m_begin,
    m_end,
    M,
    G_ROWS_CONTIGUOUS: tl.constexpr,
    X_ROWS_CONTIGUOUS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_P, BLOCK_Q) tile of G^T X over the reduction rows [m_begin, m_end). Every tile
    is loaded along its unit stride (16-byte vectors; cp.async stages when pipelined) and
    transposed in registers where the dot wants the other orientation."""
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    offs_p64 = offs_p.to(tl.int64)
    offs_q64 = offs_q.to(tl.int64)
    for m_start in range(m_begin, m_end, BLOCK_K):
        m = m_start + tl.arange(0, BLOCK_K)
        m_mask = m < M
        m64 = m.to(tl.int64)
        if G_ROWS_CONTIGUOUS:  # G^T is row-major: its (BLOCK_P, BLOCK_K) tile directly
            grad_t = tl.load(
                grad_ptr + offs_p64[:, None] * stride_g + m[None, :],
                mask=p_mask[:, None] & m_mask[None, :],
                other=0.0,
            )
        else:  # G's (BLOCK_K, BLOCK_P) rows, transposed
            grad_t = tl.load(
                grad_ptr + m64[:, None] * stride_g + offs_p[None, :],
                mask=m_mask[:, None] & p_mask[None, :],
                other=0.0,
            )
            grad_t = tl.trans(grad_t)
        if X_ROWS_CONTIGUOUS:  # X^T's (BLOCK_Q, BLOCK_K) rows, transposed
            inp = tl.load(
                input_ptr + offs_q64[:, None] * stride_x + m[None, :],
                mask=q_mask[:, None] & m_mask[None, :],
                other=0.0,
            )
            inp = tl.trans(inp)
        else:
            inp = tl.load(
                input_ptr + m64[:, None] * stride_x + offs_q[None, :],
                mask=m_mask[:, None] & q_mask[None, :],
                other=0.0,
            )
        acc = tl.dot(grad_t, inp, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(
    configs=_cuda_configs("factor_grads"),
    # The element size and the precision: the prune function keeps configs by them (shared memory,
    # FMA tiles), and the autotuner's own key holds the dtype of top-level tensors only, not of the
    # tuples' entries.
    key=["M_BUCKET", "WIDTH_BUCKET", "NUM_GROUPS", "num_splits", "LAYOUTS", "ELEMENT_SIZE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_factor_grads_configs},
    do_bench=autotune_bench,
)
@triton.jit
def _factor_grads_kernel(
    # pointers (slot g = group member g; slots g >= NUM_GROUPS are never read)
    grads,  # 8 pointers, slot g: G_g (M, p_g), unit stride along p_g, or along M (layout bit 0 of g)
    inputs,  # 8 pointers, slot g: X_g (M, q_g), unit stride along q_g, or along M (layout bit 1 of g)
    outputs,  # 8 pointers, slot g: dF_g = G_g^T X_g, contiguous (p_g, q_g)
    partial_ptr,  # fp32 (num_splits, sum_g r_g), r_g = p_g q_g rounded up to a multiple of 16 (so
    #   every region starts 64-byte aligned), SPLIT_K only: split s's partial of member g is the
    #   contiguous (p_g, q_g) at s * sum_h r_h + sum_{h<g} r_h
    counter_ptr,  # int32 (>= number of output tiles,), SPLIT_K only: splits arrived per output tile;
    #   zero before the launch, and the last split of each tile sets it back to zero
    # sizes
    M,
    grad_widths,  # 8 integers: p_g
    input_widths,  # 8 integers: q_g
    split_rows,  # reduction rows per split (a multiple of SPLIT_ALIGN when num_splits > 1)
    num_splits,  # programs per output tile, each reducing split_rows rows of M
    M_BUCKET,  # autotune key only
    WIDTH_BUCKET,  # autotune key only
    # strides (in elements)
    grad_strides,  # 8 integers: G_g's other stride, along M or along p_g
    input_strides,  # 8 integers: X_g's other stride, along M or along q_g
    layouts,  # bits 2g, 2g + 1: member g's G_g, X_g have unit stride along M
    # meta-parameters
    NUM_GROUPS,  # live slots, 1 .. 8
    BLOCK_P: tl.constexpr,  # rows of dF_g per program
    BLOCK_Q: tl.constexpr,  # columns of dF_g per program
    BLOCK_K: tl.constexpr,  # reduction (M) step; divides SPLIT_ALIGN
    LAYOUTS: tl.constexpr,  # bit c set when some member has layout code c = bits (2g, 2g+1) of layouts
    SPLIT_K: tl.constexpr,  # num_splits > 1
    ELEMENT_SIZE: tl.constexpr,  # bytes per element; read by the prune function only
    INPUT_PRECISION: tl.constexpr,
):
    """Grouped GEMM with optional split-K: one program per (output tile of one dF_g, split of M).

    Programs ``pid = tile * num_splits + split``; tiles of member 0 come first, then member 1, ...
    Without split each program reduces all of M (fp32 accumulator) and rounds once. With split,
    each program stores its fp32 partial, and the last of a tile's splits to arrive (an atomic
    counter per tile; no program ever waits) adds the partials in split order 0, 1, ... (the same
    order whichever program arrives last: deterministic), rounds once and stores dF_g.

    Roofline (one launch, e = bytes per element, P = sum_g p_g q_g, S splits):
      FLOPs   2 M P.
      DRAM    e (M sum_g (p_g + q_g) + P) bytes at least (every operand once), plus 8 S P for the
              split partials (fp32, written and read once).
    The factor gradients of OverparamLinear(d, d, depth=4)'s step (4 products, M = d, bf16), H100:
      d = 1024: 8.6 GFLOP (8.7 us at 989 TFLOP/s), 25 MB (7.5 us at 3.35 TB/s; mostly L2-resident,
              just written by the backward): compute-bound, 256 tiles of 128 x 128 (1.9 waves on
              132 SMs, no split); expected 50-70% of peak (12-17 us), against four cuBLAS calls
              and their launches.
      d = 256: 0.13 GFLOP, 1.6 MB: launch-bound (well under 1 us of work); expected one launch's
              time against four.
    Measured on an H100 (2026-11-26, device time in a layer's train step): 22 us at d = 1024
    (387 TFLOP/s, 39% of peak), 2.5 us at d = 256 with M = 64. A single call at d = 256 timed from
    the host's side took 261 us against 33 us for four torch.matmul calls: the launch itself (then
    64 separate arguments) costs host time that the kernel does not. Since then launches skip the
    autotuner after a key's first (launch_tuned: 54 us of Triton's 99-102 us per launch) and the
    slots are tuples (13-18 us less), both on a 2-core Xeon with the CUDA driver stubbed
    (benchmarks/results/triton_launch_cpu.md); not GPU-measured.
    """
    dtype = grads[0].dtype.element_ty
    pid = tl.program_id(0)
    split = pid % num_splits
    tile = pid // num_splits

    # This program's member g, the first tile of g and the offset of g's partials.
    group = pid * 0
    group_start = pid * 0
    start = pid * 0
    partial_offset = tl.full([], 0, tl.int64)
    elements = tl.full([], 0, tl.int64)  # after the loop: sum_g r_g
    for g in range(NUM_GROUPS):
        p_g = _select_int(g, grad_widths)
        q_g = _select_int(g, input_widths)
        is_past = tile >= start
        group = tl.where(is_past, g, group)
        group_start = tl.where(is_past, start, group_start)
        partial_offset = tl.where(is_past, elements, partial_offset)
        start += (tl.cdiv(p_g, BLOCK_P) * tl.cdiv(q_g, BLOCK_Q)).to(tl.int32)
        elements += tl.cdiv(p_g * q_g, 16) * 16
    grad_ptr = _select(group, grads)
    input_ptr = _select(group, inputs)
    out_ptr = _select(group, outputs)
    n_p = _select_int(group, grad_widths)
    n_q = _select_int(group, input_widths)
    stride_g = _select_int(group, grad_strides)
    stride_x = _select_int(group, input_strides)
    layout = (layouts >> (2 * group)) & 3

    local = tile - group_start
    tiles_q = tl.cdiv(n_q, BLOCK_Q)
    offs_p = (local // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (local % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < n_p
    q_mask = offs_q < n_q
    m_begin = split * split_rows
    m_end = tl.minimum(m_begin + split_rows, M)

    # One tile loop per layout code present in the launch (compile-time flags, so each loop's loads
    # have a known unit stride); a run-time branch picks the member's.
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for code in tl.static_range(4):
        if (LAYOUTS >> code) & 1:
            if LAYOUTS == (1 << code):
                acc = _factor_grad_tile(
                    grad_ptr, input_ptr, stride_g, stride_x, offs_p, p_mask, offs_q, q_mask, m_begin, m_end, M,
                    code & 1, code >> 1, BLOCK_P, BLOCK_Q, BLOCK_K, INPUT_PRECISION,
                )
            elif layout == code:
                acc = _factor_grad_tile(
                    grad_ptr, input_ptr, stride_g, stride_x, offs_p, p_mask, offs_q, q_mask, m_begin, m_end, M,
                    code & 1, code >> 1, BLOCK_P, BLOCK_Q, BLOCK_K, INPUT_PRECISION,
                )

    out_offsets = offs_p.to(tl.int64)[:, None] * n_q + offs_q[None, :]
    out_mask = p_mask[:, None] & q_mask[None, :]
    if SPLIT_K:
        region = tl.multiple_of(partial_offset, 16)  # true by construction (r_g above)
        tl.store(partial_ptr + tl.multiple_of(split * elements, 16) + region + out_offsets, acc, mask=out_mask)
        # Every thread's partial stores happen before the (one-thread) release of the arrival.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:  # the same value in every thread: the whole program enters
            # The acquire above was one thread's; the barrier orders every thread's loads after it.
            tl.debug_barrier()
            total = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
            for s in range(num_splits):
                total += tl.load(
                    partial_ptr + tl.multiple_of(s * elements, 16) + region + out_offsets,
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",  # written by other SMs: read through L2
                )
            tl.store(out_ptr + out_offsets, total.to(dtype), mask=out_mask)
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    else:
        tl.store(out_ptr + out_offsets, acc.to(dtype), mask=out_mask)


# --------------------------------------------------------------------------------------------
# factor gradients: launcher
# --------------------------------------------------------------------------------------------


def split_plan(M: int, tiles: int, num_sms: int, split_k: int | None = None) -> tuple[int, int]:
    """``(splits, rows per split)`` of the reduction over M for a grouped launch of ``tiles``
    output tiles of 128 x 128 on ``num_sms`` SMs; ``split_k`` forces a split count (clamped to what
    SPLIT_ALIGN-row splits of M allow).

    Without ``split_k``: no split while the tiles alone fill the SMs or M is under two
    SPLIT_MIN_ROWS; else enough splits to give every SM a program, at most MAX_SPLITS and at least
    SPLIT_MIN_ROWS rows each.
    """
    if split_k is None:
        if tiles >= num_sms or M < 2 * SPLIT_MIN_ROWS:
            return 1, M
        split_k = min(cdiv(num_sms, tiles), M // SPLIT_MIN_ROWS, MAX_SPLITS)
    if split_k <= 1:
        return 1, M
    rows = cdiv(cdiv(M, split_k), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = cdiv(M, rows)
    return (splits, rows) if splits > 1 else (1, M)


_SM_COUNTS: dict[int, int] = {}
# Buffers that launches on one stream share, one per (device, stream) and use: launches on one
# stream run in order, so each finds the buffer as the previous one left it.
# Arrival counters of split launches, zeroed int32: the kernel leaves them zero, so consecutive
# launches on one stream share them without a memset launch.
_SPLIT_COUNTERS: dict[tuple, Tensor] = {}
# Scratch of the fused backward (uint8; see _shared_workspace), whose contents no launch reads
# before writing them.
_WORKSPACES: dict[tuple, Tensor] = {}
# Buffers a larger one replaced in _SPLIT_COUNTERS / _WORKSPACES, kept: launches queued on their
# stream may still use them.
_RETIRED_COUNTERS: list[Tensor] = []
_RETIRED_WORKSPACES: list[Tensor] = []
# Held while a stream's buffer is made or replaced (persistent_buffer waits for a thread of its
# own, releasing the GIL): two threads launching on one stream would otherwise both make one, and
# the first, dropped unretired, be freed under its launch.
_STREAM_BUFFERS_LOCK = threading.Lock()
# The largest workspace a stream shares, in bytes (larger ones are allocated per call): the host
# cost an allocation adds matters where a launch's device time is as small as its host time,
# which at these sizes it is not. torch's cuBLAS keeps a workspace of a few MiB per handle and
# stream the same way.
SHARED_WORKSPACE_BYTES = 4 << 20
# Whether workspaces are shared at all: not under the interpreter, where a launch runs on the
# calling thread and two threads on the CPU would share one stream's buffer at once.
SHARE_WORKSPACES = not BUILT_FOR_INTERPRETER


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: an H100's count, so that tests see the GPU's decisions
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _split_counters(device: torch.device, count: int) -> Tensor:
    """A zeroed int32 buffer of at least ``count`` counters for this device's current stream.

    Eager launches on one stream share one buffer, allocated at the stream's first split launch
    (:func:`persistent_buffer`: outside the memory pool of a CUDA graph being warmed up). While the
    stream captures a CUDA graph each call gets a buffer of its own, zeroed inside the graph (a
    memset node), never shared nor registered: the stream's buffer, baked into a graph, would be
    shared by the graph's replays and the stream's eager launches (torch.compile's CUDA graph
    trees warm up and capture on one stream), and freed under the graph once a larger one
    replaced it; a registered one would tie the stream's eager launches to this graph's memory
    pool, whose zeros exist only once the graph has replayed. A capture thus takes the launches
    its warm-up took. Without counters there, the fused backward fell back to the composed
    kernels (with the driver stubbed: 3 JIT calls, configs the warm-up never ran, whose first
    launch compiles and autotunes); on an H200 the capture of a depth-4, d = 64, B = 1 train step,
    whose backward is the fused kernel, was invalidated (benchmarks/results/h200/README.md)."""
    size = max(next_power_of_2(count), 1024)  # a larger count replaces a buffer at most log2 times
    return _stream_buffer(_SPLIT_COUNTERS, _RETIRED_COUNTERS, device, count,
                          lambda: torch.zeros(size, dtype=torch.int32, device=device))


def _workspace(device: torch.device, nbytes: int) -> Tensor:
    """A uint8 buffer of at least ``nbytes`` for this device's current stream, shared as
    :func:`_split_counters` are (a capture's own while a CUDA graph is captured); its contents are
    whatever the stream's last launch left there."""
    size = max(next_power_of_2(nbytes), 1 << 16)
    return _stream_buffer(_WORKSPACES, _RETIRED_WORKSPACES, device, nbytes,
                          lambda: torch.empty(size, dtype=torch.uint8, device=device))


def _shared_workspace(device: torch.device) -> Callable[[int], tuple[Tensor, Callable[[], Tensor]] | None]:
    """For :meth:`PlanRecorder.workspace`: ``shared(nbytes)``, the current stream's workspace and
    its fetch for a launch plan, or None (allocate per call) above SHARED_WORKSPACE_BYTES or where
    workspaces are not shared. With the driver stubbed an allocation cost 0.6 us a replay and
    sharing saved 0.25 us of the fused backward's 10.7 us (the fetch costs the rest; 2-core EPYC,
    Triton 3.9); on a GPU, through the caching allocator, NOT MEASURED."""

    def shared(nbytes: int) -> tuple[Tensor, Callable[[], Tensor]] | None:
        if not SHARE_WORKSPACES or nbytes > SHARED_WORKSPACE_BYTES:
            return None
        return _workspace(device, nbytes), _stream_buffer_fetch("_WORKSPACES", device, nbytes,
                                                                lambda: _workspace(device, nbytes))

    return shared


def _stream_buffer(buffers: dict[tuple, Tensor], retired: list[Tensor], device: torch.device, needed: int,
                   make: Callable[[], Tensor]) -> Tensor:
    """``buffers``' entry for this device's current stream, made by ``make()`` (at least ``needed``
    entries) where it has none or a smaller one (which goes to ``retired``); while the stream
    captures a CUDA graph, ``make()`` alone (see :func:`_split_counters`)."""
    if _capturing(device):
        return make()
    key = _stream_key(device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < needed:
        with _STREAM_BUFFERS_LOCK:
            buffer = buffers.get(key)  # another thread's, made while this one waited
            if buffer is None or buffer.numel() < needed:
                if buffer is not None:
                    retired.append(buffer)
                buffer = buffers[key] = persistent_buffer(device, make)
    return buffer


def _stream_key(device: torch.device) -> tuple:
    """The key of ``device``'s current stream in the per-stream buffers."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # the raw stream handle: torch.cuda.current_stream builds a Stream object per call
        return (index, torch._C._cuda_getCurrentRawStream(index))
    return (device, 0)


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    return capturing(device)


def _stream_buffer_fetch(buffers: str, device: torch.device, needed: int,
                         slow: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """A launch plan's fetch of an external buffer: the current stream's entry in the module's dict
    named ``buffers`` (read at each fetch, as ``slow`` reads it: the dict of the call, not of the
    recording) looked up directly outside a capture, ``slow()`` on a miss or in a capture."""
    namespace = globals()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        raw_stream = torch._C._cuda_getCurrentRawStream
        # a replay runs on its inputs' device: the current one's stream is theirs
        stream_capturing = torch._C._cuda_isCurrentStreamCapturing

        def fetch() -> Tensor:
            if not stream_capturing():
                buffer = namespace[buffers].get((index, raw_stream(index)))
                if buffer is not None and buffer.numel() >= needed:
                    return buffer
            return slow()
    else:  # a stubbed driver's CPU tensors: never captured
        key = (device, 0)

        def fetch() -> Tensor:
            buffer = namespace[buffers].get(key)
            return buffer if buffer is not None and buffer.numel() >= needed else slow()

    return fetch


def _split_counter_fetch(device: torch.device, count: int) -> Callable[[], Tensor]:
    """``_split_counters(device, count)`` as a launch plan's fetch of an external buffer."""
    return _stream_buffer_fetch("_SPLIT_COUNTERS", device, count, lambda: _split_counters(device, count))


def _launch_factor_grads(
    grads: Sequence[Tensor], inputs: Sequence[Tensor], outputs: list[Tensor], split_k: int | None,
    precision: str, recorder: PlanRecorder,
) -> None:
    """One grouped launch for at most FACTORS_PER_LAUNCH pairs."""
    M = grads[0].shape[0]
    device = grads[0].device
    widths = [g.shape[1] for g in grads] + [i.shape[1] for i in inputs]
    grads, grad_rows, grad_strides = zip(*(_layout(g, recorder) for g in grads))
    inputs, input_rows, input_strides = zip(*(_layout(i, recorder) for i in inputs))
    codes = [int(g) | int(i) << 1 for g, i in zip(grad_rows, input_rows)]
    pairs = list(zip(grads, inputs))

    def tile_count(block_p: int, block_q: int) -> int:
        return sum(cdiv(g.shape[1], block_p) * cdiv(i.shape[1], block_q) for g, i in pairs)

    reference_tiles = tile_count(_SPLIT_REFERENCE_TILE, _SPLIT_REFERENCE_TILE)
    splits, split_rows = split_plan(M, reference_tiles, _num_sms(device), split_k)
    counter_count = tile_count(32, 32)  # 32: the smallest tile
    if splits > 1:
        counters = recorder.external(_split_counters(device, counter_count), _split_counter_fetch(device, counter_count))
        regions = sum(cdiv(g.shape[1] * i.shape[1], 16) * 16 for g, i in pairs)
        partials = recorder.empty(splits * regions, grads[0], torch.float32)
    else:  # never read; live fp32 and int32 pointers keep the launch's signature
        partials = recorder.constant(unused_buffer(device, torch.float32))
        counters = recorder.constant(unused_buffer(device, torch.int32))

    def grid(meta):
        return (tile_count(meta["BLOCK_P"], meta["BLOCK_Q"]) * splits,)

    recorder.launch(
        _factor_grads_kernel,
        grid,
        _padded(grads),
        _padded(inputs),
        _padded(outputs),
        partials,
        counters,
        M,
        _padded([g.shape[1] for g in grads]),
        _padded([i.shape[1] for i in inputs]),
        split_rows,
        splits,
        size_bucket(M),
        size_bucket(max(widths)),
        _padded(grad_strides),
        _padded(input_strides),
        sum(code << (2 * g) for g, code in enumerate(codes)),
        NUM_GROUPS=len(grads),
        LAYOUTS=sum(1 << code for code in set(codes)),
        SPLIT_K=splits > 1,
        ELEMENT_SIZE=grads[0].element_size(),
        INPUT_PRECISION=precision,
    )


def chain_factor_grads(
    grads: Sequence[Tensor], inputs: Sequence[Tensor], split_k: int | None = None
) -> list[Tensor]:
    """All factor gradients ``dF_j = grads[j]^T @ inputs[j]``, one grouped launch per
    FACTORS_PER_LAUNCH pairs.

    Args:
        grads: ``G_j`` of shape ``(M, n_j)``, float32 / float16 / bfloat16, any strides.
        inputs: ``X_{j-1}`` of shape ``(M, n_{j-1})``, same M, dtype and device, any strides.
        split_k: splits of the reduction over M per output tile (None: :func:`split_plan` decides
            from the shapes and the SM count).

    Returns:
        Contiguous ``(n_j, n_{j-1})`` tensors in the input dtype, fp32 accumulation over M and one
        rounding. Widths above :data:`MAX_GROUPED_WIDTH` (and float64) take one matmul each.
    """
    if not grads or len(grads) != len(inputs):
        _check_factor_grads(grads, inputs)
        return []
    tensors = (*grads, *inputs)
    precision = _input_precision(grads[0].dtype)  # one read of torch's TF32 setting per call
    replayed, key = _FACTOR_GRAD_PLANS.replay(tensors, (split_k, precision), grads[0].get_device())
    if replayed is not None:
        return replayed
    _check_factor_grads(grads, inputs)
    M = grads[0].shape[0]
    widths = [g.shape[1] for g in grads] + [i.shape[1] for i in inputs]
    dtype = grads[0].dtype
    if dtype not in _KERNEL_DTYPES or max(widths) > MAX_GROUPED_WIDTH or min(widths) == 0 or M == 0:
        return chain_factor_grads_ref(grads, inputs)

    recorder = _FACTOR_GRAD_PLANS.recorder(key, tensors)
    outputs = [recorder.empty((g.shape[1], i.shape[1]), g) for g, i in zip(grads, inputs)]
    with device_guard(grads[0]):
        for start in range(0, len(grads), FACTORS_PER_LAUNCH):
            stop = start + FACTORS_PER_LAUNCH
            _launch_factor_grads(grads[start:stop], inputs[start:stop], outputs[start:stop], split_k, precision, recorder)
    _FACTOR_GRAD_PLANS.record(key, recorder, outputs)
    return outputs


# --------------------------------------------------------------------------------------------
# fused backward of a narrow chain: kernel
# --------------------------------------------------------------------------------------------


def _prune_backward_configs(configs, named_args, **kwargs):
    """Less what the sm_90 compile gate (Triton 3.9) shows to spill: 16-row blocks at BLOCK_N=32
    (8 B in 16-bit without NEEDS_X) and at BLOCK_N=16 (4 B in 16-bit with NEEDS_X). fp32 "ieee" (FMA units) is launched at BLOCK_N=16 only
    (:func:`fuses_backward`): at 32 and 64 most configs spilled, up to 32 KB."""
    if BUILT_FOR_INTERPRETER:
        return configs
    block_n = {**named_args, **kwargs}["BLOCK_N"]
    return [config for config in configs if not (block_n <= 32 and config.kwargs["BLOCK_M"] == 16)]


@triton.autotune(
    configs=_cuda_configs("chain_backward"),
    key=["M_BUCKET", "BLOCK_N", "NUM_FACTORS", "NEEDS_X", "FACTORS_TRANSPOSED", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_backward_configs},
    do_bench=autotune_bench,
)
@triton.jit
def _chain_backward_kernel(
    # pointers
    x_ptr,  # X_0: contiguous (M, n_0); its element type is that of every factor and gradient
    grad_ptr,  # dX_k: contiguous (M, n_k)
    factors,  # 8 pointers, slot j: F_{j+1} (n_{j+1}, n_j), contiguous, or with FACTORS_TRANSPOSED
    #   the transposed view of a contiguous (n_j, n_{j+1}); slots j >= NUM_FACTORS are never read
    grad_x_ptr,  # dX_0: contiguous (M, n_0), written with NEEDS_X only
    grad_factors,  # 8 pointers, slot j: dF_{j+1} (n_{j+1}, n_j) in the factors' layout; slots
    #   j >= NUM_FACTORS are never written
    scratch_ptr,  # X_1 .. X_{k-1} recomputed: (M, (NUM_FACTORS - 1) BLOCK_N), X_j in columns
    #   [(j - 1) BLOCK_N, j BLOCK_N); each program writes and reads its own rows only
    partial_ptr,  # fp32 (programs, NUM_FACTORS, BLOCK_N, BLOCK_N): program p's sum of
    #   dX_{j+1}^T X_j over its rows, at [p, j]
    counter_ptr,  # int32 (1,): programs arrived; zero before the launch, reset by the last one
    # sizes
    M,
    widths,  # 9 integers: n_0 .. n_8
    M_BUCKET,  # autotune key only
    # meta-parameters
    NUM_FACTORS,  # live slots, 1 .. 8
    BLOCK_M: tl.constexpr,  # rows per step of a program
    BLOCK_N: tl.constexpr,  # power of two >= every width n_0 .. n_k (16 .. MAX_RESIDENT_WIDTH)
    NEEDS_X: tl.constexpr,  # also compute dX_0
    FACTORS_TRANSPOSED: tl.constexpr,  # every factor (and its gradient) column-major: the weight
    #   chain's W_j^T views
    INPUT_PRECISION: tl.constexpr,
):
    """Every gradient of a narrow chain ``X_k = x F_1^T ... F_k^T`` from x, the factors and dX_k, in
    one launch that keeps no intermediate from the forward.

    Each program takes row blocks pid, pid + programs, ... For a block it recomputes X_1 ..
    X_{k-1} (rounded once per step, as the forward kernel does) into its rows of the scratch, then
    runs the reverse chain dX_{j-1} = dX_j F_j (rounded once per step, as the naive chain's backward)
    with the block in registers, adding dX_j^T X_{j-1} (fp32) into its own partial of every dF_j.
    The last program to arrive (an atomic counter; no program waits) sums the partials in program
    order (deterministic), rounds once and stores every dF_j.

    Roofline (one launch, k factors, e = bytes per element, S = sum_j n_j n_{j-1}, P programs):
      FLOPs   2 M S (recompute, k - 1 steps) + 2 M S (reverse chain) + 2 M S (factor gradients).
      DRAM    e (M (n_0 + n_k) + S) in, e (S + M n_0) out: the intermediates (scratch) stay in L2,
              the partials (4 P k BLOCK_N^2 bytes) too.
    For the narrow layers it serves (d <= 64, B below ~d), e.g. OverparamLinear(64, 64, depth=4) at
    B = 64, bf16: 6 MFLOP, under 100 kB: launch-bound on any GPU; expected one launch's time
    against the two launches (reverse chain, factor gradients) of the kept-intermediates backward,
    and activation memory of one layer (x) instead of four. NOT MEASURED on a GPU.
    """
    dtype = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    tile_rows = tl.arange(0, BLOCK_N)
    tile = tile_rows[:, None] * BLOCK_N + cols[None, :]  # a (BLOCK_N, BLOCK_N) partial, row-major
    scratch_stride = (NUM_FACTORS - 1) * BLOCK_N
    n0 = widths[0]
    n_k = _select_int(NUM_FACTORS, widths)

    for block_start in range(pid * BLOCK_M, M, programs * BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)

        # Forward: X_1 .. X_{k-1} into this block's scratch rows (zero beyond each width).
        block = _load_rows(x_ptr, n0, rows64, row_mask, cols, cols < n0, False)
        for j in range(NUM_FACTORS - 1):
            factor_ptr = _select(j, factors)
            n_in = _select_int(j, widths)
            n_out = _select_int(j + 1, widths)
            if FACTORS_TRANSPOSED:
                factor_t = _load_factor_t(factor_ptr, n_out, cols, cols < n_in, cols, cols < n_out, True)
            else:
                factor_t = _load_factor_t(factor_ptr, n_in, cols, cols < n_in, cols, cols < n_out, False)
            block = tl.dot(block, factor_t, input_precision=INPUT_PRECISION).to(dtype)
            tl.store(scratch_ptr + rows64[:, None] * scratch_stride + j * BLOCK_N + cols[None, :], block,
                     mask=row_mask[:, None])
        # This program's scratch stores before its loads below (read through L2, ".cg").
        tl.debug_barrier()

        # Reverse: dX_k, then dX_{j-1} = dX_j F_j; the partial of dF_j takes dX_j^T X_{j-1}.
        grad = _load_rows(grad_ptr, n_k, rows64, row_mask, cols, cols < n_k, False)
        for step in range(NUM_FACTORS):
            j = NUM_FACTORS - 1 - step  # slot of F_{j+1}, whose input is X_j
            factor_ptr = _select(j, factors)
            n_in = _select_int(j, widths)
            n_out = _select_int(j + 1, widths)
            if j == 0:
                inputs = _load_rows(x_ptr, n0, rows64, row_mask, cols, cols < n0, False)
            else:
                inputs = _load_rows(scratch_ptr + (j - 1) * BLOCK_N, scratch_stride, rows64, row_mask, cols,
                                    cols < n_in, False)
            partial = partial_ptr + (pid * NUM_FACTORS + j).to(tl.int64) * (BLOCK_N * BLOCK_N) + tile
            acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
            if block_start > pid * BLOCK_M:  # not this program's first block: add to its partial
                acc = tl.load(partial, cache_modifier=".cg")
            acc = tl.dot(tl.trans(grad), inputs, acc, input_precision=INPUT_PRECISION)
            tl.store(partial, acc)
            if j > 0 or NEEDS_X:
                # The reverse step's factor is F^T, a transposed view of F: its tile [a, b] = F[a, b].
                if FACTORS_TRANSPOSED:
                    factor = _load_factor_t(factor_ptr, n_out, cols, cols < n_out, cols, cols < n_in, False)
                else:
                    factor = _load_factor_t(factor_ptr, n_in, cols, cols < n_out, cols, cols < n_in, True)
                grad = tl.dot(grad, factor, input_precision=INPUT_PRECISION).to(dtype)
        if NEEDS_X:
            tl.store(grad_x_ptr + rows64[:, None] * n0 + cols[None, :], grad,
                     mask=row_mask[:, None] & (cols[None, :] < n0))
        # The partial stores before the next block's loads of them, and the scratch reads before
        # the next block's writes.
        tl.debug_barrier()

    # Every thread's partial stores happen before the (one-thread) release of the arrival.
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == programs - 1:  # the same value in every thread: the whole program enters
        tl.debug_barrier()  # the acquire above was one thread's: order every thread's loads after it
        for j in range(NUM_FACTORS):
            n_in = _select_int(j, widths)
            n_out = _select_int(j + 1, widths)
            total = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
            for p in range(programs):
                total += tl.load(partial_ptr + (p * NUM_FACTORS + j).to(tl.int64) * (BLOCK_N * BLOCK_N) + tile,
                                 cache_modifier=".cg")  # written by other SMs: read through L2
            if FACTORS_TRANSPOSED:  # dF[r, c] at r + c n_out
                offsets = tile_rows[:, None] + cols[None, :] * n_out
            else:
                offsets = tile_rows[:, None] * n_in + cols[None, :]
            tl.store(_select(j, grad_factors) + offsets, total.to(dtype),
                     mask=(tile_rows[:, None] < n_out) & (cols[None, :] < n_in))
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch


# --------------------------------------------------------------------------------------------
# fused backward of a narrow chain: launcher
# --------------------------------------------------------------------------------------------

# Programs of one fused backward launch at most: each keeps fp32 partials of every dF_j
# (4 k BLOCK_N^2 bytes, 64 kB at k = 4, BLOCK_N = 64) that the last one sums alone. The layers
# route chains here when B is below about d (the cost model's activation chain) and the collapsed
# product's weight chain (M = d rows), i.e. a few row blocks. NOT MEASURED on a GPU.
MAX_BACKWARD_PROGRAMS = 16
_SMALLEST_BACKWARD_BLOCK_M = 16  # of _cuda_configs("chain_backward"): sizes the partials
# Widest layer the fused backward takes in fp32 with TF32 off (FMA units, every tile in registers):
# the compile gate (sm_90, Triton 3.9) spilled in 11 of 16 configs at BLOCK_N = 32 and 64, none at 16.
MAX_BACKWARD_WIDTH_IEEE = 16


def recomputes_backward(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """Whether :func:`chain_matmul_backward` serves the chain on ``x`` (M, n_0) from the inputs
    alone at about the cost of the kept-intermediates backward, so a layer need not keep X_1 ..
    X_{k-1}: a kernel dtype, at most FACTORS_PER_LAUNCH factors and every width at most
    :data:`MAX_RESIDENT_WIDTH` (within the chain kernel's limits). The fused kernel serves it (see
    :func:`fuses_backward` for fp32 with TF32 off). Shapes and dtypes only, so torch.compile traces
    the rule (Dynamo cannot trace the read of torch's TF32 setting)."""
    limit = min(MAX_RESIDENT_WIDTH, MAX_ONCHIP_WIDTH, MAX_ONCHIP_WIDTH_IEEE)
    return len(factors) <= FACTORS_PER_LAUNCH and _within(x, factors, limit)


def fuses_backward(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """Whether :func:`chain_matmul_backward` runs the fused kernel: :func:`recomputes_backward`,
    and for fp32 with TF32 off (FMA tiles in registers) every width at most
    :data:`MAX_BACKWARD_WIDTH_IEEE`; wider ones recompute with the chain kernel instead."""
    return _fuses_backward(x, factors, _input_precision(x.dtype))


def _fuses_backward(x: Tensor, factors: Sequence[Tensor], precision: str) -> bool:
    limit = MAX_BACKWARD_WIDTH_IEEE if precision == "ieee" else MAX_RESIDENT_WIDTH
    return recomputes_backward(x, factors) and _within(x, factors, limit)


def chain_matmul_backward(
    x: Tensor, factors: Sequence[Tensor], grad_output: Tensor, needs_x: bool = True
) -> list[Tensor]:
    """Gradients of ``chain_matmul(x, factors, return_all=False)`` from ``dX_k = grad_output``,
    recomputing the intermediates: one launch where :func:`fuses_backward` holds, else the chain
    kernel twice (recompute, reverse chain) and the grouped factor gradients.

    Args:
        x: ``(M, n_0)``, float32 / float16 / bfloat16, any strides.
        factors: ``F_j`` of shape ``(n_j, n_{j-1})``, same dtype and device, any strides.
        grad_output: ``(M, n_k)``, same dtype and device, any strides.
        needs_x: also return ``dX_0``.

    Returns:
        ``[dF_1, ..., dF_k]``, each in its factor's layout (``fastrank.chain._factor_grads_in_layout``:
        a transposed view for a transposed factor, else contiguous), then ``dX_0`` when ``needs_x``
        (contiguous); x's dtype; rounding as ``chain_matmul_backward_ref``.
    """
    precision = _input_precision(x.dtype)  # one read of torch's TF32 setting per call
    tensors = (x, *factors, grad_output)
    replayed, key = _BACKWARD_PLANS.replay(tensors, (needs_x, precision), x.get_device())
    if replayed is not None:
        return replayed
    _check_backward(x, factors, grad_output)
    # Transposed views of contiguous factors (the weight chain's W_j^T) are read as they are and
    # their gradients written in their layout (fastrank.chain._factor_grads_in_layout); other
    # factors are packed row-major. A chain mixing the two takes the composed kernels.
    views = [_transposed_view(f) for f in factors]
    transposed = all(views)
    if not _fuses_backward(x, factors, precision) or (any(views) and not transposed):
        return compose_chain_backward(x, factors, grad_output, needs_x, chain_matmul, chain_factor_grads)

    recorder = _BACKWARD_PLANS.recorder(key, tensors)
    device = x.device
    counters = recorder.external(_split_counters(device, 1), _split_counter_fetch(device, 1))
    if transposed:
        stored = [recorder.empty(f.shape[::-1], x) for f in factors]  # dF_j^T, contiguous
        grad_factors = [g.T for g in stored]
    else:
        stored = grad_factors = [recorder.empty(f.shape, x) for f in factors]
    grad_x = recorder.empty(x.shape, x) if needs_x else None
    with device_guard(x):
        _launch_backward(recorder.contiguous(x), list(factors) if transposed else [recorder.contiguous(f) for f in factors],
                         recorder.contiguous(grad_output), grad_x, stored, counters, precision, transposed, recorder)
    outputs = grad_factors + ([grad_x] if needs_x else [])
    _BACKWARD_PLANS.record(key, recorder, outputs)
    return outputs


def _launch_backward(
    x: Tensor, factors: list[Tensor], grad_output: Tensor, grad_x: Tensor | None, grad_factors: list[Tensor],
    counters: Tensor, precision: str, transposed: bool, recorder: PlanRecorder,
) -> None:
    """One fused backward launch; contiguous operands and outputs, except with ``transposed``: the
    factors transposed views of contiguous matrices, ``grad_factors`` the contiguous (n_j, n_{j+1})
    buffers of their gradients' transposes."""
    M, k = x.shape[0], len(factors)
    widths = [x.shape[1]] + [f.shape[0] for f in factors]
    block_n = _resident_block(widths)
    most_programs = min(cdiv(M, _SMALLEST_BACKWARD_BLOCK_M), MAX_BACKWARD_PROGRAMS)
    partials_shape = (most_programs * k * block_n * block_n,)
    shared = _shared_workspace(x.device)
    if k > 1:
        scratch, partials = recorder.workspace([((M, (k - 1) * block_n), x.dtype), (partials_shape, torch.float32)], x, shared)
    else:  # the scratch is never read with one factor
        scratch, (partials,) = x, recorder.workspace([(partials_shape, torch.float32)], x, shared)

    def grid(meta):
        return (min(cdiv(M, meta["BLOCK_M"]), MAX_BACKWARD_PROGRAMS),)

    recorder.launch(
        _chain_backward_kernel,
        grid,
        x,
        grad_output,
        _padded(factors),
        grad_x if grad_x is not None else grad_factors[0],  # never written without NEEDS_X
        _padded(grad_factors),
        scratch,
        partials,
        counters,
        M,
        _padded(widths, FACTORS_PER_LAUNCH + 1),  # n_0 .. n_8
        size_bucket(M),
        NUM_FACTORS=k,
        BLOCK_N=block_n,
        NEEDS_X=grad_x is not None,
        FACTORS_TRANSPOSED=transposed,
        INPUT_PRECISION=precision,
    )
