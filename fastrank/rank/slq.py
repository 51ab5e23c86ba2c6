"""The SLQ method: stochastic Lanczos quadrature of tr f(G) with Gauss / Gauss-Radau brackets."""

from __future__ import annotations

import math
from collections import namedtuple

import torch

from .common import _EPS, _power, _seed, _stable_bounds
from .exact import _ROW_BLOCK

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


_Quadrature = namedtuple(
    "_Quadrature",
    ["gauss", "radau", "gauss_nodes", "radau_nodes", "slack", "delta", "total", "square_sum", "frob2", "r", "power", "ritz", "lead"],
)
_Quadrature.__doc__ = """One SLQ run (``_slq_quadrature``): what the entropy and the stable rank read from it."""


def _slq_quadrature(A, gram, hermitian, rank, niter, seed):
    """The probes' Gauss and Gauss-Radau rules of the trace-1 Gram of A (one Lanczos run).

    A: (..., m, n) as ``_prepare`` returns it. Both SLQ metrics read this run: the entropy its
    rules (``_slq_entropy``), the stable rank its Ritz values (``_slq_stable_rank``). Fields:
      gauss, radau: (nodes, weights), each (..., probes, k) (k + 1 for radau), nodes in trace-1
        eigenvalue units; gauss_nodes, radau_nodes: the nodes clamped (and, hermitian, shifted);
      slack: the per-probe rounding allowance of the rules of x log x; delta: the node rounding,
        in trace-1 units (singular-value units for data);
      total: tr G (||A||_F^2 for data, tr A for hermitian); square_sum: ||A||_F^2; frob2: that
        plus its rounding (an upper bound); each (...);
      r: the number of values; power: see ``_power``;
      ritz: (..., k) descending lower bounds on the top k values (eigenvalues of A^T A for data,
        eigenvalues of a PSD A) in A's units: the i-th largest Ritz value over all probes, less
        the node rounding; lead: (...) the largest Ritz value, as computed.
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
    square_sum = X.square().sum((-2, -1))
    frob2 = square_sum * (1 + 2 * (m + n) * _EPS)
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
        total = square_sum
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
    # Ritz values: the i-th largest Gauss node of any probe is at most the i-th largest eigenvalue
    # of G (Cauchy interlacing for the probe's orthonormal Krylov basis), so their maximum over the
    # probes is a lower bound too, once the node rounding is taken off
    top = gauss[0].sort(-1, descending=True).values.amax(-2)
    ritz = (top - delta).clamp_min(0) if hermitian else (top.sqrt() - delta).clamp_min(0).square()
    scale = total.clamp_min(0)
    ritz, lead = ritz * scale.unsqueeze(-1), top[..., 0] * scale
    return _Quadrature(gauss, radau, gauss_nodes, radau_nodes, slack, delta, total, square_sum, frob2, r, power, ritz, lead)


def _slq_entropy(quadrature):
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
    gauss, radau, gauss_nodes, radau_nodes, slack, delta, total, _, _, r, power, _, _ = quadrature
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


def _slq_stable_rank(quadrature, hermitian):
    """RankEstimate of the stable rank from the run's Ritz values (``_stable_bounds``).

    The largest Ritz value is at most the top value v_1, so the upper bound is certified (up to
    rounding) and Lanczos makes it tight: its largest Ritz value converges fastest of all (on a
    flat spectrum, 1500 x 1600 with values in [0.5, 1], 40 steps: 0.014% above the exact stable
    rank, where a 256-column sketch was 13% above). The lower bound, from the Ritz floors and the
    exact ||A||_F^2, is certified too but near 1 on flat spectra (how far v_1 may exceed the
    largest Ritz value is not bounded without a gap); the estimate is the upper end.
    """
    return _stable_bounds(quadrature.ritz, quadrature.lead, quadrature.square_sum, quadrature.frob2, hermitian)
