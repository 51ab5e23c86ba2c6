"""Chain suite under pytest-benchmark: `pytest benchmarks/test_chain_bench.py --benchmark-only`.

Variants of one case share a benchmark group, so the table puts them side by side; the ratio
columns against nn.Linear are printed by `fastrank bench --suite chain`, which runs these cases.
"""

import functools

import pytest
import torch

from fastrank.bench_chain import chain_cases

CASES = chain_cases()
VARIANTS = ["nn.Linear", "fastrank", "sequential chain", "collapsed autograd"]


@functools.lru_cache(maxsize=1)
def _variants(case_name):
    case = next(c for c in CASES if c.name == case_name)
    return case.setup()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_chain(benchmark, case, variant):
    torch.manual_seed(0)
    fn = _variants(case.name)[variant]
    benchmark.group = case.name
    benchmark.extra_info.update(case.info, torch=torch.__version__)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
