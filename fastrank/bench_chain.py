"""Benchmark cases of the chain suite: over-parameterized layers against the layers they replace.

Each :class:`Case` is a group of variants measured side by side on the same shapes; ratios are
taken against the case's baseline (``nn.Linear``) measured in the same run. The cases are used by
``benchmarks/test_chain_bench.py`` (pytest-benchmark) and by :func:`run` (plain timing with
interleaved repeats, for tables).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chain import collapsed_weight
from .layers import OverparamLinear

__all__ = ["Case", "chain_cases", "run", "time_variants"]


@dataclass
class Case:
    """One shape and mode, several ways to compute it.

    Attributes:
        name: e.g. ``"train B=2048"``.
        baseline: the variant the others are compared with.
        variants: name -> zero-argument callable doing one step (built by ``setup``).
        flops: multiply-adds x 2 of the baseline's step, for TFLOP/s.
        info: shape / dtype / device fields for result rows.
    """

    name: str
    baseline: str
    setup: Callable[[], dict[str, Callable[[], object]]]
    flops: float
    info: dict = field(default_factory=dict)


def _train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).sum().backward()

    return step


def _eval_step(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            return module(x)

    return step


class _SequentialChain(nn.Module):
    """The anchor library's training forward: one linear layer per factor, run in sequence."""

    def __init__(self, layer: OverparamLinear):
        super().__init__()
        self.factors = layer.factors
        self.bias = layer.bias

    def forward(self, x):
        for factor in self.factors:
            x = F.linear(x, factor)
        return x + self.bias


class _CollapsedAutograd(nn.Module):
    """Plain autograd through the collapsed product ``W_L @ ... @ W_1``, then ``F.linear``."""

    def __init__(self, layer: OverparamLinear):
        super().__init__()
        self.factors = layer.factors
        self.bias = layer.bias

    def forward(self, x):
        weight = self.factors[-1]
        for factor in reversed(self.factors[:-1]):
            weight = weight @ factor
        return F.linear(x, weight, self.bias)


def chain_cases(
    features: int = 1024,
    depth: int = 4,
    batches: tuple[int, ...] = (256, 2048, 16384),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Case]:
    """Train-step and eval cases of ``OverparamLinear(features, features, depth)`` vs ``nn.Linear``."""
    cases = []
    for mode in ("train", "eval"):
        for batch in batches:

            def setup(batch=batch, mode=mode):
                gen = torch.Generator(device="cpu").manual_seed(0)
                factory = {"device": device, "dtype": dtype}
                torch.manual_seed(0)
                layer = OverparamLinear(features, features, depth=depth, **factory)
                linear = nn.Linear(features, features, **factory)
                x = torch.randn(batch, features, generator=gen).to(**factory)
                if mode == "train":
                    x.requires_grad_(True)  # as inside a network
                    make = _train_step
                else:
                    layer.eval()
                    make = _eval_step
                variants = {
                    "nn.Linear": make(linear, x),
                    "fastrank": make(layer, x),
                    "sequential chain": make(_SequentialChain(layer), x),
                    "collapsed autograd": make(_CollapsedAutograd(layer), x),
                }
                return variants

            flops = 2.0 * batch * features * features * (3 if mode == "train" else 1)
            cases.append(
                Case(
                    name=f"{mode} B={batch}",
                    baseline="nn.Linear",
                    setup=setup,
                    flops=flops,
                    info={
                        "suite": "chain",
                        "mode": mode,
                        "shape": f"B={batch} d={features} L={depth}",
                        "dtype": str(dtype).replace("torch.", ""),
                        "device": device,
                    },
                )
            )
    return cases


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(
    variants: dict[str, Callable[[], object]], repeats: int, device: str = "cpu", warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, repeats interleaved round-robin so drift hits all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run(cases: list[Case], repeats: int = 5, device: str = "cpu") -> list[dict]:
    """Time every variant of every case; one row per variant with median, quartiles and ratio."""
    rows = []
    for case in cases:
        variants = case.setup()
        times = time_variants(variants, repeats, device)
        base = statistics.median(times[case.baseline])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append(
                {
                    **case.info,
                    "case": case.name,
                    "variant": name,
                    "median_s": median,
                    "q25_s": _quantile(values, 0.25),
                    "q75_s": _quantile(values, 0.75),
                    "ratio": median / base,
                    "tflops": case.flops / median / 1e12,
                    "repeats": len(values),
                }
            )
        del variants
    return rows
