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
        raise ValueError(f"{name}: gram=True (A is data) and hermitian=True (A is a Gram) exclude each other")
    if hermitian and A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name}: hermitian=True needs square matrices, got shape {tuple(A.shape)}")
    if hermitian and center:
        raise ValueError(f"{name}: center=True applies to data, not to a given Gram (hermitian=True)")
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
        exponent = math.frexp(peak)[1] - 1  # floor(log2(peak))
        if peak > 0 and abs(exponent) > safe:
            limit = 1000 if A.dtype == torch.float64 else 126
            A = A * 2.0 ** -max(-limit, min(limit, exponent))
    else:
        # max |a| without an |A| copy (65536 x 512 fp32: 10 ms against 73 ms); NaN and Inf propagate
        peak = torch.maximum(A.amax(dim=(-2, -1), keepdim=True), -A.amin(dim=(-2, -1), keepdim=True)).to(torch.float64)
        if not bool(torch.isfinite(peak).all()):
            raise ValueError(f"{name}: input of shape {tuple(A.shape)} contains NaN or Inf")
        exponent = torch.where(peak > 0, torch.floor(torch.log2(peak.clamp_min(1e-300))), torch.zeros_like(peak))
        if bool((exponent.abs() > safe).any()):
            limit = 1000 if A.dtype == torch.float64 else 126
            A = A * torch.exp2(-exponent.clamp(-limit, limit)).to(A.dtype)
    if center:
        mean = A.mean(dim=-2, keepdim=True, dtype=torch.float64)
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        A = A.to(work) - mean.to(work)
    return A


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

def _seed(seed):
    return 0 if seed is None else int(seed) % (2**31)
