"""Benchmark cases of the effective-rank family (issue 4), shared by pytest-benchmark and the CLI.

Each case is plain data: a name, a setup function returning the inputs (built once, not timed),
the candidate and the baseline callables (each takes the inputs), the target ratio
baseline / candidate, and a quality function reporting accuracy of the candidate's result.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .rank import effective_rank

__all__ = ["RankBenchCase", "RANK_CASES", "paper_snippet_erank"]


@dataclass
class RankBenchCase:
    name: str
    shape: str
    dtype: torch.dtype
    setup: Callable[[], tuple]
    candidate: Callable
    baseline: Callable
    baseline_name: str
    target: str
    min_ratio: float
    quality: Callable = None
    rounds: int = 3
    extra_baselines: dict = field(default_factory=dict)


def paper_snippet_erank(A):
    """The usual effective-rank snippet: full SVD, then exp of the entropy of s / sum(s)."""
    s = torch.linalg.svd(A, full_matrices=False).S.double()
    p = s / s.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def _erank_of(values):
    values = values.double()
    p = values / values.sum(-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def _orthonormal(n, generator):
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q


def _embeddings():
    return (torch.randn(65536, 512, generator=torch.Generator().manual_seed(0)),)


def _gram_rank512():
    W = torch.randn(4096, 512, generator=torch.Generator().manual_seed(1))
    return (W @ W.T,)


def _weights():
    return (torch.randn(64, 512, 512, generator=torch.Generator().manual_seed(2)) / math.sqrt(512),)


def _decay098():
    generator = torch.Generator().manual_seed(3)
    s = 0.98 ** torch.arange(4096, dtype=torch.float64)
    A = (_orthonormal(4096, generator) * s) @ _orthonormal(4096, generator).T
    return (A.float(),)


def _relative_error(result, inputs, reference):
    estimate = result.estimate if hasattr(result, "estimate") else result
    return {"rel_error_vs_reference": float(((estimate - reference).abs() / reference).max())}


def _bounds_quality(result, reference):
    width = float(((result.upper - result.lower) / result.estimate).max())
    contains = bool(((result.lower <= reference) & (reference <= result.upper)).all())
    error = float(((result.estimate - reference).abs() / reference).max())
    return {"bound_width_rel": width, "bounds_contain_reference": contains, "rel_error_vs_reference": error}


RANK_CASES = [
    RankBenchCase(
        name="embeddings_gram_exact",
        shape="X 65536 x 512",
        dtype=torch.float32,
        setup=_embeddings,
        candidate=lambda X: effective_rank(X, gram=True, method="exact"),
        baseline=lambda X: _erank_of(torch.linalg.svdvals(X).square()),
        baseline_name="torch.linalg.svdvals(X)",
        target=">= 2x faster than svdvals",
        min_ratio=2.0,
        quality=lambda result, inputs: _relative_error(result, inputs, _erank_of(torch.linalg.svdvals(inputs[0].double()).square())),
        rounds=5,
    ),
    RankBenchCase(
        name="gram4096_rank512_hermitian_exact",
        shape="G 4096 x 4096, rank 512",
        dtype=torch.float32,
        setup=_gram_rank512,
        candidate=lambda G: effective_rank(G, hermitian=True, method="exact"),
        baseline=paper_snippet_erank,
        baseline_name="paper snippet (full SVD)",
        target=">= 2.5x faster than the snippet",
        min_ratio=2.5,
        rounds=2,
    ),
    RankBenchCase(
        name="gram4096_rank512_hermitian_randomized",
        shape="G 4096 x 4096, rank 512, k = 768",
        dtype=torch.float32,
        setup=_gram_rank512,
        candidate=lambda G: effective_rank(G, hermitian=True, method="randomized", rank=768, return_bounds=True),
        baseline=paper_snippet_erank,
        baseline_name="paper snippet (full SVD)",
        target=">= 10x faster than the snippet, bound width <= 1%",
        min_ratio=10.0,
        quality=lambda result, inputs: _bounds_quality(result, _erank_of(torch.linalg.eigvalsh(inputs[0].double()).abs())),
        rounds=3,
    ),
    RankBenchCase(
        name="weights_64x512x512_exact",
        shape="64 x (512 x 512)",
        dtype=torch.float32,
        setup=_weights,
        candidate=lambda W: effective_rank(W, method="exact"),
        baseline=lambda W: torch.stack([paper_snippet_erank(w) for w in W]),
        baseline_name="loop of the paper snippet",
        target="never slower than the loop (ratio >= 1), 1e-10 accurate",
        min_ratio=1.0,
        quality=lambda result, inputs: _relative_error(result, inputs, _erank_of(torch.linalg.svdvals(inputs[0].double()))),
        rounds=3,
    ),
    RankBenchCase(
        name="decay098_randomized",
        shape="A 4096 x 4096, s_i = 0.98^i, k = 512",
        dtype=torch.float32,
        setup=_decay098,
        candidate=lambda A: effective_rank(A, method="randomized", rank=512, return_bounds=True),
        baseline=lambda A: _erank_of(torch.linalg.svdvals(A)),
        baseline_name="torch.linalg.svdvals(A)",
        target=">= 10x faster than svdvals, bound width <= 2%",
        min_ratio=10.0,
        quality=lambda result, inputs: _bounds_quality(result, _erank_of(0.98 ** torch.arange(4096, dtype=torch.float64))),
        rounds=3,
        extra_baselines={"torch.svd_lowrank(q=256)": lambda A: torch.svd_lowrank(A, q=256)[1]},
    ),
]
