"""Reproduce the observations of *The Low-Rank Simplicity Bias in Deep Networks* with fastrank.

Observation 1: at initialization, deeper linear chains have lower spectral entropy: the collapsed
weight of a chain of L random factors, and the Gram matrix of the embeddings of deeper networks
(linear and ReLU), concentrate their spectrum on fewer directions as L grows.

Observation 2: trained by gradient descent on an under-determined problem, deeper
over-parameterization finds lower effective-rank solutions. Here: completing a low-rank matrix
from a fraction of its entries, the matrix parameterized as the collapsed weight of an
``OverparamLinear`` of depth L; deeper chains reach lower effective rank and lower error on the
held-out entries. All data is generated in-process; seeds are fixed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import OverparamLinear
from .rank import effective_rank, spectral_entropy

__all__ = ["init_entropy", "matrix_completion", "CompletionResult"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def init_entropy(
    depths: tuple[int, ...] = (1, 2, 4, 8, 16),
    features: int = 256,
    samples: int = 512,
    seeds: int = 5,
) -> list[dict]:
    """Spectral entropy at initialization against depth, mean and std over seeds.

    Rows ``{"depth", "kind", "mean", "std"}`` for kinds:
      * ``"collapsed weight"``: the ``features x features`` collapsed weight of
        ``OverparamLinear(features, features, depth)`` (fastrank's default init);
      * ``"linear embeddings"`` / ``"relu embeddings"``: the Gram of the outputs of ``depth``
        stacked ``nn.Linear(features, features)`` layers (default init), without / with a ReLU
        between layers, on ``samples`` standard-normal inputs.
    """
    rows = []
    for depth in depths:
        collected: dict[str, list[float]] = {
            "collapsed weight": [], "linear embeddings": [], "relu embeddings": []
        }
        for seed in range(seeds):
            torch.manual_seed(seed)
            layer = OverparamLinear(features, features, depth=depth, dtype=torch.float64)
            with torch.no_grad():
                collected["collapsed weight"].append(float(spectral_entropy(layer.weight)))
            x = torch.randn(samples, features, dtype=torch.float64)
            layers = [nn.Linear(features, features, dtype=torch.float64) for _ in range(depth)]
            for kind, relu in (("linear embeddings", False), ("relu embeddings", True)):
                h = x
                with torch.no_grad():
                    for i, linear in enumerate(layers):
                        h = linear(h)
                        if relu and i < depth - 1:
                            h = torch.relu(h)
                collected[kind].append(float(spectral_entropy(h, gram=True)))
        for kind, values in collected.items():
            mean, std = _mean_std(values)
            rows.append({"depth": depth, "kind": kind, "mean": mean, "std": std})
    return rows


@dataclass
class CompletionResult:
    depth: int
    effective_rank: float
    train_error: float
    test_error: float


def matrix_completion(
    depths: tuple[int, ...] = (1, 2, 3, 4),
    size: int = 48,
    rank: int = 3,
    observed: float = 0.35,
    steps: int = 3000,
    lr: float = 0.05,
    seed: int = 0,
) -> list[CompletionResult]:
    """Complete a rank-``rank`` ``size x size`` matrix from a fraction ``observed`` of its entries.

    The estimate is the collapsed weight of ``OverparamLinear(size, size, depth, bias=False)``,
    trained with Adam on the squared error over the observed entries. Reports the effective rank
    of the result and the relative RMS error on observed (train) and held-out (test) entries.
    """
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(size, rank, generator=gen, dtype=torch.float64)
    right = torch.randn(rank, size, generator=gen, dtype=torch.float64)
    target = left @ right / math.sqrt(rank)
    mask = torch.rand(size, size, generator=gen, dtype=torch.float64) < observed
    scale = target.square().mean().sqrt()
    results = []
    for depth in depths:
        torch.manual_seed(seed)
        layer = OverparamLinear(size, size, depth=depth, bias=False, dtype=torch.float64)
        with torch.no_grad():
            # Start every depth from the same small end-to-end scale.
            for factor in layer.factors:
                factor.mul_(0.5 ** (1.0 / depth) * (1.0 / math.sqrt(2.0)) ** (1.0 / depth))
        opt = torch.optim.Adam(layer.parameters(), lr=lr / depth)
        for _ in range(steps):
            opt.zero_grad()
            loss = ((layer.weight - target)[mask]).square().mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            estimate = layer.weight
            train = ((estimate - target)[mask]).square().mean().sqrt() / scale
            test = ((estimate - target)[~mask]).square().mean().sqrt() / scale
            results.append(
                CompletionResult(depth, float(effective_rank(estimate)), float(train), float(test))
            )
    return results
