"""The public functions of the rank family: method choice ("auto"), the three metrics, and many
matrices of mixed shapes at once."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .common import (
    _EPS, RankEstimate, _entropy, _entropy_nonzero, _is_dtensor, _num_values, _prepare, _seed, _stable_bounds, _stable_of
)
from .eigensolver import eigvalsh as _eigvalsh
from .exact import _EXACT_TOL, _exact_values, _gram_eigenvalues, _small_values
from .randomized import _captured, _randomized_entropy, _sketch_size
from .slq import _slq_entropy, _slq_quadrature, _slq_stable_rank

_AUTO_EXACT_MAX = 4096  # largest r for which "auto" runs exact (fp64 eigvalsh of r x r: ~10 s on 2 CPU cores at 4096)
_AUTO_WIDTH = 0.01  # nats; wider randomized intervals make "auto" switch to slq


def _entropy_bounds(A, gram, hermitian, method, rank, niter, seed):
    """(lower, estimate, upper) of H, each fp64 of the batch shape."""
    if method == "auto":
        method = "exact" if _num_values(A, hermitian) <= _AUTO_EXACT_MAX else "randomized"
        if method == "randomized":
            lower, estimate, upper = _randomized_entropy(A, gram, hermitian, rank, niter, seed)
            wide = (upper - lower) > _AUTO_WIDTH
            if bool(wide.any()):
                slq = _slq_entropy(_slq_quadrature(A[wide], gram, hermitian, None, None, seed))
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
    return _slq_entropy(_slq_quadrature(A, gram, hermitian, rank, niter, seed))


def _sharded(metric, A, **kwargs):
    """A metric of a DTensor A through ``fastrank.sharded`` (imported when a DTensor first comes)."""
    from ..sharded import sharded_metric

    return sharded_metric(metric, A, **kwargs)


def spectral_entropy(
    A, *, gram=False, hermitian=False, method="auto", rank=None, niter=None, seed=None, center=False, return_bounds=False
):
    """Spectral entropy H = -sum p log p, p = s / sum(s), natural log (the paper's rho).

    Args:
        A: (..., m, n) tensor; leading dims are a batch. Any real dtype (integers become float64),
            any strides, any device.
        gram: A is data X (N x d) and s are the eigenvalues of X X^T (computed from the smaller
            side, never forming N x N).
        hermitian: A is symmetric PSD (square); s are its eigenvalues (absolute values). The
            symmetry is checked: max |A - A^T| <= sqrt(eps) max |A|, eps of A's dtype.
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
        ValueError: NaN/Inf in A; empty or 1-D A; non-square or non-symmetric A with
            hermitian=True (naming the batch index and by how much); gram and hermitian together.
    """
    if _is_dtensor(A):  # sharded: reduced Grams, never a gathered weight
        return _sharded("spectral_entropy", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter,
                        seed=seed, center=center, return_bounds=return_bounds)
    values = _small_values(A, gram, hermitian, center, method, "spectral_entropy")
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
        return _sharded("effective_rank", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter,
                        seed=seed, center=center, return_bounds=return_bounds)
    values = _small_values(A, gram, hermitian, center, method, "effective_rank")
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


def _stable_rank_bounds(A, gram, hermitian, method, rank, niter, seed):
    """RankEstimate of the stable rank of a prepared A (``_prepare``) by ``method`` (see stable_rank)."""
    r = _num_values(A, hermitian)
    if method == "auto":
        method = "exact" if (r <= _AUTO_EXACT_MAX or gram) else "randomized"
    if method == "slq":
        return _slq_stable_rank(_slq_quadrature(A, gram, hermitian, rank, niter, seed), hermitian)
    k = _sketch_size(r, rank) if method == "randomized" else r
    if k >= r:  # exact, or a sketch as large as the spectrum
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
        return RankEstimate(value, value, value)
    mu, _, _, lead, frob2 = _captured(A, hermitian, k, 0 if niter is None else int(niter), _seed(seed))
    # mu: lower bounds on the top-k values, frob2 = ||A||_F^2 with its rounding added
    return _stable_bounds(mu, lead, frob2 / (1 + 2 * sum(A.shape[-2:]) * _EPS), frob2, hermitian)


def stable_rank(A, *, gram=False, hermitian=False, method="auto", rank=None, niter=None, seed=None, center=False, return_bounds=False):
    """Stable rank ||M||_F^2 / ||M||_2^2, M = A (or M = X X^T for data X when gram=True).

    A: (..., m, n); result float64 of shape (...), or RankEstimate(estimate, lower, upper) with
    return_bounds=True. All-zero matrix: 0. The bounds are certified (up to fp64 rounding) for
    every method: with v the values (eigenvalues of A^T A, or |eigenvalues| of a symmetric A),
    ||M||_F^2 is exact and v_1 lies between a lower bound mu_1 <= v_1 and the budget left by the
    floors of the others, ||A||_F^2 - sum_{i>=2} mu_i (data) or ||A||_F^2 - sum_{i>=2} mu_i^2 (PSD A).
    method:
      "exact": fp64 eigvalsh of the smaller-side Gram (bounds equal to the estimate);
      "randomized" (gram=False or hermitian=True): mu the Rayleigh-Ritz values of the sketch
        (``rank`` = sketch size, ``niter`` = power iterations); on flat spectra the estimate is
        high (a 256-column sketch of a 1600 x 1500 matrix with values in [0.5, 1]: 13%);
      "slq" (gram=False or hermitian=True): mu the Ritz values of the SLQ Lanczos run (``rank``
        probes, ``niter`` steps, as for the entropy; the run rank_metrics shares): the largest one
        converges fastest of all Ritz values (same matrix, 40 steps: 0.014% high). Upper bound
        tight, lower bound near 1 on flat spectra; hermitian=True assumes A PSD;
      "auto": exact when r <= 4096 or gram=True, else randomized.
    gram=True takes "exact" or "auto" only: sum lambda^2 = ||X^T X||_F^2 needs the d x d Gram,
    which is what the exact method forms (rank_metrics and effective_ranks(metric="all") with
    "randomized" or "slq" compute this metric by "exact").
    Raises:
        ValueError: the errors of spectral_entropy; gram=True with "randomized" or "slq".
    """
    if _is_dtensor(A):  # sharded: reduced Grams, never a gathered weight
        return _sharded("stable_rank", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter,
                        seed=seed, center=center, return_bounds=return_bounds)
    values = _small_values(A, gram, hermitian, center, method, "stable_rank")
    if values is not None:
        value = _stable_of(values)
        return RankEstimate(value, value, value) if return_bounds else value
    A = _prepare(A, gram, hermitian, center, method, "stable_rank")
    if gram and method in ("randomized", "slq"):
        raise ValueError(
            f"stable_rank: method={method!r} has no estimate of the stable rank of a Gram (gram=True): its "
            "numerator ||X^T X||_F^2 needs the d x d Gram, which method='exact' (or 'auto') forms; use one of "
            "those (rank_metrics and effective_ranks(metric='all') do so for this metric)"
        )
    bounds = _stable_rank_bounds(A, gram, hermitian, method, rank, niter, seed)
    return bounds if return_bounds else bounds.estimate


def rank_metrics(
    A, *, gram=False, hermitian=False, method="auto", rank=None, niter=None, seed=None, center=False,
    exact_tolerance=_EXACT_TOL,
):
    """The three metrics at once: ``{"spectral_entropy", "effective_rank", "stable_rank"}``.

    Same arguments and results as the three functions (float64 tensors of shape (...)); every
    method gives all three. Where the method is exact ("exact", or "auto" with at most 4096
    values) all three come from one spectrum s: H from p = s / sum(s), exp(H), and
    sum(s^2) / max(s)^2. Otherwise each metric takes the method that supports it:
      "slq": H and exp(H) by SLQ; the stable rank from the largest Ritz value of the same Lanczos
        run (one run for both, see stable_rank); with gram=True the stable rank is exact;
      "randomized": H and the stable rank each by their randomized estimator; with gram=True the
        stable rank is exact;
      "auto" above 4096 values: H as spectral_entropy's "auto", the stable rank as stable_rank's.
    ``exact_tolerance``: the relative entropy error the exact method allows the fp64
    Gram route before it recomputes a matrix with ``svdvals`` of A itself (gram=False only; the
    functions use 1e-11; ``RankTracker`` passes 1e-6, enough for a training curve and several
    times cheaper on ill-conditioned weights).
    """
    if _is_dtensor(A):  # sharded: reduced Grams, never a gathered weight
        return _sharded("all", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter,
                        seed=seed, center=center, exact_tolerance=exact_tolerance)
    values = _small_values(A, gram, hermitian, center, method, "rank_metrics")
    if values is not None:
        entropy = _entropy_nonzero(values)
        return {"spectral_entropy": entropy, "effective_rank": entropy.exp(), "stable_rank": _stable_of(values)}
    A = _prepare(A, gram, hermitian, center, method, "rank_metrics")
    if method == "exact" or (method == "auto" and _num_values(A, hermitian) <= _AUTO_EXACT_MAX):
        values = _exact_values(A, gram, hermitian, exact_tolerance)
        entropy = _entropy(values)
        return {"spectral_entropy": entropy, "effective_rank": entropy.exp(), "stable_rank": _stable_of(values)}
    if method == "slq" and not gram:  # one Lanczos run: its rules give H, its Ritz values the stable rank
        quadrature = _slq_quadrature(A, gram, hermitian, rank, niter, seed)
        entropy, stable = _slq_entropy(quadrature)[1], _slq_stable_rank(quadrature, hermitian).estimate
    else:
        entropy = _entropy_bounds(A, gram, hermitian, method, rank, niter, seed)[1]
        stable = _stable_rank_bounds(A, gram, hermitian, "exact" if gram else method, rank, niter, seed).estimate
    return {"spectral_entropy": entropy, "effective_rank": entropy.exp(), "stable_rank": stable}


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


def _check_entries(tensors, labels):
    """Raise ValueError, naming the entry, for one that is not a non-empty matrix (..., m, n).

    Entries are stacked into batches: a vector or a scalar would become a row of one matrix (or
    fail inside torch), an empty matrix would be reported with the stacked shape.
    """
    for tensor, label in zip(tensors, labels):
        shape = tuple(tensor.shape) if hasattr(tensor, "shape") else tuple(torch.as_tensor(tensor).shape)
        if len(shape) < 2 or math.prod(shape) == 0:
            raise ValueError(
                f"effective_ranks: expected each entry to be a non-empty matrix or batch of matrices (..., m, n), "
                f"got shape {shape} at {label}" + (" (a vector: pass it as one row, v[None])" if len(shape) == 1 else "")
            )


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
    Raises:
        ValueError: an unknown metric; an entry with fewer than 2 dims or no elements (naming its
            index, or its key, and its shape); the errors of the metric's function.
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
        _check_entries([tensors[key] for key in keys], [f"key {key!r}" for key in keys])
        return dict(zip(keys, effective_ranks([tensors[key] for key in keys], metric=metric, **kwargs)))
    tensors = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in tensors]
    _check_entries(tensors, [f"index {index}" for index in range(len(tensors))])
    sharded = [i for i, t in enumerate(tensors) if _is_dtensor(t)]
    if sharded:  # DTensors: one all-reduce per shape group (fastrank.sharded); the rest as usual
        from ..sharded import sharded_effective_ranks

        results = [None] * len(tensors)
        plain = [i for i, t in enumerate(tensors) if not _is_dtensor(t)]
        for indices, values in (
            (plain, effective_ranks([tensors[i] for i in plain], metric=metric, **kwargs) if plain else []),
            (sharded, sharded_effective_ranks([tensors[i] for i in sharded], metric=metric, **kwargs)),
        ):
            for index, value in zip(indices, values):
                results[index] = value
        return results
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
