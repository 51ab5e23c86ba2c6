"""Train-step grid of OverparamLinear on a GPU, and RankTracker's cost in a training loop.

    python benchmarks/gpu/train_grid.py --json train-grid.json [--tracker-json tracker-cost.json]
                                        [--budget-s 100] [--dry-run]

Grid: d in (64, 256, 1024), B in (1, 64, 1024, 8192), L in (2, 4, 8), bf16 and fp32. Each shape
runs four variants of one train step (zero the grads, forward, a scalar loss, backward):
fastrank (``OverparamLinear(d, d, depth=L)`` as users train it), the sequential chain (one
``F.linear`` per factor, then the bias), collapsed autograd (``W_L @ ... @ W_1``, then
``F.linear``) and ``nn.Linear(d, d)``. Each is timed eager and replayed from a CUDA graph of the
whole step. Per row: the median wall time per step (host-timed, synchronized), the device time
and the kernel launches of one eager step (torch.profiler). The rows are in the order the shapes
matter most, most important first; at the time budget the grid stops and the rows it did not run
are listed.

Goals, checked per shape in the JSON:
- eager: fastrank <= 1.1x the better of the sequential chain and collapsed autograd;
- CUDA graphs: where collapsed autograd is cheaper than the sequential chain, fastrank <= 1.1x
  (1 + (L - 1) d / B) x nn.Linear;
- launches per step: fastrank <= nn.Linear's + 2.

Tracker: a residual MLP of 64 blocks of width 2048 (268 M parameters) in bf16, AdamW, B = 512.
The loop is timed with a ``RankTracker`` measuring every weight and one embedding (block 32's
output) every 100 steps with ``background=True``, and without one, interleaved. The overhead
fraction is reported against the goal <= 2%.

--dry-run: on the CPU, one tiny shape without CUDA graphs, and a tiny tracker loop: the plumbing
only, rows flagged ``dry_run``. Run by benchmarks/gpu/run.sh (and its dry run in CI).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastrank
from fastrank.bench.chain import _CollapsedAutograd, _graphed, _SequentialChain

WIDTHS, BATCHES, DEPTHS = (64, 256, 1024), (1, 64, 1024, 8192), (2, 4, 8)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ("fastrank", "sequential chain", "collapsed autograd", "nn.Linear")


def grid_order() -> list[tuple[str, int, int, int]]:
    """(dtype, d, B, L) with the most important first: bf16 before fp32, depth 4 first, then the
    layers' usual widths and batches."""
    shapes = [(dtype, d, b, depth) for dtype in DTYPES for depth in (4, 2, 8) for d in (256, 1024, 64)
              for b in (64, 8192, 1, 1024)]
    return shapes


def _step(module: nn.Module, x: torch.Tensor):
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        module(x).float().square().mean().backward()

    return step


def _wall_ms(step, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _profiled(step, device: str) -> tuple[int | None, float | None]:
    """(kernel launches, device microseconds) of one step; (None, None) on the CPU."""
    if device != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [event for event in prof.events() if event.device_type.name == "CUDA"]
    return len(kernels), sum(event.time_range.elapsed_us() for event in kernels)


def _graph_ms(step, repeats: int) -> float:
    """Median ms per replay of a CUDA graph of the whole step (fastrank.bench.chain._graphed:
    captured after three side-stream calls, as torch.cuda.graphs documents)."""
    replay = _graphed(step)
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    return _wall_ms(replay, "cuda", repeats)


def measure_shape(dtype_name: str, d: int, batch: int, depth: int, device: str, graphs: bool,
                  repeats: int) -> list[dict]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(d, d, depth=depth).to(device, dtype)
    linear = nn.Linear(d, d).to(device, dtype)
    modules = {"fastrank": layer, "sequential chain": _SequentialChain(layer),
               "collapsed autograd": _CollapsedAutograd(layer), "nn.Linear": linear}
    x = torch.randn(batch, d, device=device, dtype=dtype)
    rows = []
    for variant, module in modules.items():
        row = {"dtype": dtype_name, "d": d, "B": batch, "L": depth, "variant": variant}
        try:
            step = _step(module, x)
            for _ in range(3):
                step()
            row["eager_ms"] = _wall_ms(step, device, repeats)
            row["launches"], row["device_us"] = _profiled(step, device)
            row["graph_ms"] = _graph_ms(step, repeats) if graphs else None
        except Exception as error:  # a variant that fails is a row, not the end of the grid
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        rows.append(row)
    return rows


def goals(rows: list[dict]) -> dict:
    """The issue's three goals for one shape's rows (None where a time is missing)."""
    by = {row["variant"]: row for row in rows}
    d, batch, depth = rows[0]["d"], rows[0]["B"], rows[0]["L"]

    def get(variant, field):
        return by.get(variant, {}).get(field)

    result = {}
    fast, seq, col = get("fastrank", "eager_ms"), get("sequential chain", "eager_ms"), get("collapsed autograd", "eager_ms")
    if None not in (fast, seq, col):
        result["eager_ratio"] = fast / min(seq, col)
        result["eager_met"] = result["eager_ratio"] <= 1.1
    seq_g, col_g, fast_g, lin_g = (get(v, "graph_ms") for v in ("sequential chain", "collapsed autograd", "fastrank", "nn.Linear"))
    if None not in (seq_g, col_g, fast_g, lin_g) and col_g < seq_g:
        bound = 1.1 * (1 + (depth - 1) * d / batch)
        result["graph_ratio_to_linear"] = fast_g / lin_g
        result["graph_bound"] = bound
        result["graph_met"] = fast_g / lin_g <= bound
    fast_l, lin_l = get("fastrank", "launches"), get("nn.Linear", "launches")
    if None not in (fast_l, lin_l):
        result["launches_met"] = fast_l <= lin_l + 2
    return result


def run_grid(device: str, budget_s: float, dry_run: bool) -> dict:
    shapes = [("fp32", 16, 4, 2)] if dry_run else grid_order()
    graphs, repeats = device == "cuda", 3 if dry_run else 20
    start, rows, shape_goals, not_run = time.perf_counter(), [], [], []
    for index, (dtype_name, d, batch, depth) in enumerate(shapes):
        if time.perf_counter() - start > budget_s:
            not_run = [f"{dt} d={dd} B={bb} L={ll}" for dt, dd, bb, ll in shapes[index:]]
            break
        shape_rows = measure_shape(dtype_name, d, batch, depth, device, graphs, repeats)
        rows += shape_rows
        shape_goals.append({"dtype": dtype_name, "d": d, "B": batch, "L": depth, **goals(shape_rows)})
    return {"rows": rows, "goals": shape_goals, "not_run": not_run, "seconds": time.perf_counter() - start}


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + F.gelu(self.linear(x))


def tracker_cost(device: str, dry_run: bool) -> dict:
    """Seconds per training step with a RankTracker (every weight and block 32's output every 100
    steps, background=True) and without one, interleaved twice."""
    from fastrank import RankTracker

    width, blocks, batch, steps, every = (32, 4, 8, 6, 2) if dry_run else (2048, 64, 512, 300, 100)
    dtype = torch.float32 if dry_run else torch.bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(*[_Block(width) for _ in range(blocks)]).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, width, device=device, dtype=dtype)
    embedding = str(blocks // 2)

    def loop(tracker) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            optimizer.step()
            if tracker is not None:
                tracker.step()
        if tracker is not None:
            tracker.flush()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - begin) / steps

    loop(None)  # warm-up
    off, on, measurements = [], [], 0
    for _ in range(2):
        off.append(loop(None))
        tracker = RankTracker(model, embeddings=(embedding,), every=every, background=True)
        on.append(loop(tracker))
        measurements = len({row["step"] for row in tracker.history})
        tracker.remove()
    off_s, on_s = min(off), min(on)
    return {
        "parameters": sum(p.numel() for p in model.parameters()), "width": width, "blocks": blocks,
        "batch": batch, "steps": steps, "every": every, "dtype": str(dtype).replace("torch.", ""),
        "step_s_off": off_s, "step_s_tracked": on_s, "measurements_per_loop": measurements,
        "overhead": on_s / off_s - 1, "goal": 0.02, "met": on_s / off_s - 1 <= 0.02,
    }


def _environment(device: str, dry_run: bool) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "dry_run": dry_run,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else f"CPU: {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="train-grid rows")
    parser.add_argument("--tracker-json", help="tracker cost (skipped without it)")
    parser.add_argument("--budget-s", type=float, default=100.0, help="stop the grid after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing: one tiny shape, a tiny loop")
    options = parser.parse_args(argv)
    device = "cpu" if options.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("train_grid.py: needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    environment = _environment(device, options.dry_run)
    grid = run_grid(device, options.budget_s, options.dry_run)
    Path(options.json).write_text(json.dumps({**environment, **grid}, indent=1) + "\n")
    for goal in grid["goals"]:
        print(goal)
    if grid["not_run"]:
        print(f"not run (time budget): {len(grid['not_run'])} shapes")
    if options.tracker_json:
        cost = tracker_cost(device, options.dry_run)
        Path(options.tracker_json).write_text(json.dumps({**environment, **cost}, indent=1) + "\n")
        print(f"tracker overhead {cost['overhead']:.2%} (goal <= 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
