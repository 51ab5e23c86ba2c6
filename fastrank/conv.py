"""Conv chain ops: composing a chain of conv kernels into one, and the cost model between the two.

A chain of convolutions ``K_1 .. K_L`` (``K_j`` of shape ``(n_j, n_{j-1} / groups, kh_j, kw_j)``),
all with the same dilation and groups, padding applied once on the input and the stride on the
last factor, equals one convolution with the *collapsed kernel*

    K[o, i] = sum_c  K_L[o, c] (*) ... (*) K_1[c, i]          (*) = full 2-D convolution

of size ``(sum(kh_j) - L + 1, sum(kw_j) - L + 1)``, with the same stride, dilation and groups:
dilated taps of every factor land on multiples of the dilation, and a grouped chain keeps its
groups. The composition is itself a convolution (the kernel of the input side fed as a batch of
``n_0 / groups`` images through the flipped kernel of the next factor), so it is exact and its
gradient is the chain's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["collapse_kernels", "compose_kernels", "conv_chain_costs", "collapsed_kernel_size"]


def collapsed_kernel_size(kernel_sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(sum(kh) - L + 1, sum(kw) - L + 1)`` for a chain of ``(kh, kw)`` kernel sizes."""
    depth = len(kernel_sizes)
    return (
        sum(k[0] for k in kernel_sizes) - depth + 1,
        sum(k[1] for k in kernel_sizes) - depth + 1,
    )


def compose_kernels(inner: Tensor, outer: Tensor, groups: int) -> Tensor:
    """The kernel of ``conv(conv(x, inner), outer)`` (stride 1, same dilation and groups).

    Args:
        inner: ``(n_1, n_0 / groups, kh_1, kw_1)``.
        outer: ``(n_2, n_1 / groups, kh_2, kw_2)``.

    Returns:
        ``(n_2, n_0 / groups, kh_1 + kh_2 - 1, kw_1 + kw_2 - 1)``.
    """
    kh, kw = outer.shape[-2:]
    # Batch of n_0 / groups "images" with n_1 channels; cross-correlating with the flipped outer
    # kernel over a (k - 1)-padded inner kernel is the full convolution of the two.
    composed = F.conv2d(
        inner.transpose(0, 1), outer.flip(-2, -1), padding=(kh - 1, kw - 1), groups=groups
    )
    return composed.transpose(0, 1)


def collapse_kernels(kernels: Sequence[Tensor], groups: int = 1) -> Tensor:
    """Collapse ``K_1 .. K_L`` (input side first) into one kernel, differentiably.

    Args:
        kernels: ``K_j`` of shape ``(n_j, n_{j-1} / groups, kh_j, kw_j)``.
        groups: the groups shared by every factor.

    Returns:
        ``(n_L, n_0 / groups, sum(kh_j) - L + 1, sum(kw_j) - L + 1)`` in the kernels' dtype; fp16 and
        bf16 are composed in fp32.
    """
    dtype = kernels[0].dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    # The composition keeps the kernels' precision; under autocast the conv using it casts.
    with torch.autocast(kernels[0].device.type, enabled=False):
        collapsed = kernels[0].to(compute)
        for kernel in kernels[1:]:
            collapsed = compose_kernels(collapsed, kernel.to(compute), groups)
    return collapsed.to(dtype)


def conv_chain_costs(
    batch: int,
    input_size: tuple[int, int],
    channels: Sequence[int],
    kernel_sizes: Sequence[tuple[int, int]],
    *,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    padding: tuple[int, int, int, int],
    backward: bool,
    kernel_cached: bool = False,
) -> tuple[int, int]:
    """Multiply-add counts of the activation chain and of the collapsed kernel for one call.

    Args:
        batch: images per call.
        input_size: ``(H, W)`` before padding.
        channels: ``[n_0, ..., n_L]``.
        kernel_sizes: ``(kh_j, kw_j)`` per factor.
        stride, dilation, groups: of the layer (stride on the last factor).
        padding: ``(left, right, top, bottom)`` applied once on the input.
        backward: count the backward too (about twice the forward for either form).
        kernel_cached: the collapsed kernel is already computed (eval cache): do not count it.

    Returns:
        ``(activation, collapsed)``. The collapsed form pays for composing the kernels (a
        convolution per factor over ``n_0 / groups`` images) and one convolution with the large
        kernel; the chain pays for each factor at its own resolution. Neither always wins: a
        (3, 3, 1) chain is cheaper than its 5 x 5 collapsed kernel on large images.
    """
    height = input_size[0] + padding[2] + padding[3]
    width = input_size[1] + padding[0] + padding[1]
    activation = 0
    for j, (kh, kw) in enumerate(kernel_sizes):
        last = j == len(kernel_sizes) - 1
        step = stride if last else (1, 1)
        height = (height - dilation[0] * (kh - 1) - 1) // step[0] + 1
        width = (width - dilation[1] * (kw - 1) - 1) // step[1] + 1
        activation += batch * height * width * channels[j + 1] * (channels[j] // groups) * kh * kw
    size = (kernel_sizes[0][0], kernel_sizes[0][1])
    compose = 0
    for j, (kh, kw) in enumerate(kernel_sizes[1:], start=2):
        size = (size[0] + kh - 1, size[1] + kw - 1)
        images = channels[0] // groups
        compose += images * size[0] * size[1] * channels[j] * (channels[j - 1] // groups) * kh * kw
    if kernel_cached:
        compose = 0
    kh, kw = size
    collapsed = compose + batch * height * width * channels[-1] * (channels[0] // groups) * kh * kw
    if backward:
        return 3 * activation, 3 * collapsed
    return activation, collapsed
