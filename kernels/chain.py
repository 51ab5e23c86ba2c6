"""Triton kernels for the chain matmul and its grouped factor gradients.

The over-parameterized layer is built on one primitive, the *chain matmul*::

    X_0 = x                      (M, n_0)
    X_j = X_{j-1} @ F_j^T        F_j: (n_j, n_{j-1}),  j = 1..k

returning ``[X_1, ..., X_k]`` (or only ``X_k``). Its backward needs the group of factor gradients
``dF_j = G_j^T @ X_{j-1}``. This module holds, for each of the two:

* the ``@triton.jit`` kernel,
* a thin launcher (check shapes and dtypes, allocate outputs, launch).

The pure-torch twins (``chain_matmul_ref``, ``chain_factor_grads_ref``), readable as the
specification, the CPU path and the test reference, live beside the ops in ``fastrank.chain`` and
are re-exported here. Nothing here knows about modules or autograd; ``fastrank.chain`` wraps the
launchers in custom ops.

Rounding (fp16 / bf16)
    Every product accumulates in fp32. The chain kernel rounds the running block to the input dtype
    after every step, so each returned ``X_j`` is exactly one fp32-accumulated matmul of the
    *returned* ``X_{j-1}`` rounded once: what a sequence of ``torch.matmul`` calls in that dtype
    computes, up to the order of the fp32 summation. ``return_all`` does not change the values.

Passing a variable number of tensors
    Up to :data:`FACTORS_PER_LAUNCH` factors (group members) travel as ordinary kernel arguments,
    each with its sizes and strides; a count says how many are live and the kernel picks argument
    j by a scalar select in a run-time loop (unrolled over 8 slots, a BLOCK_N=256 chain config took
    47 s to compile for sm_90). Nothing is copied
    to the device before a launch, so the launches are safe under CUDA graph capture
    (``torch.compile(mode="reduce-overhead")``). Longer chains run as consecutive launches of at
    most that many steps; larger groups as several grouped launches.

Fallbacks
    Widths above :data:`MAX_ONCHIP_WIDTH` (chain) or :data:`MAX_GROUPED_WIDTH` (factor gradients),
    and float64, run one matmul per step with fp32 accumulation and one rounding, as the kernels
    do (``torch.mm(..., out_dtype=torch.float32)`` on CUDA for fp16 / bf16; cuBLAS's own fp16
    GEMM may reduce split-K partial sums in half precision).

Device
    Launchers take a device guard on the inputs' device; Triton launches on the current device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastrank._backend import cuda_matmul_allows_tf32
from fastrank.kernels._launch import device_guard, interpreting, size_bucket

# The torch twins (the specification of these kernels, and the CPU path) live in the op file.
from fastrank.chain import (  # noqa: F401  (re-exported for the kernel tests)
    _check_chain,
    _check_factor_grads,
    chain_factor_grads_ref,
    chain_matmul_ref,
)

__all__ = [
    "FACTORS_PER_LAUNCH",
    "MAX_ONCHIP_WIDTH",
    "MAX_ONCHIP_WIDTH_IEEE",
    "MAX_GROUPED_WIDTH",
    "chain_matmul",
    "chain_matmul_ref",
    "chain_factor_grads",
    "chain_factor_grads_ref",
    "runs_on_chip",
]

# Factors (group members) one launch takes as arguments. 8 covers the depths the paper trains
# (2-8) in one launch for the activation chain and for the weight chain (L - 1 steps).
FACTORS_PER_LAUNCH = 8

# Widest layer (max over n_0 .. n_k) that the one-launch chain kernel takes. The running row block
# is held on chip padded to BLOCK_N = next power of two >= the widest layer, and each step reads a
# whole (BLOCK_N, BLOCK_N) factor, so the kernel only pays off while that stays small.
# Compile gate (sm_90, Triton 3.9, benchmarks/results/compile_sm90.md): every BLOCK_N=256
# config spilled (up to 5 KB a thread with tensor cores, 58 KB in fp32 "ieee"), and at BLOCK_N=128
# fp32 "ieee" spilled in 40 of 48 configs: wider chains take the torch path (cuBLAS per step).
# NOT MEASURED on a GPU: whether the kernel beats one matmul per step at these widths is for
# benchmarks/test_chain_kernel_bench.py to say.
MAX_ONCHIP_WIDTH = 128
MAX_ONCHIP_WIDTH_IEEE = 64  # fp32 with TF32 off: tl.dot runs on FMA units, all tiles in registers

# Widest dimension (max over n_j, n_{j-1}) that the grouped factor-gradient kernel takes; above it
# each dF_j is one matmul (cuBLAS, which splits the long reduction over M across programs; the
# grouped kernel reduces all of M inside one program). Measured once on an H100 (bf16, in a layer's
# train step, benchmarks/results/h100/): 4 products of 1024 x 8192 x 1024 took 137 us, about 63
# TFLOP/s, where cuBLAS runs a product of that size near 700; not yet timed against one
# torch.matmul per factor for d in {256, 1024, 4096}, M in {512, 8192, 65536}, L in {2, 4, 8}.
MAX_GROUPED_WIDTH = 1024

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Whether the kernels below were built for the interpreter (Triton decides at decoration time,
# i.e. when this module is imported). Tests compare it with the environment.
BUILT_FOR_INTERPRETER = interpreting()


# --------------------------------------------------------------------------------------------
# autotune configs (one function per backend)
# --------------------------------------------------------------------------------------------


def _cuda_configs(kernel: str) -> list[triton.Config]:
    """Autotune configs of the CUDA backend for ``kernel`` ("chain" or "factor_grads").

    Under the interpreter a single config (several configs fail without a GPU, and the interpreter
    has nothing to tune). NOT MEASURED on a GPU: the lists are the usual candidates for tiles of
    this size, less those the sm_90 compile gate (``python -m fastrank.kernels.report``) shows to
    spill (see ``_prune_chain_configs``).
    """
    if kernel == "chain":
        # BLOCK_NC caps the output-column chunk; it is clamped to BLOCK_N by _prune_chain_configs.
        # One stage: the factor loop carries its running block, there is nothing to pipeline.
        if BUILT_FOR_INTERPRETER:
            return [triton.Config({"BLOCK_M": 32, "BLOCK_NC": 32}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": block_m, "BLOCK_NC": block_nc}, num_warps=warps, num_stages=1)
            for block_m in (32, 64, 128)
            for block_nc in (32, 64)
            for warps in (4, 8)
        ]
    if kernel == "factor_grads":
        if BUILT_FOR_INTERPRETER:
            return [
                triton.Config({"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
            ]
        return [
            triton.Config(
                {"BLOCK_P": block_p, "BLOCK_Q": block_q, "BLOCK_K": block_k},
                num_warps=warps,
                num_stages=stages,
            )
            for block_p, block_q in ((64, 64), (128, 64), (64, 128))
            for block_k in (32, 64)
            for warps, stages in ((4, 3), (8, 3))
        ]
    raise ValueError(f"unknown kernel {kernel!r}")


def _prune_chain_configs(configs, named_args, **kwargs):
    """Clamp BLOCK_NC to BLOCK_N, drop duplicates and the tiles the sm_90 compile gate shows to
    spill (Triton 3.9): 128-row blocks from BLOCK_N=64 on (and with 4 warps at 32); 64-row blocks
    with 4 warps at BLOCK_N=64 in fp32 "ieee" (9 KB); at BLOCK_N=128 every 4-warp config (16-700 B)
    and 64 x 64 chunks (56 B in fp32)."""
    meta = {**named_args, **kwargs}
    block_n, ieee = meta["BLOCK_N"], meta["INPUT_PRECISION"] == "ieee"
    pruned, seen = [], set()
    for config in configs:
        block_m, warps = config.kwargs["BLOCK_M"], config.num_warps
        block_nc = min(config.kwargs["BLOCK_NC"], block_n)
        if block_m == 128 and (block_n >= 64 or (block_n == 32 and warps == 4)):
            continue
        if ieee and block_n >= 64 and block_m == 64 and warps == 4:
            continue
        if block_n >= 128 and (warps == 4 or (block_m == 64 and block_nc == 64)):
            continue
        key = (block_m, block_nc, warps, config.num_stages)
        if key not in seen:
            seen.add(key)
            pruned.append(
                triton.Config({**config.kwargs, "BLOCK_NC": block_nc}, num_warps=warps, num_stages=config.num_stages)
            )
    return pruned


def _prune_factor_grads_configs(configs, named_args, **kwargs):
    """Drop what the sm_90 compile gate shows to spill: BLOCK_K=64 with 4 warps; in fp32 "ieee"
    (FMA units, every tile in registers) everything but 64 x 64 tiles with BLOCK_K=32."""
    ieee = {**named_args, **kwargs}["INPUT_PRECISION"] == "ieee"
    kept = []
    for config in configs:
        meta = config.kwargs
        if meta["BLOCK_K"] == 64 and config.num_warps == 4:
            continue
        if ieee and (meta["BLOCK_P"], meta["BLOCK_Q"], meta["BLOCK_K"]) != (64, 64, 32):
            continue
        kept.append(config)
    return kept


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision matching torch's matmul: fp32 uses TF32 exactly where torch would."""
    if dtype == torch.float32 and not cuda_matmul_allows_tf32():
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16 / bf16 operands


def _on_chip(x: Tensor, factors: Sequence[Tensor], precision: str) -> bool:
    M = x.shape[0]
    widths = [x.shape[1]] + [f.shape[0] for f in factors]
    limit = MAX_ONCHIP_WIDTH if precision == "tf32" else MAX_ONCHIP_WIDTH_IEEE
    return x.dtype in _KERNEL_DTYPES and M > 0 and min(widths) > 0 and max(widths) <= limit


def runs_on_chip(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """Whether :func:`chain_matmul` runs the Triton kernel for ``x`` (M, n_0) and ``factors``: a
    kernel dtype and every width within the on-chip limit for torch's current TF32 setting.
    Otherwise it runs its torch twin, one matmul per step."""
    return _on_chip(x, factors, _input_precision(x.dtype))


# --------------------------------------------------------------------------------------------
# argument selection
# --------------------------------------------------------------------------------------------


@triton.jit
def _select(index, a0, a1, a2, a3, a4, a5, a6, a7):
    """Argument ``index`` (a run-time scalar in [0, 8)) of eight values of one type."""
    value = a0
    if index == 1:
        value = a1
    if index == 2:
        value = a2
    if index == 3:
        value = a3
    if index == 4:
        value = a4
    if index == 5:
        value = a5
    if index == 6:
        value = a6
    if index == 7:
        value = a7
    return value


@triton.jit
def _select_int(index, a0, a1, a2, a3, a4, a5, a6, a7):
    """Argument ``index`` of eight integers, as int64 (the arguments arrive as int32, int64 or
    compile-time 1 depending on their values; a run-time select needs one type)."""
    zero = tl.full([], 0, tl.int64)
    return _select(index, a0 + zero, a1 + zero, a2 + zero, a3 + zero, a4 + zero, a5 + zero, a6 + zero, a7 + zero)


def _padded(values: list, filler) -> list:
    """``values`` padded with ``filler`` to FACTORS_PER_LAUNCH slots."""
    return list(values) + [filler] * (FACTORS_PER_LAUNCH - len(values))


# --------------------------------------------------------------------------------------------
# chain matmul: kernel
# --------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_cuda_configs("chain"),
    key=["M_BUCKET", "BLOCK_N", "NUM_FACTORS"],
    prune_configs_by={"early_config_prune": _prune_chain_configs},
)
@triton.jit
def _chain_matmul_kernel(
    # pointers
    x_ptr,  # (M, n_0), any strides; its element type is that of every factor and output
    f0_ptr, f1_ptr, f2_ptr, f3_ptr, f4_ptr, f5_ptr, f6_ptr, f7_ptr,  # F_{j+1}: (n_{j+1}, n_j), any strides
    d0_ptr, d1_ptr, d2_ptr, d3_ptr, d4_ptr, d5_ptr, d6_ptr, d7_ptr,  # X_{j+1}: contiguous (M, n_{j+1})
    #   (an output, or scratch when not returned); slots j >= NUM_FACTORS are never read
    # sizes
    M,
    n0, n1, n2, n3, n4, n5, n6, n7, n8,  # widths n_0 .. n_8
    M_BUCKET,  # autotune key only
    # strides (in elements; products with row indices are formed in int64)
    stride_xm,
    stride_xk,
    so0, so1, so2, so3, so4, so5, so6, so7,  # F_{j+1} stride along n_{j+1} (its rows)
    si0, si1, si2, si3, si4, si5, si6, si7,  # F_{j+1} stride along n_j (its columns)
    # meta-parameters
    NUM_FACTORS,  # live slots, 1 .. 8
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= every width n_0 .. n_k
    BLOCK_NC: tl.constexpr,  # output columns per dot; == BLOCK_N keeps the chain in registers
    RETURN_ALL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Each program streams one BLOCK_M row block of x through all factors.

    With one column chunk (BLOCK_NC == BLOCK_N) the running block never leaves registers: each step
    is one (BLOCK_M, BLOCK_N) x (BLOCK_N, BLOCK_N) dot. With several chunks, each step writes its
    chunks to the destination (its own rows only), a barrier makes them visible to the whole
    program, and the next step reloads the block (from L2, it was just written). Destinations
    that are not returned alternate between two scratch buffers, so a step never overwrites what a
    slower warp may still be reading. No program reads another program's rows.
    """
    dtype = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)

    block = tl.load(
        x_ptr + rows64[:, None] * stride_xm + cols64[None, :] * stride_xk,
        mask=row_mask[:, None] & (cols[None, :] < n0),
        other=0.0,
    )
    # A run-time loop: unrolled over 8 factors, a BLOCK_N=256 config took 47 s to compile for sm_90.
    for j in range(NUM_FACTORS):
        factor_ptr = _select(j, f0_ptr, f1_ptr, f2_ptr, f3_ptr, f4_ptr, f5_ptr, f6_ptr, f7_ptr)
        dest_ptr = _select(j, d0_ptr, d1_ptr, d2_ptr, d3_ptr, d4_ptr, d5_ptr, d6_ptr, d7_ptr)
        n_in = _select_int(j, n0, n1, n2, n3, n4, n5, n6, n7)
        n_out = _select_int(j, n1, n2, n3, n4, n5, n6, n7, n8)
        stride_out = _select_int(j, so0, so1, so2, so3, so4, so5, so6, so7)
        stride_in = _select_int(j, si0, si1, si2, si3, si4, si5, si6, si7)
        dest_rows = dest_ptr + rows64[:, None] * n_out
        if BLOCK_NC == BLOCK_N:
            # F_j^T as a (BLOCK_N, BLOCK_N) tile: element [c, r] = F_j[r, c], zero outside.
            factor_t = tl.load(
                factor_ptr + cols64[:, None] * stride_in + cols64[None, :] * stride_out,
                mask=(cols[:, None] < n_in) & (cols[None, :] < n_out),
                other=0.0,
            )
            acc = tl.dot(block, factor_t, input_precision=INPUT_PRECISION)
            block = acc.to(dtype)
            out_mask = row_mask[:, None] & (cols[None, :] < n_out)
            if RETURN_ALL:
                tl.store(dest_rows + cols64[None, :], block, mask=out_mask)
            elif j == NUM_FACTORS - 1:
                tl.store(dest_rows + cols64[None, :], block, mask=out_mask)
        else:
            for chunk_start in tl.static_range(0, BLOCK_N, BLOCK_NC):
                if chunk_start < n_out:
                    chunk_cols = chunk_start + tl.arange(0, BLOCK_NC)
                    chunk_cols64 = chunk_cols.to(tl.int64)
                    factor_t = tl.load(
                        factor_ptr + cols64[:, None] * stride_in + chunk_cols64[None, :] * stride_out,
                        mask=(cols[:, None] < n_in) & (chunk_cols[None, :] < n_out),
                        other=0.0,
                    )
                    acc = tl.dot(block, factor_t, input_precision=INPUT_PRECISION)
                    tl.store(
                        dest_rows + chunk_cols64[None, :],
                        acc.to(dtype),
                        mask=row_mask[:, None] & (chunk_cols[None, :] < n_out),
                    )
            # The barrier makes this program's stores above visible to all of its threads; the
            # reload reads through L2 (".cg"), never from a possibly stale L1 line.
            tl.debug_barrier()
            block = tl.load(
                dest_rows + cols64[None, :],
                mask=row_mask[:, None] & (cols[None, :] < n_out),
                other=0.0,
                cache_modifier=".cg",
            )


# --------------------------------------------------------------------------------------------
# chain matmul: launcher
# --------------------------------------------------------------------------------------------


def _launch_chain(
    x: Tensor, factors: Sequence[Tensor], dests: list[Tensor | None], return_all: bool, precision: str
) -> None:
    """One launch through at most FACTORS_PER_LAUNCH factors; ``dests[j]`` receives X_{j+1}."""
    k = len(factors)
    M = x.shape[0]
    widths = [x.shape[1]] + [f.shape[0] for f in factors]
    filler = dests[-1]  # never read: slots j >= k are compiled out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    _chain_matmul_kernel[grid](
        x,
        *_padded(factors, factors[-1]),
        *_padded([d if d is not None else filler for d in dests], filler),
        M,
        *(widths + [0] * (FACTORS_PER_LAUNCH + 1 - len(widths))),  # n_0 .. n_8
        size_bucket(M),
        x.stride(0),
        x.stride(1),
        *_padded([f.stride(0) for f in factors], 0),
        *_padded([f.stride(1) for f in factors], 0),
        NUM_FACTORS=k,
        BLOCK_N=size_bucket(max(widths)),
        RETURN_ALL=return_all,
        INPUT_PRECISION=precision,
    )


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
    _check_chain(x, factors)
    M = x.shape[0]
    precision = _input_precision(x.dtype)  # one read of torch's TF32 setting per call
    if not _on_chip(x, factors, precision):
        return chain_matmul_ref(x, factors, return_all)

    outputs: list[Tensor] = []
    with device_guard(x):
        block = x
        for start in range(0, len(factors), FACTORS_PER_LAUNCH):
            group = factors[start : start + FACTORS_PER_LAUNCH]
            last_group = start + FACTORS_PER_LAUNCH >= len(factors)
            keep_all = return_all or not last_group  # the next launch starts from this one's X
            group_widths = [block.shape[1]] + [f.shape[0] for f in group]
            if keep_all:
                dests = [x.new_empty((M, n)) for n in group_widths[1:]]
            else:
                # Intermediates are staged in two alternating scratch buffers when a step needs
                # several column chunks (the smallest chunk any config may pick is 32 columns).
                needs_scratch = len(group) > 1 and size_bucket(max(group_widths)) > 32
                scratch = x.new_empty((2, M * max(group_widths[1:-1]))) if needs_scratch else None
                dests = [
                    scratch[j % 2][: M * n].view(M, n) if scratch is not None else None
                    for j, n in enumerate(group_widths[1:-1])
                ] + [x.new_empty((M, group_widths[-1]))]
            _launch_chain(block, group, dests, keep_all, precision)
            if return_all:
                outputs.extend(dests)
            block = dests[-1]
    return outputs if return_all else [block]


# --------------------------------------------------------------------------------------------
# factor gradients: kernel
# --------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_cuda_configs("factor_grads"),
    key=["M_BUCKET", "WIDTH_BUCKET", "NUM_GROUPS"],
    prune_configs_by={"early_config_prune": _prune_factor_grads_configs},
)
@triton.jit
def _factor_grads_kernel(
    # pointers (slot g = group member g; slots g >= NUM_GROUPS are never read)
    g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, g5_ptr, g6_ptr, g7_ptr,  # G_g: (M, p_g), any strides
    i0_ptr, i1_ptr, i2_ptr, i3_ptr, i4_ptr, i5_ptr, i6_ptr, i7_ptr,  # X_g: (M, q_g), any strides
    o0_ptr, o1_ptr, o2_ptr, o3_ptr, o4_ptr, o5_ptr, o6_ptr, o7_ptr,  # dF_g = G_g^T X_g: contiguous (p_g, q_g)
    # sizes
    M,
    p0, p1, p2, p3, p4, p5, p6, p7,
    q0, q1, q2, q3, q4, q5, q6, q7,
    M_BUCKET,  # autotune key only
    WIDTH_BUCKET,  # autotune key only
    # strides (in elements)
    sgm0, sgm1, sgm2, sgm3, sgm4, sgm5, sgm6, sgm7,  # G_g along M
    sgp0, sgp1, sgp2, sgp3, sgp4, sgp5, sgp6, sgp7,  # G_g along p
    sim0, sim1, sim2, sim3, sim4, sim5, sim6, sim7,  # X_g along M
    siq0, siq1, siq2, siq3, siq4, siq5, siq6, siq7,  # X_g along q
    # meta-parameters
    NUM_GROUPS,  # live slots, 1 .. 8
    BLOCK_P: tl.constexpr,  # rows of dF_g per program
    BLOCK_Q: tl.constexpr,  # columns of dF_g per program
    BLOCK_K: tl.constexpr,  # reduction (M) step
    INPUT_PRECISION: tl.constexpr,
):
    """Grouped GEMM: one program per (BLOCK_P, BLOCK_Q) tile of one dF_g, the whole reduction over M
    inside the program (fp32 accumulator), one rounding to the output dtype at the end."""
    dtype = g0_ptr.dtype.element_ty
    pid = tl.program_id(0)

    # This program's member: the tiles of member 0 come first, then those of member 1, ...
    group = pid * 0
    group_start = pid * 0
    start = pid * 0
    for g in range(NUM_GROUPS):
        is_past = pid >= start
        group = tl.where(is_past, g, group)
        group_start = tl.where(is_past, start, group_start)
        p_g = _select_int(g, p0, p1, p2, p3, p4, p5, p6, p7)
        q_g = _select_int(g, q0, q1, q2, q3, q4, q5, q6, q7)
        start += (tl.cdiv(p_g, BLOCK_P) * tl.cdiv(q_g, BLOCK_Q)).to(tl.int32)
    grad_ptr = _select(group, g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, g5_ptr, g6_ptr, g7_ptr)
    input_ptr = _select(group, i0_ptr, i1_ptr, i2_ptr, i3_ptr, i4_ptr, i5_ptr, i6_ptr, i7_ptr)
    out_ptr = _select(group, o0_ptr, o1_ptr, o2_ptr, o3_ptr, o4_ptr, o5_ptr, o6_ptr, o7_ptr)
    n_p = _select_int(group, p0, p1, p2, p3, p4, p5, p6, p7)
    n_q = _select_int(group, q0, q1, q2, q3, q4, q5, q6, q7)
    stride_gm = _select_int(group, sgm0, sgm1, sgm2, sgm3, sgm4, sgm5, sgm6, sgm7)
    stride_gp = _select_int(group, sgp0, sgp1, sgp2, sgp3, sgp4, sgp5, sgp6, sgp7)
    stride_im = _select_int(group, sim0, sim1, sim2, sim3, sim4, sim5, sim6, sim7)
    stride_iq = _select_int(group, siq0, siq1, siq2, siq3, siq4, siq5, siq6, siq7)

    tile = pid - group_start
    tiles_q = tl.cdiv(n_q, BLOCK_Q)
    offs_p = (tile // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (tile % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    p_mask = offs_p < n_p
    q_mask = offs_q < n_q

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m_start in range(0, M, BLOCK_K):
        m = m_start + offs_k
        m_mask = m < M
        m64 = m.to(tl.int64)
        # G^T tile (BLOCK_P, BLOCK_K): element [p, m] = G[m, p]
        grad_t = tl.load(
            grad_ptr + offs_p[:, None] * stride_gp + m64[None, :] * stride_gm,
            mask=p_mask[:, None] & m_mask[None, :],
            other=0.0,
        )
        # X tile (BLOCK_K, BLOCK_Q)
        inp = tl.load(
            input_ptr + m64[:, None] * stride_im + offs_q[None, :] * stride_iq,
            mask=m_mask[:, None] & q_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(grad_t, inp, acc, input_precision=INPUT_PRECISION)
    tl.store(
        out_ptr + offs_p[:, None] * n_q + offs_q[None, :],
        acc.to(dtype),
        mask=p_mask[:, None] & q_mask[None, :],
    )


# --------------------------------------------------------------------------------------------
# factor gradients: launcher
# --------------------------------------------------------------------------------------------


def _launch_factor_grads(grads: Sequence[Tensor], inputs: Sequence[Tensor], outputs: list[Tensor]) -> None:
    """One grouped launch for at most FACTORS_PER_LAUNCH pairs."""
    M = grads[0].shape[0]
    widths = [g.shape[1] for g in grads] + [i.shape[1] for i in inputs]

    def grid(meta):
        tiles = [
            triton.cdiv(g.shape[1], meta["BLOCK_P"]) * triton.cdiv(i.shape[1], meta["BLOCK_Q"])
            for g, i in zip(grads, inputs)
        ]
        return (sum(tiles),)

    _factor_grads_kernel[grid](
        *_padded(grads, grads[0]),
        *_padded(inputs, inputs[0]),
        *_padded(outputs, outputs[0]),
        M,
        *_padded([g.shape[1] for g in grads], 0),
        *_padded([i.shape[1] for i in inputs], 0),
        size_bucket(M),
        size_bucket(max(widths)),
        *_padded([g.stride(0) for g in grads], 0),
        *_padded([g.stride(1) for g in grads], 0),
        *_padded([i.stride(0) for i in inputs], 0),
        *_padded([i.stride(1) for i in inputs], 0),
        NUM_GROUPS=len(grads),
        INPUT_PRECISION=_input_precision(grads[0].dtype),
    )


def chain_factor_grads(grads: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    """All factor gradients ``dF_j = grads[j]^T @ inputs[j]``, one grouped launch per
    FACTORS_PER_LAUNCH pairs.

    Args:
        grads: ``G_j`` of shape ``(M, n_j)``, float32 / float16 / bfloat16, any strides.
        inputs: ``X_{j-1}`` of shape ``(M, n_{j-1})``, same M, dtype and device, any strides.

    Returns:
        Contiguous ``(n_j, n_{j-1})`` tensors in the input dtype, fp32 accumulation over M and one
        rounding. Widths above :data:`MAX_GROUPED_WIDTH` (and float64) take one matmul each.
    """
    _check_factor_grads(grads, inputs)
    if not grads:
        return []
    M = grads[0].shape[0]
    widths = [g.shape[1] for g in grads] + [i.shape[1] for i in inputs]
    dtype = grads[0].dtype
    if dtype not in _KERNEL_DTYPES or max(widths) > MAX_GROUPED_WIDTH or min(widths) == 0 or M == 0:
        return chain_factor_grads_ref(grads, inputs)

    outputs = [g.new_empty((g.shape[1], i.shape[1])) for g, i in zip(grads, inputs)]
    with device_guard(grads[0]):
        for start in range(0, len(grads), FACTORS_PER_LAUNCH):
            stop = start + FACTORS_PER_LAUNCH
            _launch_factor_grads(grads[start:stop], inputs[start:stop], outputs[start:stop])
    return outputs
