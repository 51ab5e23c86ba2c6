"""Per-dtype tolerances for comparisons against float64 references, scaled by reduction length.

The kernels and their torch twins accumulate every product in fp32 (fp64 for fp64) and round each
returned result once to the input dtype; a chain of ``steps`` products rounds ``steps`` times, and
each later step carries the earlier roundings forward. Compared with an fp64 evaluation of the
same (rounded) inputs, a result is therefore off by at most about

    steps * (u + u_acc * sqrt(K))          (relative, Frobenius norm)

with u the unit roundoff of the dtype (one rounding of each step's output), u_acc that of the
accumulation (fp32) and K the reduction length (random rounding errors grow like sqrt(K)). The
bound below allows twice that. It is derived from the fp32-accumulated computation, not from a
half-precision one: for bf16, 4 steps and K = 256 it is 3.3%, so an all-zero result (100%), a
transposed factor or a dropped step fail (tests/test_tolerance.py holds it to that).
"""

import math

import torch

# Unit roundoff of each dtype.
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
    """Relative tolerance for ``steps`` chained products, each reducing over ``reduction`` terms,
    accumulated in fp32 (fp64 for fp64) and rounded once per step to ``dtype``."""
    if dtype == torch.float64:
        return 1e-10
    accumulation = _UNIT[torch.float32]
    return 2.0 * steps * (_UNIT[dtype] + accumulation * math.sqrt(reduction))


def assert_close(actual, expected, dtype, reduction, steps=1, what="result"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    tol = tolerance(dtype, reduction, steps)
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.3e} ({dtype}, K={reduction}, steps={steps})"
