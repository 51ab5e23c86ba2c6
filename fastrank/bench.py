"""The benchmark case type and runner shared by every suite.

A :class:`Case` is one problem (one shape, one dtype) and several *variants*: ways to compute it
(fastrank's and the baselines it replaces), measured side by side on the same inputs. The suites
build their cases in :mod:`fastrank.bench_chain` (over-parameterized layers, and the Triton chain
kernels on CUDA) and :mod:`fastrank.bench_rank` (the effective-rank family). The same case objects
are run by ``fastrank bench`` (through :func:`run`) and by the pytest-benchmark files in
``benchmarks/`` (through :meth:`Case.setup`).

Every result row carries the median time with its quartiles, the ratio to the case's baseline
measured in the same run (variant median / baseline median: below 1 is faster), TFLOP/s where the
case counts its floating-point work, the error against an exact or fp64 reference where the case
has one, and the device name, versions and date.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ._extras import MissingExtra, pyplot  # noqa: F401  (MissingExtra: the CLI catches it from here)
from ._version import __version__

__all__ = [
    "Case",
    "Prepared",
    "environment",
    "format_table",
    "measure",
    "plot_rows",
    "pytest_cases",
    "pytest_settings",
    "run",
    "synchronized",
    "suite_cases",
]

# Columns of a result row besides the environment fields, in table order.
ROW_FIELDS = (
    "suite", "case", "variant", "baseline", "shape", "dtype", "device",
    "median_s", "q25_s", "q75_s", "repeats", "ratio", "tflops",
    "error", "bound_width", "bounds_contain_reference", "note",
)


@dataclass
class Prepared:
    """What :meth:`Case.setup` returns: the inputs are built, nothing has been timed yet.

    Attributes:
        variants: variant name -> zero-argument callable doing one call; its return value is
            handed to :attr:`Case.error` (return nothing when there is nothing to check).
        reference: zero-argument callable returning the exact (or fp64) answer, evaluated once
            after timing, never timed; None when the case has no reference.
        skipped: variant name -> why it does not run here (e.g. torch.compile unavailable).
    """

    variants: dict[str, Callable[[], object]]
    reference: Callable[[], object] | None = None
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    """One shape and dtype, several ways to compute it.

    Attributes:
        suite: ``"chain"``, ``"chain-kernel"`` or ``"rank"``.
        name: short name, unique within the suite, e.g. ``"train B=2048"``.
        shape, dtype: for the result rows, e.g. ``"B=2048 d=1024 L=4"``, ``"float32"``.
        baseline: the variant every ratio is taken against.
        variants: the names of all variants, baseline first (those :meth:`setup` returns, plus
            those it may list as skipped): known without building the inputs.
        setup: builds the inputs and returns a :class:`Prepared`.
        flops: variant name -> floating-point operations of one call, for TFLOP/s; variants not
            listed get no TFLOP/s.
        error: ``error(variant, result, reference) -> dict`` with any of ``error`` (relative error
            against the reference), ``bound_width`` and ``bounds_contain_reference``; {} when the
            variant computes something not comparable with the reference.
        repeats: timed calls per variant (interleaved across variants).
        warmup: untimed calls per variant before timing (compilation, caches, autotuning).
        note: shown beside the rows, e.g. what the case compares.
    """

    suite: str
    name: str
    shape: str
    dtype: str
    baseline: str
    variants: tuple[str, ...]
    setup: Callable[[], Prepared]
    flops: dict[str, float] = field(default_factory=dict)
    error: Callable[[str, object, object], dict] | None = None
    repeats: int = 5
    warmup: int = 1
    note: str = ""


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


def measure(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu"
) -> tuple[dict[str, list[float]], dict[str, object], dict[str, str]]:
    """Seconds per call of every variant, the repeats interleaved round-robin.

    Interleaving spreads slow phases of a shared machine over all variants alike, so the ratios
    stay fair when the absolute times drift. A variant raising during warmup (a compiler that is
    not installed, out of memory) is dropped and reported in the third return value.

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
                    ratio=median / base if base else None,
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


def suite_cases(suite: str, quick: bool, device: str) -> list[Case]:
    """The cases of ``suite`` (``"chain"``, ``"rank"`` or ``"all"``) for ``device``.

    On CUDA the chain suite adds the Triton chain-kernel cases.
    """
    from .bench_chain import chain_cases, chain_kernel_cases
    from .bench_rank import rank_cases

    cases: list[Case] = []
    if suite in ("chain", "all"):
        cases += chain_cases(quick=quick, device=device)
        if device.startswith("cuda"):
            cases += chain_kernel_cases(quick=quick)
    if suite in ("rank", "all"):
        cases += rank_cases(quick=quick, device=device)
    return cases


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


# ----------------------------------------------------------------------------- output
def _milliseconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _cells(row: dict) -> list[str]:
    spread = (
        f"{_milliseconds(row['q25_s'])}-{_milliseconds(row['q75_s'])}" if row["q25_s"] is not None else "-"
    )
    bound = "-"
    if row.get("bound_width") is not None:
        percent = 100 * row["bound_width"]
        bound = f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"
        if row.get("bounds_contain_reference") is False:
            bound += " MISSES"
    return [
        row["case"],
        row["variant"],
        row["shape"],
        row["dtype"],
        _milliseconds(row["median_s"]),
        spread,
        f"{row['ratio']:.2f}" if row["ratio"] is not None else "-",
        f"{row['tflops']:.3g}" if row["tflops"] is not None else "-",
        f"{row['error']:.1e}" if row.get("error") is not None else "-",
        bound,
    ]


TABLE_HEADER = [
    "case", "variant", "shape", "dtype", "median ms", "q25-q75 ms", "x base", "TFLOP/s", "error",
    "bounds",
]


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table, one block per suite; skipped variants are listed under their block."""
    lines = []
    for suite in dict.fromkeys(row["suite"] for row in rows):
        block = [row for row in rows if row["suite"] == suite]
        cells = [_cells(row) for row in block]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(TABLE_HEADER)]
        numeric = range(4, len(TABLE_HEADER))

        def line(values):
            return "  ".join(
                v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))
            ).rstrip()

        lines.append(f"suite {suite}")
        lines.append(line(TABLE_HEADER))
        lines.append("-" * len(line(TABLE_HEADER)))
        previous = None
        for row, values in zip(block, cells):
            if previous is not None and row["case"] != previous:
                lines.append("")
            previous = row["case"]
            lines.append(line(values))
        notes = dict.fromkeys(
            f"{row['case']} / {row['variant']}: {row['note']}"
            for row in block
            if row["note"] and row["median_s"] is None
        )
        lines += [f"  skipped {note}" for note in notes]
        lines.append("")
    lines.append(
        "x base: median time / the baseline's median in the same run (the first row of each case; "
        "below 1 is faster). error: relative error against the exact or fp64 reference; "
        "bounds: width of the returned interval, relative to the estimate."
    )
    return "\n".join(lines)


def _pyplot():
    return pyplot("--plot")


def plot_rows(rows: Sequence[dict], path: str) -> None:
    """Horizontal bars of each variant's time relative to its case's baseline, log scale, per suite."""
    plt = _pyplot()
    timed = [row for row in rows if row["ratio"] is not None]
    suites = list(dict.fromkeys(row["suite"] for row in timed))
    counts = [sum(row["suite"] == s for row in timed) for s in suites]
    fig, axes = plt.subplots(
        len(suites), 1, figsize=(9, 1.2 + 0.19 * sum(counts) + 0.6 * len(suites)),
        gridspec_kw={"height_ratios": counts}, squeeze=False, dpi=90,
    )
    variants = list(dict.fromkeys(row["variant"] for row in timed))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(variants)}
    for axis, suite in zip(axes[:, 0], suites):
        block = [row for row in timed if row["suite"] == suite]
        positions, labels, position = [], [], 0.0
        previous = None
        for row in block:
            if previous is not None and row["case"] != previous:
                position += 0.6
            previous = row["case"]
            positions.append(position)
            labels.append(f"{row['case']}  {row['variant']}")
            position += 1
        ratios = [row["ratio"] for row in block]
        axis.barh(positions, ratios, color=[colors[row["variant"]] for row in block], height=0.8)
        axis.set_xscale("log")
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_yticks(positions, labels, fontsize=7)
        axis.invert_yaxis()
        for y, ratio in zip(positions, ratios):
            axis.text(ratio, y, f" {ratio:.2g}", va="center", fontsize=6)
        low, high = min(ratios), max(ratios)
        axis.set_xlim(min(low, 1.0) / 1.5, max(high, 1.0) * 3)
        axis.set_title(f"suite {suite}: time / baseline time (first bar of each case; log scale)", fontsize=9)
        axis.tick_params(axis="x", labelsize=7)
    env = rows[0]
    fig.suptitle(
        f"fastrank {env.get('fastrank')} bench on {env.get('device_name')}, torch {env.get('torch')}, "
        f"{str(env.get('date'))[:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finite_or_none(value: float | None) -> float | None:
    """JSON has no inf/NaN: map them to None."""
    if value is None or not isinstance(value, float):
        return value
    return value if math.isfinite(value) else None
