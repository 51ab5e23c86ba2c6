"""The runner: times the variants of each case and turns them into result rows.

Every result row carries the median time with its quartiles, the ratio to the case's baseline
measured in the same run (variant median / baseline median: below 1 is faster), TFLOP/s where the
case counts its floating-point work, the error against an exact or fp64 reference where the case
has one, and the device name, versions and date. The same cases run under ``fastrank bench``
(:func:`run`) and under the pytest-benchmark files in ``benchmarks/`` (:func:`pytest_cases`).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .._version import __version__
from .cases import Case, Prepared
from .report import ROW_FIELDS

__all__ = [
    "cuda_times", "environment", "measure", "pytest_cases", "pytest_run", "pytest_settings", "run", "run_case",
    "synchronized",
    "timer_name",
]


# ----------------------------------------------------------------------------- environment
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Device name, versions, thread count and date, for every result row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{_cpu_name()} ({os.cpu_count()} cores, {platform.machine()})"
    return {
        "device_name": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fastrank": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _failure(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _cuda_events(device: str) -> bool:
    """Whether calls on ``device`` are timed with CUDA events (:func:`cuda_times`)."""
    return device.startswith("cuda") and _do_bench() is not None


def timer_name(device: str) -> str:
    """How :func:`measure` times calls on ``device`` (a result row's ``timer``)."""
    if _cuda_events(device):
        return "cuda events, L2 flushed (triton.testing.do_bench)"
    return "perf_counter, interleaved" + (", synchronized" if device.startswith("cuda") else "")


def _do_bench():
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


# Calls at least this long are timed by CUDA events alone: do_bench would add six untimed calls
# (its first and its five-call estimate), a minute for a 10 s call, and flushing a 50 MB L2
# changes nothing at this length.
LONG_CALL_MS = 100.0
# Calls at least this long are timed once: the rank suite's per-matrix SVD loop takes 3.6 s a call
# on an H100 (benchmarks/results/h100/), where its GPU step has 30 s for the whole suite, and a
# second sample of a call this long moves a median by less than the suite resolves.
ONE_SHOT_MS = 1000.0


def cuda_times(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of about ``repeats`` calls of ``fn`` on CUDA, each timed with CUDA events after the L2
    cache is flushed (``triton.testing.do_bench``, which also warms up once); calls longer than
    :data:`LONG_CALL_MS` are ``repeats`` calls timed by events alone, the first being the one
    that measured the length, and calls longer than :data:`ONE_SHOT_MS` that one call alone.
    ``fn`` must have been called before (compilation and autotuning stay out)."""
    do_bench = _do_bench()
    if do_bench is None:
        raise RuntimeError("cuda_times needs triton.testing.do_bench (Triton is not importable)")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed_call() -> float:
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    estimate_ms = max(timed_call(), 1e-3)
    if estimate_ms >= ONE_SHOT_MS:
        times_ms = [estimate_ms]
    elif estimate_ms >= LONG_CALL_MS:
        times_ms = [estimate_ms] + [timed_call() for _ in range(max(repeats, 1) - 1)]
    else:
        # do_bench repeats fn for `rep` milliseconds: ask for `repeats` calls' worth
        times_ms = do_bench(fn, warmup=0, rep=max(1.0, estimate_ms * repeats), return_mode="all")
    return [t / 1e3 for t in times_ms]


def measure(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu"
) -> tuple[dict[str, list[float]], dict[str, object], dict[str, str]]:
    """Seconds per call of every variant.

    On the CPU the repeats are interleaved round-robin: interleaving spreads slow phases of a
    shared machine over all variants alike, so the ratios stay fair when the absolute times
    drift. On CUDA (with Triton) each variant is timed by :func:`cuda_times`: CUDA events around
    each call and the L2 cache flushed before it, so that repeated calls do not measure the cache.
    A variant raising during warmup (a compiler that is not installed, out of memory) is dropped
    and reported in the third return value.

    Returns:
        ``(times, results, failed)``: variant -> list of seconds, variant -> return value of its
        last call, variant -> why it was dropped.
    """
    results: dict[str, object] = {}
    failed: dict[str, str] = {}
    alive = {}
    for name, fn in variants.items():
        try:
            for _ in range(warmup):
                results[name] = fn()
            _sync(device)
        except Exception as error:  # noqa: BLE001 (any failure of one variant is reported, not fatal)
            failed[name] = f"failed: {_failure(error)}"
            continue
        alive[name] = fn
    if _cuda_events(device):
        return {name: cuda_times(fn, repeats) for name, fn in alive.items()}, results, failed
    times: dict[str, list[float]] = {name: [] for name in alive}
    for _ in range(repeats):
        for name, fn in alive.items():
            _sync(device)
            start = time.perf_counter()
            results[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times, results, failed


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _empty_row(case: Case, variant: str, device: str) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(
        suite=case.suite, case=case.name, variant=variant, baseline=case.baseline,
        shape=case.shape, dtype=case.dtype, device=device, note=case.note or None,
    )
    return row


def run_case(case: Case, device: str = "cpu", repeats: int | None = None) -> list[dict]:
    """Rows of one case: one per variant, the baseline first; skipped variants carry a note."""
    prepared = case.setup()
    try:
        times, results, failed = measure(
            prepared.variants, repeats or case.repeats, case.warmup, device
        )
        base = statistics.median(times[case.baseline]) if case.baseline in times else None
        floor = statistics.median(times[case.floor]) if case.floor in times else None
        reference = None
        if case.error is not None and prepared.reference is not None and results:
            reference = prepared.reference()
        order = list(case.variants)
        order += [name for name in [*prepared.variants, *prepared.skipped] if name not in order]
        rows = []
        for name in order:
            row = _empty_row(case, name, device)
            if name in times:
                median = statistics.median(times[name])
                row.update(
                    median_s=median,
                    q25_s=_quantile(times[name], 0.25),
                    q75_s=_quantile(times[name], 0.75),
                    repeats=len(times[name]),
                    timer=timer_name(device),
                    ratio=median / base if base else None,
                    ratio_to_floor=median / floor if floor else None,
                    tflops=case.flops[name] / median / 1e12 if name in case.flops else None,
                )
                if reference is not None:
                    row.update(case.error(name, results[name], reference))
            else:
                reason = failed.get(name) or prepared.skipped.get(name) or "not run"
                row["note"] = f"{reason}; {case.note}" if case.note else reason
            rows.append(row)
        return rows
    finally:
        del prepared
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def run(
    cases: Sequence[Case],
    device: str = "cpu",
    repeats: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict]:
    """Run every case; ``progress(done, total, next_case_name)`` is called before each case and once at the end."""
    rows: list[dict] = []
    for i, case in enumerate(cases):
        if progress is not None:
            progress(i, len(cases), f"{case.suite}: {case.name}")
        rows += run_case(case, device, repeats)
    if progress is not None:
        progress(len(cases), len(cases), "done")
    return rows



def pytest_cases(cases: Sequence[Case]) -> tuple[list[tuple[Case, str]], list[str], Callable[[str], Prepared]]:
    """What the pytest-benchmark files in benchmarks/ parametrize over: the (case, variant) pairs,
    their test ids, and ``prepared(case_name)``, the case's setup, run once per case (the variants
    of one case are consecutive tests)."""
    by_name = {case.name: case for case in cases}
    params = [(case, variant) for case in cases for variant in case.variants]
    ids = [f"{case.name}-{variant}".replace(" ", "_") for case, variant in params]

    @functools.lru_cache(maxsize=1)
    def prepared(case_name: str) -> Prepared:
        return by_name[case_name].setup()

    return params, ids, prepared


def pytest_settings() -> tuple[str, bool]:
    """Device and sizes of the pytest-benchmark files in benchmarks/, read from the environment.

    ``FASTRANK_BENCH_DEVICE``: ``cpu`` (the default) or ``cuda``; ``FASTRANK_BENCH_QUICK``: ``1``
    for the sizes of ``fastrank bench --quick``, ``0`` (the default) for the full ones.
    benchmarks/gpu/run.sh sets both.
    """
    device = os.environ.get("FASTRANK_BENCH_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"FASTRANK_BENCH_DEVICE must be 'cpu' or 'cuda', got {device!r}")
    quick = os.environ.get("FASTRANK_BENCH_QUICK", "0")
    if quick not in ("0", "1"):
        raise ValueError(f"FASTRANK_BENCH_QUICK must be '0' or '1', got {quick!r}")
    return device, quick == "1"


def synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` followed by a device synchronization on CUDA, so that a timer around a call measures
    the work and not only its launch (pytest-benchmark times plain calls)."""
    if not device.startswith("cuda"):
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize()
        return result

    return call


_PYTEST_MEDIANS: dict[tuple[str, str, str], float] = {}  # (suite, case, variant) -> median seconds
_PYTEST_INFO: dict[tuple[str, str, str], dict] = {}  # (suite, case, variant) -> its extra_info


def pytest_run(benchmark, case: Case, variant: str, fn: Callable[[], object], device: str) -> object:
    """Time one variant under pytest-benchmark and fill its ``extra_info``; returns its result.

    On the CPU: pytest-benchmark's rounds (``case.repeats``) around a plain call. On CUDA with
    Triton: one pytest-benchmark round (its host timer), then :func:`cuda_times` (CUDA events, L2
    flushed) for ``median_s`` / ``q25_s`` / ``q75_s`` in ``extra_info``. ``ratio`` (to the case's
    baseline) and ``ratio_to_floor`` are filled in on every variant of the case as soon as both
    medians of a pair are known (the variants of a case run one after another; extra_info is
    written out at the end of the session).
    """
    benchmark.group = case.name
    benchmark.extra_info.update(
        suite=case.suite, shape=case.shape, dtype=case.dtype, variant=variant, device=device,
        timer=timer_name(device), threads=torch.get_num_threads(),
    )
    events = _cuda_events(device)
    # With CUDA events the one pytest-benchmark round is itself a warm-up call (its host time is
    # not the reported median), so it stands for one of the case's warm-up calls.
    result = benchmark.pedantic(
        synchronized(fn, device), rounds=1 if events else case.repeats,
        warmup_rounds=max(case.warmup - 1, 0) if events else case.warmup, iterations=1,
    )
    if benchmark.stats is None:  # --benchmark-disable: nothing timed
        return result
    if events:
        times = cuda_times(fn, case.repeats)
        median = statistics.median(times)
        benchmark.extra_info.update(
            median_s=median, q25_s=_quantile(times, 0.25), q75_s=_quantile(times, 0.75), repeats=len(times)
        )
    else:
        median = benchmark.stats.stats.median
    key = (case.suite, case.name)
    _PYTEST_MEDIANS[(*key, variant)] = median
    _PYTEST_INFO[(*key, variant)] = benchmark.extra_info
    for done in case.variants:
        for field, other in (("ratio", case.baseline), ("ratio_to_floor", case.floor)):
            if other not in (None, done) and (*key, done) in _PYTEST_INFO and (*key, other) in _PYTEST_MEDIANS:
                _PYTEST_INFO[(*key, done)][field] = _PYTEST_MEDIANS[(*key, done)] / _PYTEST_MEDIANS[(*key, other)]
    return result
