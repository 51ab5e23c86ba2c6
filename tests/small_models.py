"""The small over-parameterized model the multi-process tests train (DDP, FSDP2) and its data."""

import torch
import torch.nn as nn

import fastrank


def conv_mlp(seed: int = 0) -> nn.Module:
    """An OverparamConv2d and an OverparamLinear around a ReLU, fp64, for 6 x 6 inputs of 3 channels."""
    torch.manual_seed(seed)
    return nn.Sequential(
        fastrank.OverparamConv2d(3, 4, kernel_sizes=(3, 1), padding=1),
        nn.ReLU(),
        nn.Flatten(),
        fastrank.OverparamLinear(4 * 6 * 6, 5, depth=3),
    ).double()


def conv_mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): 8 inputs (8, 3, 6, 6) and regression targets (8, 5), fp64, fixed seed."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64)
    return x, torch.randn(8, 5, generator=gen, dtype=torch.float64)
