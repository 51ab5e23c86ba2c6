"""``OverparamConv2d``: a drop-in ``nn.Conv2d`` whose kernel is a chain of convolutions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..conv import collapse_kernels, collapsed_kernel_size, conv_chain_costs
from .base import (
    _check_dtype,
    _check_input,
    _check_positive_int,
    _check_width,
    _init_factor,
    _is_int,
    _OverparamBase,
)

__all__ = ["OverparamConv2d"]

def _parse_kernel_sizes(kernel_sizes: object) -> list[tuple[int, int]]:
    def is_int(v: object) -> bool:
        return _is_int(v) and v >= 1

    entries = [kernel_sizes] if is_int(kernel_sizes) else kernel_sizes
    if not isinstance(entries, (list, tuple)) or len(entries) == 0:
        raise ValueError(
            f"kernel_sizes must be a non-empty sequence of ints or (kh, kw) pairs, got {kernel_sizes!r}"
        )
    sizes = []
    for k in entries:
        if is_int(k):
            sizes.append((int(k), int(k)))
        elif isinstance(k, (list, tuple)) and len(k) == 2 and all(is_int(v) for v in k):
            sizes.append((int(k[0]), int(k[1])))
        else:
            raise ValueError(
                f"kernel_sizes entries must be positive ints or (kh, kw) pairs, got {k!r} in "
                f"{kernel_sizes!r}"
            )
    return sizes


def _pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    pair = (value, value) if _is_int(value) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(_is_int(v) and v >= minimum for v in pair)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return (int(pair[0]), int(pair[1]))


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class OverparamConv2d(_OverparamBase):
    r"""A drop-in ``nn.Conv2d`` whose kernel is a chain of convolutions ``K_L * ... * K_1``.

    The chain is ``in_channels -> hidden -> ... -> out_channels`` with
    ``hidden = int(out_channels * width)`` and one factor per entry of ``kernel_sizes``; padding is
    applied once on the input, the stride on the last factor, dilation and groups on every factor.
    The layer computes exactly ``nn.Conv2d`` with the collapsed kernel ``self.weight`` of size
    ``(sum(kh_j) - L + 1, sum(kw_j) - L + 1)``, in train and eval mode.

    Args:
        in_channels, out_channels: as ``nn.Conv2d``.
        kernel_sizes: one entry per factor, each an int (square) or a ``(kh, kw)`` pair; the
            default ``(3, 1)`` is a 3x3 factor followed by a 1x1 factor (collapsed: 3x3). A single
            int is one factor.
        stride, padding, dilation, groups, bias, padding_mode: as ``nn.Conv2d`` for the collapsed
            kernel (``padding`` may be an int, a pair, ``"valid"`` or ``"same"``). ``groups`` must
            divide ``in_channels``, ``out_channels`` and the hidden width.
        width: hidden channels as a multiple of ``out_channels``.
        device, dtype: of the parameters.

    Attributes:
        factors: ``nn.ParameterList`` of kernels, input side first; ``factors[j]`` has shape
            ``(n_{j+1}, n_j / groups, kh_j, kw_j)``.
        weight: the collapsed kernel ``(out_channels, in_channels / groups, KH, KW)``.
        bias: the ``(out_channels,)`` bias parameter or None.

    Shape:
        input ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``; output as ``nn.Conv2d``.

    Each call runs the chain of small convolutions or one convolution with the collapsed kernel,
    whichever costs fewer multiply-adds for the input size (a (3, 3, 1) chain can beat its 5x5
    collapsed kernel); both give the same result and the naive chain's gradients.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int | tuple[int, int]] | int = (3, 1),
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        width: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.kernel_sizes = _parse_kernel_sizes(kernel_sizes)
        self.depth = len(self.kernel_sizes)
        self.kernel_size = collapsed_kernel_size(self.kernel_sizes)
        self.stride = _pair("stride", stride, 1)
        self.dilation = _pair("dilation", dilation, 1)
        self.groups = _check_positive_int("groups", groups)
        self.width = width
        self.hidden_channels = _check_width(width, out_channels)
        if padding_mode not in _PAD_MODES:
            raise ValueError(
                f"padding_mode must be one of {sorted(_PAD_MODES)}, got {padding_mode!r}"
            )
        self.padding_mode = padding_mode
        # Plain attributes, so the per-call getattr(self, "norms" / "batch_norm") of the shared
        # eval path finds them instead of raising inside nn.Module.__getattr__ (about 2 us each).
        self.norms = None
        self.batch_norm = False
        self.padding = padding if isinstance(padding, str) else _pair("padding", padding, 0)
        self._pad = self._padding_amounts(padding)
        self._derive_constants()
        in_channels, out_channels, groups = self.in_channels, self.out_channels, self.groups
        channels = [in_channels] + [self.hidden_channels] * (self.depth - 1) + [out_channels]
        for name, n in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("hidden channels", self.hidden_channels)):
            if n % groups:
                raise ValueError(f"groups={groups} must divide {name}={n}")
        self.channels = channels
        _check_dtype(dtype)
        factory = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(channels[j + 1], channels[j] // groups, *k, **factory))
            for j, k in enumerate(self.kernel_sizes)
        )
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        )
        self.reset_parameters()

    def _padding_amounts(self, padding: object) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` of the padding applied once on the input."""
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            total_h = self.dilation[0] * (self.kernel_size[0] - 1)
            total_w = self.dilation[1] * (self.kernel_size[1] - 1)
            return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        pad_h, pad_w = _pair("padding", padding, 0)
        return (pad_w, pad_w, pad_h, pad_h)

    def reset_parameters(self) -> None:
        """Kaiming-normal factors (fan_out; gain 1 inside, sqrt(2) last), ``nn.Conv2d``'s bias init."""
        for j, factor in enumerate(self.factors):
            _init_factor(factor, last=j == self.depth - 1, mode="fan_out")
        if self.bias is not None:
            fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_sizes={self.kernel_sizes}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, "
            f"padding_mode={self.padding_mode!r}, width={self.width}"
        )

    def collapsed_parameters(self) -> tuple[Tensor, Tensor | None]:
        """The collapsed ``(out_channels, in_channels / groups, KH, KW)`` kernel and the bias."""
        return collapse_kernels(self._factor_list(), self.groups), self.bias

    @property
    def weight(self) -> Tensor:
        """The collapsed kernel (cached in eval mode when no grad is needed; gathered when FSDP2 has
        sharded the factors: every rank must read it)."""
        return self._collapsed()[0]

    def _derive_constants(self) -> None:
        """``_pad_in_conv``: the padding is zeros, symmetric, and left to the first convolution,
        with ``_conv_padding`` its ``(top, left)``; otherwise the input is padded first."""
        self._bias_is_own = True  # collapsed_parameters returns the module's bias
        left, right, top, bottom = self._pad
        self._pad_in_conv = self.padding_mode == "zeros" and left == right and top == bottom
        self._conv_padding = (top, left) if self._pad_in_conv else (0, 0)

    def _conv(self, x: Tensor, kernel: Tensor, bias: Tensor | None, first: bool, last: bool) -> Tensor:
        padding = self._conv_padding if first else (0, 0)
        return F.conv2d(
            x, kernel, bias, self.stride if last else 1, padding, self.dilation, self.groups
        )

    def forward(self, x: Tensor) -> Tensor:
        if (
            not torch.is_grad_enabled()
            and self._pad_in_conv
            and not self.training
            and not torch.compiler.is_compiling()
            and isinstance(x, Tensor)
            and x.dim() == 4
            and self._path_choices.get((x.shape[0], x.shape[2], x.shape[3], True, False))
        ):
            # Inference with the cached collapsed kernel (this input size chose it before): one
            # F.conv2d; the input is checked only when F.conv2d rejects it.
            kernel, bias = self._cached_parameters()
            try:
                return F.conv2d(
                    x, kernel, bias, self.stride, self._conv_padding, self.dilation, self.groups
                )
            except (TypeError, RuntimeError) as error:
                failure = error
            _check_input(x, self.in_channels, 1, "in_channels", self)  # a clearer message
            raise failure
        if isinstance(x, Tensor) and x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        _check_input(x, self.in_channels, 1, "in_channels", self)
        if x.dim() != 4:
            raise ValueError(
                f"OverparamConv2d: expected input (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}"
            )
        if not self._pad_in_conv:
            x = F.pad(x, self._pad, mode=_PAD_MODES[self.padding_mode])
            pad_counted = (0, 0, 0, 0)
        else:
            pad_counted = self._pad
        grad_on = torch.is_grad_enabled()
        grad_factors = grad_on and any(t.requires_grad for t in self._state_tensors())
        cached = not grad_factors and not self.training and not torch.compiler.is_compiling()
        backward = grad_factors or (grad_on and x.requires_grad)
        key = (x.shape[0], x.shape[2], x.shape[3], cached, backward)
        use_collapsed = self._path_choices.get(key)
        if use_collapsed is None:
            activation, collapsed = conv_chain_costs(
                x.shape[0],
                (x.shape[2], x.shape[3]),
                self.channels,
                self.kernel_sizes,
                stride=self.stride,
                dilation=self.dilation,
                groups=self.groups,
                padding=pad_counted,
                backward=backward,
                kernel_cached=cached,
            )
            use_collapsed = self._remember_path(key, self.depth == 1 or collapsed <= activation)
        if use_collapsed:
            kernel, bias = self._collapsed(cached)
            return self._conv(x, kernel, bias, first=True, last=True)
        bias = self._parameters["bias"]
        for j, kernel in enumerate(self._factor_list()):
            last = j == self.depth - 1
            x = self._conv(x, kernel, bias if last else None, first=j == 0, last=last)
        return x
