"""Rank suite under pytest-benchmark: `pytest benchmarks/test_rank_bench.py --benchmark-only`.

The cases are fastrank.bench.rank.rank_cases(), the ones `fastrank bench --suite rank` runs, on the
CPU unless FASTRANK_BENCH_DEVICE=cuda, at the --quick sizes when FASTRANK_BENCH_QUICK=1. Each case
is a benchmark group (fastrank's methods, the paper snippet or the direct fp64 formula, and torch's
functions side by side); the error of each variant against the exact value (and the bound width,
for those returning bounds) goes to extra_info, with the ratios of its median to the baseline's and
to the floor's (fp64 eigvalsh of the same Gram; for the small-matrix cases the formula on fp64
eigvalsh of A^T A, A's size), measured in this run (fastrank.bench.pytest_run; on CUDA, CUDA events
with the L2 cache flushed).

`test_small_single_call_target` (CPU) holds the small-matrix target: one effective_rank call at
most 1.2x the direct fp64 formula for every n of the small cases, both timed interleaved in one run
(the harness's `measure`, as `fastrank bench` does), on one thread.
"""

import functools
import statistics

import pytest
import torch

from fastrank.bench import measure, pytest_cases, pytest_run, pytest_settings
from fastrank.bench.rank import rank_cases

DEVICE, QUICK = pytest_settings()
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="FASTRANK_BENCH_DEVICE=cuda needs a GPU"
)
CASES = rank_cases(quick=QUICK, device=DEVICE)
PARAMS, IDS, _setup = pytest_cases(CASES)
SMALL_TARGET = 1.2  # single calls: fastrank exact / direct fp64 formula


@functools.lru_cache(maxsize=1)
def _prepared(case_name):
    prepared = _setup(case_name)
    return prepared, prepared.reference() if prepared.reference is not None else None


@pytest.mark.parametrize("case,variant", PARAMS, ids=IDS)
def test_rank(benchmark, case, variant):
    prepared, reference = _prepared(case.name)
    result = pytest_run(benchmark, case, variant, prepared.variants[variant], DEVICE)
    benchmark.extra_info.update(case.error(variant, result, reference))


SMALL = [case for case in CASES if case.name.startswith("small") and case.name != "small batched"] if DEVICE == "cpu" else []


def _small_ratios(case):
    """(fastrank / baseline, fastrank / floor, medians) of one interleaved measurement, one thread."""
    prepared = case.setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the target's setting: one thread, where a 2-core machine is steadiest
    try:
        times, _, failed = measure(prepared.variants, case.repeats, warmup=10)
    finally:
        torch.set_num_threads(threads)
    assert not failed, failed
    median = {name: statistics.median(values) for name, values in times.items()}
    fastrank = median["fastrank exact"]
    return fastrank / median[case.baseline], fastrank / median[case.floor], median


@pytest.mark.parametrize("case", SMALL, ids=[case.name.replace(" ", "_") for case in SMALL])
def test_small_single_call_target(case):
    # the best of three interleaved measurements: a burst of load from other processes on a shared
    # machine can move one of them by 20%, a slow code path moves all three
    runs = []
    for _ in range(3):
        ratio, floor, median = _small_ratios(case)
        runs.append(ratio)
        print(f"{case.name}: fastrank {median['fastrank exact'] * 1e6:.1f} us, {case.baseline} "
              f"{median[case.baseline] * 1e6:.1f} us, ratio {ratio:.2f}, to the floor {floor:.2f}")
        if ratio <= SMALL_TARGET:
            return
    pytest.fail(
        f"{case.name}: effective_rank takes {', '.join(f'{r:.2f}' for r in runs)}x the direct fp64 formula "
        f"in three runs, target <= {SMALL_TARGET}x"
    )
