"""Rank suite under pytest-benchmark: `pytest benchmarks/test_rank_bench.py --benchmark-only`.

The cases are fastrank.bench_rank.rank_cases(), the ones `fastrank bench --suite rank` runs, on the
CPU unless FASTRANK_BENCH_DEVICE=cuda, at the --quick sizes when FASTRANK_BENCH_QUICK=1. Each case
is a benchmark group (fastrank's methods, the paper snippet and torch's functions side by side); the
error of each variant against the exact value (and the bound width, for those returning bounds)
goes to extra_info.
"""

import functools

import pytest
import torch

from fastrank.bench import pytest_cases, pytest_settings, synchronized
from fastrank.bench_rank import rank_cases

DEVICE, QUICK = pytest_settings()
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="FASTRANK_BENCH_DEVICE=cuda needs a GPU"
)
PARAMS, IDS, _setup = pytest_cases(rank_cases(quick=QUICK, device=DEVICE))


@functools.lru_cache(maxsize=1)
def _prepared(case_name):
    prepared = _setup(case_name)
    return prepared, prepared.reference()


@pytest.mark.parametrize("case,variant", PARAMS, ids=IDS)
def test_rank(benchmark, case, variant):
    prepared, reference = _prepared(case.name)
    benchmark.group = case.name
    benchmark.extra_info.update(
        suite=case.suite, shape=case.shape, dtype=case.dtype, variant=variant, threads=torch.get_num_threads(),
        device=DEVICE,
    )
    result = benchmark.pedantic(
        synchronized(prepared.variants[variant], DEVICE), rounds=case.repeats, warmup_rounds=case.warmup,
        iterations=1,
    )
    benchmark.extra_info.update(case.error(variant, result, reference))
