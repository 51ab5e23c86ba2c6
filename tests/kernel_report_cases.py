"""Kernels with known compile results, for testing the compile gate (fastrank.kernels.report) itself.

    python tests/kernel_report_cases.py {gate,mismatch} [report options]

runs the report on one of the tables below instead of the package's. ``gate``: one config that
passes and one for each way to fail: spilling registers, too much shared memory for sm_90, not
compiling at all (a register cap below what the dot needs), plus one that the prune function
removes and that must not be compiled. ``mismatch``: a table whose argument names disagree with
the kernel. Results below: Triton 3.9, sm_90.
"""

import os
import sys

if __name__ == "__main__":
    # The kernels must be built for the compiler: Triton reads the flag when a kernel is decorated.
    # (Imported by the tests for the constants below, the module leaves the flag alone.)
    os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastrank.kernels import report  # noqa: E402

PASSING = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}  # 48 registers, 4 KiB shared memory
SPILLING = {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 64}  # 4 warps for a 256 x 256 fp32 accumulator: spills ~7 KB
OVERSIZED = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}  # 5 stages of 64 KiB: 320 KiB shared memory
UNCOMPILABLE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}  # with maxnreg=32 ptxas stops: "needs 58"
PRUNED = {"BLOCK_M": 32, "BLOCK_N": 512, "BLOCK_K": 32}  # wider than WIDTH: the prune function drops it


def _prune(configs, named_args, **kwargs):
    """Configs wider than the launch's WIDTH are never selected (as the chain kernel's BLOCK_NC)."""
    return [config for config in configs if config.kwargs["BLOCK_N"] <= kwargs["WIDTH"]]


@triton.jit
def _tile_product(
    # pointers
    a_ptr,  # (BLOCK_M, K) fp16
    b_ptr,  # (K, BLOCK_N) fp16
    c_ptr,  # (BLOCK_M, BLOCK_N) fp32
    # sizes
    K,
    # meta-parameters
    WIDTH: tl.constexpr,  # the launch's width bucket (read by the prune function only)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * K + (start + inner)[None, :])
        b = tl.load(b_ptr + (start + inner)[:, None] * BLOCK_N + cols[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], acc)


tile_product = triton.autotune(
    configs=[
        triton.Config(PASSING, num_warps=4, num_stages=2),
        triton.Config(SPILLING, num_warps=4, num_stages=2),
        triton.Config(OVERSIZED, num_warps=4, num_stages=5),
        triton.Config(UNCOMPILABLE, num_warps=4, num_stages=2, maxnreg=32),
        triton.Config(PRUNED, num_warps=4, num_stages=2),
    ],
    key=["K"],
    prune_configs_by={"early_config_prune": _prune},
)(_tile_product)

# The spilling config alone (4 s to compile; the quickest compile measured takes 0.18 s): with
# --timeout 0.05 it must fail as too slow on any machine.
tile_product_slow = triton.autotune(configs=[triton.Config(SPILLING, num_warps=4, num_stages=2)], key=["K"])(
    _tile_product
)

_ARGS = {"a_ptr": "*{dtype}:16", "b_ptr": "*{dtype}:16", "c_ptr": "*fp32:16", "K": "i32:16"}

TABLES = {
    "gate": {
        "tile_product": report.KernelSpec(
            module=__name__, kernel="tile_product", args=_ARGS, dtypes=("fp16",), constexprs={"WIDTH": (256,)}
        ),
        "tile_product_slow": report.KernelSpec(
            module=__name__, kernel="tile_product_slow", args=_ARGS, dtypes=("fp16",), constexprs={"WIDTH": (256,)}
        ),
    },
    "mismatch": {
        "tile_product": report.KernelSpec(
            module=__name__,
            kernel="tile_product",
            args={"a_ptr": "*fp16:16", "b_ptr": "*fp16:16", "out_ptr": "*fp32:16", "K": "i32:16"},
            dtypes=("fp16",),
            constexprs={"WIDTH": (256,)},
        ),
    },
}

if __name__ == "__main__":
    sys.exit(report.main(sys.argv[2:], kernels=TABLES[sys.argv[1]]))
