"""Accuracy and contract tests of fastrank.rank against an fp64 SVD reference.

Matrices are built with prescribed singular values (A = U diag(s) V^T, U and V orthonormal in
fp64); the reference spectrum is always the fp64 SVD of the matrix actually passed in.
"""
import math
import re

import pytest
import torch

import fastrank
import fastrank.rank.api as rank_module
from fastrank.rank import exact, slq
from fastrank.rank import RankEstimate, effective_rank, effective_ranks, spectral_entropy, stable_rank

# relative tolerance of the exact method per input dtype (issue 4 targets)
EXACT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def spectrum(kind, r, generator):
    i = torch.arange(r, dtype=torch.float64)
    if kind == "decaying":
        return 0.9**i
    if kind == "flat":
        return 0.5 + 0.5 * torch.rand(r, generator=generator, dtype=torch.float64)
    if kind == "rank_deficient":
        s = torch.rand(r, generator=generator, dtype=torch.float64) + 0.1
        s[max(1, r // 3) :] = 0
        return s
    if kind == "clustered":
        s = torch.full((r,), 1e-3, dtype=torch.float64)
        s[: max(1, r // 4)] = 10.0
        s[max(1, r // 4) : max(2, r // 2)] = 1.0
        return s
    if kind == "tiny":
        return 1e-150 * 0.95**i
    if kind == "huge":
        return 1e150 * 0.95**i
    raise ValueError(kind)


SPECTRA = ["decaying", "flat", "rank_deficient", "clustered", "tiny", "huge"]
SHAPES = [(7, 5), (33, 129), (129, 64)]


def orthonormal(rows, cols, generator):
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


def make_matrix(kind, m, n, seed=0, batch=()):
    generator = torch.Generator().manual_seed(seed)
    r = min(m, n)
    mats = []
    for _ in range(math.prod(batch)):
        s = spectrum(kind, r, generator)
        mats.append(orthonormal(m, r, generator) * s @ orthonormal(n, r, generator).T)
    return torch.stack(mats).reshape(*batch, m, n)


def make_psd(kind, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lam = spectrum(kind, n, generator)
    Q = orthonormal(n, n, generator)
    G = Q * lam @ Q.T
    return (G + G.T) / 2


def entropy_of(values):
    values = values.to(torch.float64)
    p = values / values.sum(-1, keepdim=True)
    return -torch.special.xlogy(p, p).sum(-1)


def reference_entropy(A, gram=False, hermitian=False):
    s = torch.linalg.svdvals(A.to(torch.float64))
    if gram:
        s = s.square()
    return entropy_of(s)


def assert_close_rel(actual, expected, rtol, what, floor=1e-300):
    """|actual - expected| <= rtol * max(|expected|, floor). Entropies use floor=1 nat: near H = 0
    (rank one) a relative error of H is meaningless, and 1 nat of scale makes the check that of
    the effective rank exp(H) to first order."""
    scale = expected.abs().clamp_min(floor)
    error = ((actual - expected).abs() / scale).max().item()
    worst = ((actual - expected).abs() / scale).argmax().item()
    assert error <= rtol, (
        f"{what}: relative error {error:.3e} > {rtol:.0e} at flat index {worst}: "
        f"got {actual.flatten()[worst].item()!r}, expected {expected.flatten()[worst].item()!r}"
    )


def assert_contains(bounds, exact, what):
    lower, upper = bounds.lower, bounds.upper
    below = (exact < lower).any().item()
    above = (exact > upper).any().item()
    assert not below and not above, (
        f"{what}: exact {exact.tolist()} outside [{lower.tolist()}, {upper.tolist()}] "
        f"(by {(lower - exact).clamp_min(0).max().item():.3e} below, {(exact - upper).clamp_min(0).max().item():.3e} above)"
    )


# ----------------------------------------------------------------------------- exact
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("gram", [False, True], ids=["singular", "gram"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
@pytest.mark.parametrize("kind", SPECTRA)
def test_exact_matches_svd(kind, shape, gram, dtype):
    if dtype == torch.float32 and kind in ("tiny", "huge"):
        scale = 1e-30 if kind == "tiny" else 1e30  # the fp64 scales are outside the fp32 range
        A = (make_matrix("decaying", *shape) * scale).to(dtype)
    else:
        A = make_matrix(kind, *shape).to(dtype)
    expected = reference_entropy(A, gram=gram)
    actual = spectral_entropy(A, gram=gram, method="exact")
    assert actual.dtype == torch.float64 and actual.shape == ()
    assert_close_rel(actual, expected, EXACT_RTOL[dtype], f"{kind} {shape} gram={gram} {dtype}", floor=1)
    assert_close_rel(effective_rank(A, gram=gram, method="exact"), expected.exp(), EXACT_RTOL[dtype] * max(1, expected.item()), "effective_rank")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ["decaying", "flat", "rank_deficient", "clustered", "tiny", "huge"])
def test_exact_hermitian(kind, dtype):
    G = make_psd(kind, 65)
    if dtype == torch.float32 and kind in ("tiny", "huge"):
        G = make_psd("decaying", 65) * (1e-30 if kind == "tiny" else 1e30)
    G = G.to(dtype)
    expected = reference_entropy(G, hermitian=True)
    assert_close_rel(spectral_entropy(G, hermitian=True, method="exact"), expected, EXACT_RTOL[dtype], f"hermitian {kind}", floor=1)


def test_batch_dims_match_loop():
    A = make_matrix("decaying", 17, 9, batch=(2, 3))
    batched = spectral_entropy(A)
    assert batched.shape == (2, 3)
    looped = torch.stack([spectral_entropy(a) for a in A.reshape(-1, 17, 9)]).reshape(2, 3)
    assert_close_rel(batched, looped, 1e-12, "batched vs looped")
    assert_close_rel(batched, reference_entropy(A), 1e-10, "batched vs svd")


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_batch"])
def test_non_contiguous(layout):
    base = make_matrix("clustered", 40, 24)
    if layout == "transposed":
        A = base.T
    elif layout == "strided":
        A = make_matrix("decaying", 80, 48)[::2, ::2]
    else:
        A = base.expand(3, 40, 24)
    assert not A.is_contiguous()
    assert_close_rel(spectral_entropy(A), reference_entropy(A), 1e-10, layout)
    assert_close_rel(spectral_entropy(A, gram=True), reference_entropy(A, gram=True), 1e-10, layout + " gram")


def test_gram_never_forms_large_side():
    # N = 20000 rows: an N x N Gram would be 3.2 GB in fp64; the d x d route is instant
    X = torch.randn(20000, 8, generator=torch.Generator().manual_seed(1))
    assert_close_rel(spectral_entropy(X, gram=True), reference_entropy(X, gram=True), 1e-5, "tall gram")


def test_center_subtracts_column_mean():
    X = make_matrix("decaying", 50, 10) + 3.0
    Xc = X - X.mean(0, keepdim=True)
    assert_close_rel(spectral_entropy(X, center=True, gram=True), reference_entropy(Xc, gram=True), 1e-10, "center")


def test_integer_input_is_converted():
    A = torch.arange(12).reshape(4, 3) % 5
    assert_close_rel(spectral_entropy(A), reference_entropy(A.double()), 1e-10, "int64")


def test_half_input():
    A = make_matrix("decaying", 30, 20).to(torch.float16)
    expected = reference_entropy(A.double())  # same fp16 values, fp64 reference
    assert_close_rel(spectral_entropy(A), expected, 1e-5, "fp16")


# ----------------------------------------------------------------------------- zero and bad input
@pytest.mark.parametrize("method", ["exact", "randomized", "slq", "auto"])
@pytest.mark.parametrize("mode", ["singular", "gram", "hermitian"])
def test_zero_matrix(method, mode):
    Z = torch.zeros(2, 12, 12)
    kwargs = {"gram": mode == "gram", "hermitian": mode == "hermitian", "method": method, "rank": 4}
    bounds = spectral_entropy(Z, return_bounds=True, **kwargs)
    for value in bounds:
        assert torch.equal(value, torch.full((2,), -math.inf, dtype=torch.float64)), bounds
    zeros = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(effective_rank(Z, **kwargs), zeros)
    if mode != "gram" or method in ("exact", "auto"):  # gram=True: the stable rank is exact only
        for value in stable_rank(Z, return_bounds=True, **kwargs):
            assert torch.equal(value, zeros), value
    metrics = rank_module.rank_metrics(Z, **kwargs)
    assert torch.equal(metrics["spectral_entropy"], torch.full((2,), -math.inf, dtype=torch.float64)), metrics
    assert torch.equal(metrics["effective_rank"], zeros) and torch.equal(metrics["stable_rank"], zeros), metrics


def test_zero_matrix_inside_batch():
    A = make_matrix("decaying", 10, 6, batch=(3,))
    A[1] = 0
    out = effective_rank(A)
    assert out[1].item() == 0 and torch.isfinite(out).all()
    assert_close_rel(out[[0, 2]], reference_entropy(A[[0, 2]]).exp(), 1e-10, "nonzero rows")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("function", [spectral_entropy, effective_rank, stable_rank], ids=lambda f: f.__name__)
def test_non_finite_raises(function, bad):
    A = torch.randn(5, 4)
    A[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        function(A)


@pytest.mark.parametrize("shape", [(5,), (), (0, 4), (3, 0), (2, 0, 3)], ids=str)
@pytest.mark.parametrize("function", [spectral_entropy, effective_rank, stable_rank], ids=lambda f: f.__name__)
def test_bad_shapes_raise(function, shape):
    with pytest.raises(ValueError, match=re.escape(f"shape {shape}")):
        function(torch.zeros(shape))


def test_non_square_hermitian_raises():
    with pytest.raises(ValueError, match=r"hermitian=True needs square.*\(4, 5\)"):
        spectral_entropy(torch.randn(4, 5), hermitian=True)


# ----------------------------------------------------------------------------- randomized
RANDOMIZED_CASES = [(kind, mode) for kind in SPECTRA for mode in ("singular", "gram", "hermitian")]


@pytest.mark.parametrize("rank", [8, 40], ids=["k8", "k40"])
@pytest.mark.parametrize("kind,mode", RANDOMIZED_CASES, ids=[f"{k}-{m}" for k, m in RANDOMIZED_CASES])
def test_randomized_bounds_contain_exact(kind, mode, rank):
    if mode == "hermitian":
        A = make_psd(kind, 96, seed=3)
    else:
        A = make_matrix(kind, 120, 96, seed=3)
    kwargs = {"gram": mode == "gram", "hermitian": mode == "hermitian"}
    exact = reference_entropy(A, **kwargs)
    bounds = spectral_entropy(A, method="randomized", rank=rank, return_bounds=True, **kwargs)
    assert isinstance(bounds, RankEstimate)
    assert_contains(bounds, exact, f"{kind} {mode} k={rank}")
    assert bounds.lower <= bounds.estimate <= bounds.upper
    erank = effective_rank(A, method="randomized", rank=rank, return_bounds=True, **kwargs)
    assert_contains(erank, exact.exp(), f"erank {kind} {mode} k={rank}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["singular", "gram", "hermitian"])
@pytest.mark.parametrize("decay", [0.8, 0.9, 0.95])
def test_randomized_estimate_within_one_percent(decay, mode, dtype):
    n = 200
    generator = torch.Generator().manual_seed(5)
    s = decay ** torch.arange(n, dtype=torch.float64)
    if mode == "hermitian":
        Q = orthonormal(n, n, generator)
        A = Q * s @ Q.T
        A = (A + A.T) / 2
    else:
        A = orthonormal(260, n, generator) * s @ orthonormal(n, n, generator).T
    A = A.to(dtype)
    kwargs = {"gram": mode == "gram", "hermitian": mode == "hermitian"}
    exact = reference_entropy(A, **kwargs)
    k = math.ceil(2 * exact.exp().item())  # sketch size = 2x the effective rank
    out = effective_rank(A, method="randomized", rank=k, return_bounds=True, **kwargs)
    assert_close_rel(out.estimate, exact.exp(), 0.01, f"decay {decay} {mode} k={k}")
    assert_contains(out, exact.exp(), f"decay {decay} {mode} k={k}")


def test_randomized_same_seed_same_result():
    A = make_matrix("decaying", 90, 70)
    first = spectral_entropy(A, method="randomized", rank=10, seed=11, return_bounds=True)
    second = spectral_entropy(A, method="randomized", rank=10, seed=11, return_bounds=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_randomized_batched_and_power_iterations():
    A = make_matrix("decaying", 60, 50, batch=(2, 2))
    exact = reference_entropy(A)
    plain = spectral_entropy(A, method="randomized", rank=12, return_bounds=True)
    powered = spectral_entropy(A, method="randomized", rank=12, niter=2, return_bounds=True)
    assert plain.estimate.shape == (2, 2)
    assert_contains(plain, exact, "niter 0")
    assert_contains(powered, exact, "niter 2")
    assert ((powered.upper - powered.lower) <= (plain.upper - plain.lower) * 1.001).all()


# ----------------------------------------------------------------------------- slq
@pytest.mark.parametrize("mode", ["singular", "gram", "hermitian"])
@pytest.mark.parametrize("size", [64, 150])
def test_slq_flat_spectrum(size, mode):
    if mode == "hermitian":
        A = make_psd("flat", size, seed=7)
    else:
        A = make_matrix("flat", size + 20, size, seed=7)
    kwargs = {"gram": mode == "gram", "hermitian": mode == "hermitian"}
    exact = reference_entropy(A, **kwargs)
    out = spectral_entropy(A, method="slq", return_bounds=True, **kwargs)
    assert_close_rel(out.estimate, exact, 0.02, f"slq {mode} {size}")
    assert_close_rel(effective_rank(A, method="slq", **kwargs), exact.exp(), 0.02, f"slq erank {mode} {size}")
    assert_contains(out, exact, f"slq {mode} {size}")



SLQ_MODES = ["singular", "gram", "hermitian"]
SLQ_SPECTRA = SPECTRA + ["decay98", "low_rank_gram"]


def slq_matrix(kind, size, mode, seed):
    """A test matrix for slq: data (size + 20) x size, or a size x size PSD matrix for hermitian.

    decay98: singular values 0.98^i (the bench's decay case, smaller); low_rank_gram: W W^T of a
    Gaussian W (size x size // 8), for hermitian, or W itself as data (the bench's gram case).
    """
    generator = torch.Generator().manual_seed(seed)
    if kind == "decay98":
        s = 0.98 ** torch.arange(size, dtype=torch.float64)
        A = orthonormal(size + 20, size, generator) * s @ orthonormal(size, size, generator).T
        return A.T @ A if mode == "hermitian" else A
    if kind == "low_rank_gram":
        W = torch.randn(size, size // 8, generator=generator, dtype=torch.float64)
        return W @ W.T if mode == "hermitian" else W @ torch.randn(size // 8, size, generator=generator, dtype=torch.float64)
    return make_psd(kind, size, seed=seed) if mode == "hermitian" else make_matrix(kind, size + 20, size, seed=seed)


@pytest.mark.parametrize("mode", SLQ_MODES)
@pytest.mark.parametrize("kind", SLQ_SPECTRA)
def test_slq_bounds_contain_exact(kind, mode):
    A = slq_matrix(kind, 160, mode, seed=11)
    kwargs = {"gram": mode == "gram", "hermitian": mode == "hermitian"}
    exact = reference_entropy(A, **kwargs)
    for seed in (0, 1):
        out = spectral_entropy(A, method="slq", return_bounds=True, seed=seed, **kwargs)
        assert out.lower <= out.estimate <= out.upper, f"slq {kind} {mode} seed {seed}: unordered {out}"
        assert_contains(out, exact, f"slq {kind} {mode} seed {seed}")


@pytest.mark.parametrize("kind", ["decay98", "low_rank_gram", "clustered"])
def test_slq_quadrature_brackets_each_probe(kind):
    """Gauss <= u^T f(G) u <= Gauss-Radau per probe, f = x log x and sqrt(x) log sqrt(x), G of trace 1."""
    probes, steps = 6, 12
    A = slq_matrix(kind, 160, "singular", seed=3)
    X = A / torch.linalg.matrix_norm(A)
    G = X.mT @ X
    lam, vectors = torch.linalg.eigh(G)
    lam = lam.clamp_min(0)
    signs = torch.randint(0, 2, (160, probes), generator=torch.Generator().manual_seed(0)).to(torch.float64) * 2 - 1
    mass = (vectors.T @ signs).square()  # (r, probes) spectral weights of each probe

    def rule(nodes, weights, f):
        return (weights * f(nodes.clamp_min(0))).sum(-1)

    x_log_x = lambda x: torch.special.xlogy(x, x)
    root_log_root = lambda x: torch.special.xlogy(x.sqrt(), x.sqrt())
    (sigma_g, w_g), (sigma_r, w_r) = slq._slq_data_rules(X, 160, probes, steps, 0)
    gauss_h, radau_h, shift = slq._slq_hermitian_rules(G, 160, probes, steps, 0)
    for f in (x_log_x, root_log_root):
        exact = (mass * f(lam).unsqueeze(-1)).sum(0)
        slack = 1e-9 * exact.abs().max()
        for name, low, high in (
            ("data", rule(sigma_g.square(), w_g, f), rule(sigma_r.square(), w_r, f)),
            ("hermitian", rule(*gauss_h, f), rule(radau_h[0] + shift.unsqueeze(-1), radau_h[1], f) + 160 * -shift * shift.log()),
        ):
            if f is root_log_root and name == "hermitian":
                continue  # the hermitian path only integrates x log x
            assert (low <= exact + slack).all() and (exact <= high + slack).all(), (
                f"{kind} {name}: exact {exact.tolist()} outside Gauss {low.tolist()} / Radau {high.tolist()}"
            )
    exact_root = (mass * lam.sqrt().unsqueeze(-1)).sum(0)
    gauss_root, radau_root = (w_g * sigma_g).sum(-1), (w_r * sigma_r).sum(-1)
    assert (radau_root <= exact_root + 1e-9).all() and (exact_root <= gauss_root + 1e-9).all(), (
        f"{kind} sqrt: exact {exact_root.tolist()} outside Radau {radau_root.tolist()} / Gauss {gauss_root.tolist()}"
    )


def test_auto_uses_slq_only_where_narrower(monkeypatch):
    monkeypatch.setattr(rank_module, "_AUTO_EXACT_MAX", 16)  # make 150 x 150 "large"
    flat = make_matrix("flat", 170, 150, seed=5)
    decaying = make_matrix("decaying", 170, 150, seed=5)  # singular values 0.9^i
    batch = torch.stack([flat, decaying])
    exact = reference_entropy(batch)
    # sketch of 40: interval ~0.28 nats on the decaying matrix (slq: ~0.5), > 1 nat on the flat one
    auto = spectral_entropy(batch, rank=40, return_bounds=True)
    randomized = spectral_entropy(batch, method="randomized", rank=40, return_bounds=True)
    slq = spectral_entropy(batch, method="slq", return_bounds=True)
    assert (randomized.upper - randomized.lower > rank_module._AUTO_WIDTH).all(), randomized
    # flat: slq's interval is the narrower one; decaying singular values: the sketch's
    assert slq.upper[0] - slq.lower[0] < randomized.upper[0] - randomized.lower[0], (slq, randomized)
    assert slq.upper[1] - slq.lower[1] > randomized.upper[1] - randomized.lower[1], (slq, randomized)
    for i, chosen in enumerate((slq, randomized)):
        for name in ("estimate", "lower", "upper"):
            assert getattr(auto, name)[i] == getattr(chosen, name)[i], f"auto matrix {i} {name}: {auto} vs {chosen}"
    assert_contains(auto, exact, "auto")

def test_auto_small_is_exact():
    A = make_matrix("decaying", 30, 20)
    out = spectral_entropy(A, return_bounds=True)
    assert out.lower == out.estimate == out.upper
    assert_close_rel(out.estimate, reference_entropy(A), 1e-10, "auto")


# ----------------------------------------------------------------------------- stable rank
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("mode", ["singular", "gram", "hermitian"])
@pytest.mark.parametrize("kind", ["decaying", "flat", "rank_deficient", "huge"])
def test_stable_rank_exact(kind, mode, dtype):
    A = make_psd(kind, 40) if mode == "hermitian" else make_matrix(kind, 50, 40)
    if dtype == torch.float32 and kind == "huge":
        A = A * 1e-120  # 1e30: the largest scale fp32 holds
    A = A.to(dtype)
    s = torch.linalg.svdvals(A.double())
    s = s / s.max()  # the ratio is scale-free; s^4 of 1e150 would overflow fp64
    if mode == "gram":
        s = s.square()
    expected = s.square().sum() / s.max().square()
    actual = stable_rank(A, gram=mode == "gram", hermitian=mode == "hermitian", method="exact")
    assert_close_rel(actual, expected, EXACT_RTOL[dtype], f"stable_rank {kind} {mode}")


@pytest.mark.parametrize("mode", ["singular", "hermitian"])
@pytest.mark.parametrize("kind", SPECTRA)
def test_stable_rank_randomized_bounds(kind, mode):
    A = make_psd(kind, 80, seed=2) if mode == "hermitian" else make_matrix(kind, 90, 80, seed=2)
    s = torch.linalg.svdvals(A)
    expected = s.square().sum() / s.max().square()
    out = stable_rank(A, hermitian=mode == "hermitian", method="randomized", rank=10, return_bounds=True)
    assert_contains(out, expected, f"stable_rank randomized {kind} {mode}")


# ----------------------------------------------------------------------------- many matrices
def test_effective_ranks_groups_and_keeps_order(monkeypatch):
    import fastrank.rank.api as rank_module

    tensors = [make_matrix("decaying", 12, 8, seed=i) if i % 2 else make_matrix("flat", 6, 9, seed=i) for i in range(5)]
    tensors.append(make_matrix("clustered", 7, 7, batch=(2,)))
    calls = []
    original = rank_module.effective_rank

    def counting(A, **kwargs):
        calls.append(tuple(A.shape))
        return original(A, **kwargs)

    monkeypatch.setattr(rank_module, "effective_rank", counting)
    out = effective_ranks(tensors)
    assert sorted(calls) == sorted([(2, 12, 8), (3, 6, 9), (1, 2, 7, 7)])
    for tensor, value in zip(tensors, out):
        assert value.shape == tensor.shape[:-2]
        assert_close_rel(value, reference_entropy(tensor).exp(), 1e-10, "effective_ranks")
    named = effective_ranks({"a": tensors[0], "b": tensors[1]}, return_bounds=True)
    assert list(named) == ["a", "b"] and isinstance(named["b"], RankEstimate)


# ----------------------------------------------------------------------------- sketch op (torch twin)
@pytest.mark.parametrize("gram", [False, True], ids=["plain", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
def test_sketch_op_opcheck_and_twin(dtype, gram):
    from fastrank.sketch import gaussian_sketch, gaussian_sketch_ref, sketch_omega_ref

    A = torch.randn(2, 9, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.library.opcheck(torch.ops.fastrank.gaussian_sketch.default, (A, 5, 3, gram))
    torch.library.opcheck(torch.ops.fastrank.gaussian_sketch.default, (A.mT, 4, 1, gram))
    Y = gaussian_sketch(A, 5, seed=3, gram=gram)
    assert torch.equal(Y, gaussian_sketch_ref(A, 5, 3, gram))
    assert torch.equal(Y, gaussian_sketch(A, 5, seed=3, gram=gram))
    omega = sketch_omega_ref(9 if gram else 7, 5, 3, dtype=torch.float64)
    Ad = A.double()
    expected = Ad @ (Ad.mT @ omega) if gram else Ad @ omega
    error = ((Y.double() - expected).norm() / expected.norm()).item()
    assert error < (1e-13 if dtype == torch.float64 else 1e-5), f"twin vs fp64: {error:.3e}"


def test_randomized_hermitian_psd_up_to_rounding():
    # an fp32 Gram of rank 24 is PSD only up to rounding: its 72 "zero" eigenvalues are +-noise,
    # which the exact value counts (|lambda|); the certified bounds must still contain it
    W = torch.randn(96, 24, generator=torch.Generator().manual_seed(4))
    G = W @ W.T
    exact = reference_entropy(G, hermitian=True)
    for rank in (16, 30):
        assert_contains(spectral_entropy(G, hermitian=True, method="randomized", rank=rank, return_bounds=True), exact, f"k={rank}")
        s = torch.linalg.svdvals(G.double())
        assert_contains(stable_rank(G, hermitian=True, method="randomized", rank=rank, return_bounds=True), s.square().sum() / s[0] ** 2, "stable")


@pytest.mark.parametrize(
    "kwargs,shape",
    [(dict(), (3, 9, 5)), (dict(gram=True, center=True), (2, 40, 7)), (dict(hermitian=True), (2, 6, 6))],
    ids=["singular", "gram-centered", "hermitian"],
)
def test_rank_metrics_agree_with_the_three_functions(kwargs, shape):
    A = torch.randn(*shape, dtype=torch.float64)
    if kwargs.get("hermitian"):
        A = A @ A.mT
    metrics = rank_module.rank_metrics(A, method="exact", **kwargs)
    for name, fn in [("spectral_entropy", rank_module.spectral_entropy),
                     ("effective_rank", rank_module.effective_rank), ("stable_rank", rank_module.stable_rank)]:
        expected = fn(A, method="exact", **kwargs)
        err = ((metrics[name] - expected).abs() / expected.abs()).max().item()
        assert err <= 1e-10, f"{name}: relative difference {err:.2e}"
    zero = rank_module.rank_metrics(torch.zeros(4, 3))
    assert zero["spectral_entropy"] == -math.inf and zero["effective_rank"] == 0 and zero["stable_rank"] == 0


def test_effective_ranks_all_metrics_in_input_order():
    tensors = [torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64),
               torch.randn(5, 4, dtype=torch.float64)]
    results = rank_module.effective_ranks(tensors, metric="all")
    for tensor, result in zip(tensors, results):
        assert set(result) == {"spectral_entropy", "effective_rank", "stable_rank"}
        assert float(result["effective_rank"]) == pytest.approx(float(rank_module.effective_rank(tensor)), rel=1e-12)
    with pytest.raises(ValueError, match="metric must be one of"):
        rank_module.effective_ranks(tensors, metric="rank")


# ----------------------------------------------------------------------------- small matrices
# One small CPU matrix takes _small_values (no _prepare bookkeeping; fp64 svdvals for gram=False):
# the same results as the general path, the same errors, and one route per shape.
SMALL_SHAPES = [(1, 1), (1, 7), (7, 1), (7, 7), (16, 16), (33, 9), (9, 33), (64, 64), (129, 7), (2048, 8), (72, 72), (129, 129)]
SMALL_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int64": torch.int64}
SMALL_RTOL = {torch.float64: 1e-10, torch.int64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def small_input(shape, dtype, layout, seed):
    """A fresh Gaussian (integers: -9..9, never all zero) of ``shape`` in ``dtype`` and ``layout``."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape
    stored = {"contiguous": (rows, cols), "transposed": (cols, rows), "strided": (2 * rows, 2 * cols)}[layout]
    if dtype == torch.int64:
        base = torch.randint(-9, 10, stored, generator=generator)
        base.view(-1)[0] = 5
    else:
        base = torch.randn(stored, generator=generator, dtype=torch.float64).to(dtype)
    A = {"contiguous": base, "transposed": base.mT, "strided": base[::2, ::2]}[layout]
    assert A.shape == shape
    assert A.is_contiguous() == (layout == "contiguous") or min(shape) == 1, (layout, A.stride())
    return A


SMALL_CASES = [(shape, mode) for shape in SMALL_SHAPES for mode in ("singular", "gram", "hermitian")
               if mode != "hermitian" or shape[0] == shape[1]]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype", list(SMALL_DTYPES.values()), ids=list(SMALL_DTYPES))
@pytest.mark.parametrize("shape,mode", SMALL_CASES, ids=[f"{m}x{n}-{mode}" for (m, n), mode in SMALL_CASES])
def test_small_matrix_matches_fp64_reference(shape, mode, dtype, layout):
    A = small_input(shape, dtype, layout, seed=sum(shape) + len(mode))
    if mode == "hermitian":
        A = (A.double() @ A.double().mT).to(dtype) if dtype != torch.int64 else A @ A.mT
    kwargs = {"gram": mode == "gram", "hermitian": mode == "hermitian"}
    expected = reference_entropy(A.double(), **kwargs)
    what = f"{shape} {mode} {dtype} {layout}"
    assert_close_rel(spectral_entropy(A, **kwargs), expected, SMALL_RTOL[dtype], what, floor=1)
    assert_close_rel(effective_rank(A, **kwargs), expected.exp(), SMALL_RTOL[dtype] * max(1, expected.item()), what)
    s = torch.linalg.svdvals(A.double())
    s = s.square() if mode == "gram" else s
    assert_close_rel(stable_rank(A, **kwargs), s.square().sum() / s.max().square(), SMALL_RTOL[dtype], what + " stable")


@pytest.mark.parametrize("mode", ["singular", "gram", "gram-centered", "hermitian"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (16, 16), (64, 64), (2048, 8)], ids=str)
def test_small_path_equals_general_path(monkeypatch, shape, mode):
    """The small-matrix route gives the general path's answer (forced by _SMALL_WORK = 0) to rounding,
    for every public function, and is taken: _prepare is never called."""
    if mode == "gram-centered" and shape[0] == 1:
        pytest.skip("one row is zero once centered: the general path's -inf")
    generator = torch.Generator().manual_seed(7)
    A = torch.randn(*shape, generator=generator, dtype=torch.float64)
    if mode == "hermitian":
        A = A[:, : shape[0]] if shape[1] >= shape[0] else A[: shape[1]]
        A = A @ A.mT
    kwargs = {"gram": mode.startswith("gram"), "hermitian": mode == "hermitian", "center": mode == "gram-centered"}
    functions = {
        "spectral_entropy": lambda X: spectral_entropy(X, **kwargs),
        "effective_rank": lambda X: effective_rank(X, **kwargs),
        "stable_rank": lambda X: stable_rank(X, **kwargs),
        "bounds": lambda X: effective_rank(X, return_bounds=True, **kwargs).upper,
        "rank_metrics": lambda X: rank_module.rank_metrics(X, **kwargs)["effective_rank"],
    }

    def no_prepare(*args):
        raise AssertionError("a small matrix went through _prepare")

    with monkeypatch.context() as patch:
        patch.setattr(rank_module, "_prepare", no_prepare)
        small = {name: fn(A) for name, fn in functions.items()}
    monkeypatch.setattr(exact, "_SMALL_WORK", 0)
    for name, fn in functions.items():
        general = fn(A)
        assert small[name].shape == general.shape == () and small[name].dtype == torch.float64
        assert_close_rel(small[name], general, 1e-12, f"{name} {shape} {mode}", floor=1)


def test_small_batch_of_one_and_batch_agree():
    A = torch.randn(1, 1, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    one = effective_rank(A)
    assert one.shape == (1, 1)
    batch = effective_rank(torch.cat([A, torch.randn_like(A)], dim=1))  # a batch: the Gram route
    assert_close_rel(one[0, 0], batch[0, 0], 1e-12, "batch of one vs batch")
    assert_close_rel(one, reference_entropy(A).exp(), 1e-10, "batch of one vs svd")


@pytest.mark.parametrize("mode", ["singular", "gram", "hermitian"])
def test_small_matrix_zero_and_non_finite(mode):
    kwargs = {"gram": mode == "gram", "hermitian": mode == "hermitian"}
    Z = torch.zeros(6, 6)
    assert spectral_entropy(Z, **kwargs).item() == -math.inf
    assert effective_rank(Z, **kwargs).item() == 0 and stable_rank(Z, **kwargs).item() == 0
    for bad in (math.nan, math.inf, -math.inf):
        A = torch.randn(6, 6)
        A[1, 4] = A[4, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            effective_rank(A, **kwargs)
    if mode == "gram":  # equal rows are zero once centered
        X = torch.randn(1, 5).expand(8, 5)
        assert spectral_entropy(X, gram=True, center=True).item() == -math.inf


@pytest.mark.parametrize("scale", [1e-200, 1e-70, 1e-55, 1e55, 1e70, 1e200], ids=lambda s: f"{s:.0e}")
def test_small_matrix_extreme_scales(scale):
    A = make_matrix("decaying", 9, 7) * scale
    for gram in (False, True):
        assert_close_rel(spectral_entropy(A, gram=gram), reference_entropy(A / scale, gram=gram), 1e-10, f"{scale} gram={gram}", floor=1)


def test_small_matrix_deterministic_and_differentiable():
    A = torch.randn(12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    first = effective_rank(A)
    for _ in range(3):
        assert torch.equal(effective_rank(A.clone()), first)
    for shape in [(12, 10), (3, 12, 10)]:  # small path and general (batched) path
        W = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        spectral_entropy(W).sum().backward()
        assert W.grad is not None and torch.isfinite(W.grad).all()


def test_small_matrix_from_a_list():
    rows = [[3.0, 1.0, 0.5], [1.0, 2.0, -1.0]]
    assert_close_rel(effective_rank(rows), reference_entropy(torch.tensor(rows, dtype=torch.float64)).exp(), 1e-10, "list")


def test_small_route_choice():
    """svdvals for one matrix with m n min(m, n) <= _SMALL_WORK; the Gram route for batches and above."""
    route = exact._svdvals_first
    assert route(torch.empty(64, 64), False, False) and route(torch.empty(2048, 8), False, False)
    assert not route(torch.empty(72, 72), False, False) and not route(torch.empty(2, 16, 16), False, False)
    assert not route(torch.empty(16, 16), True, False) and not route(torch.empty(16, 16), False, True)


# ----------------------------------------------------------------------------- every method, every metric
METHODS = ["auto", "exact", "randomized", "slq"]
MODES = ["singular", "gram", "hermitian"]


def mode_kwargs(mode):
    return {"gram": mode == "gram", "hermitian": mode == "hermitian"}


def reference_stable_rank(A, gram=False, hermitian=False):
    s = torch.linalg.svdvals(A.to(torch.float64))
    s = s / s.amax(-1, keepdim=True)
    if gram:
        s = s.square()
    return s.square().sum(-1)


def method_input(mode, seed):
    """A batch of two: a flat and a decaying spectrum, 96 values (randomized runs with a sketch of 16)."""
    if mode == "hermitian":
        return torch.stack([make_psd("flat", 96, seed=seed), make_psd("decaying", 96, seed=seed)])
    return torch.stack([make_matrix("flat", 110, 96, seed=seed), make_matrix("decaying", 110, 96, seed=seed)])


@pytest.mark.parametrize("entry", ["rank_metrics", "effective_ranks"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_every_metric(method, mode, entry):
    """rank_metrics and effective_ranks(metric="all") give all three metrics under every method,
    each the value of the method the docstring names for it: the entropy that of spectral_entropy
    with the same method, the stable rank that of stable_rank with the same method (for gram=True
    under randomized / slq: the exact one); and those functions' bounds contain the fp64 values."""
    A = method_input(mode, seed=23)
    kwargs = dict(mode_kwargs(mode), method=method, seed=3, rank=16 if method == "randomized" else None)
    if entry == "rank_metrics":
        got = rank_module.rank_metrics(A, **kwargs)
    else:
        listed = rank_module.effective_ranks(list(A), metric="all", **kwargs)
        got = {key: torch.stack([row[key] for row in listed]) for key in listed[0]}
    assert set(got) == {"spectral_entropy", "effective_rank", "stable_rank"}, set(got)
    entropy = spectral_entropy(A, return_bounds=True, **kwargs)
    stable_kwargs = dict(kwargs, method="exact") if mode == "gram" and method in ("randomized", "slq") else kwargs
    stable = stable_rank(A, return_bounds=True, **stable_kwargs)
    where = f"{entry} {method} {mode}"
    assert_close_rel(got["spectral_entropy"], entropy.estimate, 1e-12, f"{where} entropy", floor=1)
    assert_close_rel(got["effective_rank"], entropy.estimate.exp(), 1e-12, f"{where} effective rank")
    assert_close_rel(got["stable_rank"], stable.estimate, 1e-12, f"{where} stable rank")
    for name, bounds, expected in (
        ("entropy", entropy, reference_entropy(A, **mode_kwargs(mode))),
        ("stable rank", stable, reference_stable_rank(A, **mode_kwargs(mode))),
    ):
        if torch.equal(bounds.lower, bounds.upper):  # exact: bounds equal to the estimate
            assert_close_rel(bounds.estimate, expected, EXACT_RTOL[torch.float64], f"{where} {name}", floor=1)
        else:
            assert_contains(bounds, expected, f"{where} {name}")


@pytest.mark.parametrize("mode", ["singular", "hermitian"])
@pytest.mark.parametrize("kind", SLQ_SPECTRA)
def test_stable_rank_slq(kind, mode):
    """Stable rank from the SLQ run's Ritz values: certified bounds contain the fp64 value, the
    estimate (the largest Ritz value, converged) is the upper end and within 1e-7 of it (measured:
    at most 5e-9, on the flat spectrum), and rank_metrics reads the same run."""
    A = slq_matrix(kind, 160, mode, seed=11)
    kwargs = mode_kwargs(mode)
    expected = reference_stable_rank(A, **kwargs)
    for seed in (0, 1):
        out = stable_rank(A, method="slq", return_bounds=True, seed=seed, **kwargs)
        assert out.lower <= out.estimate <= out.upper, f"slq stable {kind} {mode} seed {seed}: unordered {out}"
        assert_contains(out, expected, f"slq stable {kind} {mode} seed {seed}")
        assert_close_rel(out.estimate, expected, 1e-7, f"slq stable {kind} {mode} seed {seed}")
        shared = rank_module.rank_metrics(A, method="slq", seed=seed, **kwargs)["stable_rank"]
        assert torch.equal(shared, out.estimate), (shared, out.estimate)


@pytest.mark.parametrize("method", ["randomized", "slq"])
def test_stable_rank_of_a_gram_by_a_sketch_names_the_alternative(method):
    with pytest.raises(ValueError, match=rf"stable_rank: method='{method}' has no estimate .*gram=True.*method='exact' \(or 'auto'\)"):
        stable_rank(torch.randn(30, 8, dtype=torch.float64), gram=True, method=method)


@pytest.mark.parametrize("function", [spectral_entropy, effective_rank, stable_rank, rank_module.rank_metrics], ids=lambda f: f.__name__)
def test_gram_and_hermitian_name_both_meanings(function):
    with pytest.raises(ValueError, match=rf"{function.__name__}: gram=True \(A is data X.*hermitian=True \(A is itself a symmetric"):
        function(torch.eye(5), gram=True, hermitian=True)


# ----------------------------------------------------------------------------- entries and symmetric inputs
@pytest.mark.parametrize(
    "entry,where",
    [(torch.randn(5), r"shape \(5,\) at index 1 \(a vector"), (torch.tensor(2.0), r"shape \(\) at index 1"),
     (torch.randn(0, 4), r"shape \(0, 4\) at index 1")],
    ids=["vector", "scalar", "empty"],
)
def test_effective_ranks_names_an_entry_that_is_not_a_matrix(entry, where):
    with pytest.raises(ValueError, match=r"effective_ranks: expected each entry to be a non-empty matrix .*" + where):
        effective_ranks([torch.randn(4, 3), entry])
    with pytest.raises(ValueError, match=r"got shape .* at key 'b'"):
        effective_ranks({"a": torch.randn(4, 3), "b": entry}, metric="all")


HERMITIAN_FUNCTIONS = {
    "spectral_entropy": spectral_entropy,
    "effective_rank": effective_rank,
    "stable_rank": stable_rank,
    "rank_metrics": rank_module.rank_metrics,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("batched", [False, True], ids=["one", "batch"])
def test_hermitian_refuses_a_matrix_that_is_not_symmetric(dtype, batched):
    torch.manual_seed(41)
    X = torch.randn(64, 7, dtype=dtype)
    gram = X.T @ X
    centered = (X - X.mean(0)).T @ (X - X.mean(0))
    good = torch.stack([gram, centered]) if batched else gram
    for function in HERMITIAN_FUNCTIONS.values():
        function(good, hermitian=True)  # symmetric to rounding: accepted
    bad = torch.randn(7, 7, dtype=dtype)
    bad = torch.stack([gram, bad]) if batched else bad
    where = r" at batch index 1" if batched else ""
    for name, function in HERMITIAN_FUNCTIONS.items():
        for method in METHODS:
            with pytest.raises(ValueError, match=rf"{name}: hermitian=True needs a symmetric PSD matrix, but the matrix{where} of shape \(7, 7\) is not symmetric: max \|A - A\^T\| = "):
                function(bad, hermitian=True, method=method)


SYMMETRY_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("size", [8, 100], ids=["small-path", "general-path"])
@pytest.mark.parametrize("dtype", list(SYMMETRY_DTYPES.values()), ids=list(SYMMETRY_DTYPES))
def test_hermitian_symmetry_tolerance(dtype, size):
    """The documented criterion, on both paths: max |A - A^T| <= sqrt(eps(dtype)) max |A|; half of it
    in one entry pair is accepted, twice it is refused with the measured ratio in the message."""
    G = make_psd("flat", size, seed=5)
    G = (G / G.abs().max()).to(dtype)  # max |G| = 1, exactly
    limit = math.sqrt(torch.finfo(dtype).eps)
    for factor, accepted in ((0.5, True), (2.0, False)):
        A = G.clone()
        A[0, size - 1] += factor * limit  # G[0, -1] is small: the sum rounds by at most eps / 2
        asymmetry = (A.double() - A.double().T).abs().max().item()
        assert (asymmetry <= limit) == accepted, (asymmetry, limit)
        for name, function in HERMITIAN_FUNCTIONS.items():
            if accepted:
                function(A, hermitian=True)
            else:
                with pytest.raises(ValueError, match=rf"{name}: .* = {asymmetry:.3g} max \|A\|, above the {limit:.2g} max \|A\| allowed for {dtype}"):
                    function(A, hermitian=True)


def test_hermitian_accepts_a_gram_symmetric_up_to_rounding():
    """Rounding-level asymmetry passes and the result is that of the symmetric part: an fp32 Gram
    whose triangles come from two summation orders (fp32 product / correctly rounded fp64 one),
    an fp64 Gram centered by an outer product of column sums (mean 100 std: 7e-12 max |A|), and
    fp16 / bf16 products."""
    generator = torch.Generator().manual_seed(9)
    X = torch.randn(4096, 48, generator=generator)
    upper = torch.triu(X.T @ X)
    lower = torch.tril((X.double().T @ X.double()).float(), -1)
    mixed = upper + lower
    assert (mixed != mixed.T).any()  # asymmetric, by rounding
    Y = torch.randn(1000, 40, generator=generator, dtype=torch.float64) + 100 * torch.randn(40, generator=generator, dtype=torch.float64)
    column_sum = Y.sum(0)
    centered = Y.T @ Y - torch.outer(column_sum, column_sum / 1000)
    assert (centered != centered.T).any()
    half = X[:256].half()
    cases = {"fp32 mixed": (mixed, 1e-5), "fp64 centered": (centered, 1e-10),
             "fp16": (half.T @ half, 1e-5), "bf16": (X[:256].bfloat16().T @ X[:256].bfloat16(), 1e-5)}
    for what, (A, rtol) in cases.items():
        symmetric = (A.double() + A.double().T) / 2
        expected = reference_entropy(symmetric, hermitian=True)
        for batch in (A, torch.stack([A, A])):
            got = rank_module.rank_metrics(batch, hermitian=True)["spectral_entropy"]
            assert_close_rel(got, expected.expand(got.shape), rtol, what, floor=1)


# ---- the host solver (fastrank.rank.eigensolver.host_eigvalsh / on_host) ---------------------------

from eigensolver_cases import record_host_solves, symmetric_with_garbage  # noqa: E402

from fastrank.rank import eigensolver  # noqa: E402


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("shape,n", [((), 17), ((7,), 17), ((2, 3), 9), ((4,), 1), ((3,), 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("upper", [True, False], ids=["upper", "lower"])
def test_host_eigvalsh_matches_fp64(threads, shape, n, dtype, upper):
    G, S = symmetric_with_garbage(shape, n, dtype, upper, seed=n + len(shape))
    values = eigensolver.host_eigvalsh(G, threads, upper=upper)
    assert values.shape == (*shape, n) and values.dtype == dtype and values.device == G.device
    reference = torch.linalg.eigvalsh(S)  # fp64, of the symmetric matrix the named triangle holds
    scale = reference.abs().amax(-1, keepdim=True)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    assert ((values.double() - reference).abs() <= tolerance * scale).all()
    assert (values.diff(dim=-1) >= 0).all()  # ascending


@pytest.mark.parametrize("shape", [(0, 5, 5), (3, 0, 0), (0, 0)])
def test_host_eigvalsh_of_empty_input_is_what_torch_returns(shape):
    G = torch.randn(shape, dtype=torch.float64)
    values = eigensolver.host_eigvalsh(G, 2)
    assert values.shape == torch.linalg.eigvalsh(G).shape == (*shape[:-1],) and values.dtype == torch.float64


def test_host_eigvalsh_of_a_non_contiguous_batch():
    G, S = symmetric_with_garbage((6,), 33, torch.float64, True, seed=1)
    strided = G.mT.contiguous().mT[::2]  # column-major storage, every other matrix
    assert not strided.is_contiguous()
    values = eigensolver.host_eigvalsh(strided, 2, upper=True)
    assert torch.allclose(values, torch.linalg.eigvalsh(S[::2]), rtol=0, atol=1e-12 * float(S.abs().max()))


def test_host_eigvalsh_workers_run_one_thread_and_leave_the_callers_count():
    import threading

    before = torch.get_num_threads()
    eigensolver.host_eigvalsh(torch.eye(3).expand(4, 3, 3), 3)
    pool = eigensolver._pool(3)
    counts = [pool.submit(torch.get_num_threads).result() for _ in range(9)]
    assert counts == [1] * 9
    assert torch.get_num_threads() == before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]  # threads started later take the count they took before the pool


def test_on_host_routes_this_threads_eigvalsh_only(monkeypatch):
    import threading

    calls = record_host_solves(monkeypatch)
    G, S = symmetric_with_garbage((3,), 20, torch.float64, True, seed=2)
    eigensolver.eigvalsh(G, upper=True)
    assert calls == []
    with eigensolver.on_host(2):
        inside = eigensolver.eigvalsh(G, upper=True)
        with eigensolver.on_host(4):
            eigensolver.eigvalsh(G)
        eigensolver.eigvalsh(G, upper=True)
        other = threading.Thread(target=lambda: eigensolver.eigvalsh(G), name="other")
        other.start()
        other.join()
    eigensolver.eigvalsh(G)
    main = threading.current_thread().name
    assert [(call.thread, call.threads, call.upper) for call in calls] == [(main, 2, True), (main, 4, False), (main, 2, True)]
    assert torch.allclose(inside, torch.linalg.eigvalsh(S), rtol=0, atol=1e-12 * float(S.abs().max()))


def test_effective_ranks_on_host_equal_the_default():
    generator = torch.Generator().manual_seed(4)
    weights = [torch.randn(80, 72, generator=generator) for _ in range(5)] + [
        torch.randn(72, 90, dtype=torch.float64, generator=generator) for _ in range(3)]
    default = effective_ranks(weights, metric="all")
    with eigensolver.on_host(2):
        hosted = effective_ranks(weights, metric="all")
    for got, want in zip(hosted, default):
        for key in want:
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-12, abs=0), key


@pytest.mark.parametrize("threads", [0, -1, True, 2.5, "2", None])
def test_host_solver_refuses_a_thread_count_that_is_not_a_positive_int(threads):
    with pytest.raises(ValueError, match=rf"^host_eigvalsh: threads must be a positive int, got {re.escape(repr(threads))}$"):
        eigensolver.host_eigvalsh(torch.eye(2), threads)
    with pytest.raises(ValueError, match=rf"^on_host: threads must be a positive int, got {re.escape(repr(threads))}$"):
        with eigensolver.on_host(threads):
            pass


def test_host_eigvalsh_refuses_non_square_input():
    with pytest.raises(ValueError, match=r"expected square matrices \(\.\.\., n, n\), got shape \(3, 4\)"):
        eigensolver.host_eigvalsh(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        eigensolver.host_eigvalsh(torch.randn(5), 2)


def test_default_host_threads_leave_half_the_cpus(monkeypatch):
    monkeypatch.setattr(eigensolver.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert eigensolver.default_host_threads() == 8
    monkeypatch.setattr(eigensolver.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert eigensolver.default_host_threads() == 1


def test_host_eigvalsh_in_a_forked_child_starts_workers_of_its_own():
    # A forked child has none of the parent's worker threads: it must not queue work for them.
    import multiprocessing

    eigensolver.host_eigvalsh(torch.eye(4).expand(2, 4, 4), 2)  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_solve_in_child, args=(queue,))
    child.start()
    child.join(timeout=30)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child hung on the parent's pool"
    assert child.exitcode == 0 and queue.get(timeout=5) == [1.0, 1.0, 1.0, 1.0] * 2


def _solve_in_child(queue):
    queue.put(eigensolver.host_eigvalsh(torch.eye(4, dtype=torch.float64).expand(2, 4, 4), 2).flatten().tolist())


def test_host_eigvalsh_is_differentiable_and_keeps_no_grad_and_inference_mode():
    G, _ = symmetric_with_garbage((4,), 12, torch.float64, False, seed=8)
    G.requires_grad_(True)
    weights = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (eigensolver.host_eigvalsh(G, 3) * weights).sum().backward()
    hosted, G.grad = G.grad, None
    (torch.linalg.eigvalsh(G) * weights).sum().backward()
    assert torch.allclose(hosted, G.grad, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert not eigensolver.host_eigvalsh(G, 3).requires_grad
    with torch.inference_mode():
        assert eigensolver.host_eigvalsh(G.detach(), 3).is_inference()
    W = torch.randn(3, 40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(10), requires_grad=True)
    spectral_entropy(W).sum().backward()
    default, W.grad = W.grad, None
    with eigensolver.on_host(2):
        spectral_entropy(W).sum().backward()
    assert torch.allclose(W.grad, default, rtol=1e-10, atol=1e-12)
