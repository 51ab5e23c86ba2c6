"""RankTracker's cost in a GPU training loop: a bf16 transformer trained with AdamW, tracked and not.

    python benchmarks/gpu/tracker_cost.py --json tracker-cost.json [--budget-s 33] [--dry-run]

The model: a decoder-only transformer of 24 pre-norm blocks of width 1024 (a causal attention
of 16 heads through ``F.scaled_dot_product_attention``, a 4x GELU MLP; every projection an
``nn.Linear``), a 16384-token embedding and an output ``nn.Linear``: 336 M parameters, built from
torch.nn, in bf16, trained with AdamW on random tokens (B = 4 sequences of T = 512). Each loop runs
``steps`` training steps (forward, cross-entropy, backward, optimizer step); the tracked loop also
runs a ``RankTracker`` measuring every weight (97 matrices) and one embedding (block 12's output,
2048 rows of 1024 features) every 100 steps with ``background=True``, and waits for its last
measurement (``flush``) before the loop's clock stops. Untracked and tracked loops alternate (the
order swapped every round), after a warm-up of both (a background measurement included, so that
the solvers' first-call costs stay out of the timed loops).

Each loop is ``every`` steps long, so that a tracked loop makes one measurement (at its first
step, finished in the background by the loop's end), and rounds of an untracked and a tracked loop,
in alternating order, repeat as often as ``--budget-s`` allows from the warm-up's step time and
measurement cost (at most MAX_ROUNDS): many short adjacent pairs, because the loop's own speed
drifts more than the 2% to resolve (on an H200 the warm-up ran 38.8 ms a step, the untracked loop
of 200 steps after it 43.5 ms). Reported: the median step time of each kind, the overhead
fraction (median over rounds of tracked / untracked - 1, each round's in ``overhead_by_round``)
against the goal <= 2%, and every loop's time. The JSON is rewritten after every loop and on
SIGINT (run.sh's time limit).

--dry-run: on the CPU, a tiny model (fp32, 4 steps, measuring every 2), one round; rows flagged
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

    def __init__(self, config: Config, device: str):
        self.config, self.device = config, device
        torch.manual_seed(0)
        self.model = Transformer(config).to(device=device, dtype=getattr(torch, config.dtype))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        self.batches = torch.randint(config.vocab, (4, config.batch, config.tokens + 1), generator=gen).to(device)
        self.embedding = f"blocks.{config.blocks // 2}"

    def tracker(self) -> RankTracker:
        return RankTracker(self.model, embeddings=(self.embedding,), weights=True, every=self.config.every,
                           background=True)

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
    rounds of an untracked and a tracked loop (the tracked one costing up to ``measure_s`` on top)
    as fit in ``budget_s``, at least one and at most MAX_ROUNDS."""
    round_s = 2 * every * step_s + measure_s
    return every, max(1, min(MAX_ROUNDS, int(budget_s // round_s)))


def tracker_cost(path: Path, device: str, budget_s: float, dry_run: bool) -> dict:
    config = DRY if dry_run else FULL
    started = time.perf_counter()
    loop = Loop(config, device)
    result = {**environment(device), "dry_run": dry_run, **config._asdict(),
              "parameters": sum(p.numel() for p in loop.model.parameters()),
              "measured": {"embeddings": [loop.embedding],
                           "weights": sum(1 for m in loop.model.modules() if isinstance(m, nn.Linear))},
              "budget_s": budget_s, "goal": GOAL, "loops": [], "complete": False}

    def write() -> None:
        off = [entry["step_ms"] for entry in result["loops"] if not entry["tracked"]]
        on = [entry["step_ms"] for entry in result["loops"] if entry["tracked"]]
        result["step_ms_untracked"] = statistics.median(off) if off else None
        result["step_ms_tracked"] = statistics.median(on) if on else None
        ratios = [entry["step_ms"] / untracked["step_ms"] - 1
                  for entry in result["loops"] if entry["tracked"]
                  for untracked in result["loops"] if not untracked["tracked"] and untracked["round"] == entry["round"]]
        result["overhead"] = statistics.median(ratios) if ratios else None
        result["overhead_by_round"] = ratios
        result["met"] = result["overhead"] <= GOAL if ratios else None
        result["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=1) + "\n")

    try:
        # Warm-up: both loops, the tracked one with a background measurement at its first step.
        loop.run(2, None)
        untracked_s = loop.run(WARMUP_STEPS, None) / WARMUP_STEPS
        tracker = loop.tracker()
        tracked_s = loop.run(WARMUP_STEPS, tracker)
        tracker.remove()
        measure_s = max(0.0, tracked_s - WARMUP_STEPS * untracked_s)
        remaining = budget_s - (time.perf_counter() - started)
        steps, rounds = DRY_PLAN if dry_run else plan(untracked_s, measure_s, config.every, remaining)
        result.update(warmup={"step_ms": untracked_s * 1e3, "measurement_s": measure_s}, steps=steps, rounds=rounds)
        write()
        for index in range(rounds):
            for tracked in ((False, True) if index % 2 == 0 else (True, False)):
                tracker = loop.tracker() if tracked else None
                seconds = loop.run(steps, tracker)
                entry = {"round": index, "tracked": tracked, "steps": steps, "seconds": seconds,
                         "step_ms": seconds / steps * 1e3}
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
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing: a tiny model, one round")
    options = parser.parse_args(argv)
    device = "cpu" if options.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("tracker_cost.py: needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    try:
        result = tracker_cost(Path(options.json), device, options.budget_s, options.dry_run)
    except KeyboardInterrupt:
        print(f"tracker_cost.py: interrupted; the loops so far are in {options.json}", file=sys.stderr)
        return 130
    print(f"{result['device_name']}, torch {result['torch']}: {result['parameters']:,} parameters, "
          f"{result['dtype']}, {result['steps']} steps x {result['rounds']} rounds"
          + (" (dry run: the plumbing only)" if options.dry_run else ""))
    print(f"step {result['step_ms_untracked']:.2f} ms untracked, {result['step_ms_tracked']:.2f} ms tracked: "
          f"overhead {result['overhead']:.2%} (goal <= {GOAL:.0%}, {'met' if result['met'] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
