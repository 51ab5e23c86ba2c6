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
