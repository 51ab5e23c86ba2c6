"""Rank suite under pytest-benchmark: `pytest benchmarks/test_rank_bench.py --benchmark-only`.

The cases are fastrank.bench_rank.rank_cases(), the ones `fastrank bench --suite rank` runs. Each case
is a benchmark group (fastrank's methods, the paper snippet and torch's functions side by side); the
error of each variant against the exact value (and the bound width, for those returning bounds)
goes to extra_info.
"""

import functools

import pytest
import torch

from fastrank.bench import pytest_cases
from fastrank.bench_rank import rank_cases

PARAMS, IDS, _setup = pytest_cases(rank_cases(device="cpu"))


@functools.lru_cache(maxsize=1)
def _prepared(case_name):
    prepared = _setup(case_name)
    return prepared, prepared.reference()


@pytest.mark.parametrize("case,variant", PARAMS, ids=IDS)
def test_rank(benchmark, case, variant):
    prepared, reference = _prepared(case.name)
    benchmark.group = case.name
    benchmark.extra_info.update(
        suite=case.suite, shape=case.shape, dtype=case.dtype, variant=variant, threads=torch.get_num_threads()
    )
    result = benchmark.pedantic(
        prepared.variants[variant], rounds=case.repeats, warmup_rounds=case.warmup, iterations=1
    )
    benchmark.extra_info.update(case.error(variant, result, reference))
