"""Where the time of one OverparamLinear training step goes on CUDA: kernel launches and device time.

    python benchmarks/gpu/profile_step.py [--json PATH]

For each shape, ``nn.Linear`` and ``OverparamLinear(d, d, depth=L)`` train steps (forward, a
scalar loss, backward) in bf16: the number of CUDA kernels one step launches (torch profiler), the
step's median wall time over 20 steps after warm-up (CUDA-synchronized), and the device time per
kernel name, largest first. The collapsed form's floor against nn.Linear is 1 + (L - 1) d / B
(DESIGN.md); the launch target is nn.Linear's count plus 3. Prints a table; ``--json`` writes the
rows. Needs a CUDA device; run by benchmarks/gpu/run.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

import fastrank

# (d, B, L): the collapsed product at three sizes, and a narrow activation chain (its backward the
# fused recomputing kernel).
SHAPES = [(1024, 8192, 4), (256, 64, 4), (256, 8192, 8), (64, 32, 4)]


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
            "shape": f"d={d} B={batch} L={depth}",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_step.py: needs a CUDA device")
        return 0
    rows, failed = [], 0
    for d, batch, depth in SHAPES:
        try:
            rows += profile(d, batch, depth)
        except Exception as error:  # a shape that fails is a row, not the end of the profile
            failed += 1
            rows.append({"shape": f"d={d} B={batch} L={depth}", "error": f"{type(error).__name__}: {error}"[:400]})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 train steps")
    for row in rows:
        if "error" in row:
            print(f"\n{row['shape']:22s} FAILED: {row['error']}")
            continue
        print(f"\n{row['shape']:22s} {row['module']:28s} launches {row['launches']:3d}  "
              f"step {row['median_step_ms']:.3f} ms (wall)  device {row['device_us']:.0f} us")
        for kernel in row["kernels"][:12]:
            print(f"    {kernel['us']:9.1f} us  x{kernel['count']:<3d} {kernel['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
