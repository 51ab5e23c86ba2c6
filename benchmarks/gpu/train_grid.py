"""Train steps of OverparamLinear against the naive forms and nn.Linear, eager and from CUDA graphs.

    python benchmarks/gpu/train_grid.py --json train-grid.json [--budget-s 70] [--dry-run]

Grid: d in (64, 256, 1024), B in (1, 64, 1024, 8192), L in (2, 4, 8), bf16 and fp32. Each shape
runs four variants of one train step (zero the grads, forward, a mean-square loss, backward; x
requires grad, as inside a network): fastrank (``OverparamLinear(d, d, depth=L)`` in training mode,
as users train it), the sequential chain (one ``F.linear`` per factor, then the bias), collapsed
autograd (``W_L @ ... @ W_1``, then ``F.linear``) and ``nn.Linear(d, d)``; the naive forms share the
layer's factors (``fastrank.bench.chain``). Each variant runs eager and replayed from a CUDA graph
of the whole step (backward included; captured after three calls on a side stream, as
``torch.cuda.graphs`` documents).

One row per (shape, variant, mode):

- ``wall_ms``: median host time per step, synchronized after each step, with its quartiles, from
  rounds of one step of every variant and mode (the order rotated each round);
- ``span_us``: CUDA events around back-to-back steps, per step (the stream's time, gaps included);
- ``device_us``: the sum of the step's CUDA kernel times, and ``launches``: the number of CUDA
  kernels one step runs, memory copies and sets not counted (torch.profiler: one profiled step of
  every variant and mode per shape, each kernel given to the step whose window it starts in; a
  session per step where a kernel falls outside every window);
- per shape (in ``goals``): ``seconds``, the shape's time in the grid, and ``warmup_s``, the part
  of it the first three calls of every variant and mode took (compiles, autotuning, captures);
- ``jit_calls_per_step``: fastrank launcher calls per timed step that took Triton's JIT path
  instead of a launch plan (``fastrank.kernels._launch.jit_calls``; 0 in a steady loop, present
  where the kernels import).

And ``autotunings``: every autotuning of a new key the grid's steps caused, in order
(``fastrank.kernels._launch.autotunings``: kernel, key arguments, dtype, each config's median ms,
the chosen config, the tuning's seconds with its compiles), empty on the CPU; ``autotuned``
sums them up per kernel (keys, seconds, how often each config was chosen).

Goals, per shape (``goals``) and marked on the fastrank rows:

- ``eager``: fastrank's wall time <= 1.1x the better of the sequential chain and collapsed autograd;
- ``graph``: where the collapsed form is the cheaper one (``fastrank.chain_costs``), fastrank's
  replay (``span_us``) <= 1.1 (1 + (L - 1) d / B) x nn.Linear's;
- ``launches``: fastrank's eager launches <= nn.Linear's + 2.

Shapes run most important first (depth 4, 2, 8; each in bf16, then fp32); a shape starts only
when the time it is expected to take (the slowest so far) fits in ``--budget-s`` (the first always
runs), and the shapes not run are listed in ``not_run``. The JSON is rewritten after every shape, and on SIGINT
(run.sh's time limit) before exiting.

--dry-run: on the CPU, one tiny shape, eager only (no CUDA events, profiler or graphs: those
fields are None), rows flagged ``dry_run``. Run by benchmarks/gpu/run.sh (its dry run in CI).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from fastrank import chain_costs
from fastrank.bench.chain import _CollapsedAutograd, _graphed, _layer_calls, _SequentialChain
from fastrank.bench.runner import _quantile, environment

WIDTHS, BATCHES, DEPTHS = (64, 256, 1024), (1, 64, 1024, 8192), (2, 4, 8)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ("fastrank", "sequential chain", "collapsed autograd", "nn.Linear")
EAGER, GRAPH = "eager", "cuda graph"
DRY_SHAPES = [("fp32", 16, 4, 2)]
# Timed steps per measurement: enough for ~50 ms of steps, within these bounds.
MIN_REPEATS, MAX_REPEATS, TIMED_SECONDS = 5, 25, 0.05
# Goal thresholds.
EAGER_TARGET, GRAPH_FACTOR, EXTRA_LAUNCHES = 1.1, 1.1, 2
# Host pause between the profiled steps, so that each kernel falls in its step's window.
PROFILE_GAP_S = 0.002


def grid_order() -> list[tuple[str, int, int, int]]:
    """Every (dtype, d, B, L) once, most important first: depth 4, 2, then 8, each in bf16 then
    fp32 (on an H200 the bf16 shapes alone filled the budget before any fp32 one ran), the usual
    widths (256, 1024, then 64) and batches (64, 8192, 1, then 1024)."""
    return [(dtype, d, batch, depth) for depth in (4, 2, 8) for dtype in DTYPES for d in (256, 1024, 64)
            for batch in (64, 8192, 1, 1024)]


def _train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One train step of ``module`` on ``x``: grads set to None, forward, mean-square loss, backward."""
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).float().square().mean().backward()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _repeats(step: Callable[[], None], device: str) -> int:
    """Timed steps for ``step`` (already warm): ~TIMED_SECONDS of them, within the bounds."""
    start = time.perf_counter()
    step()
    _sync(device)
    seconds = time.perf_counter() - start
    return max(MIN_REPEATS, min(MAX_REPEATS, int(TIMED_SECONDS / max(seconds, 1e-6))))


def _interleaved_wall(steps: dict, device: str, repeats: int) -> dict:
    """Synchronized host times of ``repeats`` rounds of one step of every entry of ``steps`` (key
    -> warm step), each round starting one entry later than the one before, so that the host's
    drift over the shape (on an H200 a training loop's step time moved by 12% between two loops)
    falls on every variant alike. Returns key -> {"repeats", "wall_ms", "wall_ms_quartiles"}, and
    ``jit_calls_per_step`` where the launchers count their JIT calls."""
    keys = list(steps)
    times = {key: [] for key in keys}
    jit = {key: 0 for key in keys}
    counting = _jit_calls() is not None
    for index in range(repeats):
        for key in keys[index % len(keys):] + keys[: index % len(keys)]:
            before = _jit_calls() if counting else 0
            start = time.perf_counter()
            steps[key]()
            _sync(device)
            times[key].append(time.perf_counter() - start)
            if counting:
                jit[key] += _jit_calls() - before
    results = {}
    for key, seconds in times.items():
        results[key] = {"repeats": repeats, "wall_ms": statistics.median(seconds) * 1e3,
                        "wall_ms_quartiles": [_quantile(seconds, 0.25) * 1e3, _quantile(seconds, 0.75) * 1e3]}
        if counting:
            results[key]["jit_calls_per_step"] = jit[key] / repeats
    return results


def _span_us(step: Callable[[], None], repeats: int) -> float:
    """CUDA events around ``repeats`` back-to-back steps, per step (microseconds)."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1e3 / repeats


def attribute_kernels(windows: Sequence[tuple[float, float]],
                      kernels: Sequence[tuple[float, float]]) -> tuple[list[tuple[int, float]], int]:
    """Kernels per window: ``windows`` are (start_us, end_us) of the profiled steps (a step's
    kernels start after its first launch and end before its closing synchronize), ``kernels`` are
    (start_us, duration_us). Returns ([(count, total duration_us)] per window, kernels outside
    every window)."""
    totals = [(0, 0.0)] * len(windows)
    outside = 0
    for start, duration in kernels:
        for index, (low, high) in enumerate(windows):
            if low <= start <= high:
                count, total = totals[index]
                totals[index] = (count + 1, total + duration)
                break
        else:
            outside += 1
    return totals, outside


def _kernels(events, labels=()) -> list[tuple[float, float]]:
    """(start_us, duration_us) of the CUDA kernels among profiler ``events``: not the device-side
    annotations of the ``labels`` ranges, not memory copies and sets."""
    return [(event.time_range.start, event.time_range.elapsed_us()) for event in events
            if event.device_type.name == "CUDA" and event.name not in labels
            and not event.name.startswith(("Memcpy", "Memset"))]


def _profile(steps: dict[tuple[str, str], Callable[[], None]]) -> tuple[dict, int]:
    """One profiled step of each (variant, mode), in one torch.profiler session: {key: (launches,
    device_us)} and the number of kernels that fell in no step's window."""
    from torch.profiler import ProfilerActivity, profile, record_function

    labels = {key: f"train_grid::{index}" for index, key in enumerate(steps)}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for key, step in steps.items():
            with record_function(labels[key]):
                step()
                torch.cuda.synchronize()
            time.sleep(PROFILE_GAP_S)
    events = prof.events()
    ranges = {event.name: event.time_range for event in events
              if event.name in labels.values() and event.device_type.name == "CPU"}
    keys = [key for key in steps if labels[key] in ranges]
    windows = [(ranges[labels[key]].start, ranges[labels[key]].end) for key in keys]
    totals, outside = attribute_kernels(windows, _kernels(events, set(labels.values())))
    return dict(zip(keys, totals)), outside


def _profile_alone(step: Callable[[], None]) -> tuple[int, float]:
    """(launches, device_us) of one step in a torch.profiler session of its own."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = _kernels(prof.events())
    return len(kernels), sum(duration for _, duration in kernels)


def goals(rows: Sequence[dict]) -> dict:
    """The three goals for one shape's rows: per goal ``{"value", "target", "met"}``, ``met`` None
    with a ``reason`` where a figure is missing or the goal does not apply."""
    by = {(row["variant"], row["mode"]): row for row in rows}
    d, batch, depth = rows[0]["d"], rows[0]["B"], rows[0]["L"]

    def get(variant, mode, field):
        value = by.get((variant, mode), {}).get(field)
        return value if isinstance(value, (int, float)) and value > 0 else None

    def check(value, target, reason="not measured"):
        if value is None or target is None:
            return {"value": value, "target": target, "met": None, "reason": reason}
        return {"value": value, "target": target, "met": value <= target}

    result = {}
    fast, seq, col = (get(v, EAGER, "wall_ms") for v in ("fastrank", "sequential chain", "collapsed autograd"))
    naive = min(seq, col) if None not in (seq, col) else None
    result["eager"] = check(fast / naive if None not in (fast, naive) else None, EAGER_TARGET)
    activation, collapsed = chain_costs(batch, [d] * (depth + 1))
    floor = 1 + (depth - 1) * d / batch
    if collapsed < activation:
        # The events' span where both replays have one, else both wall times: one timer for both.
        timer = "span_us" if None not in (get("fastrank", GRAPH, "span_us"), get("nn.Linear", GRAPH, "span_us")) else "wall_ms"
        fast_g, linear_g = get("fastrank", GRAPH, timer), get("nn.Linear", GRAPH, timer)
        ratio = fast_g / linear_g if None not in (fast_g, linear_g) else None
        result["graph"] = {**check(ratio, GRAPH_FACTOR * floor), "floor": floor, "timer": timer}
    else:
        result["graph"] = {"value": None, "target": None, "met": None, "floor": floor,
                           "reason": "the activation chain is the cheaper form (chain_costs)"}
    fast_l, linear_l = get("fastrank", EAGER, "launches"), get("nn.Linear", EAGER, "launches")
    result["launches"] = check(fast_l, linear_l + EXTRA_LAUNCHES if linear_l is not None else None)
    return result


def _jit_calls() -> int | None:
    """Launcher calls that took Triton's JIT path so far (fastrank.kernels._launch.jit_calls), None
    without the kernels (no Triton)."""
    try:
        from fastrank.kernels._launch import jit_calls
    except ImportError:
        return None
    return jit_calls()


def _autotunings() -> list[dict]:
    """What the kernels' autotuners timed so far (fastrank.kernels._launch.autotunings), [] without
    the kernels."""
    try:
        from fastrank.kernels._launch import autotunings
    except ImportError:
        return []
    return autotunings()


def autotune_summary(autotunings: Sequence[dict]) -> dict:
    """Per kernel: the keys tuned, the tuning's seconds (compiles included) and how often each
    config was chosen (as ``"NAME=value ..."``)."""
    summary: dict[str, dict] = {}
    for entry in autotunings:
        kernel = summary.setdefault(entry["kernel"], {"keys": 0, "seconds": 0.0, "chosen": {}})
        kernel["keys"] += 1
        kernel["seconds"] += entry["bench_s"] or 0.0
        chosen = " ".join(f"{name}={value}" for name, value in entry["chosen"].items())
        kernel["chosen"][chosen] = kernel["chosen"].get(chosen, 0) + 1
    return summary


def measure_shape(dtype_name: str, d: int, batch: int, depth: int, device: str, context: dict) -> dict:
    """The rows of one shape (eager, and on CUDA graph-replayed, for every variant) and its goals."""
    dtype = DTYPES[dtype_name]
    layer, linear, x, _ = _layer_calls(d, depth, batch, "train", device, dtype)
    modules = {"fastrank": layer, "sequential chain": _SequentialChain(layer),
               "collapsed autograd": _CollapsedAutograd(layer), "nn.Linear": linear}
    modes = (EAGER, GRAPH) if device == "cuda" else (EAGER,)
    shape = {"dtype": dtype_name, "d": d, "B": batch, "L": depth, "shape": f"B={batch} d={d} L={depth}"}
    rows, steps, by_key = [], {}, {}
    began = time.perf_counter()
    for variant, module in modules.items():
        for mode in modes:
            row = {**context, **shape, "variant": variant, "mode": mode,
                   "wall_ms": None, "span_us": None, "device_us": None, "launches": None}
            rows.append(row)
            try:
                step = _train_step(module, x)
                if mode == GRAPH:
                    step = _graphed(step)  # captured at its first call, replayed after
                for _ in range(3):
                    step()
                _sync(device)
                steps[(variant, mode)], by_key[(variant, mode)] = step, row
            except Exception as error:  # a variant that fails is a row, not the end of the grid
                row["error"] = f"{type(error).__name__}: {error}"[:400]
    shape["warmup_s"] = time.perf_counter() - began  # first calls: compiles, autotuning, captures
    if steps:
        # As many rounds as the slowest step allows within its ~TIMED_SECONDS.
        repeats = min(_repeats(step, device) for step in steps.values())
        for key, timing in _interleaved_wall(steps, device, repeats).items():
            by_key[key].update(timing)
        if device == "cuda":
            for key, step in steps.items():
                by_key[key]["span_us"] = _span_us(step, repeats)
    unattributed = None
    if device == "cuda" and steps:
        try:
            profiled, unattributed = _profile(steps)
            shape["profile"] = "one session, kernels by window"
            if unattributed:  # host and device clocks disagree, or a window is missing
                profiled = {key: _profile_alone(step) for key, step in steps.items()}
                shape["profile"] = f"one session per step ({unattributed} kernels outside the windows)"
            for row in rows:
                launches, device_us = profiled.get((row["variant"], row["mode"]), (0, 0.0))
                if launches:  # a replay the profiler saw no kernels of stays None
                    row["launches"], row["device_us"] = launches, device_us
        except Exception as error:
            shape["profile_error"] = f"{type(error).__name__}: {error}"[:400]
    shape_goals = goals(rows)
    for row in rows:
        if row["variant"] == "fastrank":
            row["goals"] = {name: shape_goals[name]["met"] for name in
                            (("eager", "launches") if row["mode"] == EAGER else ("graph",))}
    return {"rows": rows, "goals": {**shape, **shape_goals, "unattributed_kernels": unattributed}}


def goal_counts(shape_goals: Sequence[dict]) -> dict:
    """Per goal: shapes met, missed, and not checked (a figure missing or the goal not applying)."""
    counts = {}
    for name in ("eager", "graph", "launches"):
        marks = [entry[name]["met"] for entry in shape_goals]
        counts[name] = {"met": marks.count(True), "missed": marks.count(False), "not checked": marks.count(None)}
    return counts


def run_grid(path: Path, device: str, budget_s: float, dry_run: bool) -> dict:
    """Measure the grid in order within ``budget_s``, rewriting ``path`` after each shape."""
    shapes = DRY_SHAPES if dry_run else grid_order()
    context = {**environment(device), "dry_run": dry_run}
    result = {**context, "budget_s": budget_s, "modes": [EAGER] if device != "cuda" else [EAGER, GRAPH],
              "rows": [], "goals": [], "goal_counts": {}, "not_run": [], "complete": False, "seconds": 0.0}
    start = time.perf_counter()
    slowest = 0.0

    def write(done: int, why: str | None) -> None:
        result["goal_counts"] = goal_counts(result["goals"])
        result["not_run"] = [{"dtype": s[0], "d": s[1], "B": s[2], "L": s[3], "why": why} for s in shapes[done:]]
        result["complete"] = done == len(shapes)
        result["seconds"] = time.perf_counter() - start
        result["autotunings"] = _autotunings()
        result["autotuned"] = autotune_summary(result["autotunings"])
        path.write_text(json.dumps(result, indent=1) + "\n")

    done = 0
    try:
        for dtype_name, d, batch, depth in shapes:
            elapsed = time.perf_counter() - start
            if done and elapsed + slowest > budget_s:  # the first shape always runs
                write(done, f"time budget: {elapsed:.0f} s of {budget_s:.0f} s spent, a shape takes up to {slowest:.1f} s")
                return result
            began = time.perf_counter()
            measured = measure_shape(dtype_name, d, batch, depth, device, context)
            measured["goals"]["seconds"] = time.perf_counter() - began
            slowest = max(slowest, measured["goals"]["seconds"])
            result["rows"] += measured["rows"]
            result["goals"].append(measured["goals"])
            done += 1
            write(done, None)
            if device == "cuda":
                torch.cuda.empty_cache()  # the graphs' pools of this shape are gone
    except KeyboardInterrupt:  # run.sh's time limit
        write(done, "interrupted at the time limit")
        raise
    write(done, None)
    return result


def _print(result: dict) -> None:
    print(f"{result['device_name']}, torch {result['torch']}, triton {result['triton']}")
    for entry in result["goals"]:
        marks = "  ".join(
            f"{name} {entry[name]['value']:.3g}/{entry[name]['target']:.3g} {'met' if entry[name]['met'] else 'MISSED'}"
            if entry[name]["met"] is not None else f"{name} -" for name in ("eager", "graph", "launches"))
        wanted = (entry["dtype"], entry["shape"], "fastrank", EAGER)
        jit = next((row.get("jit_calls_per_step") for row in result["rows"]
                    if (row["dtype"], row["shape"], row["variant"], row["mode"]) == wanted), None)
        jit = f"  JIT launcher calls/step {jit:.2g}" if jit is not None else ""
        print(f"{entry['dtype']:4s} {entry['shape']:22s} {marks}{jit}  "
              f"({entry['seconds']:.1f} s, {entry['warmup_s']:.1f} s of it first calls)")
    for name, counts in result["goal_counts"].items():
        print(f"goal {name}: {counts}")
    if result["not_run"]:
        print(f"not run: {len(result['not_run'])} shapes ({result['not_run'][0]['why']})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where the rows go (rewritten after every shape)")
    parser.add_argument("--budget-s", type=float, default=70.0, help="start no shape that would end after this")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing: one tiny shape, eager only")
    options = parser.parse_args(argv)
    device = "cpu" if options.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("train_grid.py: needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    try:
        result = run_grid(Path(options.json), device, options.budget_s, options.dry_run)
    except KeyboardInterrupt:
        print(f"train_grid.py: interrupted; the rows so far are in {options.json}", file=sys.stderr)
        return 130
    _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
