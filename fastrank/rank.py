"""Effective rank at scale: spectral entropy, effective rank, stable rank.

Definitions (DESIGN.md). For a matrix A (m x n) let s be its singular values; with ``gram=True``
the spectrum is that of the Gram X X^T of data X = A (s_i = sigma_i(A)^2); with
``hermitian=True`` A is a symmetric PSD matrix and s are its eigenvalues (their absolute values,
which are the singular values of any symmetric A). With p = s / sum(s):

- ``spectral_entropy`` H = -sum p log p, natural log (the rho of Huh et al., 2103.10427);
- ``effective_rank`` exp(H) (Roy & Vetterli 2007);
- ``stable_rank`` ||M||_F^2 / ||M||_2^2 of M = A (or of the Gram X X^T when gram=True).

All-zero matrix: spectral_entropy = -inf, effective_rank = 0, stable_rank = 0 (the rank of the
zero matrix; exp(-inf) = 0 keeps effective_rank = exp(spectral_entropy)). Never NaN.

Methods (``method=``):

- ``"exact"``: fp64 ``eigvalsh`` of the smaller-side Gram (A^T A or A A^T), never a full SVD of
  a Gram and never the N x N Gram of data. For gram=False the singular values are square roots of
  the Gram's eigenvalues; where the Gram's rounding (about sqrt(m + n) eps ||A||_2^2 per eigenvalue)
  could move the entropy by more than 1e-11 relative (singular values below ~1e-6 of the largest,
  e.g. a rank-deficient A), those matrices are recomputed with fp64 ``svdvals`` of A itself.
  fp32/fp16/bf16 data with gram=True form the Gram from fp32 products over row blocks
  of 16384 rows, summed in fp64; everything else is formed in fp64. One small matrix on the CPU
  (m n min(m, n) <= 64^3, not a batch) skips the per-matrix bookkeeping (``_small_values``; its
  Gram, for gram=True, is formed in fp64) and, for gram=False, takes fp64 ``svdvals`` of A
  directly: there the Gram route's product and rounding check cost more than its cheaper
  eigensolver saves (one 16 x 16 call: 240 -> 35 us on a 2-core CPU).
- ``"randomized"``: randomized range finder + Rayleigh-Ritz (Halko, Martinsson & Tropp 2011) on a
  Gaussian sketch, Y = A (A^T Omega) for data and Y = A Omega for a symmetric A, drawn from ``seed``
  (``fastrank.sketch.gaussian_sketch``), with certified bounds (see ``_certified_bounds``).
  Lower bounds on the top-k eigenvalues come from a second, fp64 pass (sigma(Q^T A) for data,
  eig(Q^T G Q) for a PSD G): they hold for any orthonormal Q, so the sketch itself may be fp32
  and the only rounding to allow for is that of the fp64 pass (a one-pass Nystrom core would
  need an allowance amplified by the conditioning of Omega^T G Omega). ``rank`` = sketch size k (default min(r, clamp(r // 8,
  256, 1024)), r the number of singular values), ``niter`` = extra power iterations (default 0). k >= r falls back to exact.
- ``"slq"``: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) of tr f(G), G the Gram
  scaled to trace 1, with Rademacher probes. ``rank`` = number of probes (default 32), ``niter`` =
  Lanczos steps k (default 40, full reorthogonalization). Each probe's quadratic form is bracketed
  by its Gauss (k nodes) and Gauss-Radau (node at 0, k + 1 nodes) rules, which is a guarantee
  (every derivative of the integrands has a fixed sign on (0, 1], see ``_slq_entropy``); the
  probe means of these brackets (with the exact u^T G u as a control variate) are widened by 4
  standard errors (a variance bound from the probes' own rules, or the sample variance if
  larger). The bounds are therefore a confidence interval, not a guarantee: about 99.99% under a
  normal approximation; the probe means are skewed on decaying spectra (on 0.81^i, |z| reached
  3.6 in 625 repetitions), read it as >= 99.9%. With p proportional to eigenvalues (gram=True,
  hermitian=True) the normalizer is the exact trace; with p proportional to singular values
  (gram=False) both sum(sigma) and sum(sigma log sigma) are estimated and H is bounded over both
  intervals. hermitian=True assumes A PSD (negative eigenvalues beyond rounding void the bounds).
  Accuracy: flat spectra within a few tenths of a percent in exp(H) (interval ~1-3% wide); on
  decaying or low-rank spectra SLQ is poor, since the spread between probes is carried by the few
  large eigenvalues and, for singular values, sqrt(x) is hard to integrate near 0: intervals of
  10-25% (eigenvalue spectra) and 40-75% (singular values 0.9^i / 0.98^i, n = 512..1024) in exp(H),
  errors up to ~10%. Use "randomized" (or "exact") there.
- ``"auto"``: exact when r <= 4096 (an fp64 eigvalsh of at most 4096 x 4096); above that
  randomized, and slq for the matrices whose certified randomized interval is wider than 0.01
  nats (1% in effective rank: a spectrum too flat for a sketch of size k) and whose slq interval
  is narrower than that randomized one (so never on the decaying spectra where slq is poor).

Shapes and dtypes: A is (..., m, n), leading dims are a batch (one batched call, no Python loop);
results have shape (...) and dtype float64, on A's device. Integer and bool inputs are converted
to float64. ``return_bounds=True`` returns ``RankEstimate(estimate, lower, upper)``; for "exact"
the three are equal.
"""
import math
import os
import sys
from collections import namedtuple
from collections.abc import Mapping

import torch

from . import _cusolver
from .sketch import gaussian_sketch

__all__ = [
    "RankEstimate",
    "spectral_entropy",
    "effective_rank",
    "stable_rank",
    "effective_ranks",
    "rank_metrics",
    "nystrom_entropy",
]

RankEstimate = namedtuple("RankEstimate", ["estimate", "lower", "upper"])
RankEstimate.__doc__ = """Estimate with lower/upper bounds, each a float64 tensor of the batch shape."""

_EPS = torch.finfo(torch.float64).eps
_AUTO_EXACT_MAX = 4096  # largest r for which "auto" runs exact (fp64 eigvalsh of r x r: ~10 s on 2 CPU cores at 4096)
_AUTO_WIDTH = 0.01  # nats; wider randomized intervals make "auto" switch to slq
_ROW_BLOCK = 16384  # rows per fp32 Gram block summed in fp64 (4 blocks for 65536 rows)
_GRAM_SPLIT = 128  # Grams of at least 2x this many columns multiply only their upper block triangle
_PROJECT_BLOCK = 2**21  # elements per fp64 block of A in _project (512 rows of 4096: 16 MiB)
_EXACT_TOL = 1e-11  # relative entropy error above which gram=False exact falls back to svdvals(A)
# One matrix with m n min(m, n) <= this is "small": exact runs without _prepare's bookkeeping and,
# for gram=False, takes fp64 svdvals of A instead of the Gram route (_svdvals_first). Measured on the
# 2-core CPU, one thread, whole effective_rank calls, Gram route / svdvals route: 64 x 64 1.14,
# 96 x 48 1.07, 2048 x 8 1.24 (all below the bound: svdvals), 72 x 72 0.95, 128 x 64 0.83,
# 512 x 32 0.96 (above: Gram).
_SMALL_WORK = 64**3
_SMALL_NORM = (2.0**-200, 2.0**200)  # ||A||_F range in which that path needs no scaling (see _small_values)
_REAL_DTYPES = frozenset(
    (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
     torch.uint8, torch.bool)
)
_METHODS = ("auto", "exact", "randomized", "slq")
_EIGENSOLVERS = ("auto", "torch", "cusolver")  # FASTRANK_EIGENSOLVER: see _eigvalsh
# Largest n for which "auto" takes cuSOLVER's batched solver. fp64 batches on an H100, batched /
# torch's loop: 1000 x 64^2 3.0 / 328 ms, 128 x 256^2 13.7 / 248, 64 x 1024^2 144 / 650,
# 16 x 2048^2 245 / 412, 4 x 4096^2 495 / 470 (fp32: 604 / 354): no gain left at 4096.
_CUSOLVER_MAX_N = 2048


# ----------------------------------------------------------------------------- input handling
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


# ----------------------------------------------------------------------------- exact
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


def _eigensolver():
    choice = os.environ.get("FASTRANK_EIGENSOLVER", "auto")
    if choice not in _EIGENSOLVERS:
        raise ValueError(f"FASTRANK_EIGENSOLVER must be one of {_EIGENSOLVERS}, got {choice!r}")
    return choice


def _eigvalsh(G, upper=False):
    """Ascending eigenvalues of symmetric (..., n, n) matrices, reading the upper or lower triangle.

    A batch of CUDA matrices goes to cuSOLVER's batched solver (``fastrank._cusolver``: one call for
    the batch, where ``torch.linalg.eigvalsh`` loops one ``syevd`` per matrix) when it is available
    and ``FASTRANK_EIGENSOLVER`` is "cusolver", or "auto" (default) with n <= ``_CUSOLVER_MAX_N``;
    "torch" keeps torch's solver. Single matrices and CPU tensors always take
    ``torch.linalg.eigvalsh``.
    """
    n = G.shape[-1]
    if G.is_cuda and G.numel() > n * n:
        choice = _eigensolver()
        if choice == "cusolver" or (choice == "auto" and n <= _CUSOLVER_MAX_N):
            if _cusolver.available():
                return _cusolver.eigvalsh(G, upper=upper)
            if choice == "cusolver":
                raise RuntimeError(
                    "FASTRANK_EIGENSOLVER=cusolver, but cusolverDnXsyevBatched is not available "
                    "(needs cuSOLVER 11.7.1 / CUDA 12.6.2 or later)"
                )
    return torch.linalg.eigvalsh(G, UPLO="U" if upper else "L")


def _gram_eigenvalues(A, fp64_products):
    """(..., r) ascending fp64 eigenvalues of the smaller-side Gram, clamped at 0."""
    return _eigvalsh(_smaller_gram(A, fp64_products), upper=True).clamp_min(0)


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


def _small_values(A, gram, hermitian, center, method):
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
    value vector returned has a positive sum (A is not zero).
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
        values = torch.linalg.eigvalsh(X).abs()
    elif gram:
        values = _gram_eigenvalues(X, fp64_products=True)
    else:
        values = torch.linalg.svdvals(X)
    return values if len(shape) == 2 else values.reshape(*shape[:-2], -1)


# ----------------------------------------------------------------------------- randomized
def _default_sketch_size(r):
    return min(r, max(256, min(1024, r // 8)))


def _project(A, Q):
    """(Q^T A, ||A||_F^2), both in fp64, for A (..., m, n) of any float dtype and Q (..., m, k) fp64.

    A is converted one block of rows at a time into one reused fp64 buffer, so the pass never holds
    an fp64 copy of A (for an fp32 4096 x 4096 A on 2 CPU cores this is 0.3 s against 0.75 s for
    converting A whole and multiplying). The buffer's sum of squares gives ||A||_F^2 on the way.
    """
    batch = A.shape[:-2]
    m, n = A.shape[-2:]
    A3 = A.reshape(-1, m, n)
    Q3 = Q.reshape(-1, m, Q.shape[-1])
    out = torch.zeros(A3.shape[0], Q3.shape[-1], n, dtype=torch.float64, device=A.device)
    frob2 = torch.zeros(A3.shape[0], dtype=torch.float64, device=A.device)
    rows = max(1, min(m, _PROJECT_BLOCK // max(1, n * A3.shape[0])))
    buffer = torch.empty(A3.shape[0], rows, n, dtype=torch.float64, device=A.device)
    for start in range(0, m, rows):
        block = buffer[:, : min(rows, m - start)]
        block.copy_(A3[:, start : start + rows])
        out.baddbmm_(Q3[:, start : start + rows].mT, block)
        frob2 += block.square().sum((-2, -1))
    return out.reshape(*batch, *out.shape[-2:]), frob2.reshape(batch)


def _captured(A, hermitian, k, niter, seed):
    """Certified lower bounds on the top-k values and an upper bound on the total mass.

    Data A (hermitian=False): mu_1 >= ... >= mu_k <= the top-k eigenvalues of the Gram A^T A,
    total = ||A||_F^2 = their exact sum, total_hi = total plus its fp64 rounding.
    Symmetric A (hermitian=True): mu_i <= the i-th largest |eigenvalue|, total = tr(A) and
    total_hi >= sum |eigenvalues| (see below). Also returns the unrounded leading value and
    frob2 = ||A||_F^2 (an upper bound on the sum of squares of the values).
    """
    m, n = A.shape[-2:]
    # Data: Y = A (A^T Omega), a sketch of the Gram A A^T. Symmetric A: Y = A Omega. In A's
    # precision (fp32 or fp64): Q only has to be some orthonormal basis, the certified part is
    # the fp64 pass below.
    Y = gaussian_sketch(A, k, seed, gram=not hermitian)
    for _ in range(niter):
        Q = torch.linalg.qr(Y.to(torch.float64)).Q.to(Y.dtype)
        work = A.to(Y.dtype)
        Y = work @ (work.mT @ Q)
    Q = torch.linalg.qr(Y.to(torch.float64)).Q  # (..., m, k), orthonormal to fp64 rounding
    B, frob2 = _project(A, Q)  # (..., k, n) = Q^T A in fp64
    frob = frob2.sqrt()
    frob2 = frob2 * (1 + 2 * (m + n) * _EPS)
    if hermitian:
        # Rayleigh-Ritz: theta_i(Q^T G Q) <= lambda_i(G) (Cauchy interlacing), for any orthonormal Q.
        B = B @ Q
        theta = _eigvalsh((B + B.mT) / 2).flip(-1)
        # rounding of Q^T G, (Q^T G) Q and eigvalsh, each at most ~ (n sqrt(k) + k) eps ||G||_F
        eta = 2 * (n * math.sqrt(k) + k) * _EPS * frob
        mu = (theta - eta.unsqueeze(-1)).clamp_min(0)
        total = torch.diagonal(A, dim1=-2, dim2=-1).to(torch.float64).sum(-1)
        # p is proportional to |lambda|: sum |lambda| = tr(G) + 2 (negative mass), and the
        # negative eigenvalues are among those not lower-bounded by mu, whose squares sum to at
        # most frob2 - sum mu^2, so by Cauchy-Schwarz the negative mass is at most
        # sqrt((n - k) (frob2 - sum mu^2)). Zero for a PSD G, tiny for one PSD up to rounding.
        unseen_energy = (frob2 - mu.square().sum(-1)).clamp_min(0)
        total_hi = total * (1 + 2 * n * _EPS) + 2 * ((n - k) * unseen_energy).sqrt()
        lead = theta[..., 0]
    else:
        # sigma_i(Q^T A) <= sigma_i(A) for any orthonormal Q.
        # sigma(B) = sigma(R) for B^T = Q' R: a Householder QR of the tall (n, k) B^T and the SVD of
        # the small (k, k) R are both backward stable, and much faster than the SVD of the wide B
        # (LAPACK's gesdd on 512 x 4096: about 2 s of the 2.5 s of the whole estimate, 2 cores).
        R = torch.linalg.qr(B.mT, mode="r").R
        sigma = torch.linalg.svdvals(R)
        # rounding of Q^T A (m products per entry), of the QR (n per column, k columns) and of
        # svdvals, in singular-value units
        delta = 2 * (m * math.sqrt(k) + n * math.sqrt(k) + k) * _EPS * frob
        mu = (sigma - delta.unsqueeze(-1)).clamp_min(0).square()
        total = frob.square()
        total_hi = frob2
        lead = sigma[..., 0].square()
    return mu, total, total_hi, lead, frob2


def _certified_bounds(mu, total, total_hi, r, power):
    """Bounds and estimate of H for p proportional to lambda^(1/power).

    What is known, for each matrix: lambda_1 >= ... >= lambda_r >= 0 (r = number of eigenvalues),
    lower bounds mu_i <= lambda_i for i <= k (Rayleigh-Ritz / projection, with a rounding
    allowance subtracted), and the exact total sum(lambda) = T (trace or ||A||_F^2, never
    estimated). Let v = lambda^(1/power) (v = lambda for Gram spectra, v = sigma for singular
    values), f_i = mu_i^(1/power) the floors (f_i = 0 for i > k), and L the budget sum(v^power) = T.
    Every spectrum consistent with the data lies in F = {v >= f, sum v^power = T} (F also drops
    the ordering, so it is a superset: bounds over F hold for the true spectrum).

    Upper bound: the water-filled w = max(f, L) with sum w^power = T.
      power 1: w is majorized by every x >= f with sum x = T (it is the flattest such vector), and
      H is Schur-concave, so H(x) <= H(w).
      power 2: fix S = sum x; among x >= f with sum x = S the water-filled w_S is majorized by all,
      and sum w_S^2 <= sum x^2 = T (sum of squares is Schur-convex). H(w_S) grows with the water
      level (raising the level shrinks, relative to it, only the entries above it, all larger
      than the rest: dH/dlevel = (1/L) sum_{above} p_i (log p_i + H) >= 0 because the mean of
      log p over the entries above the level is at least its mean over all). So H(x) <= H(w) for
      the highest level allowed, sum w^2 = T.
    Lower bound: S_max = sum w is the largest possible sum v (for power 2 the flattest vector
      maximizes the l1 norm at fixed l2 norm; for power 1 S_max = T). Among x >= f with
      sum x = S the vector f + (S - sum f) e_1 majorizes all (its m-th partial sum is S minus
      the least possible rest), so H(x) >= H(f + (S - sum f) e_1), which decreases in S (adding
      to the largest entry lowers H: log p_1 + H >= 0). Hence H >= H(f + (S_max - sum f) e_1).
      For power 1 this is the classic "all unseen mass R = T - sum mu on the top eigenvalue".
    Both use T_hi (T plus its fp64 rounding): both bounds move outwards as T grows.

    Estimate (not certified, clipped to [lower, upper]): the captured values, continued by a
    geometric tail that carries the exact unseen mass (see the code).
    """
    k = mu.shape[-1]
    dtype = mu.dtype
    floors = mu.pow(1.0 / power)
    # Water level: with j floors kept above the water (j = k, k-1, ..., 0),
    # L_j = ((T - sum_{i<=j} f_i^power) / (r - j))^(1/power); the right j is the largest
    # one whose j-th floor is >= L_j (floor_0 = +inf).
    prefix = torch.cat([torch.zeros_like(mu[..., :1]), mu.cumsum(-1)], dim=-1)  # (..., k+1)
    kept = torch.arange(k + 1, device=mu.device, dtype=dtype)
    level = ((total_hi.unsqueeze(-1) - prefix).clamp_min(0) / (r - kept)).pow(1.0 / power)
    floor_at = torch.cat([torch.full_like(mu[..., :1], math.inf), floors], dim=-1)
    valid = level <= floor_at
    j = (valid * torch.arange(k + 1, device=mu.device)).amax(-1, keepdim=True)
    water = level.gather(-1, j)
    flat = torch.maximum(floors, water)
    tail = (r - k) * water.squeeze(-1)
    s_max = flat.sum(-1) + tail
    denom = s_max.clamp_min(torch.finfo(dtype).tiny).unsqueeze(-1)
    p = flat / denom
    upper = -torch.special.xlogy(p, p).sum(-1) - (r - k) * torch.special.xlogy(water / denom, water / denom).squeeze(-1)

    peaked = floors.clone()
    peaked[..., 0] += (s_max - floors.sum(-1)).clamp_min(0)
    lower = _entropy(peaked)

    # estimate: the captured values, continued geometrically: the unseen mass
    # R = T - sum mu placed on lambda_{k + j} proportional to rho^(j-1), with rho the decay rate
    # of the captured values between k/4 and k/2, which the sketch resolves well (oversampling 2;
    # rho -> 1: a flat tail).
    trusted = max(1, k // 2)
    first = max(1, trusted // 2)
    top, bottom = mu[..., first - 1], mu[..., trusted - 1]
    steps = max(trusted - first, 1)
    rho = torch.where(top > 0, (bottom / top.clamp_min(torch.finfo(dtype).tiny)).pow(1.0 / steps), torch.zeros_like(top))
    rho = rho.clamp(0, 1)
    unseen = (total - mu.sum(-1)).clamp_min(0)
    j_tail = torch.arange(r - k, device=mu.device, dtype=dtype)
    weights = torch.where(j_tail == 0, torch.ones_like(j_tail), rho.unsqueeze(-1).pow(j_tail))
    tail_values = unseen.unsqueeze(-1) * weights / weights.sum(-1, keepdim=True)
    estimate = _entropy(torch.cat([mu, tail_values], dim=-1).pow(1.0 / power))
    # fp64 rounding of the entropy sums themselves
    margin = 8 * (k + 2) * _EPS * upper.abs().clamp_min(1)
    lower, upper = lower - margin, upper + margin
    estimate = torch.minimum(torch.maximum(estimate, lower), upper)
    zero = total_hi <= 0
    neg_inf = torch.full_like(estimate, -math.inf)
    return tuple(torch.where(zero, neg_inf, x) for x in (lower, estimate, upper))


def _randomized_entropy(A, gram, hermitian, rank, niter, seed):
    r = _num_values(A, hermitian)
    k = _default_sketch_size(r) if rank is None else int(rank)
    if k < 1:
        raise ValueError(f"rank (sketch size) must be >= 1, got {rank}")
    if k >= r:
        exact = _entropy(_exact_values(A, gram, hermitian))
        return exact, exact, exact
    mu, total, total_hi, _, _ = _captured(A, hermitian, k, 0 if niter is None else int(niter), _seed(seed))
    lower, estimate, upper = _certified_bounds(mu, total, total_hi, r, _power(gram, hermitian))
    return lower, estimate, upper


def _seed(seed):
    return 0 if seed is None else int(seed) % (2**31)


# ----------------------------------------------------------------------------- slq
_SLQ_PROBES = 32  # default number of Rademacher probes
_SLQ_STEPS = 40  # default number of Lanczos steps (Gauss nodes per probe)
_SLQ_Z = 4.0  # standard errors added on each side of the probe means (see _probe_bounds)
_SLQ_BREAKDOWN = 1e-12  # beta below this (operator scaled to trace 1) ends a probe's Krylov space
_SLQ_SHIFT = 1e-10  # hermitian: Gauss-Radau node at -shift (trace-1 units), see _slq_hermitian_rules


def _lanczos(apply, r, probes, steps, batch, seed, device):
    """Lanczos with full reorthogonalization on ``probes`` Rademacher starting vectors at once.

    apply(V) multiplies the (..., r, r) operator with V (..., r, probes). Returns the basis
    (..., r, probes, steps + 1) (column steps is v_{k+1}; zero columns after a breakdown),
    alpha (..., probes, steps) and beta (..., probes, steps) (beta_k couples v_k and v_{k+1}).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    signs = torch.randint(0, 2, (r, probes), generator=generator).to(device=device, dtype=torch.float64) * 2 - 1
    basis = torch.zeros(*batch, r, probes, steps + 1, dtype=torch.float64, device=device)
    basis[..., 0] = signs / math.sqrt(r)
    alphas, betas = [], []
    for step in range(steps):
        q = basis[..., step]
        w = apply(q)
        alpha = (q * w).sum(-2)
        known = basis[..., : step + 1]
        for _ in range(2):  # full reorthogonalization (the three-term recurrence included), twice is enough
            w = w - (known * (known * w.unsqueeze(-1)).sum(-3, keepdim=True)).sum(-1)
        beta = w.norm(dim=-2)
        alive = beta > _SLQ_BREAKDOWN  # else an invariant subspace was found: the rule is exact
        beta = torch.where(alive, beta, torch.zeros_like(beta))
        basis[..., step + 1] = torch.where(alive.unsqueeze(-2), w / beta.clamp_min(1e-300).unsqueeze(-2), torch.zeros_like(w))
        alphas.append(alpha)
        betas.append(beta)
    return basis, torch.stack(alphas, -1), torch.stack(betas, -1)


def _svd_rule(R, r):
    """Nodes sigma and weights of the quadrature rule with Jacobi matrix R^T R, mass r."""
    _, sigma, Vh = torch.linalg.svd(R)
    return sigma, Vh[..., :, 0].square() * r


def _slq_data_rules(X, r, probes, steps, seed):
    """Gauss and Gauss-Radau rules of each probe's spectral measure, for the Gram X^T X (trace 1).

    X: (..., rows, r) with rows >= r and ||X||_F = 1. The Lanczos vectors V of X^T X give
    R = qr(X V).R with R^T R = V^T X^T X V, the Jacobi matrix (Golub-Kahan bidiagonalization: R is
    upper bidiagonal up to rounding). Gauss (k nodes): the singular values of R[:k, :k]. Gauss-Radau
    with a node at 0 (k + 1 nodes): R with its last diagonal entry zeroed (the Jacobi matrix
    T_{k+1} with its last diagonal entry changed so that it is singular). Both come as singular
    values of R, with an absolute error of a few eps (sigma <= 1), where eigenvalues of the Gram's
    tridiagonal would only give sigma to sqrt(eps).
    """
    rows = X.shape[-2]
    batch = X.shape[:-2]
    basis, _, _ = _lanczos(lambda V: X.mT @ (X @ V), r, probes, steps, batch, seed, X.device)
    flat = basis.flatten(-2)  # (..., r, probes * (k + 1))
    R = None
    for start in range(0, rows, _ROW_BLOCK):  # tall-skinny QR over row blocks: X V is never held whole
        block = (X[..., start : start + _ROW_BLOCK, :] @ flat).unflatten(-1, (probes, steps + 1)).movedim(-3, -2)
        R = torch.linalg.qr(block if R is None else torch.cat([R, block], dim=-2), mode="r").R
    if R.shape[-2] < steps + 1:  # fewer rows than columns (rows == r == k): pad to square
        R = torch.cat([R, R.new_zeros(*R.shape[:-2], steps + 1 - R.shape[-2], steps + 1)], dim=-2)
    gauss = _svd_rule(R[..., :steps, :steps], r)
    radau = R.clone()
    radau[..., steps, steps] = 0
    return gauss, _svd_rule(radau, r)


def _slq_hermitian_rules(G, r, probes, steps, seed):
    """Gauss and (shifted) Gauss-Radau rules of each probe's spectral measure for a PSD G of trace 1.

    Gauss: the eigenpairs of the Lanczos tridiagonal T_k. Gauss-Radau with a node at -shift: T_{k+1}
    with its last diagonal entry set to -shift + beta_k^2 [(T_k + shift I)^-1]_{kk}. A node at
    exactly 0 would need T_k^-1, which is singular up to rounding on a rank-deficient G; with
    shift = 1e-10 + max(0, -min Ritz value) (well above the rounding of T_k, ~ k eps) the solve is
    well conditioned. Returns the rules and the shifts (..., probes).
    """
    batch = G.shape[:-2]
    _, alpha, beta = _lanczos(lambda V: G @ V, r, probes, steps, batch, seed, G.device)
    tri = torch.diag_embed(alpha) + torch.diag_embed(beta[..., :-1], 1) + torch.diag_embed(beta[..., :-1], -1)
    theta, vectors = torch.linalg.eigh(tri)
    gauss = (theta, vectors[..., 0, :].square() * r)
    shift = _SLQ_SHIFT + (-theta[..., 0]).clamp_min(0)
    eye = torch.eye(steps, dtype=torch.float64, device=G.device)
    last = torch.zeros_like(alpha)
    last[..., -1] = 1
    solved = torch.linalg.solve(tri + shift[..., None, None] * eye, last.unsqueeze(-1)).squeeze(-1)
    corner = -shift + beta[..., -1].square() * solved[..., -1]
    extended = torch.diag_embed(torch.cat([alpha, corner.unsqueeze(-1)], -1))
    extended = extended + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    theta_radau, vectors_radau = torch.linalg.eigh(extended)
    radau = (theta_radau, vectors_radau[..., 0, :].square() * r)
    return gauss, radau, shift


def _probe_bounds(low, high, nodes, weights, values, z):
    """Confidence bounds of E[y_u] from per-probe brackets low_u <= y_u <= high_u.

    low, high: (..., probes). nodes, weights, values: the probes' Gauss rules (..., probes, k)
    for the trace-1 Gram G and f at the nodes (y_u ~ u^T f(G) u).
    Control variate: u^T G u = sum w nodes is exact per probe with known mean tr G = 1, so
    y_u - c (u^T G u - 1) has the same mean for any fixed c. With c, d the weighted
    least-squares line of f over the pooled nodes (an estimate of the spectral density),
    F = f(G) - c G - d I has Var(u^T F u) = 2 sum_{i != j} F_ij^2 <= 2 ||F||_F^2 for Rademacher u
    (adding d I changes no off-diagonal entry), and ||F||_F^2 = tr F^2 is estimated by the same
    rules. That variance is used unless the sample variance of the probes is larger: on
    decaying spectra a few probes carry the spread and 32 samples often miss it (the sample
    standard error alone left the exact value outside 3 of them, 0.9^i, 200 x 200). On a flat
    spectrum the control variate cuts the spread ~30x (0.14 -> 0.005 nats, 300 x 300).
    Returns (lower, estimate, upper): the means of the adjusted low, midpoint and high, the
    bounds each moved out by z standard errors.
    """
    count = low.shape[-1]
    tiny = torch.finfo(torch.float64).tiny
    w = weights / count
    w_sum, x_sum, y_sum = w.sum((-2, -1)), (w * nodes).sum((-2, -1)), (w * values).sum((-2, -1))
    xx_sum, xy_sum = (w * nodes.square()).sum((-2, -1)), (w * nodes * values).sum((-2, -1))
    spread = w_sum * xx_sum - x_sum.square()
    slope = torch.where(spread > 0, (w_sum * xy_sum - x_sum * y_sum) / spread.clamp_min(tiny), torch.zeros_like(spread))
    intercept = (y_sum - slope * x_sum) / w_sum.clamp_min(tiny)
    residual = values - slope[..., None, None] * nodes - intercept[..., None, None]
    variance_bound = 2 * (w * residual.square()).sum((-2, -1))
    moment = (weights * nodes).sum(-1)  # u^T G u (Gauss is exact for degree <= 2k - 1)
    shift = slope.unsqueeze(-1) * (moment - 1)
    low, high = low - shift, high - shift
    low_var = torch.maximum(low.var(-1), variance_bound)
    high_var = torch.maximum(high.var(-1), variance_bound)
    lower = low.mean(-1) - z * (low_var / count).sqrt()
    upper = high.mean(-1) + z * (high_var / count).sqrt()
    return lower, ((low + high) / 2).mean(-1), upper


def _slq_entropy(A, gram, hermitian, rank, niter, seed):
    """(lower, estimate, upper) of H by stochastic Lanczos quadrature (module docstring).

    Scaled to trace 1 (tr G = ||A||_F^2 for data, tr A for hermitian), every eigenvalue lambda of
    the Gram is in [0, 1]. Per probe u (||u||^2 = r), with Phi_u = u^T g(G) u and S_u = u^T G^(1/2) u:
      power 1 (gram / hermitian): H = -Phi, g(x) = x log x, the sum of p is exactly 1;
      power 2 (singular values):  H = log S - Phi / S, S = sum sigma, g(x) = sqrt(x) log sqrt(x).
    Gauss quadrature error is f^(2k)(eta) / (2k)! int pi_k^2 dmu, Gauss-Radau with a node at
    a <= lambda_min is f^(2k+1)(eta) / (2k+1)! int (x - a) pi_k^2 dmu. On (0, 1] every derivative
    of order j >= 2 of x log x and of sqrt(x) log sqrt(x) has the sign (-1)^j (for sqrt(x) log x
    the j-th derivative is (1/2)_j x^(1/2-j) (log x + sum_{i<j} 1/(1/2 - i)): (1/2)_j has the sign
    -(-1)^j and the bracket is <= 0 for x <= 1), and those of sqrt(x) the sign -(-1)^j: so per probe
      Gauss(g) <= Phi_u <= Radau(g),   Radau(sqrt) <= S_u <= Gauss(sqrt)
    (a guarantee, up to rounding). E[Phi_u] = Phi, E[S_u] = S: the probe means of the lower and
    upper rules, each widened by z standard errors, bound Phi (and S); H is bounded over that box.
    """
    m, n = A.shape[-2:]
    probes = _SLQ_PROBES if rank is None else int(rank)
    steps = _SLQ_STEPS if niter is None else int(niter)
    if probes < 2 or steps < 2:
        raise ValueError(f"slq needs rank (probes) >= 2 and niter (Lanczos steps) >= 2, got {rank}, {niter}")
    X = A.to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    power = _power(gram, hermitian)
    seed = _seed(seed)
    if hermitian:
        r = n
        total = torch.diagonal(X, dim1=-2, dim2=-1).sum(-1)
        steps = min(steps, r)
        G = X / total.clamp_min(tiny)[..., None, None]
        gauss, radau, shift = _slq_hermitian_rules(G, r, probes, steps, seed)
        # Radau bounds int f(x + shift) dmu; f(x) - f(x + shift) <= -shift log shift for x >= 0
        shift_allowance = r * (-shift * torch.log(shift))
        gauss_nodes, radau_nodes = gauss[0].clamp_min(0), (radau[0] + shift.unsqueeze(-1)).clamp_min(0)
    else:
        X = X if n <= m else X.mT
        r = X.shape[-1]
        total = X.square().sum((-2, -1))
        steps = min(steps, r)
        X = X / total.clamp_min(tiny).sqrt()[..., None, None]
        (sigma_g, w_g), (sigma_r, w_r) = _slq_data_rules(X, r, probes, steps, seed)
        gauss = (sigma_g.square(), w_g)
        radau = (sigma_r.square(), w_r)
        shift_allowance = torch.zeros((), dtype=torch.float64, device=X.device)
        gauss_nodes, radau_nodes = gauss[0], radau[0]
    # rounding: the nodes (sigma for data, from the QR of X V; lambda for hermitian, from eigh) are
    # off by at most ~ delta in trace-1 units (8 (k + 1) sqrt(r) eps: generous for a Lanczos basis
    # orthonormal to ~sqrt(r) eps and the QR / SVD / eigh of (k + 1) x (k + 1) matrices), which
    # moves x log x by at most delta (1 + |log delta|) and sqrt by delta, per unit of mass (r)
    delta = 8 * (steps + 1) * math.sqrt(r) * _EPS
    slack = r * delta * (1 + abs(math.log(delta))) + shift_allowance
    nodes_g = gauss_nodes.pow(1.0 / power)
    nodes_r = radau_nodes.pow(1.0 / power)
    g_values = torch.special.xlogy(nodes_g, nodes_g)
    phi_g = (gauss[1] * g_values).sum(-1)  # per probe, <= Phi_u
    phi_r = (radau[1] * torch.special.xlogy(nodes_r, nodes_r)).sum(-1)  # per probe, >= Phi_u
    phi_low, phi_mid, phi_high = _probe_bounds(phi_g - slack, phi_r + slack, gauss_nodes, gauss[1], g_values, _SLQ_Z)
    ceiling = math.log(r)
    if power == 1:
        estimate, lower, upper = -phi_mid, -phi_high, -phi_low
    else:
        mass_g = (gauss[1] * nodes_g).sum(-1)  # per probe, >= S_u
        mass_r = (radau[1] * nodes_r).sum(-1)  # per probe, <= S_u
        s_slack = r * delta
        s_low, s_mid, s_high = _probe_bounds(mass_r - s_slack, mass_g + s_slack, gauss_nodes, gauss[1], nodes_g, _SLQ_Z)
        # 1 <= S <= sqrt(r) (sum sigma^2 = 1), Phi <= 0 (sigma <= 1)
        s_low = s_low.clamp(1, math.sqrt(r))
        s_high = torch.maximum(s_high.clamp(1, math.sqrt(r)), s_low)
        phi_high = phi_high.clamp_max(0)
        phi_low = torch.minimum(phi_low, phi_high)

        def entropy(s, phi):
            return torch.log(s) - phi / s

        # H(S, Phi) = log S - Phi / S falls with Phi; in S it is convex with its minimum at S = -Phi
        upper = torch.maximum(entropy(s_low, phi_low), entropy(s_high, phi_low))
        lower = entropy(torch.minimum(torch.maximum(-phi_high, s_low), s_high), phi_high)
        estimate = entropy(s_mid.clamp(1, math.sqrt(r)), phi_mid)
    lower = lower.clamp(0, ceiling)
    upper = upper.clamp(0, ceiling)
    estimate = torch.minimum(torch.maximum(estimate, lower), upper)
    zero = total <= 0
    neg_inf = torch.full_like(estimate, -math.inf)
    return tuple(torch.where(zero, neg_inf, x) for x in (lower, estimate, upper))


# ----------------------------------------------------------------------------- dispatch
def _entropy_bounds(A, gram, hermitian, method, rank, niter, seed):
    """(lower, estimate, upper) of H, each fp64 of the batch shape."""
    if method == "auto":
        method = "exact" if _num_values(A, hermitian) <= _AUTO_EXACT_MAX else "randomized"
        if method == "randomized":
            lower, estimate, upper = _randomized_entropy(A, gram, hermitian, rank, niter, seed)
            wide = (upper - lower) > _AUTO_WIDTH
            if bool(wide.any()):
                slq = _slq_entropy(A[wide], gram, hermitian, None, None, seed)
                # slq only where its interval is the narrower one: on decaying spectra (singular
                # values especially) its interval is wide and the sketch's is the better answer
                better = (slq[2] - slq[0]) < (upper[wide] - lower[wide])
                lower, estimate, upper = (x.clone() for x in (lower, estimate, upper))
                for target, value in zip((lower, estimate, upper), slq):
                    target[wide] = torch.where(better, value, target[wide])
            return lower, estimate, upper
    if method == "exact":
        exact = _entropy(_exact_values(A, gram, hermitian))
        return exact, exact, exact
    if method == "randomized":
        return _randomized_entropy(A, gram, hermitian, rank, niter, seed)
    return _slq_entropy(A, gram, hermitian, rank, niter, seed)


def spectral_entropy(
    A, *, gram=False, hermitian=False, method="auto", rank=None, niter=None, seed=None, center=False, return_bounds=False
):
    """Spectral entropy H = -sum p log p, p = s / sum(s), natural log (the paper's rho).

    Args:
        A: (..., m, n) tensor; leading dims are a batch. Any real dtype (integers become float64),
            any strides, any device.
        gram: A is data X (N x d) and s are the eigenvalues of X X^T (computed from the smaller
            side, never forming N x N).
        hermitian: A is symmetric PSD (square); s are its eigenvalues (absolute values).
        method: "auto", "exact", "randomized" or "slq" (module docstring).
        rank: randomized: sketch size k; slq: number of probe vectors (default 32).
        niter: randomized: extra power iterations; slq: Lanczos steps (default 40).
        seed: int for the sketch / probes (default 0: repeated calls agree).
        center: subtract the column mean (mean over rows, dim -2) first.
        return_bounds: return RankEstimate(estimate, lower, upper). The bounds are: exact:
            equal to the estimate; randomized: certified (they hold for every input, up to fp64
            rounding allowed for); slq: a confidence interval (quadrature error bracketed exactly,
            probe sampling error at 4 standard errors, >= 99.9% coverage), wide on decaying
            spectra (module docstring).
    Returns:
        float64 tensor of shape (...) (or a RankEstimate of three). All-zero matrix: -inf.
    Raises:
        ValueError: NaN/Inf in A; empty or 1-D A; non-square A with hermitian=True.
    """
    if _is_dtensor(A):  # sharded: reduced Grams, never a gathered weight
        from .sharded import sharded_metric
        return sharded_metric("spectral_entropy", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter, seed=seed, center=center, return_bounds=return_bounds)
    values = _small_values(A, gram, hermitian, center, method)
    if values is not None:
        lower = estimate = upper = _entropy_nonzero(values)
    else:
        A = _prepare(A, gram, hermitian, center, method, "spectral_entropy")
        lower, estimate, upper = _entropy_bounds(A, gram, hermitian, method, rank, niter, seed)
    if return_bounds:
        return RankEstimate(estimate, lower, upper)
    return estimate


def effective_rank(
    A, *, gram=False, hermitian=False, method="auto", rank=None, niter=None, seed=None, center=False, return_bounds=False
):
    """Effective rank exp(H) (Roy & Vetterli 2007), H = spectral_entropy with the same arguments.

    Between 1 and the number of nonzero singular values (eigenvalues for gram/hermitian);
    all-zero matrix: 0. A: (..., m, n); result float64 of shape (...), or
    RankEstimate(estimate, lower, upper) with return_bounds=True (bounds map through exp, which
    is monotone, so certified bounds stay certified). See spectral_entropy for the arguments.
    """
    if _is_dtensor(A):  # sharded: reduced Grams, never a gathered weight
        from .sharded import sharded_metric
        return sharded_metric("effective_rank", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter, seed=seed, center=center, return_bounds=return_bounds)
    values = _small_values(A, gram, hermitian, center, method)
    if values is not None:
        lower = estimate = upper = _entropy_nonzero(values).exp()
        return RankEstimate(estimate, lower, upper) if return_bounds else estimate
    A = _prepare(A, gram, hermitian, center, method, "effective_rank")
    bounds = _entropy_bounds(A, gram, hermitian, method, rank, niter, seed)
    if bounds[0] is bounds[1] is bounds[2]:  # exact: one exp
        lower = estimate = upper = bounds[1].exp()
    else:
        lower, estimate, upper = (x.exp() for x in bounds)
    if return_bounds:
        return RankEstimate(estimate, lower, upper)
    return estimate


def stable_rank(A, *, gram=False, hermitian=False, method="auto", rank=None, niter=None, seed=None, center=False, return_bounds=False):
    """Stable rank ||M||_F^2 / ||M||_2^2, M = A (or M = X X^T for data X when gram=True).

    A: (..., m, n); result float64 of shape (...). All-zero matrix: 0.
    method: "exact" (fp64 eigvalsh of the smaller-side Gram), "randomized" (gram=False or
    hermitian=True only: ||M||_F^2 is exact; the top eigenvalue lambda_1 of the Gram lies in
    [theta_1, (sigma_1(Q^T A) + sqrt(R))^2] (data) or [theta_1, theta_1 + R] (PSD A), R the unseen
    mass, so the bounds are certified), "auto" (exact when r <= 4096, else randomized where
    available). "slq" is not available for the stable rank.
    """
    if _is_dtensor(A):  # sharded: reduced Grams, never a gathered weight
        from .sharded import sharded_metric
        return sharded_metric("stable_rank", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter, seed=seed, center=center, return_bounds=return_bounds)
    values = _small_values(A, gram, hermitian, center, method)
    if values is not None:
        value = _stable_of(values)
        return RankEstimate(value, value, value) if return_bounds else value
    A = _prepare(A, gram, hermitian, center, method, "stable_rank")
    r = _num_values(A, hermitian)
    if method == "auto":
        method = "exact" if (r <= _AUTO_EXACT_MAX or gram) else "randomized"
    if method == "slq" or (method == "randomized" and gram):
        raise ValueError(f"stable_rank: method={method!r} is not available with gram={gram}; use 'exact'")
    k = _default_sketch_size(r) if rank is None else int(rank)
    if method == "exact" or k >= r:
        if hermitian:
            lam = _eigvalsh(A.to(torch.float64)).abs()
            num, top = lam.square().sum(-1), lam.amax(-1).square()
        elif gram:
            lam = _gram_eigenvalues(A, fp64_products=False)
            num, top = lam.square().sum(-1), lam.amax(-1).square()
        else:
            num = torch.linalg.vector_norm(A, dim=(-2, -1), dtype=torch.float64).square()
            top = _gram_eigenvalues(A, fp64_products=True)[..., -1]
        value = torch.where(top > 0, num / top.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num))
        return RankEstimate(value, value, value) if return_bounds else value
    mu, total, total_hi, lead, frob2 = _captured(A, hermitian, k, 0 if niter is None else int(niter), _seed(seed))
    tiny = torch.finfo(torch.float64).tiny
    # values v (eigenvalues of A^T A for data, |eigenvalues| of a symmetric A): the stable rank is
    # sum v^2 / v_1^2 resp. sum v / v_1 with the numerator known exactly (||A||_F^2 or ||A||_F^2
    # of the symmetric A). v_1 >= mu_1, and v_1 <= budget - sum_{i>=2} mu_i (the other values are
    # at least their floors): power 1 for data (budget ||A||_F^2), power 2 for symmetric A.
    power = 2 if hermitian else 1
    budget = frob2
    numerator = frob2 / (1 + 2 * sum(A.shape[-2:]) * _EPS)
    floors = mu.pow(power)
    top_low = floors[..., 0]
    top_high = (budget - floors[..., 1:].sum(-1)).clamp_min(0)
    lead_value = lead.abs().pow(power)
    lower = torch.where(top_high > 0, numerator / top_high.clamp_min(tiny), torch.zeros_like(numerator))
    upper = torch.where(top_low > 0, budget / top_low.clamp_min(tiny), torch.where(numerator > 0, torch.full_like(numerator, math.inf), torch.zeros_like(numerator)))
    estimate = torch.where(lead_value > 0, numerator / lead_value.clamp_min(tiny), torch.zeros_like(numerator))
    estimate = torch.minimum(torch.maximum(estimate, lower), upper)
    return RankEstimate(estimate, lower, upper) if return_bounds else estimate


def rank_metrics(
    A, *, gram=False, hermitian=False, method="auto", rank=None, niter=None, seed=None, center=False,
    exact_tolerance=_EXACT_TOL,
):
    """The three metrics at once: ``{"spectral_entropy", "effective_rank", "stable_rank"}``.

    Same arguments and results as the three functions (float64 tensors of shape (...)). Where the
    method is exact ("exact", or "auto" with at most 4096 values) all three come from one spectrum
    s: H from p = s / sum(s), exp(H), and sum(s^2) / max(s)^2; otherwise each function runs its own
    estimator. ``exact_tolerance``: the relative entropy error the exact method allows the fp64
    Gram route before it recomputes a matrix with ``svdvals`` of A itself (gram=False only; the
    functions use 1e-11; ``RankTracker`` passes 1e-6, enough for a training curve and several
    times cheaper on ill-conditioned weights).
    """
    if _is_dtensor(A):  # sharded: reduced Grams, never a gathered weight
        from .sharded import sharded_metric
        return sharded_metric("all", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter, seed=seed, center=center, exact_tolerance=exact_tolerance)
    values = _small_values(A, gram, hermitian, center, method)
    if values is not None:
        entropy = _entropy_nonzero(values)
        return {"spectral_entropy": entropy, "effective_rank": entropy.exp(), "stable_rank": _stable_of(values)}
    A = _prepare(A, gram, hermitian, center, method, "rank_metrics")
    if method == "exact" or (method == "auto" and _num_values(A, hermitian) <= _AUTO_EXACT_MAX):
        values = _exact_values(A, gram, hermitian, exact_tolerance)
        entropy = _entropy(values)
        return {"spectral_entropy": entropy, "effective_rank": entropy.exp(), "stable_rank": _stable_of(values)}
    kwargs = dict(gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter, seed=seed)
    entropy = spectral_entropy(A, **kwargs)
    return {
        "spectral_entropy": entropy,
        "effective_rank": entropy.exp(),
        "stable_rank": stable_rank(A, **kwargs),
    }


_CUDA_CHUNK_BYTES = 2**31  # working set of one batched call on CUDA, at least (see _chunks)


def _chunks(groups, tensors):
    """Split each group of same-shape tensors into batched calls of bounded memory on CUDA.

    One call holds the stacked batch, its fp64 smaller-side Grams and the solver's copy of them:
    about ``(2 m n e + 16 r^2)`` bytes per matrix (e the element size). A chunk's share is at most
    a quarter of the free device memory, or 2 GiB, whichever is larger (224 weights of 4096 x 4096
    fp32 would otherwise need some 60 GiB at once). CPU groups stay whole.
    """
    for indices in groups:
        first = tensors[indices[0]]
        if not first.is_cuda or first.dim() < 2 or len(indices) == 1:
            yield indices
            continue
        m, n = first.shape[-2:]
        per_matrix = (2 * m * n * first.element_size() + 16 * min(m, n) ** 2) * max(1, first[..., 0, 0].numel())
        budget = max(_CUDA_CHUNK_BYTES, torch.cuda.mem_get_info(first.device)[0] // 4)
        step = max(1, budget // max(per_matrix, 1))
        for start in range(0, len(indices), step):
            yield indices[start : start + step]


def effective_ranks(tensors, *, metric="effective_rank", **kwargs):
    """A rank metric of many matrices of mixed shapes: one batched call per (shape, dtype, device).

    Args:
        tensors: a sequence of tensors (each (..., m, n)) or a mapping name -> tensor, e.g.
            ``{n: p for n, p in model.named_parameters() if p.dim() >= 2}`` (flatten conv
            weights yourself, ``w.flatten(1)``: a 4-D tensor is a batch of matrices).
        metric: "effective_rank" (default), "spectral_entropy", "stable_rank", or "all" (the dict
            of :func:`rank_metrics`, all three from one spectrum where exact).
        **kwargs: the keyword arguments of that function.
    Returns:
        a list in input order (a dict with the same keys for a mapping) of float64 tensors of each
        input's batch shape (of dicts of them for "all"), or of RankEstimate with return_bounds=True.
    """
    functions = {
        "effective_rank": effective_rank,
        "spectral_entropy": spectral_entropy,
        "stable_rank": stable_rank,
        "all": rank_metrics,
    }
    if metric not in functions:
        raise ValueError(f"effective_ranks: metric must be one of {sorted(functions)}, got {metric!r}")
    function = functions[metric]
    if isinstance(tensors, Mapping):
        keys = list(tensors.keys())
        return dict(zip(keys, effective_ranks([tensors[key] for key in keys], metric=metric, **kwargs)))
    tensors = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in tensors]
    if any(_is_dtensor(t) for t in tensors):  # sharded weights: one all-reduce per shape group
        from .sharded import sharded_effective_ranks
        return sharded_effective_ranks(tensors, metric=metric, **kwargs)
    groups = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(index)
    results = [None] * len(tensors)
    with torch.no_grad():
        for chunk in _chunks(groups.values(), tensors):
            batch = torch.stack([tensors[i].detach() for i in chunk])
            out = function(batch, **kwargs)
            for position, index in enumerate(chunk):
                if isinstance(out, RankEstimate):
                    results[index] = RankEstimate(*(x[position] for x in out))
                elif isinstance(out, dict):
                    results[index] = {key: value[position] for key, value in out.items()}
                else:
                    results[index] = out[position]
    return results


def nystrom_entropy(sketch, omega, trace, *, return_bounds=False):
    """Spectral entropy of a PSD G (d x d) seen only through a streaming sketch ``Y = G Omega``.

    For accumulators that never hold G (``RankTracker`` on wide embeddings: Y is summed over
    batches as X^T (X Omega)). The stabilized Nystrom approximation (Tropp, Yurtsever, Udell &
    Cevher 2017) gives eigenvalues mu_1 >= ... >= mu_k with G_nys <= G in the PSD order, hence
    mu_i <= lambda_i(G); with the exact ``trace`` = tr(G) the same water-filling / majorization
    bounds as ``method="randomized"`` apply (``_certified_bounds``). The bounds are certified up
    to the rounding of the Nystrom core (shift nu = sqrt(d) eps ||Y||_F is subtracted back).

    Args:
        sketch: (d, k) float tensor Y = G Omega.
        omega: (d, k) the test matrix used for the sketch.
        trace: scalar tensor or float, tr(G) (for a Gram X^T X: ||X||_F^2).
        return_bounds: return RankEstimate(estimate, lower, upper) instead of the estimate.
    Returns:
        float64 scalar tensor (or a RankEstimate of three). Zero trace: -inf.
    """
    Y = torch.as_tensor(sketch).to(torch.float64)
    omega = torch.as_tensor(omega).to(Y)
    if Y.dim() != 2 or Y.shape != omega.shape:
        raise ValueError(
            f"nystrom_entropy: sketch and omega must both be (d, k), got {tuple(Y.shape)} and {tuple(omega.shape)}"
        )
    if not bool(torch.isfinite(Y).all()):
        raise ValueError("nystrom_entropy: the sketch contains NaN or Inf")
    d, k = Y.shape
    total = torch.as_tensor(trace, dtype=torch.float64, device=Y.device)
    nu = math.sqrt(d) * _EPS * float(torch.linalg.matrix_norm(Y))
    if nu == 0:
        mu = torch.zeros(k, dtype=torch.float64, device=Y.device)
    else:
        shifted = Y + nu * omega
        core = omega.T @ shifted
        core = (core + core.T) / 2
        chol, info = torch.linalg.cholesky_ex(core)
        shift = nu
        while int(info) != 0:  # the core is PSD only up to rounding: raise the shift until it is PD
            shift *= 10
            shifted = Y + shift * omega
            core = omega.T @ shifted
            chol, info = torch.linalg.cholesky_ex((core + core.T) / 2)
        factor = torch.linalg.solve_triangular(chol, shifted.T, upper=False).T  # shifted C^-T
        mu = (torch.linalg.svdvals(factor).square() - shift).clamp_min(0)
    total_hi = total * (1 + 2 * d * _EPS)
    lower, estimate, upper = _certified_bounds(mu, total, total_hi, d, 1)
    if return_bounds:
        return RankEstimate(estimate, lower, upper)
    return estimate
