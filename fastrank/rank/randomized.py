"""The randomized method: a Gaussian range finder with Rayleigh-Ritz and certified bounds, and the
streaming Nystrom estimate of :class:`~fastrank.RankTracker` (:func:`nystrom_entropy`)."""

from __future__ import annotations

import math

import torch

from ..sketch import gaussian_sketch
from .common import _EPS, RankEstimate, _entropy, _num_values, _power, _seed
from .eigensolver import eigvalsh as _eigvalsh
from .exact import _exact_values

_PROJECT_BLOCK = 2**21  # elements per fp64 block of A in _project (512 rows of 4096: 16 MiB)


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


def _sketch_size(r, rank):
    """The sketch size k for r values: ``rank``, or the default (``_default_sketch_size``)."""
    k = _default_sketch_size(r) if rank is None else int(rank)
    if k < 1:
        raise ValueError(f"randomized: rank (the sketch size) must be >= 1, got {rank}")
    return k


def _randomized_entropy(A, gram, hermitian, rank, niter, seed):
    r = _num_values(A, hermitian)
    k = _sketch_size(r, rank)
    if k >= r:
        exact = _entropy(_exact_values(A, gram, hermitian))
        return exact, exact, exact
    mu, total, total_hi, _, _ = _captured(A, hermitian, k, 0 if niter is None else int(niter), _seed(seed))
    lower, estimate, upper = _certified_bounds(mu, total, total_hi, r, _power(gram, hermitian))
    return lower, estimate, upper




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
