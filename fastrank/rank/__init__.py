"""Effective rank at scale: spectral entropy, effective rank, stable rank.

Definitions (DESIGN.md). For a matrix A (m x n) let s be its singular values; with ``gram=True``
the spectrum is that of the Gram X X^T of data X = A (s_i = sigma_i(A)^2); with
``hermitian=True`` A is a symmetric PSD matrix and s are its eigenvalues (their absolute values,
which are the singular values of any symmetric A). hermitian=True checks the symmetry: a matrix
with max |A - A^T| above sqrt(eps) max |A| (eps of A's dtype; sqrt(eps) = 3.5e-4 for fp32, 1.5e-8
for fp64) raises ValueError (a Gram symmetric up to rounding passes). With p = s / sum(s):

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
- Stable rank: ``||A||_F^2`` is exact; the top value comes from the method: exact, the sketch's
  Rayleigh-Ritz values ("randomized") or the largest Ritz value of the SLQ Lanczos run ("slq",
  0.014% high on a flat 1600 x 1500 spectrum where a 256-column sketch is 13% high), with
  certified bounds for both (the lower one near 1 on flat spectra). For gram=True only "exact"
  (and "auto") estimate it: sum lambda^2 = ||X^T X||_F^2 needs the d x d Gram; ``stable_rank``
  refuses "randomized" / "slq" there and names the alternative.
- Which method each metric of ``rank_metrics`` (and ``effective_ranks(metric="all")``,
  ``RankTracker``, ``fastrank rank``) uses: every method gives all three. "exact" (and "auto"
  up to 4096 values): all from one spectrum. "slq": entropy and effective rank by SLQ, the
  stable rank from the same Lanczos run (gram=True: exact). "randomized": each by its randomized
  estimator (stable rank with gram=True: exact). "auto" above 4096 values: as the functions.
- ``"auto"``: exact when r <= 4096 (an fp64 eigvalsh of at most 4096 x 4096); above that
  randomized, and slq for the matrices whose certified randomized interval is wider than 0.01
  nats (1% in effective rank: a spectrum too flat for a sketch of size k) and whose slq interval
  is narrower than that randomized one (so never on the decaying spectra where slq is poor).

Shapes and dtypes: A is (..., m, n), leading dims are a batch (one batched call, no Python loop);
results have shape (...) and dtype float64, on A's device. Integer and bool inputs are converted
to float64. ``return_bounds=True`` returns ``RankEstimate(estimate, lower, upper)``; for "exact"
the three are equal.
"""

from .api import effective_rank, effective_ranks, rank_metrics, spectral_entropy, stable_rank
from .common import RankEstimate
from .randomized import nystrom_entropy

__all__ = [
    "RankEstimate",
    "spectral_entropy",
    "effective_rank",
    "stable_rank",
    "effective_ranks",
    "rank_metrics",
    "nystrom_entropy",
]
