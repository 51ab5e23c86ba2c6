"""RankTracker's cost in a GPU training loop: a bf16 transformer trained with AdamW, tracked and not.

    python benchmarks/gpu/tracker_cost.py --json tracker-cost.json [--budget-s 33] [--host-threads N] [--dry-run]

The model: a decoder-only transformer of 24 pre-norm blocks of width 1024 (a causal attention
of 16 heads through ``F.scaled_dot_product_attention``, a 4x GELU MLP; every projection an
``nn.Linear``), a 16384-token embedding and an output ``nn.Linear``: 336 M parameters, built from
torch.nn, in bf16, trained with AdamW on random tokens (B = 4 sequences of T = 512). Each loop runs
``steps`` training steps (forward, cross-entropy, backward, optimizer step); the tracked loop also
runs a ``RankTracker`` measuring every weight (97 matrices) and one embedding (block 12's output,
2048 rows of 1024 features) every 100 steps with ``background=True``, and waits for its last
measurement (``flush``) before the loop's clock stops. The tracked loop runs with each of the
tracker's eigensolvers (SOLVERS): "device", the default (cuSOLVER's batched solver, on the
worker's CUDA stream), and "host" (``host_threads=--host-threads``: the Grams formed on the GPU,
their eigenvalues solved by LAPACK on that many host threads, default half the CPUs this process
may use). Each round runs an untracked loop and a tracked loop with each solver, in an order
rotated every round, after a warm-up of every kind (a background measurement with each solver
included, so that first-call costs stay out of the timed loops).

Each loop is ``every`` steps long, so that a tracked loop makes one measurement (at its first
step, finished in the background by the loop's end), and rounds repeat as often as
``--budget-s`` allows from the warm-up's step time and measurement cost (at most MAX_ROUNDS):
many short adjacent loops, because the loop's own speed drifts more than the 2% to resolve (on an
H200 the warm-up ran 38.8 ms a step, the untracked loop of 200 steps after it 43.5 ms). Reported:
the median untracked step time and, per solver (``solvers``), the median tracked step time and
the overhead fraction (median over rounds of tracked / untracked - 1, each round's in
``overhead_by_round``) against the goal <= 2%; and every loop's time. The JSON is rewritten after
every loop and on SIGINT (run.sh's time limit).

--dry-run: on the CPU, a tiny model (fp32, loops of 2 steps, measuring every 2), two rounds; rows flagged
``dry_run``. Run by benchmarks/gpu/run.sh (its dry run in CI).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastrank import RankTracker
from fastrank.bench.runner import environment
from fastrank.rank.eigensolver import default_host_threads

GOAL = 0.02
WARMUP_STEPS = 10


class Config(NamedTuple):
    width: int
    blocks: int
    heads: int
    vocab: int
    batch: int
    tokens: int
    every: int
    dtype: str


FULL = Config(width=1024, blocks=24, heads=16, vocab=16384, batch=4, tokens=512, every=100, dtype="bfloat16")
DRY = Config(width=32, blocks=2, heads=2, vocab=64, batch=2, tokens=8, every=2, dtype="float32")
MAX_ROUNDS = 8
DRY_PLAN = (2, 2)  # (steps, rounds) of the dry run: DRY.every steps a loop
SOLVERS = ("device", "host")  # the tracked loops' eigensolvers (RankTracker's host_threads None, or set)
KINDS = (None, *SOLVERS)  # the loops of a round: untracked, then tracked with each solver (rotated by round)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP, each residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):  # (B, T, width)
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, tokens, 3, self.heads, width // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab, config.width)
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)

    def forward(self, tokens):  # (B, T) -> (B, T, vocab)
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Loop:
    """The training loop of one model, optimizer and fixed batches, timed with or without a tracker."""

    def __init__(self, config: Config, device: str, host_threads: int):
        self.config, self.device, self.host_threads = config, device, host_threads
        torch.manual_seed(0)
        self.model = Transformer(config).to(device=device, dtype=getattr(torch, config.dtype))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        self.batches = torch.randint(config.vocab, (4, config.batch, config.tokens + 1), generator=gen).to(device)
        self.embedding = f"blocks.{config.blocks // 2}"

    def tracker(self, solver: str) -> RankTracker:
        return RankTracker(self.model, embeddings=(self.embedding,), weights=True, every=self.config.every,
                           background=True, host_threads=self.host_threads if solver == "host" else None)

    def run(self, steps: int, tracker: RankTracker | None) -> float:
        """Seconds for ``steps`` training steps (and the tracker's last measurement)."""
        _sync(self.device)
        start = time.perf_counter()
        for step in range(steps):
            batch = self.batches[step % len(self.batches)]
            logits = self.model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if tracker is not None:
                tracker.step()
        if tracker is not None:
            tracker.flush()
        _sync(self.device)
        return time.perf_counter() - start


def plan(step_s: float, measure_s: float, every: int, budget_s: float) -> tuple[int, int]:
    """(steps, rounds): loops of ``every`` steps (one measurement each when tracked), and as many
    rounds of an untracked loop and a tracked one per solver (each tracked one costing up to
    ``measure_s`` on top) as fit in ``budget_s``, at least one and at most MAX_ROUNDS."""
    round_s = len(KINDS) * every * step_s + len(SOLVERS) * measure_s
    return every, max(1, min(MAX_ROUNDS, int(budget_s // round_s)))


def round_order(index: int) -> tuple[str | None, ...]:
    """The loops of round ``index``: KINDS rotated by the round, so that each kind leads in turn."""
    shift = index % len(KINDS)
    return KINDS[shift:] + KINDS[:shift]


def overheads(loops: list[dict], solver: str) -> list[float]:
    """Tracked / untracked - 1 of the loops with ``solver``, each against its round's untracked loop."""
    untracked = {entry["round"]: entry["step_ms"] for entry in loops if entry["solver"] is None}
    return [entry["step_ms"] / untracked[entry["round"]] - 1
            for entry in loops if entry["solver"] == solver and entry["round"] in untracked]


def tracker_cost(path: Path, device: str, budget_s: float, dry_run: bool, host_threads: int) -> dict:
    config = DRY if dry_run else FULL
    started = time.perf_counter()
    loop = Loop(config, device, host_threads)
    result = {**environment(device), "dry_run": dry_run, **config._asdict(),
              "parameters": sum(p.numel() for p in loop.model.parameters()),
              "measured": {"embeddings": [loop.embedding],
                           "weights": sum(1 for m in loop.model.modules() if isinstance(m, nn.Linear))},
              "host_threads": host_threads, "budget_s": budget_s, "goal": GOAL, "loops": [], "complete": False}

    def write() -> None:
        off = [entry["step_ms"] for entry in result["loops"] if entry["solver"] is None]
        result["step_ms_untracked"] = statistics.median(off) if off else None
        result["solvers"] = {}
        for solver in SOLVERS:
            on = [entry["step_ms"] for entry in result["loops"] if entry["solver"] == solver]
            ratios = overheads(result["loops"], solver)
            overhead = statistics.median(ratios) if ratios else None
            result["solvers"][solver] = {"step_ms_tracked": statistics.median(on) if on else None,
                                         "overhead": overhead, "overhead_by_round": ratios,
                                         "met": overhead <= GOAL if ratios else None}
        result["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=1) + "\n")

    try:
        # Warm-up: every kind of loop, a tracked one with a background measurement at its first step.
        loop.run(2, None)
        untracked_s = loop.run(WARMUP_STEPS, None) / WARMUP_STEPS
        measure_s = {}
        for solver in SOLVERS:
            tracker = loop.tracker(solver)
            measure_s[solver] = max(0.0, loop.run(WARMUP_STEPS, tracker) - WARMUP_STEPS * untracked_s)
            tracker.remove()
        remaining = budget_s - (time.perf_counter() - started)
        steps, rounds = DRY_PLAN if dry_run else plan(untracked_s, max(measure_s.values()), config.every, remaining)
        result.update(warmup={"step_ms": untracked_s * 1e3, "measurement_s": measure_s}, steps=steps, rounds=rounds)
        write()
        for index in range(rounds):
            for solver in round_order(index):
                tracker = loop.tracker(solver) if solver is not None else None
                seconds = loop.run(steps, tracker)
                entry = {"round": index, "tracked": solver is not None, "solver": solver, "steps": steps,
                         "seconds": seconds, "step_ms": seconds / steps * 1e3}
                if tracker is not None:
                    entry["measurements"] = len({row["step"] for row in tracker.history})
                    entry["embedding_effective_rank"] = next(
                        (row["effective_rank"] for row in tracker.history if row["name"] == loop.embedding), None)
                    tracker.remove()
                result["loops"].append(entry)
                write()
        result["complete"] = True
    except KeyboardInterrupt:  # run.sh's time limit
        result["interrupted"] = True
        write()
        raise
    write()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where the result goes (rewritten after every loop)")
    parser.add_argument("--budget-s", type=float, default=33.0, help="seconds the script may take after start-up (sizes the loops)")
    parser.add_argument("--host-threads", type=int, default=default_host_threads(),
                        help="the host solver's threads (RankTracker's host_threads; default: half the CPUs)")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing: a tiny model, two rounds")
    options = parser.parse_args(argv)
    if options.host_threads < 1:
        parser.error(f"--host-threads must be a positive int, got {options.host_threads}")
    device = "cpu" if options.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("tracker_cost.py: needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    try:
        result = tracker_cost(Path(options.json), device, options.budget_s, options.dry_run, options.host_threads)
    except KeyboardInterrupt:
        print(f"tracker_cost.py: interrupted; the loops so far are in {options.json}", file=sys.stderr)
        return 130
    print(f"{result['device_name']}, torch {result['torch']}: {result['parameters']:,} parameters, "
          f"{result['dtype']}, {result['steps']} steps x {result['rounds']} rounds"
          + (" (dry run: the plumbing only)" if options.dry_run else ""))
    print(f"step {result['step_ms_untracked']:.2f} ms untracked")
    for solver, cost in result["solvers"].items():
        threads = f" ({result['host_threads']} threads)" if solver == "host" else ""
        print(f"  tracked, {solver} solver{threads}: {cost['step_ms_tracked']:.2f} ms: overhead {cost['overhead']:.2%} "
              f"(goal <= {GOAL:.0%}, {'met' if cost['met'] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
