"""What every method of the rank family shares: the result type, input checks and scaling, and the
entropy of a spectrum. See :mod:`fastrank.rank` for the definitions."""

from __future__ import annotations

import math
import sys
from collections import namedtuple

import torch

RankEstimate = namedtuple("RankEstimate", ["estimate", "lower", "upper"])
RankEstimate.__doc__ = """Estimate with lower/upper bounds, each a float64 tensor of the batch shape."""

_EPS = torch.finfo(torch.float64).eps
_REAL_DTYPES = frozenset(
    (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
     torch.uint8, torch.bool)
)
_METHODS = ("auto", "exact", "randomized", "slq")


def _is_dtensor(A):
    """Whether A is a ``torch.distributed`` DTensor: a sharded weight, measured by ``fastrank.sharded``."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    return module is not None and isinstance(A, module.DTensor)


def _prepare(A, gram, hermitian, center, method, name):
    if not isinstance(A, torch.Tensor):
        A = torch.as_tensor(A)
    if method not in _METHODS:
        raise ValueError(f"{name}: method must be one of {_METHODS}, got {method!r}")
    if A.is_complex():
        raise TypeError(f"{name}: complex input is not supported, got {A.dtype}")
    if A.dim() < 2:
        raise ValueError(f"{name}: expected a matrix or a batch of matrices (..., m, n), got shape {tuple(A.shape)}")
    if A.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty matrix, got shape {tuple(A.shape)}")
    if gram and hermitian:
        raise ValueError(
            f"{name}: gram=True (A is data X: the spectrum of X X^T) and hermitian=True (A is itself a symmetric "
            "PSD matrix, such as a Gram X^T X) exclude each other; pass the one that describes A"
        )
    if hermitian and A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name}: hermitian=True needs square matrices, got shape {tuple(A.shape)}")
    if hermitian and center:
        raise ValueError(f"{name}: center=True applies to data, not to a given Gram (hermitian=True)")
    given = A.dtype
    if not A.is_floating_point():
        A = A.to(torch.float64)
    if A.dtype in (torch.float16, torch.bfloat16):
        A = A.to(torch.float32)  # exact; half-precision products would overflow at 256
    # All three quantities are scale-invariant. Matrices whose largest entry is far from 1 are
    # scaled by a power of two (exact) to [1, 2), so that fp32 products of data at 1e20 or 1e-25
    # neither overflow nor underflow; others are used as they are (no copy).
    safe = 200 if A.dtype == torch.float64 else 20
    m, n = A.shape[-2:]
    if A.numel() == m * n:
        # one matrix: max |a| as a Python number (aminmax and two items: ~3 us, where the tensor
        # bookkeeping below costs ~35 us on a 16 x 16 matrix, 2-core CPU)
        low, high = torch.aminmax(A)
        peak = max(high.item(), -low.item())
        if not math.isfinite(peak):
            raise ValueError(f"{name}: input of shape {tuple(A.shape)} contains NaN or Inf")
        if hermitian:
            _check_symmetric(A, peak, given, name)
        exponent = math.frexp(peak)[1] - 1  # floor(log2(peak))
        if peak > 0 and abs(exponent) > safe:
            limit = 1000 if A.dtype == torch.float64 else 126
            A = A * 2.0 ** -max(-limit, min(limit, exponent))
    else:
        # max |a| without an |A| copy (65536 x 512 fp32: 10 ms against 73 ms); NaN and Inf propagate
        peak = torch.maximum(A.amax(dim=(-2, -1), keepdim=True), -A.amin(dim=(-2, -1), keepdim=True)).to(torch.float64)
        if not bool(torch.isfinite(peak).all()):
            raise ValueError(f"{name}: input of shape {tuple(A.shape)} contains NaN or Inf")
        if hermitian:
            _check_symmetric(A, peak, given, name)
        exponent = torch.where(peak > 0, torch.floor(torch.log2(peak.clamp_min(1e-300))), torch.zeros_like(peak))
        if bool((exponent.abs() > safe).any()):
            limit = 1000 if A.dtype == torch.float64 else 126
            A = A * torch.exp2(-exponent.clamp(-limit, limit)).to(A.dtype)
    if center:
        mean = A.mean(dim=-2, keepdim=True, dtype=torch.float64)
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        A = A.to(work) - mean.to(work)
    return A


def _symmetry_tolerance(dtype):
    """The largest max|A - A^T| / max|A| that hermitian=True accepts for a matrix given in ``dtype``.

    sqrt(eps) of that dtype (fp32: 3.5e-4, fp64: 1.5e-8; exact integers: as fp64). A Gram formed
    by one product is symmetric to the bit on the CPU (X^T X in fp32, 65536 x 64: max|A - A^T| =
    0), but one centered by an outer product of column sums is not, growing with (mean / std)^2:
    in fp64 (1000 x 64 data) 6.9e-12 max|A| at a mean of 100 std, 6.7e-9 at 3000, 1.1e-7 at
    10000. sqrt(eps) accepts that up to a mean of ~4000 std in fp64 (in fp32 ~25 std: 5.8e-5 at
    10, 4.5e-4 at 30, its entries as uncertain; the error says to pass (A + A.mT) / 2), while a
    matrix that is not symmetric (the triangles of a Gaussian matrix differ by ~ max|A|) stays
    above it by orders of magnitude.
    """
    return math.sqrt(torch.finfo(dtype).eps if dtype.is_floating_point else _EPS)


def _check_symmetric(A, peak, dtype, name):
    """Raise ValueError unless every matrix of A (..., n, n) is symmetric up to rounding.

    ``peak``: max |A| per matrix, a Python number (one matrix) or a (..., 1, 1) tensor; ``dtype``:
    the dtype A was given in (``_symmetry_tolerance``). The cost is a transpose copy, one
    subtraction and one reduction over A; measured against whole exact effective_rank calls on
    fp32 Grams (2-core CPU, shared): 1.2 of 49 ms at 1024 x 1024, 0.13 of 7.5 ms for 1000 x 16 x 16,
    0.4-0.65 of 26 ms for 256 x 64 x 64, 5 of 34 us for one 16 x 16 matrix (the small path's
    aminmax included): no switch to skip it.
    hermitian=True methods read one triangle (exact) or multiply by A (randomized, slq): either way a
    matrix that is not symmetric would give a number without meaning.
    """
    # A - A^T is antisymmetric: its max is max |A - A^T|. The transpose is copied first: torch's
    # blocked copy and a contiguous subtraction take 1.7 ms on 1024 x 1024 fp32 against 3.7 ms for
    # subtracting the strided view (2-core CPU)
    asymmetry = (A - A.mT.contiguous()).amax(dim=(-2, -1))
    limit = _symmetry_tolerance(dtype)
    if isinstance(peak, float):
        value, scale, where = asymmetry.item(), peak, ""
        if not value > limit * scale:
            return
    else:
        scale = peak.reshape(asymmetry.shape)
        excess = asymmetry.to(torch.float64) > limit * scale
        if not bool(excess.any()):
            return
        index = tuple(int(i) for i in excess.nonzero()[0])
        value, scale = float(asymmetry[index]), float(scale[index])
        where = f" at batch index {index[0] if len(index) == 1 else index}"
    raise ValueError(
        f"{name}: hermitian=True needs a symmetric PSD matrix, but the matrix{where} of shape "
        f"{tuple(A.shape[-2:])} is not symmetric: max |A - A^T| = {value:.3g} = {value / scale:.3g} max |A|, "
        f"above the {limit:.2g} max |A| allowed for {dtype}. For data X use gram=True (the spectrum of "
        "X X^T) or the default (singular values of A); for a Gram off by more than rounding, pass (A + A.mT) / 2"
    )


def _num_values(A, hermitian):
    m, n = A.shape[-2:]
    return n if hermitian else min(m, n)


def _power(gram, hermitian):
    """p is proportional to lambda^(1/power), lambda the eigenvalues of the Gram (or of A)."""
    return 1 if (gram or hermitian) else 2


def _entropy_nonzero(values):
    """H of p = values / sum(values) over the last dim, for values with a positive sum."""
    return torch.special.entr(values / values.sum(-1, keepdim=True)).sum(-1)  # entr(p) = -p log p


def _entropy(values):
    """H of p = values / sum(values) over the last dim; -inf where all values are zero."""
    # The values are finite and nonnegative, so the only NaN is 0 / 0, where all values are zero
    # (one nan_to_num: 2 us, a mask and torch.where: 11 us on one matrix)
    return torch.nan_to_num(_entropy_nonzero(values), nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _stable_of(values):
    """sum(v^2) / max(v)^2 over the last dim; 0 where all values are zero."""
    top = values.amax(-1)
    return torch.where(
        top > 0, values.square().sum(-1) / top.square().clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(top)
    )

def _stable_bounds(floors, lead, numerator, budget, hermitian):
    """RankEstimate of the stable rank from lower bounds on the top values (randomized and slq).

    Values v: the eigenvalues of A^T A for data (hermitian=False), the |eigenvalues| of a
    symmetric A. The stable rank is sum v^2 / v_1^2 (symmetric A) resp. sum v / v_1 (data), whose
    numerator ||A||_F^2 is known: ``numerator`` (as computed) and ``budget`` (with its rounding,
    an upper bound), each (...). ``floors`` (..., k): descending, floors_i <= v_i; ``lead`` (...):
    the estimate of v_1. Then v_1 >= floors_1, and v_1 <= budget - sum_{i>=2} floors_i (the other
    values are at least their floors): power 1 for data, power 2 for a symmetric A.
    """
    tiny = torch.finfo(torch.float64).tiny
    power = 2 if hermitian else 1
    floors = floors.pow(power)
    top_low = floors[..., 0]
    top_high = (budget - floors[..., 1:].sum(-1)).clamp_min(0)
    lead_value = lead.abs().pow(power)
    zero = torch.zeros_like(numerator)
    lower = torch.where(top_high > 0, numerator / top_high.clamp_min(tiny), zero)
    upper = torch.where(
        top_low > 0, budget / top_low.clamp_min(tiny), torch.where(numerator > 0, torch.full_like(numerator, math.inf), zero)
    )
    estimate = torch.where(lead_value > 0, numerator / lead_value.clamp_min(tiny), zero)
    return RankEstimate(torch.minimum(torch.maximum(estimate, lower), upper), lower, upper)


def _seed(seed):
    return 0 if seed is None else int(seed) % (2**31)
