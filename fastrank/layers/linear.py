"""``OverparamLinear``: a drop-in ``nn.Linear`` whose weight is a chain of factors."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..chain import (
    _chain_linear_as,
    _eager_plain,
    _plain_half_on_cuda,
    _plain_product,
    chain_costs,
    chain_matmul,
    collapsed_weight,
)
from .base import (
    _check_dtype,
    _check_input,
    _check_positive_int,
    _check_width,
    _costed_size,
    _init_factor,
    _OverparamBase,
)

__all__ = ["OverparamLinear", "RESIDUAL_INTERVAL"]

# Residual skips span this many factors, as in the anchor library's default.
RESIDUAL_INTERVAL = 2

_REQUIRES_GRAD = operator.attrgetter("requires_grad")


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
    parameters is needed in eval mode (under ``torch.no_grad()``), the collapsed weight is cached
    and forward is a single ``F.linear``. The cache lives within one eval window (dropped by
    ``train()`` / ``eval()``, ``load_state_dict``, ``.to()``) and is never served after an
    optimizer step or an in-place update (see ``_CollapseCache``).
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
        dims = [self.in_features] + [self.hidden_features] * (self.depth - 1) + [self.out_features]
        self.skips = self._skip_targets(dims) if residual else ()
        _check_dtype(dtype)
        factory = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(dims[j + 1], dims[j], **factory)) for j in range(self.depth)
        )
        self.norms = (
            nn.ModuleList(nn.BatchNorm1d(n, **factory) for n in dims[1:]) if batch_norm else None
        )
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        )
        if self.residual:
            # Saved with the factors, so that a checkpoint says the chain has skips (fastrank rank
            # collapses it from the state_dict alone).
            self.register_buffer("residual_interval", torch.tensor(RESIDUAL_INTERVAL, device=device))
        self._derive_constants()
        self.reset_parameters()

    def _derive_constants(self) -> None:
        """``_inference_collapses``: whether a call without autograd takes the cached weight."""
        super()._derive_constants()
        # A forward-only call with the collapsed weight cached costs B n_0 n_L, the activation
        # chain B sum(n_j n_{j-1}): whatever B, only a bottleneck chain is cheaper.
        dims = [self.in_features] + [self.hidden_features] * (self.depth - 1) + [self.out_features]
        chain = sum(dims[j] * dims[j + 1] for j in range(self.depth))
        self._inference_collapses = self.in_features * self.out_features <= chain
        # The collapsed bias is the module's own bias (collapsed_parameters) without skips or norms.
        self._bias_is_own = not self.skips and self.norms is None
        self._widest = max(dims)  # which routes a half-precision chain on CUDA (_plain_half_on_cuda)
        # n_0 .. n_L for the cost model: the factors' shapes without reading the factors (a
        # parametrized one is computed at each read)
        self._dims = dims

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
            return self._factor_list(), [None] * self.depth
        factors, shifts = [], []
        for factor, norm in zip(self._factor_list(), self.norms):
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
            return collapsed_weight(factors), self._bias_parameter()
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
        bias = self._bias_parameter()
        if offset is not None:
            bias = offset if bias is None else bias + offset
        return weight, bias

    @property
    def weight(self) -> Tensor:
        """The collapsed ``(out_features, in_features)`` weight (cached in eval mode when no grad is
        needed; gathered when FSDP2 has sharded the factors: every rank must read it)."""
        return self._collapsed()[0]

    # ---- forward ----------------------------------------------------------------------------

    def _activation_forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        h = rows
        factors = self._factor_list()
        for indices, skip in self._segments():
            start = h
            if self.norms is None:
                chain = [factors[j] for j in indices]
                h = chain_matmul(h, chain, return_all=torch.is_grad_enabled())[-1]
            else:
                for j in indices:
                    h = self.norms[j](F.linear(h, factors[j]))
            if skip:
                h = h + start
        bias = self._bias_parameter()
        if bias is not None:
            h = h + bias.to(h.dtype)
        return h.reshape(*x.shape[:-1], self.out_features)

    def _choose_path(self, key: tuple, rows: int) -> bool:
        """Whether the call signature ``key = (rows, cached, grad_input, grad_factors)`` runs the
        collapsed product (else the activation chain): the cost model's answer, remembered."""
        return self._remember_path(key, self._collapses(*key))

    def _collapses(self, rows: int, cached: bool, grad_input: bool, grad_factors: bool) -> bool:
        """The cost model's answer for a call of ``rows`` rows: the collapsed product (True) or the
        activation chain. Under Dynamo (torch.compile) ``rows`` may be symbolic, and the comparison,
        linear in it, is then one inequality guard on the size, where a remembered choice would
        specialize it; torch.export's non-strict tracing costs a symbolic size as
        ``_SYMBOLIC_SIZE`` instead (``fastrank.layers.base._costed_size``)."""
        activation, collapsed = chain_costs(rows, self._dims, grad_input=grad_input, grad_factors=grad_factors)
        if cached:
            # The collapsed weight is already paid for; only a bottleneck chain can beat it.
            collapsed = rows * self.in_features * self.out_features
        return collapsed <= activation

    def _plain_forward(self, x: Tensor) -> Tensor | None:
        """An eager fp32 / fp64 call under autograd of a chain without skips or norms (a training
        step), or an fp16 / bf16 one where :func:`fastrank.chain._plain_half_on_cuda` routes it:
        the naive chain as plain ``F.linear`` calls, the bias on the last step, or one ``F.linear``
        with the collapsed weight (plain matmuls), as the cost model picks. What the general path
        below computes, with its bookkeeping cut to what this case needs: the general path cost
        about 5 us a call more (OverparamLinear(64, 64, depth=2), B=1, 2-core Xeon: 14 us
        against 8 us for the two F.linear calls alone). None where the general path must run (a
        cached weight: frozen parameters in eval mode). The input is checked only when
        ``F.linear`` rejects it, or before a reshape that could hide a wrong width."""
        factors = self._factor_list()
        bias = self._bias_parameter()
        flat = x.dim() == 2
        if not flat and (x.dim() == 0 or x.shape[-1] != self.in_features):
            _check_input(x, self.in_features, -1, "in_features", self)  # raises
        grad_factors = True in map(_REQUIRES_GRAD, factors) or (bias is not None and bias.requires_grad)
        cached = not grad_factors and not self.training
        rows = x.shape[0] if flat else x.numel() // self.in_features
        key = (rows, cached, x.requires_grad, grad_factors)
        use_collapsed = self._path_choices.get(key)
        if use_collapsed is None:
            use_collapsed = self._choose_path(key, rows)
        if use_collapsed and cached:
            return None
        try:
            h = x if flat else x.reshape(rows, self.in_features)
            if use_collapsed:
                out = F.linear(h, _plain_product(factors), bias)
            else:
                for factor in factors[:-1]:
                    h = F.linear(h, factor)
                out = F.linear(h, factors[-1], bias)
        except (TypeError, RuntimeError) as error:
            failure = error
        else:
            return out if flat else out.reshape(*x.shape[:-1], self.out_features)
        _check_input(x, self.in_features, -1, "in_features", self)  # a clearer message
        raise failure

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            if self._inference_collapses and not self.training and not torch.compiler.is_compiling():
                cache = self._cache
                # self._collapse_inputs() inline (a method call less: 0.1 us of a 5 us call). An
                # nn.DataParallel replica's factor dict is empty: never fresh, it takes the path below,
                # as a parametrized factor does (the dict lacks it), and a parametrized layer whose
                # state tensors this would read (the path below reads them once).
                if (self._bias_is_own or not self._parametrized()) and cache.fresh(
                    self._modules["factors"]._parameters.values() if self._bias_is_own else self._state_tensors()
                ):
                    # Inference with a valid cache: one F.linear. The input is checked only when
                    # F.linear rejects it (the check cost 1.6 us a call, nn.Linear's whole call 7 us).
                    weight, bias = cache.value
                    if self._bias_is_own:
                        try:
                            bias = self._parameters["bias"]  # self._bias_parameter() inline
                        except KeyError:  # a bias under torch.nn.utils.parametrize: an attribute
                            bias = self.bias
                    try:
                        return F.linear(x, weight, bias)
                    except (TypeError, RuntimeError) as error:
                        failure = error
                    _check_input(x, self.in_features, -1, "in_features", self)  # a clearer message
                    raise failure
                # Otherwise the path below fills the cache.
        elif self._bias_is_own and type(x) is Tensor and (_eager_plain(x) or _plain_half_on_cuda(x, self.depth, self._widest)):
            out = self._plain_forward(x)
            if out is not None:
                return out
        if self._parametrized():
            with self._reading_once():
                return self._general_forward(x)
        return self._general_forward(x)

    def _general_forward(self, x: Tensor) -> Tensor:
        """:meth:`forward` where its fast paths do not apply: the input checked, the path chosen by
        the cost model (the collapsed weight or the activation chain), every layer kind."""
        _check_input(x, self.in_features, -1, "in_features", self)
        if self.batch_norm and self.training:
            return self._activation_forward(x)
        tensors = self._state_tensors()
        grad_on = torch.is_grad_enabled()
        grad_factors = grad_on and any(t.requires_grad for t in tensors)
        grad_input = grad_on and x.requires_grad
        compiling = torch.compiler.is_compiling()
        cached = not grad_factors and not self.training and not compiling
        rows = x.numel() // self.in_features
        if compiling:
            # Traced (torch.compile, torch.export): costed, never remembered, so that a dynamic size
            # is compared with the cost model's threshold instead of specialized to each value (a
            # recompile per batch size), and torch.export's symbolic one costed as a large size.
            use_collapsed = self._collapses(_costed_size(rows), cached, grad_input, grad_factors)
        else:
            key = (rows, cached, grad_input, grad_factors)
            use_collapsed = self._path_choices.get(key)
            if use_collapsed is None:
                use_collapsed = self._choose_path(key, rows)
        if use_collapsed:
            weight, bias = self._cached_parameters() if cached else self.collapsed_parameters()
            return F.linear(x, weight, bias)
        if not self.skips and self.norms is None:
            factors, bias = tensors[: self.depth], self._bias_parameter()
            return _chain_linear_as(x, factors, bias, False, grad_input or grad_factors)
        return self._activation_forward(x)
