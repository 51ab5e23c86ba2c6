"""pytest-benchmark suite of the effective-rank family; cases live in fastrank.bench_rank.

Run: pytest benchmarks/test_rank_bench.py --benchmark-only. Each case is a benchmark group with the
candidate and its baseline(s), so the ratio is read within one run.
"""
import functools

import pytest
import torch

from fastrank.bench_rank import RANK_CASES

ROLES = [(case, "candidate", None) for case in RANK_CASES]
ROLES += [(case, "baseline", None) for case in RANK_CASES]
ROLES += [(case, "extra", name) for case in RANK_CASES for name in case.extra_baselines]


@functools.lru_cache(maxsize=1)
def _inputs(name):
    case = next(c for c in RANK_CASES if c.name == name)
    return case.setup()


@pytest.mark.parametrize("case,role,extra", ROLES, ids=[f"{c.name}-{r}{'-' + e if e else ''}" for c, r, e in ROLES])
def test_rank_bench(benchmark, case, role, extra):
    inputs = _inputs(case.name)
    if role == "candidate":
        fn = case.candidate
    elif role == "baseline":
        fn = case.baseline
    else:
        fn = case.extra_baselines[extra]
    benchmark.group = case.name
    benchmark.extra_info.update(
        {"role": role if role != "extra" else extra, "shape": case.shape, "dtype": str(case.dtype),
         "torch": torch.__version__, "threads": torch.get_num_threads(), "target": case.target}
    )
    with torch.no_grad():
        result = benchmark.pedantic(fn, args=inputs, rounds=case.rounds, iterations=1, warmup_rounds=0)
    if role == "candidate" and case.quality is not None:
        benchmark.extra_info.update(case.quality(result, inputs))
