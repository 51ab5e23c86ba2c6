"""The suites by name: what ``fastrank bench --suite`` runs.

The only module that knows every suite; the case modules know only :mod:`fastrank.bench.cases`.
"""

from __future__ import annotations

from .cases import Case
from .chain import chain_cases, chain_kernel_cases
from .rank import rank_cases
from .sketch import sketch_kernel_cases

__all__ = ["SUITES", "suite_cases"]

SUITES = ("chain", "rank", "all")


def suite_cases(suite: str, quick: bool, device: str) -> list[Case]:
    """The cases of ``suite`` (``"chain"``, ``"rank"`` or ``"all"``) for ``device``.

    On CUDA the chain suite adds the Triton chain-kernel cases, the rank suite the sketch-kernel ones.
    """
    cases: list[Case] = []
    if suite in ("chain", "all"):
        cases += chain_cases(quick=quick, device=device)
        if device.startswith("cuda"):
            cases += chain_kernel_cases(quick=quick)
    if suite in ("rank", "all"):
        cases += rank_cases(quick=quick, device=device)
        if device.startswith("cuda"):
            cases += sketch_kernel_cases(quick=quick, device=device)
    return cases

