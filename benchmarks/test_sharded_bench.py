"""Rank of a sharded weight: fastrank.sharded's reduced Gram against gathering the weight.

One fp32 weight of SIZE x SIZE (8192 by default), Shard(0) over 4 gloo processes on the CPU (one
thread each). A measurement is a reduction followed by the spectrum:

- sharded (``fastrank.effective_rank`` of the DTensor): each rank's fp64 Gram of its rows, one
  all-reduce of the SIZE x SIZE fp64 Gram;
- all-gather: ``all_gather_into_tensor`` of the weight, then the single-process exact path's fp64
  Gram of the whole weight on every rank;
- spectrum: fp64 ``eigvalsh`` of the Gram on every rank at once; the same in both approaches.

Bytes are counted from the collectives issued (the tensors handed to torch.distributed) and, for
the wire, with the ring model: an all-reduce of S bytes sends 2 (w - 1) / w S per rank, an
all-gather of an S-byte result (w - 1) / w S. Times are the slowest rank's, medians over rounds.

``python benchmarks/test_sharded_bench.py [--size 8192] [--rounds 2]`` prints the table (about 4
minutes at 8192 on a 2-core CPU); ``pytest benchmarks/test_sharded_bench.py --benchmark-only`` runs
the same at ``FASTRANK_BENCH_SHARDED_SIZE`` (default 8192) and records the numbers in extra_info;
with ``--benchmark-disable`` it checks a 256 x 256 weight in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from multiprocess import run_processes  # noqa: E402

import fastrank  # noqa: E402
from fastrank.rank.common import _entropy  # noqa: E402
from fastrank.rank.eigensolver import eigvalsh as _eigvalsh  # noqa: E402
from fastrank.rank.exact import _smaller_gram  # noqa: E402
from fastrank.sharded import _reduced_gram  # noqa: E402

WORLD = 4
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single")


class _Counter:
    """Payload bytes of every torch.distributed collective called while installed, by name."""

    def __init__(self) -> None:
        self.payload: dict[str, int] = {}
        self.originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def __enter__(self) -> "_Counter":
        def wrap(name):
            def counted(*args, **kwargs):
                if name == "all_reduce":
                    tensor = args[0]  # the reduced tensor
                elif name == "all_gather":
                    tensor = torch.cat([t.reshape(-1) for t in args[0]])  # the gathered result
                else:
                    tensor = args[0]  # the output of all_gather_into_tensor / all_to_all_single
                self.payload[name] = self.payload.get(name, 0) + tensor.numel() * tensor.element_size()
                return self.originals[name](*args, **kwargs)

            return counted

        for name in COLLECTIVES:
            setattr(dist, name, wrap(name))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)

    def wire(self, world: int) -> float:
        """Bytes one rank sends under the ring model."""
        share = (world - 1) / world
        return sum(b * (2 * share if name == "all_reduce" else share) for name, b in self.payload.items())


def _timed(function, counter=None):
    dist.barrier()
    start = time.perf_counter()
    if counter is None:
        out = function()
    else:
        with counter:
            out = function()
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank's time is the measurement's
    return out, float(seconds)


def _worker(rank: int, world: int, size: int, rounds: int, out_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0))  # fp32, the same on every rank
    sharded = distribute_tensor(weight, mesh, [Shard(0)])
    local = sharded.to_local()
    del weight

    def reduce_sharded():
        return _reduced_gram([sharded], gram=False, center=False, name="bench")[0][0]

    def reduce_gathered():
        full = torch.empty(size, size, dtype=local.dtype)
        dist.all_gather_into_tensor(full, local.contiguous())
        return _smaller_gram(full, fp64_products=True)

    times: dict[str, list[float]] = {"sharded": [], "all-gather": []}
    counters = {}
    for _ in range(rounds):
        for name, function in (("sharded", reduce_sharded), ("all-gather", reduce_gathered)):
            counters[name] = _Counter()
            gram, seconds = _timed(function, counters[name])
            times[name].append(seconds)
            if name == "sharded":
                sharded_gram = gram
            else:
                gathered_gram = gram
            del gram
    if size > 1024:
        del gathered_gram
    # The spectrum costs the same in both approaches: solved once, on every rank at once.
    lam, spectrum_seconds = _timed(lambda: _eigvalsh(sharded_gram, upper=True).clamp_min(0))
    del sharded_gram
    entropy = float(_entropy(lam.sqrt()).exp())
    check = None
    if size <= 1024:  # small: both spectra, and the public call end to end
        other = float(_entropy(_eigvalsh(gathered_gram, upper=True).clamp_min(0).sqrt()).exp())
        check = abs(entropy - other) / entropy
        got = float(fastrank.effective_rank(sharded, method="exact"))
        want = float(fastrank.effective_rank(sharded.full_tensor(), method="exact"))
        assert abs(got - want) <= 1e-10 * want, (got, want)
    if rank == 0:
        row = {
            "size": size,
            "world": world,
            "dtype": "float32",
            "rounds": rounds,
            "effective_rank": entropy,
            "relative_difference_of_approaches": check,
            "torch": torch.__version__,
            "fastrank": fastrank.__version__,
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "date": datetime.date.today().isoformat(),
        }
        for name in ("sharded", "all-gather"):
            row[name] = {
                "reduce_seconds_median": statistics.median(times[name]),
                "reduce_seconds": times[name],
                "payload_bytes": counters[name].payload,
                "wire_bytes_per_rank": counters[name].wire(world),
            }
        row["spectrum_seconds"] = spectrum_seconds
        Path(out_path).write_text(json.dumps(row, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(size: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "row.json")
        run_processes(_worker, WORLD, Path(tmp), size, rounds, out_path)
        return json.loads(Path(out_path).read_text())


def table(row: dict) -> str:
    mib = 2.0**20
    lines = [
        "| approach | collectives (payload) | wire bytes sent per rank | reduction | spectrum | time per measurement |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in ("sharded", "all-gather"):
        entry = row[name]
        payload = ", ".join(f"{k} {v / mib:.0f} MiB" for k, v in entry["payload_bytes"].items())
        total = entry["reduce_seconds_median"] + row["spectrum_seconds"]
        lines.append(
            f"| {name} | {payload} | {entry['wire_bytes_per_rank'] / mib:.0f} MiB | "
            f"{entry['reduce_seconds_median']:.2f} s | {row['spectrum_seconds']:.2f} s | {total:.2f} s |"
        )
    return "\n".join(lines)


def test_sharded_rank_against_all_gather(benchmark):
    if not dist.is_available():
        import pytest

        pytest.skip("torch.distributed is not available")
    size = 256 if benchmark.disabled else int(os.environ.get("FASTRANK_BENCH_SHARDED_SIZE", "8192"))
    rows = []
    benchmark.group = f"rank of a sharded {size} x {size} fp32 weight, {WORLD} gloo processes"
    benchmark.pedantic(lambda: rows.append(run(size, rounds=1 if benchmark.disabled else 2)), rounds=1, iterations=1)
    row = rows[-1]
    benchmark.extra_info.update(row)
    assert row["sharded"]["payload_bytes"] == {"all_reduce": 8 * size * size + 8}  # the fp64 Gram and the peak
    assert row["all-gather"]["payload_bytes"] == {"all_gather_into_tensor": 4 * size * size}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the row here")
    args = parser.parse_args()
    result = run(args.size, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("sharded", "all-gather")}))
    print(table(result))
