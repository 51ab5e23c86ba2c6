"""RankTracker overhead: a CPU training loop of a small MLP, with and without the tracker measuring
every 100 steps (target: <= 5% more time). `pytest benchmarks/test_tracking_bench.py --benchmark-only`;
the two variants share a benchmark group, compare their medians."""

import pytest
import torch
import torch.nn as nn

import fastrank

STEPS = 300
EVERY = 100


def make_loop(tracked: bool):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), fastrank.OverparamLinear(512, 512, depth=2), nn.ReLU(),
        nn.Linear(512, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = torch.randn(8, 256, 256)
    tracker = fastrank.RankTracker(model, embeddings=("3",), every=EVERY) if tracked else None

    def loop():
        for step in range(STEPS):
            loss = model(data[step % len(data)]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if tracker is not None:
                tracker.step()

    return loop


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "tracked-every-100"])
def test_tracker_overhead(benchmark, tracked):
    loop = make_loop(tracked)
    benchmark.group = f"MLP train loop, {STEPS} steps"
    benchmark.extra_info.update(torch=torch.__version__, every=EVERY, steps=STEPS)
    benchmark.pedantic(loop, rounds=5, warmup_rounds=1)


def interleaved_overhead(pairs: int = 7) -> tuple[float, list[float]]:
    """Median over ``pairs`` of (tracked time / untracked time), the two loops run back to back in
    each pair, so that drifts of a shared machine hit both alike. Returns (median, ratios)."""
    import statistics
    import time

    loops = {tracked: make_loop(tracked) for tracked in (False, True)}
    for loop in loops.values():
        loop()  # warm-up
    ratios = []
    for _ in range(pairs):
        seconds = {}
        for tracked, loop in loops.items():
            start = time.perf_counter()
            loop()
            seconds[tracked] = time.perf_counter() - start
        ratios.append(seconds[True] / seconds[False])
    return statistics.median(ratios), ratios


if __name__ == "__main__":
    median, ratios = interleaved_overhead()
    print(f"tracked / untracked, {STEPS} steps, every {EVERY}: median {median:.3f} "
          f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
