"""Host time of fastrank's kernel launchers without a GPU: Triton's real CUDA launcher on a stubbed
driver (benchmarks/stubbed_cuda.py), each public launcher through the JIT path and through its
launch plan's replay, interleaved in one run.

    python benchmarks/host_cost.py [--json benchmarks/results/host_cost_cpu.json] [--rounds 40]
    python benchmarks/host_cost.py --device cuda --json OUT.json [--budget-s 18]   # on a GPU: the real driver

Rows ``{"call", "triton", "path", "us", ...}``: path "jit" is Triton's JIT launch (binding,
specialization, kernel cache, the remembered autotune choice, and fastrank's launcher Python),
"fast" the plan replay. The JSON keeps the rows of other Triton versions (run the script once per
Triton install to fill both) and the markdown table beside it (same name, .md) is rewritten from
all rows. What a GPU adds is not included: the driver's launch call and the CUDA caching
allocator's ``torch.empty`` (here the CPU allocator's); on the JIT path also one driver pointer
query per tensor argument, which a replay skips (it passes pointers as integers).

``--device cuda`` measures the same calls on a GPU with its real driver and the CUDA caching
allocator (what a user's process pays): host time of back-to-back calls, the stream synchronized
before and after each timed batch (every kernel here runs in less device time than its launch
takes on the host, so the queue never fills and the figure is the host's).
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

sys.path.insert(0, str(Path(__file__).parent))
import stubbed_cuda  # noqa: E402

GOAL_US = 10.0
# jit: Triton's JIT launch; fast: the plan's replay; torch: the torch matmuls the call replaces, on
# 1 x 1 operands (their host cost, i.e. what cuBLAS through torch costs the host, less the driver).
PATHS = ("jit", "fast", "torch")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cases(device: str = "cpu"):
    import torch

    from fastrank.kernels import chain, sketch

    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    d = 256
    chain_x, chain_factors = randn(d, d), [randn(d, d) for _ in range(3)]
    grads, inputs = [randn(d, d) for _ in range(4)], [randn(d, d) for _ in range(4)]
    narrow = 64
    back_x, back_factors, back_grad = randn(narrow, narrow), [randn(narrow, narrow) for _ in range(4)], randn(narrow, narrow)
    # a collapsed depth-4 layer's weight chain: W_4 as the chain's input, then W_3, W_2, W_1 as
    # transposed views (whose gradients the backward returns in their layout)
    weight_factors = [randn(narrow, narrow).T for _ in range(3)]
    sketch_a = randn(4096, 256, dtype=torch.float32)
    one = randn(1, 1)

    def torch_ops(count):  # the host cost of `count` torch matmuls (1 x 1: no work behind them)
        return lambda: [torch.mm(one, one) for _ in range(count)]

    # (name, plans, call, launches per call, the torch ops it replaces: one matmul per step of
    # the chain / per factor gradient; the kept-intermediates backward's 4 + 3, the weight chain's
    # 3 + 3; Omega and A Omega)
    return [
        ("chain_matmul, d = 256, 3 factors (bf16)", chain._CHAIN_PLANS,
         lambda: chain.chain_matmul(chain_x, chain_factors), 1, torch_ops(3)),
        ("chain_factor_grads, d = 256, 4 pairs (bf16)", chain._FACTOR_GRAD_PLANS,
         lambda: chain.chain_factor_grads(grads, inputs), 1, torch_ops(4)),
        ("chain_matmul_backward, d = 64, 4 factors (bf16, fused)", chain._BACKWARD_PLANS,
         lambda: chain.chain_matmul_backward(back_x, back_factors, back_grad), 1, torch_ops(7)),
        ("chain_matmul_backward, d = 64, a weight chain: 3 transposed factors (bf16, fused)", chain._BACKWARD_PLANS,
         lambda: chain.chain_matmul_backward(back_x, weight_factors, back_grad), 1, torch_ops(6)),
        ("gaussian_sketch, 4096 x 256, k = 64 (fp32)", sketch._SKETCH_PLANS,
         lambda: sketch.gaussian_sketch(sketch_a, 64, 7), 2, torch_ops(2)),
    ]


def measure(rounds: int, calls: int, device: str = "stub", budget_s: float | None = None) -> list[dict]:
    """Median microseconds per call of every case on both paths, interleaved round by round;
    ``device`` "stub" (the stubbed driver, CPU tensors) or "cuda" (a GPU). With ``budget_s``, the
    rounds stop (after two at least) where the next would end past that many seconds from the
    start, compiles and autotuning included. Every row also says how many rounds ran, and the
    seconds before them (imports, compiles, tuning: ``setup_s``) and in them (``rounds_s``)."""
    started = time.perf_counter()
    cuda = device == "cuda"
    if not cuda:
        stubbed_cuda.activate(compile=True, record=False)
    import torch
    import triton

    from fastrank.kernels import _launch

    if cuda and not torch.cuda.is_available():
        raise SystemExit("host_cost.py --device cuda: torch sees no CUDA device")
    torch.set_num_threads(1)
    cases = _cases("cuda" if cuda else "cpu")
    samples = {(name, path): [] for name, *_ in cases for path in PATHS}
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)

    def jit_only(tensors, flags, index, scalars=()):  # what PlanCache.replay returns without a plan
        return None, _launch.call_key(tensors, flags)[0]

    for name, plans, call, launches, _torch in cases:  # compile, tune and record once
        call()
        if cuda:  # the train grid's count: the CUDA kernels of one call, copies and sets not counted
            sys.path.insert(0, str(Path(__file__).parent / "gpu"))
            from train_grid import _profile_alone

            counted, _ = _profile_alone(call)
        else:
            before = stubbed_cuda.launch_count()
            call()
            counted = stubbed_cuda.launch_count() - before
        if counted != launches:
            raise RuntimeError(f"{name}: expected {launches} launches a call, counted {counted}")
        if not any(plan is not None for plan in plans.plans.values()):
            raise RuntimeError(f"{name}: no launch plan was recorded")
    rounds_started = time.perf_counter()
    done = 0
    for _ in range(rounds):
        round_started = time.perf_counter()
        for name, plans, call, _launches, torch_call in cases:
            for path in PATHS:
                if path == "jit":
                    plans.replay = jit_only  # the instance attribute hides PlanCache.replay
                else:
                    plans.__dict__.pop("replay", None)
                timed = torch_call if path == "torch" else call
                synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    timed()
                samples[(name, path)].append((time.perf_counter() - start) / calls * 1e6)
                synchronize()
                plans.__dict__.pop("replay", None)
        done += 1
        now = time.perf_counter()
        if budget_s is not None and done >= 2 and now + (now - round_started) - started > budget_s:
            break
    setup_s, rounds_s = rounds_started - started, time.perf_counter() - rounds_started
    date = datetime.date.today().isoformat()
    rows = []
    for (name, path), values in samples.items():
        quartiles = statistics.quantiles(values, n=4)
        rows.append({
            "call": name, "triton": triton.__version__, "path": path, "us": round(statistics.median(values), 2),
            "q1_us": round(quartiles[0], 2), "q3_us": round(quartiles[2], 2), "rounds": done, "calls": calls,
            "setup_s": round(setup_s, 3), "rounds_s": round(rounds_s, 3),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_name(), "date": date,
            "device": torch.cuda.get_device_name() if cuda else "stubbed CUDA driver (no GPU), CPU tensors",
        })
    return rows


def markdown(rows: list[dict], json_name: str = "host_cost_cpu.json") -> str:
    if any(row["device"].startswith("stubbed") for row in rows):
        title, setting = "measured without a GPU", (
            "Triton's real CUDA launcher\n"
            "on a stubbed driver (benchmarks/stubbed_cuda.py), CPU tensors, one thread")
        left_out = ("Not\nincluded: the driver's launch call and the CUDA caching allocator; the JIT path's driver "
                    "pointer\nquery per tensor argument, which the replay skips.")
    else:
        devices = ", ".join(sorted({row["device"] for row in rows}))
        title, setting = f"on {devices}", (
            f"{devices}, its real driver and\nthe CUDA caching allocator, one CPU thread, the stream "
            "synchronized around each timed batch")
        left_out = "Included: the driver's launch call and the CUDA caching allocator."
    versions = sorted({row["triton"] for row in rows})
    calls = list(dict.fromkeys(row["call"] for row in rows))
    by = {(row["call"], row["triton"], row["path"]): row for row in rows}
    header = "| call | " + " | ".join(f"jit, {v} | fast, {v} | torch ops, {v}" for v in versions) + " |"
    lines = [header, "|---|" + "---:|" * (len(PATHS) * len(versions))]
    for call in calls:
        cells = []
        for version in versions:
            for path in PATHS:
                row = by.get((call, version, path))
                cells.append(f"{row['us']:.1f}" if row else "-")
        lines.append(f"| {call} | " + " | ".join(cells) + " |")
    machines = sorted({f"{row['cpu']}, torch {row['torch']}, Python {row['python']}, {row['date']}" for row in rows})
    misses = [f"{row['call']} (Triton {row['triton']}: {row['us']:.1f} us)" for row in rows
              if row["path"] == "fast" and row["us"] > GOAL_US]
    return "\n".join([
        f"# Host cost of fastrank's launchers, {title}",
        "",
        f"Written by `python benchmarks/host_cost.py` (rows: {json_name}). {setting}; microseconds per public",
        "call, median of interleaved rounds. jit: the launch through Triton's JIT (binding and",
        "specialization, kernel cache, the remembered autotune choice) with fastrank's launcher Python;",
        "fast: the launch plan's replay (fastrank.kernels._launch); torch ops: the torch matmuls the call",
        "replaces (one per chain step or factor gradient, 4 + 3 for the kept-intermediates backward, 3 + 3",
        "for the weight chain's, Omega and A Omega for the sketch) on 1 x 1 operands, i.e. their host",
        "cost. Columns by Triton version. " + left_out,
        "",
        "Machines: " + "; ".join(machines) + ".",
        "",
        *lines,
        "",
        f"Goal: every fast row <= {GOAL_US:.0f} us. " + ("Met." if not misses else "Missed: " + "; ".join(misses) + "."),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "host_cost_cpu.json"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--device", choices=("stub", "cuda"), default="stub",
                        help="stub: Triton's launcher on a stubbed driver (no GPU); cuda: a GPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop the rounds (after two at least) before this many seconds from the start")
    options = parser.parse_args()
    rows = measure(options.rounds, options.calls, options.device, options.budget_s)
    path = Path(options.json)
    version = rows[0]["triton"]
    kept = [row for row in json.loads(path.read_text()) if row["triton"] != version] if path.exists() else []
    rows = kept + rows
    path.write_text(json.dumps(rows, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(rows, path.name))
    for row in rows:
        print(f"{row['triton']:6s} {row['path']:5s} {row['us']:8.1f} us  {row['call']}")


if __name__ == "__main__":
    main()
