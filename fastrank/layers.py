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
            with torch.no_grad():
                self._cache.value = self.collapsed_parameters()
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
            h = h + self.bias
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
