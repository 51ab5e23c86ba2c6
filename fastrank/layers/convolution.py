"""``OverparamConv1d`` / ``OverparamConv2d``: drop-in ``nn.Conv1d`` / ``nn.Conv2d`` whose kernel is a
chain of convolutions. Both compute in 2-D: a 1-D convolution is a 2-D one of height 1."""

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
    _costed_size,
    _init_factor,
    _is_int,
    _OverparamBase,
)

__all__ = ["OverparamConv1d", "OverparamConv2d"]

def _sizes(name: str, value: object, minimum: int, dims: int) -> tuple[int, ...]:
    """``value`` as a ``dims``-tuple of ints >= ``minimum`` (an int stands for all of them)."""
    values = (value,) * dims if _is_int(value) else value
    if (
        not isinstance(values, (list, tuple))
        or len(values) != dims
        or not all(_is_int(v) and v >= minimum for v in values)
    ):
        several = "a pair of them" if dims == 2 else "a 1-tuple of one"
        raise ValueError(f"{name} must be an int >= {minimum} or {several}, got {value!r}")
    return tuple(int(v) for v in values)


def _parse_kernel_sizes(kernel_sizes: object, dims: int) -> list[tuple[int, ...]]:
    entries = [kernel_sizes] if _is_int(kernel_sizes) else kernel_sizes
    tuples = "(kh, kw) pairs" if dims == 2 else "(k,) tuples"
    if not isinstance(entries, (list, tuple)) or len(entries) == 0:
        raise ValueError(f"kernel_sizes must be a non-empty sequence of ints or {tuples}, got {kernel_sizes!r}")
    sizes = []
    for k in entries:
        try:
            sizes.append(_sizes("kernel_sizes entries", k, 1, dims))
        except ValueError:
            raise ValueError(
                f"kernel_sizes entries must be positive ints or {tuples}, got {k!r} in {kernel_sizes!r}"
            ) from None
    return sizes


def _to_2d(values: tuple[int, ...], fill: int) -> tuple[int, int]:
    """A 1-D geometry as the 2-D one of height 1 (``fill`` on the height); 2-D unchanged."""
    return (values[0], values[1]) if len(values) == 2 else (fill, values[0])


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class _OverparamConvNd(_OverparamBase):
    """The chain of convolutions, computed in 2-D whatever the layer's spatial dims.

    Public attributes (``kernel_sizes``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
    the factors' shapes) are in the layer's own dims, as ``nn.Conv1d`` / ``nn.Conv2d`` have them;
    ``_derive_constants`` lifts them to the 2-D geometry the forward runs (height 1 for 1-D).
    """

    _spatial = 2  # spatial dims of the inputs, kernels and attributes

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int | tuple[int, ...]] | int = (3, 1),
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        width: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dims = self._spatial
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.kernel_sizes = _parse_kernel_sizes(kernel_sizes, dims)
        self.depth = len(self.kernel_sizes)
        collapsed = collapsed_kernel_size([_to_2d(k, 1) for k in self.kernel_sizes])
        self.kernel_size = collapsed if dims == 2 else collapsed[1:]
        self.stride = _sizes("stride", stride, 1, dims)
        self.dilation = _sizes("dilation", dilation, 1, dims)
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
        self.padding = padding if isinstance(padding, str) else _sizes("padding", padding, 0, dims)
        self._derive_geometry()
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

    def _derive_geometry(self) -> None:
        """The 2-D geometry of the forward: kernel sizes, stride and dilation (height 1 for 1-D)."""
        self._kernel_sizes2 = [_to_2d(k, 1) for k in self.kernel_sizes]
        self._kernel_size2 = _to_2d(tuple(self.kernel_size), 1)
        self._stride2 = _to_2d(tuple(self.stride), 1)
        self._dilation2 = _to_2d(tuple(self.dilation), 1)

    def _padding_amounts(self, padding: object) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` of the padding applied once on the input."""
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if self._stride2 != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            total_h = self._dilation2[0] * (self._kernel_size2[0] - 1)
            total_w = self._dilation2[1] * (self._kernel_size2[1] - 1)
            return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
        if isinstance(padding, str):
            several = "a pair" if self._spatial == 2 else "a 1-tuple"
            raise ValueError(f"padding must be an int, {several}, 'valid' or 'same', got {padding!r}")
        pad_h, pad_w = _to_2d(_sizes("padding", padding, 0, self._spatial), 0)
        return (pad_w, pad_w, pad_h, pad_h)

    def reset_parameters(self) -> None:
        """Kaiming-normal factors (fan_out; gain 1 inside, sqrt(2) last), the plain layer's bias init."""
        for j, factor in enumerate(self.factors):
            _init_factor(factor, last=j == self.depth - 1, mode="fan_out")
        if self.bias is not None:
            fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_sizes={self.kernel_sizes}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, "
            f"padding_mode={self.padding_mode!r}, width={self.width}"
        )

    def _kernels(self) -> list[Tensor]:
        """The factors as 2-D kernels ``(n_{j+1}, n_j / groups, kh, kw)`` (views for 1-D)."""
        factors = self._factor_list()
        return factors if self._spatial == 2 else [f.unsqueeze(2) for f in factors]

    def _as_2d(self, kernel: Tensor) -> Tensor:
        return kernel if self._spatial == 2 else kernel.unsqueeze(2)

    def collapsed_parameters(self) -> tuple[Tensor, Tensor | None]:
        """The collapsed ``(out_channels, in_channels / groups, *kernel_size)`` kernel and the bias."""
        kernel = collapse_kernels(self._kernels(), self.groups)
        return (kernel if self._spatial == 2 else kernel.squeeze(2)), self._bias_parameter()

    @property
    def weight(self) -> Tensor:
        """The collapsed kernel (cached in eval mode when no grad is needed; gathered when FSDP2 has
        sharded the factors: every rank must read it)."""
        return self._collapsed()[0]

    def _derive_constants(self) -> None:
        """``_pad_in_conv``: the padding is zeros, symmetric, and left to the first convolution,
        with ``_conv_padding`` its ``(top, left)``; otherwise the input is padded first."""
        super()._derive_constants()
        self._derive_geometry()
        self._bias_is_own = True  # collapsed_parameters returns the module's bias
        left, right, top, bottom = self._pad
        self._pad_in_conv = self.padding_mode == "zeros" and left == right and top == bottom
        self._conv_padding = (top, left) if self._pad_in_conv else (0, 0)

    def _conv(self, x: Tensor, kernel: Tensor, bias: Tensor | None, first: bool, last: bool) -> Tensor:
        padding = self._conv_padding if first else (0, 0)
        return F.conv2d(
            x, kernel, bias, self._stride2 if last else 1, padding, self._dilation2, self.groups
        )

    def _forward_2d(self, x: Tensor, given: Tensor) -> Tensor:
        """The layer on ``x`` ``(N, C, H, W)``, the 2-D view of the batched input ``given``
        (checked, and named in errors, as it was given)."""
        if (
            not torch.is_grad_enabled()
            and self._pad_in_conv
            and not self.training
            and not torch.compiler.is_compiling()
            and self._path_choices.get((x.shape[0], x.shape[2], x.shape[3], True, False))
            and not self._parametrized()  # the path below reads a parametrization once
        ):
            # Inference with the cached collapsed kernel (this input size chose it before): one
            # F.conv2d; the input is checked only when F.conv2d rejects it.
            kernel, bias = self._cached_parameters()
            try:
                return F.conv2d(
                    x, self._as_2d(kernel), bias, self._stride2, self._conv_padding, self._dilation2,
                    self.groups,
                )
            except (TypeError, RuntimeError) as error:
                failure = error
            _check_input(given, self.in_channels, 1, "in_channels", self)  # a clearer message
            raise failure
        if self._parametrized():
            with self._reading_once():
                return self._general_forward(x, given)
        return self._general_forward(x, given)

    def _general_forward(self, x: Tensor, given: Tensor) -> Tensor:
        """:meth:`_forward_2d` where its cached-kernel inference path does not apply."""
        _check_input(given, self.in_channels, 1, "in_channels", self)
        if not self._pad_in_conv:
            x = F.pad(x, self._pad, mode=_PAD_MODES[self.padding_mode])
            pad_counted = (0, 0, 0, 0)
        else:
            pad_counted = self._pad
        grad_on = torch.is_grad_enabled()
        grad_factors = grad_on and any(t.requires_grad for t in self._state_tensors())
        compiling = torch.compiler.is_compiling()
        cached = not grad_factors and not self.training and not compiling
        backward = grad_factors or (grad_on and x.requires_grad)
        if compiling:  # costed, never remembered: see OverparamLinear.forward
            sizes = [_costed_size(n) for n in (x.shape[0], x.shape[2], x.shape[3])]
            use_collapsed = self._collapses(*sizes, cached, backward, pad_counted)
        else:
            key = (x.shape[0], x.shape[2], x.shape[3], cached, backward)
            use_collapsed = self._path_choices.get(key)
            if use_collapsed is None:
                use_collapsed = self._remember_path(key, self._collapses(*key, pad_counted))
        if use_collapsed:
            kernel, bias = self._collapsed(cached)
            return self._conv(x, self._as_2d(kernel), bias, first=True, last=True)
        bias = self._bias_parameter()
        for j, kernel in enumerate(self._kernels()):
            last = j == self.depth - 1
            x = self._conv(x, kernel, bias if last else None, first=j == 0, last=last)
        return x

    def _collapses(self, batch: int, height: int, width: int, cached: bool, backward: bool, padding: tuple) -> bool:
        """The cost model's answer for a call on ``(batch, C, height, width)`` inputs (``padding``
        counted in the chain's first conv): the collapsed kernel (True) or the chain of convs."""
        activation, collapsed = conv_chain_costs(
            batch,
            (height, width),
            self.channels,
            self._kernel_sizes2,
            stride=self._stride2,
            dilation=self._dilation2,
            groups=self.groups,
            padding=padding,
            backward=backward,
            kernel_cached=cached,
        )
        return self.depth == 1 or collapsed <= activation

    def _bad_rank(self, x: object, expected: str) -> ValueError:
        """The error for an input of the wrong rank (raised here if it is not even a tensor of the
        layer's dtype with ``in_channels`` channels)."""
        _check_input(x, self.in_channels, 1 if isinstance(x, Tensor) and x.dim() > 1 else 0, "in_channels", self)
        return ValueError(f"{type(self).__name__}: expected input {expected}, got shape {tuple(x.shape)}")


class OverparamConv2d(_OverparamConvNd):
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

    _spatial = 2

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 4:
            return self._forward_2d(x, x)
        if isinstance(x, Tensor) and x.dim() == 3:
            batched = x.unsqueeze(0)
            return self._forward_2d(batched, batched).squeeze(0)
        raise self._bad_rank(x, "(N, C, H, W) or (C, H, W)")


class OverparamConv1d(_OverparamConvNd):
    r"""A drop-in ``nn.Conv1d`` whose kernel is a chain of convolutions ``K_L * ... * K_1``.

    As :class:`OverparamConv2d` in one spatial dim: one factor per entry of ``kernel_sizes``,
    padding applied once on the input, the stride on the last factor, dilation and groups on every
    factor; the layer computes exactly ``nn.Conv1d`` with the collapsed kernel ``self.weight`` of
    size ``sum(k_j) - L + 1``, in train and eval mode.

    Args:
        in_channels, out_channels: as ``nn.Conv1d``.
        kernel_sizes: one entry per factor, each an int or a ``(k,)`` tuple; the default
            ``(3, 1)`` is a size-3 factor followed by a size-1 factor. A single int is one factor.
        stride, padding, dilation, groups, bias, padding_mode: as ``nn.Conv1d`` for the collapsed
            kernel (``padding`` may be an int, a 1-tuple, ``"valid"`` or ``"same"``). ``groups``
            must divide ``in_channels``, ``out_channels`` and the hidden width.
        width: hidden channels as a multiple of ``out_channels``.
        device, dtype: of the parameters.

    Attributes:
        factors: ``nn.ParameterList`` of kernels, input side first; ``factors[j]`` has shape
            ``(n_{j+1}, n_j / groups, k_j)``.
        weight: the collapsed kernel ``(out_channels, in_channels / groups, K)``.
        bias: the ``(out_channels,)`` bias parameter or None.

    Shape:
        input ``(N, in_channels, L)`` or ``(in_channels, L)``; output as ``nn.Conv1d``.

    Computed as a 2-D chain of height 1 (the cost model, the eval cache and the gradients are
    :class:`OverparamConv2d`'s).
    """

    _spatial = 1

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 3:
            return self._forward_2d(x.unsqueeze(2), x).squeeze(2)
        if isinstance(x, Tensor) and x.dim() == 2:
            batched = x.unsqueeze(0)
            return self._forward_2d(batched.unsqueeze(2), batched).squeeze(2).squeeze(0)
        raise self._bad_rank(x, "(N, C, L) or (C, L)")
