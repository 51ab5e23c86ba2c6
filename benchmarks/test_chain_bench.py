"""Chain suite under pytest-benchmark: `pytest benchmarks/test_chain_bench.py --benchmark-only`.

The cases are fastrank.bench.chain.chain_cases(), the ones `fastrank bench --suite chain` runs (the
CUDA chain-kernel cases are in test_chain_kernel_bench.py), on the CPU unless
FASTRANK_BENCH_DEVICE=cuda, at the --quick sizes when FASTRANK_BENCH_QUICK=1. Variants of one case
share a benchmark group, so pytest-benchmark's table puts them side by side; `fastrank bench` adds
the ratio to nn.Linear measured in the same run and the error against the fp64 chain.
"""

import pytest
import torch

from fastrank.bench import pytest_cases, pytest_settings, synchronized
from fastrank.bench.chain import chain_cases

DEVICE, QUICK = pytest_settings()
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="FASTRANK_BENCH_DEVICE=cuda needs a GPU"
)
PARAMS, IDS, _prepared = pytest_cases(chain_cases(quick=QUICK, device=DEVICE))


@pytest.mark.parametrize("case,variant", PARAMS, ids=IDS)
def test_chain(benchmark, case, variant):
    prepared = _prepared(case.name)
    if variant not in prepared.variants:
        pytest.skip(prepared.skipped.get(variant, "not run"))
    benchmark.group = case.name
    benchmark.extra_info.update(suite=case.suite, shape=case.shape, dtype=case.dtype, variant=variant, device=DEVICE)
    benchmark.pedantic(synchronized(prepared.variants[variant], DEVICE), rounds=case.repeats, warmup_rounds=case.warmup)
