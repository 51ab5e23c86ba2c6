"""Where the time of one OverparamLinear training step goes on CUDA: kernel launches and device time.

    python benchmarks/gpu/profile_step.py [--json PATH] [--budget-s 13]

For each shape, ``nn.Linear`` and ``OverparamLinear(d, d, depth=L)`` train steps (forward, a
scalar loss, backward) in bf16: the number of CUDA kernels one step launches (torch profiler), the
step's median wall time over 20 steps after warm-up (CUDA-synchronized), and the device time per
kernel name, largest first. The collapsed form's floor against nn.Linear is 1 + (L - 1) d / B
(DESIGN.md); the launch target is nn.Linear's count plus 2. Prints each shape's table as it is
measured and rewrites ``--json`` after it; starts no shape after ``--budget-s`` (the first always
runs) and lists those left out, so that run.sh's time limit cuts no shape's rows. Needs a CUDA
device; run by benchmarks/gpu/run.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn

import fastrank

# (d, B, L): the kernels' shapes first (an activation chain, a narrow one whose backward is the fused
# recomputing kernel, the collapsed product at depth 8), then a width above the chain kernel's,
# which trains through plain cuBLAS ops in bf16 (fastrank.chain._plain_half_on_cuda).
SHAPES = [(256, 64, 4), (64, 32, 4), (256, 8192, 8), (1024, 8192, 4)]


def _label(d: int, batch: int, depth: int) -> str:
    return f"d={d} B={batch} L={depth}"


def _step(module: nn.Module, x: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).float().square().mean().backward()

    return step


def profile(d: int, batch: int, depth: int) -> list[dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows = []
    torch.manual_seed(0)
    x = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
    for name, module in (
        ("nn.Linear", nn.Linear(d, d)),
        (f"OverparamLinear depth={depth}", fastrank.OverparamLinear(d, d, depth=depth)),
    ):
        module = module.to("cuda", torch.bfloat16)
        step = _step(module, x)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels: dict[str, list[float]] = {}
        for event in prof.events():
            if event.device_type.name == "CUDA":
                kernels.setdefault(event.name, []).append(event.time_range.elapsed_us())
        rows.append({
            "shape": _label(d, batch, depth),
            "module": name,
            "launches": sum(len(v) for v in kernels.values()),
            "median_step_ms": statistics.median(times) * 1e3,
            "device_us": sum(sum(v) for v in kernels.values()),
            "kernels": sorted(
                ({"name": k[:100], "count": len(v), "us": sum(v)} for k, v in kernels.items()),
                key=lambda row: -row["us"],
            ),
        })
    return rows


def _print(rows: list[dict]) -> None:
    for row in rows:
        if "error" in row:
            print(f"\n{row['shape']:22s} FAILED: {row['error']}")
            continue
        print(f"\n{row['shape']:22s} {row['module']:28s} launches {row['launches']:3d}  "
              f"step {row['median_step_ms']:.3f} ms (wall)  device {row['device_us']:.0f} us")
        for kernel in row["kernels"][:12]:
            print(f"    {kernel['us']:9.1f} us  x{kernel['count']:<3d} {kernel['name']}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no shape that would end after this many seconds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py: needs a CUDA device")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 train steps")
    start, slowest = time.perf_counter(), 0.0
    rows, failed, not_run = [], 0, []

    def write() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "not_run": not_run, "seconds": time.perf_counter() - start}, f, indent=1)

    try:
        for index, (d, batch, depth) in enumerate(SHAPES):
            elapsed = time.perf_counter() - start
            if index and elapsed + slowest > args.budget_s:
                why = f"time budget: {elapsed:.0f} s of {args.budget_s:.0f} s"
                not_run = [{"shape": _label(*shape), "why": why} for shape in SHAPES[index:]]
                break
            began = time.perf_counter()
            try:
                shape_rows = profile(d, batch, depth)
            except Exception as error:  # a shape that fails is a row, not the end of the profile
                failed += 1
                shape_rows = [{"shape": _label(d, batch, depth), "error": f"{type(error).__name__}: {error}"[:400]}]
            slowest = max(slowest, time.perf_counter() - began)
            rows += shape_rows
            _print(shape_rows)
            write()
    except KeyboardInterrupt:  # run.sh's time limit: the shapes measured so far are written
        done = {row["shape"] for row in rows}
        not_run = [{"shape": _label(*shape), "why": "interrupted at the time limit"}
                   for shape in SHAPES if _label(*shape) not in done]
        write()
        print(f"profile_step.py: interrupted; {len(not_run)} shapes not profiled", file=sys.stderr)
        return 130
    write()
    if not_run:
        print(f"\nnot profiled: {', '.join(entry['shape'] for entry in not_run)} ({not_run[0]['why']})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
