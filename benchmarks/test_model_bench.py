"""Whole models: eval and train-step time of an over-parameterized model against the plain model.

Two in-repo models shaped like the architectures users over-parameterize: a resnet18-like conv net
(BasicBlocks [2, 2, 2, 2], widths 64-512, BatchNorm, 64 x 64 images, batch 8) and a ViT-like
transformer (patch 16, width 192, 6 blocks, 3 heads, 112 x 112 images, batch 16). The
over-parameterized variants are ``fastrank.overparameterize(model, depth=2)`` and ``depth=3``;
every nn.Linear and nn.Conv2d is replaced.

`pytest benchmarks/test_model_bench.py --benchmark-only` puts the variants of one model and mode
side by side (one benchmark group each); `python benchmarks/test_model_bench.py` runs the
variants interleaved, round after round, and prints the median of the per-round ratios to the
plain model (steadier on a shared machine) as the README's table.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastrank


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return F.relu(skip + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetLike(nn.Module):
    """resnet18's layout: 7x7 stem, max-pool, four stages of two BasicBlocks, linear head."""

    def __init__(self, classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
            blocks.append(BasicBlock(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTLike(nn.Module):
    """vit_tiny's layout (patch 16, width 192, 3 heads, MLP 4x), 6 blocks, class token."""

    def __init__(self, image: int = 112, dim: int = 192, depth: int = 6, heads: int = 3, classes: int = 100) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 16, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // 16) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


MODELS = {
    "resnet-like": (ResNetLike, (8, 3, 64, 64)),
    "vit-like": (ViTLike, (16, 3, 112, 112)),
}
VARIANTS = {"plain": None, "overparam depth 2": 2, "overparam depth 3": 3}
MODES = ("eval", "train step")


def make_step(model_name: str, mode: str, depth: int | None):
    """A closure running one eval forward (under ``torch.no_grad``) or one SGD train step."""
    torch.manual_seed(0)
    make, shape = MODELS[model_name]
    model = make()
    if depth is not None:
        model = fastrank.overparameterize(copy.deepcopy(model), depth=depth)
    images = torch.randn(shape)
    labels = torch.randint(0, 100, (shape[0],))
    if mode == "eval":
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(images)

        return step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model(benchmark, model_name, mode, variant):
    step = make_step(model_name, mode, VARIANTS[variant])
    benchmark.group = f"{model_name} {mode}"
    benchmark.extra_info.update(
        torch=torch.__version__, threads=torch.get_num_threads(), shape=MODELS[model_name][1],
        dtype="float32", machine=platform.machine(),
    )
    benchmark.pedantic(step, rounds=7, warmup_rounds=2)


def interleaved_ratios(rounds: int = 12, repeats: int = 3) -> list[dict]:
    """Per model, mode and over-parameterized variant: the median over ``rounds`` of its time /
    the plain model's, each round timing every variant back to back in a rotated order
    (``repeats`` calls each, the fastest kept), so drifts of a shared machine hit them alike."""
    rows = []
    for model_name in MODELS:
        for mode in MODES:
            steps = {variant: make_step(model_name, mode, depth) for variant, depth in VARIANTS.items()}
            for step in steps.values():
                step()
                step()  # warm-up: allocator, eval caches
            ratios = {variant: [] for variant in steps if variant != "plain"}
            plain_times = []
            order = list(steps)
            for round_index in range(rounds):
                seconds = {}
                # Rotated each round, so that no variant always runs first or after another.
                shift = round_index % len(order)
                for variant in order[shift:] + order[:shift]:
                    step = steps[variant]
                    best = float("inf")
                    for _ in range(repeats):
                        start = time.perf_counter()
                        step()
                        best = min(best, time.perf_counter() - start)
                    seconds[variant] = best
                plain_times.append(seconds["plain"])
                for variant in ratios:
                    ratios[variant].append(seconds[variant] / seconds["plain"])
            for variant, values in ratios.items():
                quartiles = statistics.quantiles(values, n=4)
                rows.append({
                    "model": model_name, "mode": mode, "variant": variant,
                    "plain_ms": 1e3 * statistics.median(plain_times),
                    "ratio": statistics.median(values), "q25": quartiles[0], "q75": quartiles[2],
                })
    return rows


if __name__ == "__main__":
    rows = interleaved_ratios()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{platform.processor() or 'cpu'}, {time.strftime('%Y-%m-%d')}")
    print("| model | mode | plain (ms) | variant | ratio to plain (median) | quartiles |")
    print("|---|---|---:|---|---:|---|")
    for row in rows:
        print(f"| {row['model']} | {row['mode']} | {row['plain_ms']:.1f} | {row['variant']} | "
              f"{row['ratio']:.3f}x | {row['q25']:.3f}-{row['q75']:.3f} |")
