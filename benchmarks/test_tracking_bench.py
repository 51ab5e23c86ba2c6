"""RankTracker overhead: a CPU training loop of a small MLP, with and without the tracker measuring
every 100 steps (target: <= 5% more time), the measurements run inline or on the tracker's
background thread, there also with the host solver on one thread (``host_threads=1``: each
eigenvalue problem on one LAPACK thread, leaving the other core to the loop).

`pytest benchmarks/test_tracking_bench.py --benchmark-only` (the variants share a benchmark group,
compare their medians) or, steadier on a shared machine, `python benchmarks/test_tracking_bench.py`
(the loops interleaved, the median of the per-round ratios)."""

import statistics
import time

import pytest
import torch
import torch.nn as nn

import fastrank

STEPS = 300
EVERY = 100
VARIANTS = {  # the tracker's (background, host_threads), or None: no tracker
    "untracked": None,
    "tracked-every-100": (False, None),
    "tracked-every-100-background": (True, None),
    "tracked-every-100-background-host-1": (True, 1),
}


def make_loop(tracking: tuple[bool, int | None] | None):
    """The training loop; ``tracking`` None: no tracker, else the tracker's ``(background, host_threads)``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), fastrank.OverparamLinear(512, 512, depth=2), nn.ReLU(),
        nn.Linear(512, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = torch.randn(8, 256, 256)
    tracker = None
    if tracking is not None:
        background, host_threads = tracking
        tracker = fastrank.RankTracker(model, embeddings=("3",), every=EVERY, background=background,
                                       host_threads=host_threads)

    def loop():
        for step in range(STEPS):
            loss = model(data[step % len(data)]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if tracker is not None:
                tracker.step()
        if tracker is not None:
            tracker.flush()  # the loop is not over before its measurements are

    return loop


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tracker_overhead(benchmark, variant):
    loop = make_loop(VARIANTS[variant])
    benchmark.group = f"MLP train loop, {STEPS} steps"
    benchmark.extra_info.update(torch=torch.__version__, every=EVERY, steps=STEPS)
    benchmark.pedantic(loop, rounds=5, warmup_rounds=1)


def interleaved_overhead(rounds: int = 7) -> dict[str, tuple[float, list[float]]]:
    """Per tracked variant: the median over ``rounds`` of (its time / the untracked time), all loops
    run back to back in each round so that drifts of a shared machine hit them alike."""
    loops = {name: make_loop(tracking) for name, tracking in VARIANTS.items()}
    for loop in loops.values():
        loop()  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in loops if name != "untracked"}
    for _ in range(rounds):
        seconds = {}
        for name, loop in loops.items():
            start = time.perf_counter()
            loop()
            seconds[name] = time.perf_counter() - start
        for name in ratios:
            ratios[name].append(seconds[name] / seconds["untracked"])
    return {name: (statistics.median(values), values) for name, values in ratios.items()}


if __name__ == "__main__":
    for name, (median, values) in interleaved_overhead(11).items():
        print(f"{name} / untracked, {STEPS} steps: median {median:.3f} "
              f"(rounds: {', '.join(f'{r:.3f}' for r in values)})")
