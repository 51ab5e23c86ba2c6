"""Over-parameterized layers: drop-in ``nn.Linear`` / ``nn.Conv2d`` written as a chain of factors.

``OverparamLinear`` and ``OverparamConv2d`` hold the factors ``W_1 .. W_L`` as parameters and train
with their factorized gradient dynamics (arXiv 2103.10427), at about the cost of the plain layer:
each call runs whichever association of the chain is cheaper for its shapes. ``overparameterize``
swaps the layers of a model for over-parameterized ones; ``collapse`` swaps them back for plain
``nn.Linear`` / ``nn.Conv2d`` layers that compute the same function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .chain import chain_costs, chain_linear, chain_matmul, collapsed_weight
from .conv import collapse_kernels, collapsed_kernel_size, conv_chain_costs

__all__ = ["OverparamLinear", "OverparamConv2d", "overparameterize", "collapse"]

# Residual skips span this many factors, as in the anchor library's default.
RESIDUAL_INTERVAL = 2


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_width(width: object, out_features: int) -> int:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a number > 0, got {width!r}")
    hidden = int(out_features * width)
    if hidden < 1:
        raise ValueError(
            f"width={width!r} gives hidden size int({out_features} * {width}) = {hidden}, expected >= 1"
        )
    return hidden


def _check_input(x: Tensor, expected: int, dim: int, what: str, layer: nn.Module) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{type(layer).__name__}: expected a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{type(layer).__name__}: expected a floating-point input, got dtype {x.dtype}"
        )
    if x.dim() == 0 or x.shape[dim] != expected:
        raise ValueError(
            f"{type(layer).__name__}: expected input with {what}={expected} at dim {dim}, "
            f"got shape {tuple(x.shape)}"
        )
    dtype = layer.factors[0].dtype
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{type(layer).__name__}: expected input of dtype {dtype} like the layer, got {x.dtype}")


def _init_factor(factor: Tensor, last: bool, mode: str) -> None:
    # The anchor library's init: Kaiming-normal, gain 1 inside the chain (a linear map follows)
    # and sqrt(2) on the last factor (a ReLU follows the layer).
    nn.init.kaiming_normal_(factor, a=0.0 if last else 1.0, mode=mode, nonlinearity="leaky_relu")


class _CollapseCache:
    """The collapsed parameters, valid while no tensor of the module changed.

    The key holds every parameter's and buffer's storage pointer, version counter, dtype and
    device: optimizer steps and ``load_state_dict`` bump versions, ``.to()`` / ``.half()`` give new
    storage. Writes through ``tensor.data`` bypass version counters; call ``clear_cache()`` after
    such writes.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple[Tensor, Tensor | None] | None = None

    @staticmethod
    def make_key(module: nn.Module) -> tuple:
        return tuple(
            (t.data_ptr(), t._version, t.dtype, t.device)
            for t in (*module.parameters(), *module.buffers())
        )


class _OverparamBase(nn.Module):
    """Shared machinery: the collapse cache and the choice of when it may be used."""

    def __init__(self) -> None:
        super().__init__()
        self._cache = _CollapseCache()

    def collapsed_parameters(self) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Drop the cached collapsed parameters (only needed after writes through ``.data``)."""
        self._cache = _CollapseCache()

    def _cache_usable(self) -> bool:
        if torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return False
        return not getattr(self, "batch_norm", False) or not self.training

    def _cached_parameters(self) -> tuple[Tensor, Tensor | None]:
        key = _CollapseCache.make_key(self)
        if self._cache.key != key:
            # Cached in the parameters' dtype whatever the autocast state; F.linear / F.conv2d
            # cast it under autocast like any weight. Made outside inference mode: an inference
            # tensor in the cache would break a later call that autograd records (frozen
            # parameters, an input that requires grad).
            device_type = self.factors[0].device.type
            with torch.inference_mode(False), torch.no_grad(), \
                    torch.autocast(device_type, enabled=False):
                weight, bias = self.collapsed_parameters()
                # Contiguous: the composed conv kernel is a transposed view, and F.conv2d copied
                # it on every call (resnet18-sized eval 1.5x the plain model, 2-core CPU).
                self._cache.value = (weight.contiguous(), bias)
            self._cache.key = key
        return self._cache.value

    def _collapsed(self) -> tuple[Tensor, Tensor | None]:
        if self._cache_usable():
            return self._cached_parameters()
        return self.collapsed_parameters()

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_cache"] = _CollapseCache()
        return state


class OverparamLinear(_OverparamBase):
    r"""A drop-in ``nn.Linear`` whose weight is a chain of ``depth`` factors, ``W = W_L ... W_1``.

    The chain is ``in_features -> hidden -> ... -> hidden -> out_features`` with
    ``hidden = int(out_features * width)``. Each factor is Kaiming-normal initialized (gain 1, and
    sqrt(2) on the last factor), as in the paper's experiments; the bias is ``nn.Linear``'s.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        depth: number of factors L (1 is a plain linear layer).
        width: hidden size as a multiple of ``out_features`` (fractional widths are bottlenecks).
        bias: learn an additive bias of shape ``(out_features,)``.
        residual: add an identity skip around every run of 2 factors (``node_m += node_{m-2}``);
            needs equal widths at both ends of each skip. The skips collapse into the weight.
        batch_norm: a ``BatchNorm1d`` after every factor. Training then runs the activation chain
            (batch statistics); in eval the norms fold into the collapsed weight and bias.
        device, dtype: of the parameters.

    Attributes:
        factors: ``nn.ParameterList``; ``factors[0]`` is ``(hidden, in_features)``, ``factors[-1]``
            is ``(out_features, hidden)``.
        weight: the collapsed ``(out_features, in_features)`` weight, differentiable.
        bias: the bias parameter or None.

    Shape:
        input ``(..., in_features)``, output ``(..., out_features)``, floating point.
        ``forward(x)`` equals ``F.linear(x, self.weight, self.bias)`` in train and eval mode (with
        ``batch_norm=True``: ``F.linear(x, *self.collapsed_parameters())`` in eval mode).

    Each call picks the cheaper association from the shapes (see :func:`fastrank.chain_costs`);
    gradients of every factor and of x equal those of the naive chain. When no gradient of the
    parameters is needed (eval under ``torch.no_grad()``), the collapsed weight is cached and
    forward is a single ``F.linear``; the cache is invalidated by any in-place update, by
    ``load_state_dict`` and by ``.to()``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int = 2,
        width: float = 1.0,
        bias: bool = True,
        residual: bool = False,
        batch_norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        self.depth = _check_positive_int("depth", depth)
        self.width = width
        self.hidden_features = _check_width(width, out_features)
        self.residual = bool(residual)
        self.batch_norm = bool(batch_norm)
        dims = [in_features] + [self.hidden_features] * (depth - 1) + [out_features]
        self.skips = self._skip_targets(dims) if residual else ()
        factory = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(dims[j + 1], dims[j], **factory)) for j in range(depth)
        )
        self.norms = (
            nn.ModuleList(nn.BatchNorm1d(n, **factory) for n in dims[1:]) if batch_norm else None
        )
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        )
        self.reset_parameters()

    @staticmethod
    def _skip_targets(dims: Sequence[int]) -> tuple[int, ...]:
        depth = len(dims) - 1
        if depth < RESIDUAL_INTERVAL:
            raise ValueError(
                f"residual=True needs depth >= {RESIDUAL_INTERVAL} (a skip spans "
                f"{RESIDUAL_INTERVAL} factors), got depth={depth}"
            )
        targets = tuple(range(RESIDUAL_INTERVAL, depth + 1, RESIDUAL_INTERVAL))
        for m in targets:
            if dims[m] != dims[m - RESIDUAL_INTERVAL]:
                raise ValueError(
                    f"residual=True: the skip into node {m} needs equal widths, got "
                    f"{dims[m - RESIDUAL_INTERVAL]} -> {dims[m]} (dims {list(dims)}); use "
                    f"in_features == out_features and width=1"
                )
        return targets

    def reset_parameters(self) -> None:
        """Kaiming-normal factors (gain 1 inside, sqrt(2) last), ``nn.Linear``'s bias init."""
        for j, factor in enumerate(self.factors):
            _init_factor(factor, last=j == self.depth - 1, mode="fan_in")
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.norms is not None:
            for norm in self.norms:
                norm.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"depth={self.depth}, width={self.width}, bias={self.bias is not None}, "
            f"residual={self.residual}, batch_norm={self.batch_norm}"
        )

    # ---- the collapsed map ------------------------------------------------------------------

    def _segments(self) -> list[tuple[list[int], bool]]:
        """Runs of factor indices, each with whether an identity skip closes it."""
        if not self.skips:
            return [(list(range(self.depth)), False)]
        segments = [(list(range(m - RESIDUAL_INTERVAL, m)), True) for m in self.skips]
        if self.skips[-1] < self.depth:
            segments.append((list(range(self.skips[-1], self.depth)), False))
        return segments

    def _folded_factors(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """Factors with eval-mode batch norm folded in: ``D_j W_j`` and shifts ``e_j``."""
        if self.norms is None:
            return list(self.factors), [None] * self.depth
        factors, shifts = [], []
        for factor, norm in zip(self.factors, self.norms):
            scale = torch.rsqrt(norm.running_var + norm.eps)
            shift = -norm.running_mean * scale
            if norm.affine:
                scale = scale * norm.weight
                shift = shift * norm.weight + norm.bias
            factors.append(factor * scale.to(factor.dtype)[:, None])
            shifts.append(shift.to(factor.dtype))
        return factors, shifts

    def collapsed_parameters(self) -> tuple[Tensor, Tensor | None]:
        """The ``(out_features, in_features)`` weight and ``(out_features,)`` bias of the layer's map.

        Differentiable. Batch norms enter with their running statistics (the eval-mode map).
        """
        factors, shifts = self._folded_factors()
        if not self.skips and self.norms is None:
            return collapsed_weight(factors), self.bias
        blocks, offset = [], None
        for indices, skip in self._segments():
            block = collapsed_weight([factors[j] for j in indices])
            if skip:
                block = block + torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
            shift = None
            for j in indices:
                if shift is not None:
                    shift = factors[j] @ shift
                if shifts[j] is not None:
                    shift = shifts[j] if shift is None else shift + shifts[j]
            if offset is not None:
                offset = block @ offset
            if shift is not None:
                offset = shift if offset is None else offset + shift
            blocks.append(block)
        weight = collapsed_weight(blocks)
        bias = self.bias
        if offset is not None:
            bias = offset if bias is None else bias + offset
        return weight, bias

    @property
    def weight(self) -> Tensor:
        """The collapsed ``(out_features, in_features)`` weight (cached when no grad is needed)."""
        return self._collapsed()[0]

    # ---- forward ----------------------------------------------------------------------------

    def _activation_forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        h = rows
        for indices, skip in self._segments():
            start = h
            if self.norms is None:
                chain = [self.factors[j] for j in indices]
                h = chain_matmul(h, chain, return_all=torch.is_grad_enabled())[-1]
            else:
                for j in indices:
                    h = self.norms[j](F.linear(h, self.factors[j]))
            if skip:
                h = h + start
        if self.bias is not None:
            h = h + self.bias.to(h.dtype)
        return h.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_features, -1, "in_features", self)
        if self.batch_norm and self.training:
            return self._activation_forward(x)
        if not self.skips and self.norms is None and not self._cache_usable():
            return chain_linear(x, list(self.factors), self.bias)
        dims = [self.in_features] + [f.shape[0] for f in self.factors]
        grad_on = torch.is_grad_enabled()
        activation, collapsed = chain_costs(
            x.numel() // self.in_features,
            dims,
            grad_input=grad_on and x.requires_grad,
            grad_factors=grad_on and any(p.requires_grad for p in self.parameters()),
        )
        if self._cache_usable():
            # The collapsed weight is already paid for; only a bottleneck chain can beat it.
            collapsed = x.numel() // self.in_features * self.in_features * self.out_features
        if collapsed <= activation:
            weight, bias = self._collapsed()
            return F.linear(x, weight, bias)
        return self._activation_forward(x)


def _parse_kernel_sizes(kernel_sizes: object) -> list[tuple[int, int]]:
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    entries = [kernel_sizes] if is_int(kernel_sizes) else kernel_sizes
    if not isinstance(entries, (list, tuple)) or len(entries) == 0:
        raise ValueError(
            f"kernel_sizes must be a non-empty sequence of ints or (kh, kw) pairs, got {kernel_sizes!r}"
        )
    sizes = []
    for k in entries:
        if is_int(k):
            sizes.append((k, k))
        elif isinstance(k, (list, tuple)) and len(k) == 2 and all(is_int(v) for v in k):
            sizes.append((k[0], k[1]))
        else:
            raise ValueError(
                f"kernel_sizes entries must be positive ints or (kh, kw) pairs, got {k!r} in "
                f"{kernel_sizes!r}"
            )
    return sizes


def _pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return (pair[0], pair[1])


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
        self.padding = padding if isinstance(padding, str) else _pair("padding", padding, 0)
        self._pad = self._padding_amounts(padding)
        channels = [in_channels] + [self.hidden_channels] * (self.depth - 1) + [out_channels]
        for name, n in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("hidden channels", self.hidden_channels)):
            if n % groups:
                raise ValueError(f"groups={groups} must divide {name}={n}")
        self.channels = channels
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
        return collapse_kernels(list(self.factors), self.groups), self.bias

    @property
    def weight(self) -> Tensor:
        """The collapsed kernel (cached when no grad is needed)."""
        return self._collapsed()[0]

    def _conv(self, x: Tensor, kernel: Tensor, bias: Tensor | None, first: bool, last: bool) -> Tensor:
        left, right, top, bottom = self._pad
        padding = (0, 0)
        if first and self.padding_mode == "zeros" and left == right and top == bottom:
            padding = (top, left)
        return F.conv2d(
            x, kernel, bias, self.stride if last else 1, padding, self.dilation, self.groups
        )

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        _check_input(x, self.in_channels, 1, "in_channels", self)
        if x.dim() != 4:
            raise ValueError(
                f"OverparamConv2d: expected input (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}"
            )
        left, right, top, bottom = self._pad
        if self.padding_mode != "zeros" or left != right or top != bottom:
            x = F.pad(x, self._pad, mode=_PAD_MODES[self.padding_mode])
            pad_counted = (0, 0, 0, 0)
        else:
            pad_counted = self._pad
        cached = self._cache_usable()
        grad_on = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        activation, collapsed = conv_chain_costs(
            x.shape[0],
            (x.shape[2], x.shape[3]),
            self.channels,
            self.kernel_sizes,
            stride=self.stride,
            dilation=self.dilation,
            groups=self.groups,
            padding=pad_counted,
            backward=grad_on or (torch.is_grad_enabled() and x.requires_grad),
            kernel_cached=cached,
        )
        if self.depth == 1 or collapsed <= activation:
            kernel, bias = self._collapsed()
            return self._conv(x, kernel, bias, first=True, last=True)
        for j, kernel in enumerate(self.factors):
            last = j == self.depth - 1
            x = self._conv(x, kernel, self.bias if last else None, first=j == 0, last=last)
        return x


def _matches(name: str, module: nn.Module, patterns: Iterable[object]) -> bool:
    for pattern in patterns:
        if isinstance(pattern, str) and (name == pattern or name.startswith(pattern + ".")):
            return True
        if isinstance(pattern, type) and isinstance(module, pattern):
            return True
    return False


def _balanced_factors(matrix: Tensor, dims: Sequence[int], where: str) -> list[Tensor]:
    """Factor ``matrix`` (``dims[-1] x dims[0]``) into ``W_L .. W_1`` of the given widths, exactly.

    Balanced SVD split: ``W_j = Q_j diag(s^(1/L)) Q_{j-1}^T`` with ``Q_0 = V``, ``Q_L = U`` and random
    orthonormal ``Q_j`` in between, so every factor carries the same share of the spectrum.
    """
    depth = len(dims) - 1
    work = matrix.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    narrowest = min(dims[1:-1], default=len(s))
    if narrowest < len(s):
        tol = s.max() * max(work.shape) * torch.finfo(matrix.dtype).eps if len(s) else 0.0
        rank = int((s > tol).sum())
        if rank > narrowest:
            raise ValueError(
                f"preserve=True cannot factor {where}: its weight has rank {rank} but the chain's "
                f"narrowest hidden width is {narrowest}; use a larger width or preserve=False"
            )
        u, s, vh = u[:, :narrowest], s[:narrowest], vh[:narrowest]
    root = s ** (1.0 / depth)
    bases = [vh.T]
    for n in dims[1:-1]:
        q, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, device=work.device))
        bases.append(q)
    bases.append(u)
    return [(bases[j + 1] * root) @ bases[j].T for j in range(depth)]


def _linear_from(layer: nn.Linear, depth: int, width: float, preserve: bool, name: str) -> OverparamLinear:
    weight = layer.weight
    replacement = OverparamLinear(
        layer.in_features, layer.out_features, depth=depth, width=width,
        bias=layer.bias is not None, device=weight.device, dtype=weight.dtype,
    )
    if preserve:
        dims = [layer.in_features] + [f.shape[0] for f in replacement.factors]
        with torch.no_grad():
            for factor, value in zip(replacement.factors, _balanced_factors(weight, dims, name)):
                factor.copy_(value)
            if layer.bias is not None:
                replacement.bias.copy_(layer.bias)
    return replacement


def _conv_from(layer: nn.Conv2d, depth: int, width: float, preserve: bool, name: str) -> OverparamConv2d:
    weight = layer.weight
    replacement = OverparamConv2d(
        layer.in_channels, layer.out_channels,
        kernel_sizes=[tuple(layer.kernel_size)] + [(1, 1)] * (depth - 1),
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
        bias=layer.bias is not None, padding_mode=layer.padding_mode, width=width,
        device=weight.device, dtype=weight.dtype,
    )
    if preserve:
        groups = layer.groups
        out_g, in_g = layer.out_channels // groups, weight.shape[1]
        kh, kw = layer.kernel_size
        dims = [in_g * kh * kw] + [c // groups for c in replacement.channels[1:]]
        with torch.no_grad():
            for g in range(groups):
                block = weight[g * out_g : (g + 1) * out_g].reshape(out_g, -1)
                pieces = _balanced_factors(block, dims, f"{name} (group {g})")
                for j, (factor, piece) in enumerate(zip(replacement.factors, pieces)):
                    rows = slice(g * dims[j + 1], (g + 1) * dims[j + 1])
                    factor[rows].copy_(piece.reshape(factor[rows].shape))
            if layer.bias is not None:
                replacement.bias.copy_(layer.bias)
    return replacement


def overparameterize(
    model: nn.Module,
    depth: int = 2,
    width: float = 1.0,
    include: tuple[type, ...] = (nn.Linear, nn.Conv2d),
    exclude: Iterable[str | type] = (),
    preserve: bool = False,
) -> nn.Module:
    """Replace the ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` by over-parameterized ones, in place.

    Args:
        model: any module; itself replaced (and returned) if it is a matching layer.
        depth: factors per replaced layer. Convolutions keep their kernel on the first factor and
            get 1x1 factors after it, so the collapsed kernel size is unchanged.
        width: hidden size as a multiple of each layer's output size.
        include: layer types to replace (subclasses of ``nn.Linear`` / ``nn.Conv2d``).
        exclude: qualified module names (``"head"``, ``"features.3"``; a name excludes its
            children too) or module types to leave alone.
        preserve: factor each existing weight so the model computes the same function (a
            balanced SVD split); raises ``ValueError`` naming the layer when a bottleneck is
            narrower than the weight's rank. Otherwise the new layers get the default random init.

    Returns:
        the model, with the new layers on the device and dtype of the layers they replace.
    """
    _check_positive_int("depth", depth)
    exclude = tuple(exclude)
    for kind in include:
        if not (isinstance(kind, type) and issubclass(kind, (nn.Linear, nn.Conv2d))):
            raise ValueError(f"include may only hold nn.Linear / nn.Conv2d types, got {kind!r}")

    def replace(module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, _OverparamBase) or _matches(name, module, exclude):
            return module
        if isinstance(module, include):
            where = repr(name) if name else "the top-level module"
            if isinstance(module, nn.Linear):
                return _linear_from(module, depth, width, preserve, where)
            return _conv_from(module, depth, width, preserve, where)
        for child_name, child in list(module.named_children()):
            new = replace(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(module, child_name, new)
        return module

    return replace(model, "")


def _plain_from(layer: _OverparamBase) -> nn.Module:
    with torch.no_grad():
        weight, bias = layer.collapsed_parameters()
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, OverparamLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, **factory)
    else:
        plain = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
            bias=bias is not None, padding_mode=layer.padding_mode, **factory,
        )
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    plain.train(layer.training)
    return plain


def collapse(model: nn.Module) -> nn.Module:
    """Replace every over-parameterized layer of ``model`` by a plain ``nn.Linear`` / ``nn.Conv2d``.

    The plain layers compute the same outputs (batch norms folded with their running statistics)
    and hold ordinary ``weight`` / ``bias`` parameters, so the state_dict loads into a model that
    never imported fastrank. Works in place; returns the model (or the replacement if ``model``
    itself is an over-parameterized layer).
    """
    if isinstance(model, _OverparamBase):
        return _plain_from(model)
    for child_name, child in list(model.named_children()):
        new = collapse(child)
        if new is not child:
            setattr(model, child_name, new)
    return model
