"""CUDA cases of the Gaussian sketch Y = X @ Omega (``fastrank.gaussian_sketch``): the randomized
effective rank's pass over the data.

:func:`sketch_kernel_cases` (CUDA): for X of ``rows`` x 4096 in bf16 and fp32 and a sketch of k
columns, the fastrank sketch (Omega drawn in a small buffer, one tensor-core GEMM over X) against
``torch.matmul(X, Omega)`` with the same Omega materialized (the baseline, cuBLAS), and one read
of X (``X.sum()``, the floor: no sketch can read X faster). The speed that matters is bytes of X
per second (:attr:`SketchCase.x_bytes` over the median), against the HBM bandwidth.

fp32 cases run with torch's fp32 matmul precision set to TF32 around every call (fastrank's
kernel and cuBLAS both follow that switch); with TF32 off the fp32 sketch runs on the FMA units
and is compute-bound (see ``fastrank/kernels/sketch.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._backend import cuda_matmul_tf32
from .cases import Case, Prepared

__all__ = ["SketchCase", "sketch_kernel_cases", "SKETCH_BASELINE", "SKETCH_FLOOR", "SKETCH_VARIANTS"]

SKETCH_BASELINE = "torch.matmul(X, Omega)"
SKETCH_FLOOR = "X.sum() (one read of X, floor)"
SKETCH_VARIANTS = (SKETCH_BASELINE, "gaussian_sketch", SKETCH_FLOOR)
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_WIDTH = 4096
_SEED = 7
_CHECKED_ROWS = 4096  # rows of Y compared against fp64 (an fp64 copy of all of X would be 32 GB)


@dataclass
class SketchCase(Case):
    """A :class:`Case` that also knows the bytes of X one call reads (for GB/s)."""

    x_bytes: int = 0


def _with_precision(fn: Callable[[], object], tf32: bool) -> Callable[[], object]:
    def call():
        with cuda_matmul_tf32(tf32):
            return fn()

    return call


def _sketch_error(variant: str, result, reference) -> dict:
    if variant == SKETCH_FLOOR:
        return {}
    got = result[:_CHECKED_ROWS].double()
    return {"error": float((got - reference).norm() / reference.norm())}


def sketch_kernel_cases(
    quick: bool = False,
    device: str = "cuda",
    rows: int | None = None,
    k: int = 256,
    dtypes: tuple[str, ...] | None = None,
    repeats: int | None = None,
    toy: bool = False,
) -> list[SketchCase]:
    """CUDA cases of the sketch of X (``rows`` x 4096) with k columns: bf16 and fp32 (TF32).

    Defaults: rows 1,000,000 (X is 16.4 GB in fp32, 8.2 GB in bf16: built once per case) and 5
    timed calls; with ``quick`` 65,536 rows (1 GB / 0.5 GB) and 10. k = 256 is the randomized
    method's sketch for matrices of 2,048 - 4,096 values (``_default_sketch_size``). The error
    is checked on the first 4,096 rows of Y against fp64. Without CUDA no cases, unless ``toy``:
    64 rows on any device (the same code at a size the tests run on the CPU).
    """
    if not (str(device).startswith("cuda") or toy):
        return []
    rows = rows or (64 if toy else 65_536 if quick else 1_000_000)
    dtypes = dtypes or tuple(_DTYPES)
    repeats = repeats or (10 if quick else 5)
    cases = []
    for dtype_name in dtypes:
        dtype = _DTYPES[dtype_name]
        tf32 = dtype == torch.float32

        def setup(dtype=dtype, tf32=tf32) -> Prepared:
            from ..sketch import gaussian_sketch, sketch_omega_ref

            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(rows, _WIDTH, device=device, dtype=dtype, generator=gen)
            omega = sketch_omega_ref(_WIDTH, k, _SEED, device=device, dtype=dtype)  # the op's Omega there

            def reference():
                omega64 = sketch_omega_ref(_WIDTH, k, _SEED, device=device, dtype=torch.float64)
                return x[:_CHECKED_ROWS].double() @ omega64

            variants = {
                SKETCH_BASELINE: lambda: torch.matmul(x, omega),
                "gaussian_sketch": lambda: gaussian_sketch(x, k, seed=_SEED),
                SKETCH_FLOOR: lambda: x.sum(),
            }
            return Prepared({name: _with_precision(fn, tf32) for name, fn in variants.items()}, reference)

        flops = 2.0 * rows * _WIDTH * k
        cases.append(
            SketchCase(
                suite="sketch-kernel",
                name=f"{dtype_name} X={rows}x{_WIDTH} k={k}",
                shape=f"X={rows}x{_WIDTH} k={k}",
                dtype=str(dtype).replace("torch.", ""),
                baseline=SKETCH_BASELINE,
                variants=SKETCH_VARIANTS,
                setup=setup,
                flops={SKETCH_BASELINE: flops, "gaussian_sketch": flops},
                error=_sketch_error,
                repeats=repeats,
                warmup=1,
                floor=SKETCH_FLOOR,
                note=f"X read once = {rows * _WIDTH * dtype.itemsize / 1e9:.1f} GB"
                + ("; fp32 matmuls in TF32 (both)" if tf32 else ""),
                x_bytes=rows * _WIDTH * dtype.itemsize,
            )
        )
    return cases
