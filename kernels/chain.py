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
    Both kernels read an int64 *descriptor table* with one row per factor (per group member):
    the tensors' addresses (``Tensor.data_ptr()``), their sizes and their strides in elements.
    A kernel turns an address back into a typed pointer (``int64 -> pointer``, as the grouped GEMM
    tutorial does), so factors and gradients are read in place with any strides: nothing is packed
    or copied. Outputs are allocated contiguous by the launchers. The table is built on the host
    and copied to the device once per distinct content (a small cache keyed on the content).
    Under the Triton interpreter this needs CPU tensors (the addresses are then host addresses).

Fallbacks
    Widths above :data:`MAX_ONCHIP_WIDTH` (chain) or :data:`MAX_GROUPED_WIDTH` (factor gradients),
    and float64, run one ``torch.matmul`` per step instead (cuBLAS on CUDA).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# The torch twins (the specification of these kernels, and the CPU path) live in the op file.
from fastrank.chain import (  # noqa: F401  (re-exported for the kernel tests)
    _check_chain,
    _check_factor_grads,
    chain_factor_grads_ref,
    chain_matmul_ref,
)

__all__ = [
    "MAX_ONCHIP_WIDTH",
    "MAX_GROUPED_WIDTH",
    "chain_matmul",
    "chain_matmul_ref",
    "chain_factor_grads",
    "chain_factor_grads_ref",
]

# Widest layer (max over n_0 .. n_k) that the one-launch chain kernel takes. The running row block
# is held on chip padded to BLOCK_N = next power of two >= the widest layer, and each step reads a
# whole (BLOCK_N, BLOCK_N) factor, so the kernel only pays off while that stays small.
# NOT MEASURED: no GPU was available when this was written. 256 is a guess from register and
# shared-memory budgets (a 256-wide fp16 row block of 64 rows is 32 KiB). To set it, time
# chain_matmul against one torch.matmul per step (benchmarks/test_chain_kernel_bench.py) for
# widths 64..1024, B in {512, 8192, 65536}, L in {2, 4, 8}, fp16 / bf16 / fp32, and take the
# largest width at which the kernel still wins for every B (per dtype if fp32 differs).
# What is known: the kernel compiles for sm_90 with Triton 3.9 (ahead of time, no GPU) at
# BLOCK_M 64, BLOCK_N 256 with 64 KiB shared memory (fp16 / bf16, BLOCK_NC 64) and 128 KiB (fp32,
# ieee), under H100's 227 KiB; larger configs that do not fit are skipped by the autotuner.
MAX_ONCHIP_WIDTH = 256

# Widest dimension (max over n_j, n_{j-1}) that the grouped factor-gradient kernel takes; above it
# each dF_j is one torch.matmul (cuBLAS, which splits the long reduction over M across programs;
# the grouped kernel reduces all of M inside one program).
# NOT MEASURED: no GPU was available. To set it, time chain_factor_grads against one torch.matmul
# per factor for d in {256, 1024, 4096}, M in {512, 8192, 65536}, L in {2, 4, 8}.
MAX_GROUPED_WIDTH = 1024

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether the kernels below were built for the interpreter (Triton decides at decoration time,
# i.e. when this module is imported). Tests compare it with the environment.
BUILT_FOR_INTERPRETER = _interpreting()


# --------------------------------------------------------------------------------------------
# autotune configs (one function per backend)
# --------------------------------------------------------------------------------------------


def _cuda_configs(kernel: str) -> list[triton.Config]:
    """Autotune configs of the CUDA backend for ``kernel`` ("chain" or "factor_grads").

    Under the interpreter a single config (several configs fail without a GPU, and the interpreter
    has nothing to tune). NOT MEASURED on a GPU yet: the lists are the usual candidates for tiles
    of this size; prune them once the benchmarks have run.
    """
    if kernel == "chain":
        # BLOCK_NC caps the output-column chunk; it is clamped to BLOCK_N by _prune_chain_configs.
        if _interpreting():
            return [triton.Config({"BLOCK_M": 32, "BLOCK_NC": 32}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": block_m, "BLOCK_NC": block_nc}, num_warps=warps, num_stages=stages)
            for block_m in (32, 64, 128)
            for block_nc in (64, 128)
            for warps in (4, 8)
            for stages in (2, 3)
        ]
    if kernel == "factor_grads":
        if _interpreting():
            return [
                triton.Config({"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
            ]
        return [
            triton.Config(
                {"BLOCK_P": block_p, "BLOCK_Q": block_q, "BLOCK_K": block_k},
                num_warps=warps,
                num_stages=stages,
            )
            for block_p, block_q in ((64, 64), (128, 64), (64, 128), (128, 128))
            for block_k in (32, 64)
            for warps, stages in ((4, 3), (8, 3), (4, 4))
        ]
    raise ValueError(f"unknown kernel {kernel!r}")


def _prune_chain_configs(configs, named_args, **kwargs):
    """Clamp BLOCK_NC to BLOCK_N (one chunk when the whole layer fits) and drop duplicates."""
    block_n = {**named_args, **kwargs}["BLOCK_N"]
    pruned, seen = [], set()
    for config in configs:
        block_nc = min(config.kwargs["BLOCK_NC"], block_n)
        key = (config.kwargs["BLOCK_M"], block_nc, config.num_warps, config.num_stages)
        if key not in seen:
            seen.add(key)
            pruned.append(
                triton.Config(
                    {**config.kwargs, "BLOCK_NC": block_nc},
                    num_warps=config.num_warps,
                    num_stages=config.num_stages,
                )
            )
    return pruned


def _size_bucket(n: int) -> int:
    """Autotune key for a size: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(n))


# --------------------------------------------------------------------------------------------
# descriptor tables
# --------------------------------------------------------------------------------------------

# Columns of a chain table row (one row per factor F_j, j = 1..k).
_CHAIN_COLUMNS = 6  # factor address, n_out, n_in, factor stride_out, factor stride_in, dest address
# Columns of a factor-gradient table row (one row per pair (G_j, X_{j-1})).
_GRAD_COLUMNS = 9  # grad address, input address, output address, n_p, n_q,
#                    grad stride_m, grad stride_p, input stride_m, input stride_q

_TABLE_CACHE: dict[tuple, Tensor] = {}
_TABLE_CACHE_SIZE = 512


def _device_table(rows: list[list[int]], device: torch.device) -> Tensor:
    """An int64 device tensor holding ``rows``, copied to the device once per distinct content."""
    key = (str(device), tuple(v for row in rows for v in row))
    table = _TABLE_CACHE.get(key)
    if table is None:
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.clear()
        table = torch.tensor(rows, dtype=torch.int64, device=device)
        _TABLE_CACHE[key] = table
    return table


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision matching torch.matmul: fp32 uses TF32 only where torch allows it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16 / bf16 operands


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
    x_ptr,  # (M, n_0), any strides; its element type is the dtype of every factor and output
    table_ptr,  # (NUM_FACTORS, 6) int64, row j: address of F_{j+1} (n_out, n_in), n_out, n_in,
    #            F_{j+1} stride_out, F_{j+1} stride_in, address of the contiguous (M, n_out)
    #            destination of X_{j+1} (an output, or staging scratch when not returned)
    # sizes
    M,
    NUM_FACTORS,
    M_BUCKET,  # autotune key only
    # strides
    stride_xm,
    stride_xk,
    # meta-parameters
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
    program, and the next step reloads the block (from L1/L2, it was just written). Destinations
    that are not returned alternate between two scratch buffers, so a step never overwrites what a
    slower warp may still be reading. No program reads another program's rows.
    """
    dtype = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)

    n_in = tl.load(table_ptr + 2)
    block = tl.load(
        x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
        mask=row_mask[:, None] & (cols[None, :] < n_in),
        other=0.0,
    )
    for j in range(NUM_FACTORS):
        entry = table_ptr + j * 6
        factor_ptr = tl.load(entry).to(tl.pointer_type(dtype))
        n_out = tl.load(entry + 1)
        n_in = tl.load(entry + 2)
        stride_out = tl.load(entry + 3)
        stride_in = tl.load(entry + 4)
        dest_ptr = tl.load(entry + 5).to(tl.pointer_type(dtype))
        if BLOCK_NC == BLOCK_N:
            # F_j^T as a (BLOCK_N, BLOCK_N) tile: element [c, r] = F_j[r, c], zero outside.
            factor_t = tl.load(
                factor_ptr + cols[:, None] * stride_in + cols[None, :] * stride_out,
                mask=(cols[:, None] < n_in) & (cols[None, :] < n_out),
                other=0.0,
            )
            acc = tl.dot(block, factor_t, input_precision=INPUT_PRECISION)
            block = acc.to(dtype)
            out_ptrs = dest_ptr + rows64[:, None] * n_out + cols[None, :]
            out_mask = row_mask[:, None] & (cols[None, :] < n_out)
            if RETURN_ALL:
                tl.store(out_ptrs, block, mask=out_mask)
            elif j == NUM_FACTORS - 1:
                tl.store(out_ptrs, block, mask=out_mask)
        else:
            for chunk_start in tl.static_range(0, BLOCK_N, BLOCK_NC):
                if chunk_start < n_out:
                    chunk_cols = chunk_start + tl.arange(0, BLOCK_NC)
                    factor_t = tl.load(
                        factor_ptr + cols[:, None] * stride_in + chunk_cols[None, :] * stride_out,
                        mask=(cols[:, None] < n_in) & (chunk_cols[None, :] < n_out),
                        other=0.0,
                    )
                    acc = tl.dot(block, factor_t, input_precision=INPUT_PRECISION)
                    tl.store(
                        dest_ptr + rows64[:, None] * n_out + chunk_cols[None, :],
                        acc.to(dtype),
                        mask=row_mask[:, None] & (chunk_cols[None, :] < n_out),
                    )
            # The barrier makes this program's stores above visible to all of its threads; the
            # reload reads through L2 (".cg"), never from a possibly stale L1 line.
            tl.debug_barrier()
            block = tl.load(
                dest_ptr + rows64[:, None] * n_out + cols[None, :],
                mask=row_mask[:, None] & (cols[None, :] < n_out),
                other=0.0,
                cache_modifier=".cg",
            )


# --------------------------------------------------------------------------------------------
# chain matmul: torch twin and launcher
# --------------------------------------------------------------------------------------------


def _chain_matmul_torch(x: Tensor, factors: Sequence[Tensor], return_all: bool) -> list[Tensor]:
    """The fallback: one torch.matmul per step (cuBLAS on CUDA, fp32 accumulation for halves)."""
    outputs, block = [], x
    for factor in factors:
        block = torch.matmul(block, factor.T)
        outputs.append(block)
    return outputs if return_all else outputs[-1:]


def chain_matmul(x: Tensor, factors: Sequence[Tensor], return_all: bool = True) -> list[Tensor]:
    """Run ``x`` through the chain ``F_1 .. F_k`` in one kernel launch.

    Args:
        x: ``(M, n_0)``, float32 / float16 / bfloat16 (float64 takes the torch path), any strides.
        factors: ``F_j`` of shape ``(n_j, n_{j-1})``, same dtype and device as ``x``, any strides.
        return_all: return ``[X_1, ..., X_k]``; otherwise ``[X_k]`` only.

    Returns:
        Contiguous ``(M, n_j)`` tensors in ``x.dtype``; see the module docstring for the rounding.
        Widths above :data:`MAX_ONCHIP_WIDTH` run one torch.matmul per step instead.
    """
    _check_chain(x, factors)
    k = len(factors)
    M = x.shape[0]
    widths = [x.shape[1]] + [f.shape[0] for f in factors]
    if x.dtype not in _KERNEL_DTYPES or M == 0 or min(widths) == 0 or max(widths) > MAX_ONCHIP_WIDTH:
        return _chain_matmul_torch(x, factors, return_all)

    block_n = _size_bucket(max(widths))
    outputs = [x.new_empty((M, n)) for n in (widths[1:] if return_all else widths[-1:])]
    dests = [out.data_ptr() for out in outputs]
    if not return_all:
        # Intermediates are staged in two alternating scratch buffers when a step needs several
        # column chunks (the smallest chunk any config may pick is 32 columns).
        scratch = x.new_empty((2, M * max(widths[1:-1]))) if k > 1 and block_n > 32 else None
        dests = [scratch[j % 2].data_ptr() if scratch is not None else 0 for j in range(k - 1)] + dests
    table = _device_table(
        [
            [f.data_ptr(), f.shape[0], f.shape[1], f.stride(0), f.stride(1), dest]
            for f, dest in zip(factors, dests)
        ],
        x.device,
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    _chain_matmul_kernel[grid](
        x,
        table,
        M,
        k,
        _size_bucket(M),
        x.stride(0),
        x.stride(1),
        BLOCK_N=block_n,
        RETURN_ALL=return_all,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    return outputs


# --------------------------------------------------------------------------------------------
# factor gradients: kernel
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_cuda_configs("factor_grads"), key=["M_BUCKET", "WIDTH_BUCKET", "NUM_GROUPS"])
@triton.jit
def _factor_grads_kernel(
    # pointers
    dtype_ptr,  # (M, n_p) the first gradient; only its element type is used (the table has all)
    table_ptr,  # (NUM_GROUPS, 9) int64, row j: address of G_j (M, n_p), address of X_{j-1} (M, n_q),
    #            address of the contiguous (n_p, n_q) output dF_j, n_p, n_q,
    #            G_j stride_m, G_j stride_p, X_{j-1} stride_m, X_{j-1} stride_q
    # sizes
    M,
    NUM_GROUPS,
    M_BUCKET,  # autotune key only
    WIDTH_BUCKET,  # autotune key only
    # strides: per group, in the table
    # meta-parameters
    BLOCK_P: tl.constexpr,  # rows of dF_j per program
    BLOCK_Q: tl.constexpr,  # columns of dF_j per program
    BLOCK_K: tl.constexpr,  # reduction (M) step
    INPUT_PRECISION: tl.constexpr,
):
    """Grouped GEMM: one program per (BLOCK_P, BLOCK_Q) tile of one dF_j, the whole reduction over M
    inside the program (fp32 accumulator), one rounding to the output dtype at the end."""
    dtype = dtype_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)

    # Find this program's group: the tiles of group 0 come first, then those of group 1, ...
    group = pid * 0
    group_start = pid * 0
    tiles_before = pid * 0
    for g in range(NUM_GROUPS):
        n_p = tl.load(table_ptr + g * 9 + 3)
        n_q = tl.load(table_ptr + g * 9 + 4)
        tiles = tl.cdiv(n_p, BLOCK_P) * tl.cdiv(n_q, BLOCK_Q)
        inside = (pid >= tiles_before) & (pid < tiles_before + tiles)
        group = tl.where(inside, g, group)
        group_start = tl.where(inside, tiles_before, group_start)
        tiles_before += tiles

    entry = table_ptr + group * 9
    grad_ptr = tl.load(entry).to(tl.pointer_type(dtype))
    input_ptr = tl.load(entry + 1).to(tl.pointer_type(dtype))
    out_ptr = tl.load(entry + 2).to(tl.pointer_type(dtype))
    n_p = tl.load(entry + 3)
    n_q = tl.load(entry + 4)
    stride_gm = tl.load(entry + 5)
    stride_gp = tl.load(entry + 6)
    stride_im = tl.load(entry + 7)
    stride_iq = tl.load(entry + 8)

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
        # G_j^T tile (BLOCK_P, BLOCK_K): element [p, m] = G_j[m, p]
        grad_t = tl.load(
            grad_ptr + offs_p[:, None] * stride_gp + m64[None, :] * stride_gm,
            mask=p_mask[:, None] & m_mask[None, :],
            other=0.0,
        )
        # X_{j-1} tile (BLOCK_K, BLOCK_Q)
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
# factor gradients: torch twin and launcher
# --------------------------------------------------------------------------------------------


def chain_factor_grads(grads: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    """All factor gradients ``dF_j = grads[j]^T @ inputs[j]`` in one grouped launch.

    Args:
        grads: ``G_j`` of shape ``(M, n_j)``, float32 / float16 / bfloat16, any strides.
        inputs: ``X_{j-1}`` of shape ``(M, n_{j-1})``, same M, dtype and device, any strides.

    Returns:
        Contiguous ``(n_j, n_{j-1})`` tensors in the input dtype, fp32 accumulation over M and one
        rounding. Widths above :data:`MAX_GROUPED_WIDTH` (and float64) take one torch.matmul each.
    """
    _check_factor_grads(grads, inputs)
    if not grads:
        return []
    M = grads[0].shape[0]
    widths = [g.shape[1] for g in grads] + [i.shape[1] for i in inputs]
    dtype = grads[0].dtype
    if dtype not in _KERNEL_DTYPES or max(widths) > MAX_GROUPED_WIDTH or min(widths) == 0 or M == 0:
        return [torch.matmul(g.T, i) for g, i in zip(grads, inputs)]

    outputs = [g.new_empty((g.shape[1], i.shape[1])) for g, i in zip(grads, inputs)]
    table = _device_table(
        [
            [g.data_ptr(), i.data_ptr(), out.data_ptr(), g.shape[1], i.shape[1]]
            + [g.stride(0), g.stride(1), i.stride(0), i.stride(1)]
            for g, i, out in zip(grads, inputs, outputs)
        ],
        grads[0].device,
    )

    def grid(meta):
        tiles = sum(
            triton.cdiv(g.shape[1], meta["BLOCK_P"]) * triton.cdiv(i.shape[1], meta["BLOCK_Q"])
            for g, i in zip(grads, inputs)
        )
        return (tiles,)

    _factor_grads_kernel[grid](
        grads[0],
        table,
        M,
        len(grads),
        _size_bucket(M),
        _size_bucket(max(widths)),
        INPUT_PRECISION=_input_precision(dtype),
    )
    return outputs
