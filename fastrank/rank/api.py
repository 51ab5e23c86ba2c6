"""The public functions of the rank family: method choice ("auto"), the three metrics, and many
matrices of mixed shapes at once."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .common import _EPS, RankEstimate, _entropy, _entropy_nonzero, _is_dtensor, _num_values, _prepare, _seed, _stable_of
from .eigensolver import eigvalsh as _eigvalsh
from .exact import _EXACT_TOL, _exact_values, _gram_eigenvalues, _small_values
from .randomized import _captured, _default_sketch_size, _randomized_entropy
from .slq import _slq_entropy

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
        return _sharded("spectral_entropy", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter,
                        seed=seed, center=center, return_bounds=return_bounds)
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
        return _sharded("effective_rank", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter,
                        seed=seed, center=center, return_bounds=return_bounds)
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
        return _sharded("stable_rank", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter,
                        seed=seed, center=center, return_bounds=return_bounds)
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
        return _sharded("all", A, gram=gram, hermitian=hermitian, method=method, rank=rank, niter=niter,
                        seed=seed, center=center, exact_tolerance=exact_tolerance)
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
