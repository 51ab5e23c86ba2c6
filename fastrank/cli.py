"""The ``fastrank`` command line.

``fastrank bench`` runs the benchmark suites; ``fastrank rank CHECKPOINT`` prints the rank of every
weight of a checkpoint.
"""

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


class _Progress:
    """A progress bar on stderr: tqdm when installed, a counter line otherwise."""

    def __init__(self, total: int, description: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._bar = tqdm(total=total, desc=description, file=sys.stderr, leave=False) if tqdm else None
        self.description, self.total, self.done = description, total, 0

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self.done)
        elif sys.stderr.isatty():
            print(f"\r{self.description}: {done}/{self.total}", end="", file=sys.stderr, flush=True)
        self.done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif sys.stderr.isatty():
            print(file=sys.stderr)


def rank(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, load_weights, rank_report

    try:
        weights = load_weights(args.checkpoint)
    except CheckpointError as error:
        print(f"fastrank rank: {error}", file=sys.stderr)
        return 2
    progress = _Progress(3, f"ranking {len(weights)} weights")
    rows = rank_report(weights, method=args.method, progress=lambda done, total: progress.update(done))
    progress.close()
    width = max(len("name"), *(len(row["name"]) for row in rows))
    print(f"{'name':<{width}}  {'shape':<14} {'effective rank':>14} {'spectral entropy':>16} {'stable rank':>11}")
    for row in rows:
        shape = "x".join(str(n) for n in row["shape"])
        print(
            f"{row['name']:<{width}}  {shape:<14} {row['effective_rank']:>14.3f} "
            f"{row['spectral_entropy']:>16.4f} {row['stable_rank']:>11.3f}"
        )
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
    rank_parser = commands.add_parser("rank", help="rank of every weight of a checkpoint")
    rank_parser.add_argument("checkpoint", help="a checkpoint or state_dict saved with torch.save")
    rank_parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    rank_parser.add_argument(
        "--method", choices=["auto", "exact", "randomized", "slq"], default="auto",
        help="effective-rank algorithm (see fastrank.effective_rank)",
    )
    rank_parser.set_defaults(handler=rank)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
