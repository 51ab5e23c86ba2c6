"""Chain suite under pytest-benchmark: `pytest benchmarks/test_chain_bench.py --benchmark-only`.

The cases are fastrank.bench.chain.chain_cases(), small_layer_cases() among them, the ones
`fastrank bench --suite chain` runs (the CUDA chain-kernel cases are in test_chain_kernel_bench.py),
on the CPU unless
FASTRANK_BENCH_DEVICE=cuda, at the --quick sizes when FASTRANK_BENCH_QUICK=1. Variants of one case
share a benchmark group, so pytest-benchmark's table puts them side by side; extra_info holds the
ratio to nn.Linear and to the floor (one matmul of fastrank's FLOPs) measured in the same run, and
on CUDA the times from CUDA events with the L2 cache flushed (fastrank.bench.pytest_run).
"""

import pytest
import torch

from fastrank.bench import pytest_cases, pytest_run, pytest_settings
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
    pytest_run(benchmark, case, variant, prepared.variants[variant], DEVICE)
