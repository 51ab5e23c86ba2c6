"""Cases of the rank suite: fastrank's effective-rank family against what people use today.

Every case has the same baseline, the usual effective-rank snippet (``paper snippet``: a full SVD,
then exp of the entropy of s / sum(s)), and reports the accuracy of every variant against the exact
value (fp64 spectrum, or the prescribed one), with the width of the returned interval for the
variants that return bounds:

* ``embeddings``: the Gram spectrum of embeddings X (N x d): fastrank exact (``gram=True``: fp64
  eigvalsh of the d x d side) vs the snippet and ``torch.linalg.svdvals`` of X;
* ``gram``: a PSD Gram G (n x n, rank r): fastrank exact / randomized (certified bounds) / slq vs the
  snippet, ``torch.linalg.svdvals`` and ``torch.svd_lowrank`` (top-k only: the tail is lost);
* ``weights``: a batch of b square weights: fastrank batched (one call, and with the host solver,
  ``on_host``: one matrix per thread) vs the snippet in a Python loop (as per-layer tools do) and
  batched ``torch.linalg.svdvals``;
* ``decay``: A (n x n) with singular values 0.98^i: fastrank randomized / slq / exact vs the
  snippet, ``torch.linalg.svdvals`` and ``torch.svd_lowrank``;
* ``small n``: one fp64 n x n matrix (n = 8, 16, 64, 256): fastrank exact vs the direct formula
  (``fp64 svdvals formula``: ``torch.linalg.svdvals`` in fp64, p = s / sum(s), exp of the entropy),
  with the floor: the same formula on fp64 ``torch.linalg.eigvalsh`` of the n x n Gram A^T A (a
  symmetric eigensolver of A's size, the cheapest exact spectrum there is, without fastrank's
  rounding check);
* ``small batched``: b fp64 matrices n x n (1000 x 64 x 64): fastrank in one batched call and in a
  Python loop of single calls vs the direct formula in a loop, batched, and the batched floor.

On CUDA three more cases measure model scale (:func:`cuda_rank_cases`, the same sizes with or
without ``quick``):

* ``weights 1024``: 64 fp32 weights 1024 x 1024: fastrank batched (cuSOLVER's batched eigensolver,
  with ``FASTRANK_EIGENSOLVER=torch``, and with the Grams' eigenvalues solved on half the host's
  CPUs, ``on_host``) vs ``torch.linalg.svdvals`` per weight (the baseline),
  with the eigensolvers alone on the 64 fp64 Grams (the floor of the exact method);
* ``model weights 4096``: 16 fp32 weights 4096 x 4096 (the shape of a 7B model's attention
  weights), exact with both eigensolvers and randomized, vs ``torch.linalg.svdvals`` per weight;
  ``7B weights randomized``: all 224 of them (15 GB) through ``effective_ranks``, randomized with
  certified bounds (their width is the accuracy; no reference);
* ``embeddings 1M``: the Gram spectrum of X 1,000,000 x 4096 fp32 (16 GB) against one fp32
  ``X^T X`` (the floor: the product the exact method cannot avoid).

Errors are relative errors of the effective rank exp(H).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..rank import RankEstimate, effective_rank, effective_ranks
from ..rank.eigensolver import default_host_threads, eigvalsh, on_host
from ..rank.exact import _smaller_gram
from .cases import Case, Prepared

__all__ = ["QUICK_SIZES", "RankSizes", "cuda_rank_cases", "direct_erank", "paper_snippet_erank", "rank_cases"]

SNIPPET = "paper snippet (full SVD)"
DIRECT = "fp64 svdvals formula"
FLOOR = "fp64 eigvalsh of A^T A (floor)"
BATCHED_FLOOR = "fp64 eigvalsh of A^T A, batched (floor)"
HOST_SOLVER = "fastrank batched, host solver"


def host_threads(device: str) -> int:
    """The host solver's threads in the cases: torch's intra-op threads for CPU tensors; for a GPU's,
    ``default_host_threads()`` (half the CPUs: the rest stay with the process that feeds the GPU)."""
    return torch.get_num_threads() if device == "cpu" else default_host_threads()


def paper_snippet_erank(A: torch.Tensor) -> torch.Tensor:
    """The usual effective-rank snippet: full SVD, then exp of the entropy of s / sum(s)."""
    s = torch.linalg.svd(A, full_matrices=False).S.double()
    return _erank_of(s)


def _erank_of(values: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of values / sum(values), over the last dim, in fp64."""
    values = values.double()
    p = values / values.sum(-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def _rank_error(variant: str, result, reference: torch.Tensor | None) -> dict:
    """Relative error of the estimate; width of the bounds (relative) and whether they hold.

    Results that are lists (``effective_ranks``) are stacked; without a reference only the width
    of the bounds is reported, and nothing for results that are not estimates."""
    if isinstance(result, list):
        if not result or not isinstance(result[0], (RankEstimate, torch.Tensor)):
            return {}
        result = RankEstimate(*(torch.stack(x) for x in zip(*result))) if isinstance(result[0], RankEstimate) \
            else torch.stack(result)
    if not isinstance(result, (RankEstimate, torch.Tensor)):
        return {}
    if isinstance(result, RankEstimate):
        estimate = result.estimate
        row = {"bound_width": float(((result.upper - result.lower) / estimate).max())}
        if reference is not None:
            row["bounds_contain_reference"] = bool(((result.lower <= reference) & (reference <= result.upper)).all())
    else:
        estimate, row = result, {}
    if reference is None:
        return row
    if estimate.shape != reference.shape:  # e.g. eigenvalues, not effective ranks
        return {}
    estimate = estimate.to(reference.device, torch.float64)
    row["error"] = float(((estimate - reference).abs() / reference).max())
    return row


def _orthonormal(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q


def direct_erank(A: torch.Tensor) -> torch.Tensor:
    """The direct fp64 formula: ``torch.linalg.svdvals`` in fp64, p = s / sum(s), exp of the entropy."""
    s = torch.linalg.svdvals(A.double())
    p = s / s.sum(-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def _floor(A: torch.Tensor) -> torch.Tensor:
    """The formula on fp64 eigvalsh of the Gram A^T A (n x n, A's size), with no rounding check:
    the cheapest exact spectrum of that size (accurate to ~1e-13 on these well-conditioned inputs)."""
    X = A.double()
    s = torch.linalg.eigvalsh(X.mT @ X).clamp_min(0).sqrt()
    return _erank_of(s)


GRAM_FLOOR = "fp64 eigvalsh of the Gram (floor)"


def _gram_floor(A: torch.Tensor, given: bool = False) -> Callable[[], torch.Tensor]:
    """fp64 eigvalsh of the smaller-side Gram of A (formed once, untimed; A itself when ``given``
    is a Gram): the eigensolver the exact method cannot avoid, on this machine."""
    if given:
        return lambda G=A.double(): eigvalsh(G)
    G = _smaller_gram(A, fp64_products=True)  # its upper triangle, as the exact method reads it
    return lambda: eigvalsh(G, upper=True)


def _case(name, shape, variants, setup, repeats, note="", dtype="float32", floor=None) -> Case:
    """A rank case; its floor is the variant named ``floor``, else the one whose name ends in "(floor)"."""
    floor = floor or next((v for v in variants if v.endswith("(floor)")), None)
    return Case(
        suite="rank",
        name=name,
        shape=shape,
        dtype=dtype,
        baseline=variants[0],
        variants=variants,
        setup=setup,
        error=_rank_error,
        repeats=repeats,
        warmup=1,
        note=note,
        floor=floor,
    )


@dataclass(frozen=True)
class RankSizes:
    """Shapes of the rank cases (see the module docstring)."""

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
    small_sizes: tuple[int, ...] = (8, 16, 64, 256)  # small n: one n x n matrix
    small_calls: int = 200  # timed calls of each small n <= 64 variant (a tenth of it above 64)
    small_batch: int = 1000  # small batched: small_batch x (small_batch_size x small_batch_size)
    small_batch_size: int = 64


QUICK_SIZES = RankSizes(16384, 256, 1024, 128, 192, 16, 128, 1024, 256, 3, small_calls=100, small_batch=100)


def rank_cases(quick: bool = False, device: str = "cpu", sizes: RankSizes | None = None) -> list[Case]:
    """The rank cases at :class:`RankSizes` (``quick``: :data:`QUICK_SIZES`, about 4x smaller per side)."""
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
                GRAM_FLOOR: _gram_floor(X),
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
                GRAM_FLOOR: _gram_floor(G, given=True),
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
                HOST_SOLVER: lambda: _on_host(device, lambda: effective_rank(W, method="exact")),
                "torch.linalg.svdvals batched": lambda: _erank_of(torch.linalg.svdvals(W)),
                GRAM_FLOOR: _gram_floor(W),
            },
            reference=lambda: _erank_of(torch.linalg.svdvals(W.double())),
        )

    def small(n: int):
        def setup() -> Prepared:
            A = torch.randn(n, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
            return Prepared(
                {
                    DIRECT: lambda: direct_erank(A),
                    "fastrank exact": lambda: effective_rank(A),
                    FLOOR: lambda: _floor(A),
                },
                reference=lambda: direct_erank(A),
            )

        return setup

    def small_batched() -> Prepared:
        generator = torch.Generator().manual_seed(5)
        W = torch.randn(small_batch, small_size, small_size, generator=generator, dtype=torch.float64).to(device)
        return Prepared(
            {
                DIRECT + " loop": lambda: torch.stack([direct_erank(w) for w in W]),
                "fastrank batched": lambda: effective_rank(W),
                "fastrank loop": lambda: torch.stack([effective_rank(w) for w in W]),
                DIRECT + " batched": lambda: direct_erank(W),
                BATCHED_FLOOR: lambda: _floor(W),
            },
            reference=lambda: direct_erank(W),
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
                GRAM_FLOOR: _gram_floor(A),
            },
            reference=lambda: _erank_of(spectrum).to(device),
        )

    small_batch, small_size = sizes.small_batch, sizes.small_batch_size
    square_variants = (
        SNIPPET, "fastrank exact", "fastrank randomized", "fastrank slq", "torch.linalg.svdvals",
    )
    # On CUDA the model-scale cases first: a run cut short by its time limit has done them.
    return (cuda_rank_cases() if device == "cuda" else []) + [
        _case("embeddings", f"X {samples} x {features}", (SNIPPET, "fastrank exact", "torch.linalg.svdvals", GRAM_FLOOR),
              embeddings, repeats, note="spectrum of the Gram X X^T (never formed)"),
        _case("gram", f"G {gram_size} x {gram_size}, rank {gram_rank}, k={gram_sketch}",
              square_variants + (f"torch.svd_lowrank(q={gram_sketch})", GRAM_FLOOR), gram, repeats),
        _case("weights", f"{batch} x ({weight_size} x {weight_size})",
              (SNIPPET + " loop", "fastrank batched", HOST_SOLVER, "torch.linalg.svdvals batched", GRAM_FLOOR),
              weights, repeats),
        _case("decay", f"A {decay_size} x {decay_size}, s_i=0.98^i, k={decay_sketch}",
              square_variants + (f"torch.svd_lowrank(q={decay_sketch})", GRAM_FLOOR), decay, repeats),
    ] + [
        _case(f"small {n}", f"A {n} x {n}", (DIRECT, "fastrank exact", FLOOR), small(n),
              sizes.small_calls if n <= 64 else max(repeats, sizes.small_calls // 10),
              note="one matrix per call", dtype="float64")
        for n in sizes.small_sizes
    ] + [
        _case("small batched", f"{small_batch} x ({small_size} x {small_size})",
              (DIRECT + " loop", "fastrank batched", "fastrank loop", DIRECT + " batched", BATCHED_FLOOR),
              small_batched, repeats, dtype="float64"),
    ]


def _with_eigensolver(name: str, call):
    """``call()`` with ``FASTRANK_EIGENSOLVER=name``, the previous setting restored."""
    previous = os.environ.get("FASTRANK_EIGENSOLVER")
    os.environ["FASTRANK_EIGENSOLVER"] = name
    try:
        return call()
    finally:
        if previous is None:
            del os.environ["FASTRANK_EIGENSOLVER"]
        else:
            os.environ["FASTRANK_EIGENSOLVER"] = previous


def _on_host(device: str, call):
    """``call()`` with every eigvalsh on the host solver (``host_threads(device)`` threads)."""
    with on_host(host_threads(device)):
        return call()


def cuda_rank_cases(device: str = "cuda", toy: bool = False) -> list[Case]:
    """The model-scale CUDA cases (module docstring). ``toy``: the same cases at sizes a few
    hundred times smaller, so that a test can run them end to end on any ``device``."""
    torch_solver = "eigensolver: torch"
    shrink = 16 if toy else 1
    weights_1024_shape = (4, 64, 64) if toy else (64, 1024, 1024)
    model_shape = (3, 4096 // shrink, 4096 // shrink) if toy else (16, 4096, 4096)
    count_7b = 5 if toy else 224
    embeddings_shape = (3000, 4096 // shrink) if toy else (1_000_000, 4096)

    def weights_1024() -> Prepared:
        generator = torch.Generator(device=device).manual_seed(11)
        W = torch.randn(*weights_1024_shape, generator=generator, device=device) / math.sqrt(weights_1024_shape[-1])
        G = W.double().mT @ W.double()
        return Prepared(
            {
                "torch.linalg.svdvals loop": lambda: torch.stack([_erank_of(torch.linalg.svdvals(w)) for w in W]),
                "fastrank batched": lambda: effective_rank(W, method="exact"),
                f"fastrank batched ({torch_solver})": lambda: _with_eigensolver(
                    "torch", lambda: effective_rank(W, method="exact")),
                HOST_SOLVER: lambda: _on_host(device, lambda: effective_rank(W, method="exact")),
                "eigvalsh of the fp64 Grams: cuSOLVER batched": lambda: _with_eigensolver(
                    "cusolver", lambda: eigvalsh(G, upper=True)),
                "eigvalsh of the fp64 Grams: torch": lambda: torch.linalg.eigvalsh(G),
            },
            # The fp64 Gram's spectrum through torch's solver: an fp64 SVD of the 64 weights took
            # about half of this case's time on an H100 (torch.linalg.svdvals batched is the same
            # per-matrix loop as the baseline: 3.5 s against 3.6 s there, so it is not repeated)
            reference=lambda: _erank_of(torch.linalg.eigvalsh(G).clamp_min(0).sqrt()),
        )

    def model_weights() -> Prepared:
        generator = torch.Generator(device=device).manual_seed(12)
        W = torch.randn(*model_shape, generator=generator, device=device) / math.sqrt(model_shape[-1])

        def randomized():
            return effective_rank(W, method="randomized", return_bounds=True, seed=0)

        return Prepared(
            {
                "torch.linalg.svdvals loop": lambda: torch.stack([_erank_of(torch.linalg.svdvals(w)) for w in W]),
                "fastrank exact": lambda: effective_rank(W, method="exact"),
                # "auto" takes the batched solver for 8 or more 4096^2 Grams: torch's loop beside it
                f"fastrank exact ({torch_solver})": lambda: _with_eigensolver(
                    "torch", lambda: effective_rank(W, method="exact")),
                "fastrank randomized": randomized,
                "fastrank slq": lambda: effective_rank(W, method="slq", return_bounds=True, seed=0),
                GRAM_FLOOR: _gram_floor(W),
            },
            # fp64 Gram eigenvalues through torch's solver: the exact method's contract (1e-10
            # against fp64 on the CPU) is a test; an fp64 SVD of 16 such weights takes minutes
            reference=lambda: _with_eigensolver("torch", lambda: effective_rank(W, method="exact")),
        )

    def weights_7b() -> Prepared:
        generator = torch.Generator(device=device).manual_seed(13)
        weights = [torch.randn(*model_shape[1:], generator=generator, device=device) / math.sqrt(model_shape[-1])
                   for _ in range(count_7b)]
        return Prepared(
            {
                "fastrank randomized": lambda: effective_ranks(weights, method="randomized", return_bounds=True, seed=0),
                # a flat (Marchenko-Pastur) spectrum leaves the sketch's tail mass wide open; SLQ's
                # bracket does not depend on the decay
                "fastrank slq": lambda: effective_ranks(weights, method="slq", return_bounds=True, seed=0),
                "one pass over the weights (floor)": lambda: torch._foreach_norm(weights),
            }
        )

    def embeddings_1m() -> Prepared:
        generator = torch.Generator(device=device).manual_seed(14)
        X = torch.randn(*embeddings_shape, generator=generator, device=device)
        return Prepared(
            {
                "X^T X, one fp32 matmul (floor)": lambda: X.mT @ X,
                "fastrank exact (gram=True)": lambda: effective_rank(X, gram=True, method="exact"),
            }
        )

    def shape(dims):
        return f"{dims[0]} x ({dims[1]} x {dims[2]})"

    # What a run has not measured yet first (a run cut short by its time limit has done it): the
    # 1024 case's host solver; the 4096 case ran on an H100, the 1M embeddings on an H200, and the 7B
    # case, last, did not finish within 50 s there (benchmarks/results/h100/, h200/).
    return [
        _case("weights 1024", shape(weights_1024_shape),
              ("torch.linalg.svdvals loop", "fastrank batched", f"fastrank batched ({torch_solver})", HOST_SOLVER,
               "eigvalsh of the fp64 Grams: cuSOLVER batched", "eigvalsh of the fp64 Grams: torch"),
              weights_1024, repeats=2,
              floor="eigvalsh of the fp64 Grams: cuSOLVER batched"),
        _case("model weights 4096", shape(model_shape),
              ("torch.linalg.svdvals loop", "fastrank exact", f"fastrank exact ({torch_solver})",
               "fastrank randomized", "fastrank slq", GRAM_FLOOR), model_weights, repeats=2),
        _case("embeddings 1M", f"X {embeddings_shape[0]} x {embeddings_shape[1]}", ("X^T X, one fp32 matmul (floor)", "fastrank exact (gram=True)"),
              embeddings_1m, repeats=2, note="spectrum of the Gram X X^T (never formed)"),
        _case("7B weights randomized", shape((count_7b, *model_shape[1:])), ("fastrank randomized", "fastrank slq", "one pass over the weights (floor)"), weights_7b, repeats=2,
              note="bounds only: their width is the accuracy"),
    ]
