"""Chain suite under pytest-benchmark: `pytest benchmarks/test_chain_bench.py --benchmark-only`.

The cases are fastrank.bench_chain.chain_cases(), the ones `fastrank bench --suite chain` runs on the
CPU (the CUDA chain-kernel cases are in test_chain_kernel_bench.py). Variants of one case share a
benchmark group, so pytest-benchmark's table puts them side by side; `fastrank bench` adds the ratio
to nn.Linear measured in the same run and the error against the fp64 chain.
"""

import pytest

from fastrank.bench import pytest_cases
from fastrank.bench_chain import chain_cases

PARAMS, IDS, _prepared = pytest_cases(chain_cases(device="cpu"))


@pytest.mark.parametrize("case,variant", PARAMS, ids=IDS)
def test_chain(benchmark, case, variant):
    prepared = _prepared(case.name)
    if variant not in prepared.variants:
        pytest.skip(prepared.skipped.get(variant, "not run"))
    benchmark.group = case.name
    benchmark.extra_info.update(suite=case.suite, shape=case.shape, dtype=case.dtype, variant=variant)
    benchmark.pedantic(prepared.variants[variant], rounds=case.repeats, warmup_rounds=case.warmup)
