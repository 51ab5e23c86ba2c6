"""The ``fastrank`` command line: ``fastrank bench`` runs the benchmark suites."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Sequence

import torch

from ._version import __version__


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastrank bench: --device cuda was asked for, but torch sees no CUDA device")
    return choice


def _environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "fastrank": __version__,
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
    }


def _chain_cases(quick: bool, device: str):
    from .bench_chain import chain_cases

    if quick:
        return chain_cases(features=256, depth=4, batches=(64, 1024, 8192), device=device)
    return chain_cases(device=device)


def _print_table(rows: list[dict]) -> None:
    header = f"{'case':<18} {'variant':<20} {'shape':<22} {'dtype':<8} {'median ms':>10} {'q25-q75 ms':>17} {'ratio':>7} {'TFLOP/s':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        spread = f"{row['q25_s'] * 1e3:.2f}-{row['q75_s'] * 1e3:.2f}"
        tflops = f"{row['tflops']:.3f}" if row.get("tflops") is not None else "-"
        print(
            f"{row['case']:<18} {row['variant']:<20} {row['shape']:<22} {row['dtype']:<8} "
            f"{row['median_s'] * 1e3:>10.2f} {spread:>17} {row['ratio']:>7.2f} {tflops:>8}"
        )


def bench(args: argparse.Namespace) -> int:
    from .bench_chain import run

    device = _device(args.device)
    env = _environment(device)
    suites = ["chain"] if args.suite == "all" else [args.suite]
    rows: list[dict] = []
    print(f"fastrank {__version__} bench on {env['device_name']} ({device}), torch {env['torch']}")
    if "chain" in suites:
        cases = _chain_cases(args.quick, device)
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] chain: {case.name}", file=sys.stderr, flush=True)
            rows += run([case], repeats=3 if args.quick else 7, device=device)
    rows = [{**row, **env} for row in rows]
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrank", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastrank {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    bench_parser = commands.add_parser("bench", help="run the benchmark suites")
    bench_parser.add_argument("--suite", choices=["chain", "all"], default="all")
    bench_parser.add_argument("--quick", action="store_true", help="small shapes, a few repeats")
    bench_parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bench_parser.add_argument("--json", metavar="PATH", help="write the result rows as JSON")
    bench_parser.set_defaults(handler=bench)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
