"""Per-dtype tolerances for comparisons against float64 references, scaled by reduction length."""

import math

import torch

# Unit roundoff of each dtype; fp16 / bf16 results are computed with fp32 accumulation, so the
# error is one rounding of the result per step plus the accumulated fp32 error.
_UNIT = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius-norm relative error of ``actual`` against ``expected`` (both cast to fp64)."""
    actual, expected = actual.detach(), expected.detach()
    diff = (actual.double() - expected.double()).norm()
    scale = expected.double().norm().clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff / scale)


def tolerance(dtype: torch.dtype, reduction: int, steps: int = 1) -> float:
    """Relative tolerance for ``steps`` chained products, each reducing over ``reduction`` terms."""
    if dtype == torch.float64:
        return 1e-10
    return 4.0 * _UNIT[dtype] * math.sqrt(reduction) * steps + 4.0 * _UNIT[dtype] * steps


def assert_close(actual, expected, dtype, reduction, steps=1, what="result"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    tol = tolerance(dtype, reduction, steps)
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.3e} ({dtype}, K={reduction})"
