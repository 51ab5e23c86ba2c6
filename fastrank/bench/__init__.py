"""Tooling around the library: the benchmark suites, their runner, the paper's reproduction and the
command line (``fastrank bench / paper / rank / plot``). Nothing here is needed to train.

Modules, each importing only those above it:

- :mod:`~fastrank.bench.cases`: the case type (:class:`Case`, :class:`Prepared`);
- :mod:`~fastrank.bench.report`: result rows as a table, a plot, JSON-safe numbers;
- :mod:`~fastrank.bench.runner`: timing (interleaved repeats), result rows, the pytest-benchmark glue;
- :mod:`~fastrank.bench.chain`, :mod:`~fastrank.bench.rank`: the suites' cases;
- :mod:`~fastrank.bench.suites`: the suites by name;
- :mod:`~fastrank.bench.paper`: the paper's observations (Huh et al., arXiv 2103.10427);
- :mod:`~fastrank.bench.cli`: the ``fastrank`` command.

A new benchmark case goes into the suite module of its op family (a function returning a
:class:`Case`, listed by that module's ``*_cases``); a new suite adds its module to ``suites``.
"""

from .cases import Case, Prepared
from .report import ROW_FIELDS, MissingExtra, finite_or_none, format_table, plot_rows
from .runner import (
    cuda_times,
    environment,
    measure,
    pytest_cases,
    pytest_run,
    pytest_settings,
    run,
    run_case,
    synchronized,
    timer_name,
)
from .suites import SUITES, suite_cases

__all__ = [
    "Case",
    "Prepared",
    "ROW_FIELDS",
    "SUITES",
    "MissingExtra",
    "cuda_times",
    "environment",
    "finite_or_none",
    "format_table",
    "measure",
    "plot_rows",
    "pytest_cases",
    "pytest_run",
    "pytest_settings",
    "run",
    "run_case",
    "suite_cases",
    "synchronized",
    "timer_name",
]
