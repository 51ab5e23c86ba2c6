"""Cases of the rank suite: fastrank's effective-rank family against what people use today.

Every case has the same baseline, the usual effective-rank snippet (``paper snippet``: a full SVD,
then exp of the entropy of s / sum(s)), and reports the accuracy of every variant against the exact
value (fp64 spectrum, or the prescribed one), with the width of the returned interval for the
variants that return bounds:

* ``embeddings``: the Gram spectrum of embeddings X (N x d): fastrank exact (``gram=True``: fp64
  eigvalsh of the d x d side) vs the snippet and ``torch.linalg.svdvals`` of X;
* ``gram``: a PSD Gram G (n x n, rank r): fastrank exact / randomized (certified bounds) / slq vs the
  snippet, ``torch.linalg.svdvals`` and ``torch.svd_lowrank`` (top-k only: the tail is lost);
* ``weights``: a batch of b square weights: fastrank batched (one call) vs the snippet in a Python
  loop (as per-layer tools do) and batched ``torch.linalg.svdvals``;
* ``decay``: A (n x n) with singular values 0.98^i: fastrank randomized / slq / exact vs the
  snippet, ``torch.linalg.svdvals`` and ``torch.svd_lowrank``.

Errors are relative errors of the effective rank exp(H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bench import Case, Prepared
from .rank import RankEstimate, effective_rank

__all__ = ["QUICK_SIZES", "RankSizes", "paper_snippet_erank", "rank_cases"]

SNIPPET = "paper snippet (full SVD)"


def paper_snippet_erank(A: torch.Tensor) -> torch.Tensor:
    """The usual effective-rank snippet: full SVD, then exp of the entropy of s / sum(s)."""
    s = torch.linalg.svd(A, full_matrices=False).S.double()
    return _erank_of(s)


def _erank_of(values: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of values / sum(values), over the last dim, in fp64."""
    values = values.double()
    p = values / values.sum(-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def _rank_error(variant: str, result, reference: torch.Tensor) -> dict:
    """Relative error of the estimate; width of the bounds (relative) and whether they hold."""
    if isinstance(result, RankEstimate):
        estimate = result.estimate
        row = {
            "bound_width": float(((result.upper - result.lower) / estimate).max()),
            "bounds_contain_reference": bool(
                ((result.lower <= reference) & (reference <= result.upper)).all()
            ),
        }
    else:
        estimate, row = result, {}
    estimate = estimate.to(reference.device, torch.float64)
    row["error"] = float(((estimate - reference).abs() / reference).max())
    return row


def _orthonormal(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q


def _case(name, shape, variants, setup, repeats, note="") -> Case:
    return Case(
        suite="rank",
        name=name,
        shape=shape,
        dtype="float32",
        baseline=variants[0],
        variants=variants,
        setup=setup,
        error=_rank_error,
        repeats=repeats,
        warmup=1,
        note=note,
    )


@dataclass(frozen=True)
class RankSizes:
    """Shapes of the four rank cases (see the module docstring)."""

    samples: int = 65536  # embeddings: X is samples x features
    features: int = 512
    gram_size: int = 4096  # gram: G is gram_size x gram_size of rank gram_rank
    gram_rank: int = 512
    gram_sketch: int = 768  # sketch size k of the randomized variants
    batch: int = 64  # weights: batch x (weight_size x weight_size)
    weight_size: int = 512
    decay_size: int = 4096  # decay: A is decay_size x decay_size
    decay_sketch: int = 512
    repeats: int = 3


QUICK_SIZES = RankSizes(16384, 256, 1024, 128, 192, 16, 128, 1024, 256, 3)


def rank_cases(quick: bool = False, device: str = "cpu", sizes: RankSizes | None = None) -> list[Case]:
    """The four rank cases at :class:`RankSizes` (``quick``: :data:`QUICK_SIZES`, about 4x smaller per side)."""
    sizes = sizes or (QUICK_SIZES if quick else RankSizes())
    samples, features = sizes.samples, sizes.features
    gram_size, gram_rank, gram_sketch = sizes.gram_size, sizes.gram_rank, sizes.gram_sketch
    batch, weight_size = sizes.batch, sizes.weight_size
    decay_size, decay_sketch = sizes.decay_size, sizes.decay_sketch
    repeats = sizes.repeats

    def embeddings() -> Prepared:
        X = torch.randn(samples, features, generator=torch.Generator().manual_seed(0)).to(device)
        return Prepared(
            {
                SNIPPET: lambda: _erank_of(torch.linalg.svd(X, full_matrices=False).S.square()),
                "fastrank exact": lambda: effective_rank(X, gram=True, method="exact"),
                "torch.linalg.svdvals": lambda: _erank_of(torch.linalg.svdvals(X).square()),
            },
            reference=lambda: _erank_of(torch.linalg.svdvals(X.double()).square()),
        )

    def gram() -> Prepared:
        W = torch.randn(gram_size, gram_rank, generator=torch.Generator().manual_seed(1))
        G = (W @ W.T).to(device)

        def randomized():
            return effective_rank(G, hermitian=True, method="randomized", rank=gram_sketch, return_bounds=True, seed=0)

        return Prepared(
            {
                SNIPPET: lambda: paper_snippet_erank(G),
                "fastrank exact": lambda: effective_rank(G, hermitian=True, method="exact"),
                "fastrank randomized": randomized,
                "fastrank slq": lambda: effective_rank(G, hermitian=True, method="slq", return_bounds=True, seed=0),
                "torch.linalg.svdvals": lambda: _erank_of(torch.linalg.svdvals(G)),
                f"torch.svd_lowrank(q={gram_sketch})": lambda: _erank_of(torch.svd_lowrank(G, q=gram_sketch)[1]),
            },
            reference=lambda: _erank_of(torch.linalg.eigvalsh(G.double()).abs()),
        )

    def weights() -> Prepared:
        generator = torch.Generator().manual_seed(2)
        W = (torch.randn(batch, weight_size, weight_size, generator=generator) / math.sqrt(weight_size)).to(device)
        return Prepared(
            {
                SNIPPET + " loop": lambda: torch.stack([paper_snippet_erank(w) for w in W]),
                "fastrank batched": lambda: effective_rank(W, method="exact"),
                "torch.linalg.svdvals batched": lambda: _erank_of(torch.linalg.svdvals(W)),
            },
            reference=lambda: _erank_of(torch.linalg.svdvals(W.double())),
        )

    def decay() -> Prepared:
        generator = torch.Generator().manual_seed(3)
        spectrum = 0.98 ** torch.arange(decay_size, dtype=torch.float64)
        A = ((_orthonormal(decay_size, generator) * spectrum) @ _orthonormal(decay_size, generator).T).float().to(device)

        def randomized():
            return effective_rank(A, method="randomized", rank=decay_sketch, return_bounds=True, seed=0)

        return Prepared(
            {
                SNIPPET: lambda: paper_snippet_erank(A),
                "fastrank exact": lambda: effective_rank(A, method="exact"),
                "fastrank randomized": randomized,
                "fastrank slq": lambda: effective_rank(A, method="slq", return_bounds=True, seed=0),
                "torch.linalg.svdvals": lambda: _erank_of(torch.linalg.svdvals(A)),
                f"torch.svd_lowrank(q={decay_sketch})": lambda: _erank_of(torch.svd_lowrank(A, q=decay_sketch)[1]),
            },
            reference=lambda: _erank_of(spectrum).to(device),
        )

    square_variants = (
        SNIPPET, "fastrank exact", "fastrank randomized", "fastrank slq", "torch.linalg.svdvals",
    )
    return [
        _case("embeddings", f"X {samples} x {features}", (SNIPPET, "fastrank exact", "torch.linalg.svdvals"),
              embeddings, repeats, note="spectrum of the Gram X X^T (never formed)"),
        _case("gram", f"G {gram_size} x {gram_size}, rank {gram_rank}, k={gram_sketch}",
              square_variants + (f"torch.svd_lowrank(q={gram_sketch})",), gram, repeats),
        _case("weights", f"{batch} x ({weight_size} x {weight_size})",
              (SNIPPET + " loop", "fastrank batched", "torch.linalg.svdvals batched"), weights, repeats),
        _case("decay", f"A {decay_size} x {decay_size}, s_i=0.98^i, k={decay_sketch}",
              square_variants + (f"torch.svd_lowrank(q={decay_sketch})",), decay, repeats),
    ]
