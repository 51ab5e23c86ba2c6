"""The exact method: fp64 eigenvalues of the smaller-side Gram, with the rounding check that sends
ill-conditioned matrices to fp64 ``svdvals``; and the fast path of one small matrix on the CPU."""

from __future__ import annotations

import math

import torch

from .common import _EPS, _REAL_DTYPES, _check_symmetric
from .eigensolver import eigvalsh as _eigvalsh

_ROW_BLOCK = 16384  # rows per fp32 Gram block summed in fp64 (4 blocks for 65536 rows)
_GRAM_SPLIT = 128  # Grams of at least 2x this many columns multiply only their upper block triangle
_EXACT_TOL = 1e-11  # relative entropy error above which gram=False exact falls back to svdvals(A)
# One matrix with m n min(m, n) <= this is "small": exact runs without _prepare's bookkeeping and,
# for gram=False, takes fp64 svdvals of A instead of the Gram route (_svdvals_first). Measured on the
# 2-core CPU, one thread, whole effective_rank calls, Gram route / svdvals route: 64 x 64 1.14,
# 96 x 48 1.07, 2048 x 8 1.24 (all below the bound: svdvals), 72 x 72 0.95, 128 x 64 0.83,
# 512 x 32 0.96 (above: Gram).
_SMALL_WORK = 64**3
_SMALL_NORM = (2.0**-200, 2.0**200)  # ||A||_F range in which that path needs no scaling (see _small_values)


def _add_gram(gram, block):
    """gram += block^T block, in fp64, for block (..., rows, cols) fp32 or fp64.

    Only the upper block triangle is multiplied when cols >= 2 * _GRAM_SPLIT (the column halves
    X1^T [X1 X2] and X2^T X2: 3/4 of the products; 65536 x 512 fp32 on 2 CPU cores: 0.19 s against
    0.31 s for one X^T X). The lower triangle is left as it is: ``_gram_eigenvalues`` reads the
    upper one.
    """
    cols = block.shape[-1]
    half = cols // 2 if cols >= 2 * _GRAM_SPLIT else cols
    for start in range(0, cols, half):
        left = block[..., :, start : start + half]
        gram[..., start : start + half, start:] += (left.mT @ block[..., :, start:]).to(torch.float64)


def _smaller_gram(A, fp64_products):
    """(..., r, r) fp64 Gram of the smaller side, A^T A if n <= m else A A^T: its upper triangle.

    Only the upper triangle is meaningful (the lower one may be zero or differ by rounding): read
    it with ``eigvalsh(..., UPLO="U")``, as ``_gram_eigenvalues`` does.
    """
    X = A if A.shape[-1] <= A.shape[-2] else A.mT
    rows, cols = X.shape[-2:]
    if fp64_products or A.dtype == torch.float64:
        dtype, block_rows = torch.float64, rows
    else:
        dtype, block_rows = torch.float32, _ROW_BLOCK
    if rows <= block_rows and cols < 2 * _GRAM_SPLIT:
        # one product, no accumulator (16 x 16: 4 us against 33 us for zeros, += and symmetrize)
        X = X.to(dtype)
        return (X.mT @ X).to(torch.float64)
    gram = torch.zeros(*X.shape[:-2], cols, cols, dtype=torch.float64, device=X.device)
    for start in range(0, rows, block_rows):
        _add_gram(gram, X[..., start : start + block_rows, :].to(dtype))
    return gram


def _gram_eigenvalues(A, fp64_products):
    """(..., r) ascending fp64 eigenvalues of the smaller-side Gram, clamped at 0."""
    return _eigvalsh(_smaller_gram(A, fp64_products), upper=True).clamp_min(0)


def _svdvals_first(A, gram, hermitian):
    """Whether the exact values of A come from fp64 ``svdvals`` of A rather than from the Gram.

    For one small matrix (gram=False) the Gram route's fixed cost (its product and the rounding
    estimate below, about 25 small tensor operations) exceeds what its cheaper eigensolver saves.
    Batches take the Gram route at every size: batched eigvalsh of Grams is 1.5x faster than
    batched svdvals already at 1000 x 16 x 16 and the estimate is amortized.
    """
    m, n = A.shape[-2:]
    return not (gram or hermitian) and A.numel() == m * n and m * n * min(m, n) <= _SMALL_WORK


def _exact_values(A, gram, hermitian, tolerance=_EXACT_TOL):
    """(..., r) fp64 nonnegative values v with p = v / sum(v)."""
    if hermitian:
        return _eigvalsh(A.to(torch.float64)).abs()
    if gram:
        return _gram_eigenvalues(A, fp64_products=False)
    if _svdvals_first(A, gram, hermitian):
        return torch.linalg.svdvals(A.double())
    lam = _gram_eigenvalues(A, fp64_products=True)
    s, suspect = _gram_singular_values(lam, *A.shape[-2:], tolerance)
    if bool(suspect.any()):
        s = s.clone()
        s[suspect] = torch.linalg.svdvals(A[suspect].to(torch.float64))
    return s


def _gram_singular_values(lam, m, n, tolerance):
    """Singular values ``sqrt(lam)`` of an m x n matrix from its fp64 Gram eigenvalues ``lam`` (..., r),
    and a bool (...) mask of the matrices whose entropy the Gram's rounding may move by more than
    ``tolerance`` (relative): those need ``svdvals`` of the matrix itself."""
    s = lam.sqrt()
    # First-order estimate of the entropy error caused by the Gram's rounding: each eigenvalue is
    # off by about eta, each singular value by ds = min(sqrt(eta), eta / (2 s)), and
    # dH/ds_i = -(log p_i + H) / S. eta follows the usual sqrt(m + n) eps ||A||_2^2 model of
    # accumulated rounding, not the (m + n) worst case: on 64 Gaussian 512 x 512 weights the
    # estimate still exceeds the true error (at most 1e-13, against fp64 svdvals) 60-fold, where
    # the worst case flagged 19 of them for an SVD they did not need. The error bound taken is
    # sum_i ds_i (H - log q_i) / S with q_i = max(s_i, ds_i) / S. An all-zero matrix gives NaN
    # (0 / 0), which compares false: it is never recomputed.
    eta = math.sqrt(m + n) * _EPS * lam[..., -1:]  # eigvalsh is ascending: the last is ||A||_2^2
    ds = eta / torch.maximum(2 * s, eta.sqrt())  # min(sqrt(eta), eta / (2 s))
    total = s.sum(-1, keepdim=True)
    entropy = torch.special.entr(s / total).sum(-1, keepdim=True).clamp_min(0)
    error = (ds * (entropy + total.log() - torch.maximum(s, ds).log())).sum(-1, keepdim=True) / total
    return s, (error > tolerance * entropy.clamp_min(1)).squeeze(-1)


def _small_values(A, gram, hermitian, center, method, name):
    """``_exact_values`` of one small matrix on the CPU, without ``_prepare``'s bookkeeping, or None.

    The fixed cost of a call on a small matrix was that bookkeeping, not the spectrum: on one
    16 x 16 fp32 matrix (2-core CPU, one thread; 240 us a call) the per-matrix NaN and scale checks
    in tensors took 41 us, the Gram's accumulator and symmetrization 33 us, the rounding estimate
    about 100 us and the entropy with its zero mask 33 us, around an eigvalsh of 18 us: some 60
    tensor operations of 1.5-3 us each. Here one matrix with m n min(m, n) <= ``_SMALL_WORK``,
    "exact" or "auto", costs one fp64 copy, ||A||_F read back as a Python number (NaN, Inf, zero
    and scale in one check) and the spectrum: fp64 ``svdvals`` of A for gram=False (see
    ``_svdvals_first``), eigvalsh of the fp64 Gram (gram=True) or of A (hermitian=True). With
    ||A||_F in ``_SMALL_NORM`` the fp64 Gram neither overflows nor loses a value that matters, and
    LAPACK scales internally. Anything else returns None and takes the general path, which raises
    the documented errors, scales, or returns -inf: a batch, another device or method, NaN/Inf, a
    zero matrix (also after centering), ||A||_F outside _SMALL_NORM or overflowing fp64. Every
    value vector returned has a positive sum (A is not zero). hermitian=True checks symmetry as
    ``_prepare`` does (``_check_symmetric``; ``name``, the public function, heads its error).
    """
    if not (
        isinstance(A, torch.Tensor)
        and A.is_cpu
        and (method == "auto" or method == "exact")
        and A.dtype in _REAL_DTYPES
        and not (gram and hermitian)
    ):
        return None
    shape = A.shape
    if len(shape) < 2:
        return None
    m, n = shape[-2], shape[-1]
    if not 0 < A.numel() == m * n or m * n * min(m, n) > _SMALL_WORK or (hermitian and (m != n or center)):
        return None
    X = A if len(shape) == 2 else A.reshape(m, n)
    if X.dtype != torch.float64:
        X = X.double()
    if center:
        X = X - X.mean(0, keepdim=True)
    if not _SMALL_NORM[0] <= torch.linalg.vector_norm(X).item() <= _SMALL_NORM[1]:  # also False for NaN
        return None
    if hermitian:
        low, high = torch.aminmax(X)
        _check_symmetric(X, max(high.item(), -low.item()), A.dtype, name)
        values = torch.linalg.eigvalsh(X).abs()
    elif gram:
        values = _gram_eigenvalues(X, fp64_products=True)
    else:
        values = torch.linalg.svdvals(X)
    return values if len(shape) == 2 else values.reshape(*shape[:-2], -1)
