"""The case type of every benchmark suite: one problem, several ways to compute it.

A :class:`Case` is one problem (one shape, one dtype) and several *variants*: ways to compute it
(fastrank's and the baselines it replaces), measured side by side on the same inputs. The suites
(:mod:`fastrank.bench.chain`, :mod:`fastrank.bench.rank`) build cases; the runner
(:mod:`fastrank.bench.runner`) and the pytest-benchmark files in ``benchmarks/`` time them. This
module imports no suite and no runner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Case", "Prepared"]


@dataclass
class Prepared:
    """What :meth:`Case.setup` returns: the inputs are built, nothing has been timed yet.

    Attributes:
        variants: variant name -> zero-argument callable doing one call; its return value is
            handed to :attr:`Case.error` (return nothing when there is nothing to check).
        reference: zero-argument callable returning the exact (or fp64) answer, evaluated once
            after timing, never timed; None when the case has no reference.
        skipped: variant name -> why it does not run here (e.g. torch.compile unavailable).
    """

    variants: dict[str, Callable[[], object]]
    reference: Callable[[], object] | None = None
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    """One shape and dtype, several ways to compute it.

    Attributes:
        suite: ``"chain"``, ``"chain-kernel"`` or ``"rank"``.
        name: short name, unique within the suite, e.g. ``"train B=2048"``.
        shape, dtype: for the result rows, e.g. ``"B=2048 d=1024 L=4"``, ``"float32"``.
        baseline: the variant every ratio is taken against.
        variants: the names of all variants, baseline first (those :meth:`setup` returns, plus
            those it may list as skipped): known without building the inputs.
        setup: builds the inputs and returns a :class:`Prepared`.
        flops: variant name -> floating-point operations of one call, for TFLOP/s; variants not
            listed get no TFLOP/s.
        error: ``error(variant, result, reference) -> dict`` with any of ``error`` (relative error
            against the reference), ``bound_width`` and ``bounds_contain_reference``; {} when the
            variant computes something not comparable with the reference.
        repeats: timed calls per variant (interleaved across variants).
        warmup: untimed calls per variant before timing (compilation, caches, autotuning).
        note: shown beside the rows, e.g. what the case compares.
        floor: the variant that is the case's floor (the least work any method must do: one
            matmul of the same FLOPs, fp64 ``eigvalsh`` of the same Gram, one pass over the
            input), or None; every row also gets its ratio to it.
    """

    suite: str
    name: str
    shape: str
    dtype: str
    baseline: str
    variants: tuple[str, ...]
    setup: Callable[[], Prepared]
    flops: dict[str, float] = field(default_factory=dict)
    error: Callable[[str, object, object], dict] | None = None
    repeats: int = 5
    warmup: int = 1
    note: str = ""
    floor: str | None = None

