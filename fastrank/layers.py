"""Over-parameterized layers: drop-in ``nn.Linear`` / ``nn.Conv2d`` written as a chain of factors.

``OverparamLinear`` and ``OverparamConv2d`` hold the factors ``W_1 .. W_L`` as parameters and train
with their factorized gradient dynamics (arXiv 2103.10427), at about the cost of the plain layer:
each call runs whichever association of the chain is cheaper for its shapes. ``overparameterize``
swaps the layers of a model for over-parameterized ones; ``collapse`` swaps them back for plain
``nn.Linear`` / ``nn.Conv2d`` layers that compute the same function.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import operator
import sys
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .chain import _chain_linear_as, chain_costs, chain_matmul, collapsed_weight
from .conv import collapse_kernels, collapsed_kernel_size, conv_chain_costs
from .rank.common import _is_dtensor
from .sharded import collapsed_parameters_of

__all__ = ["OverparamLinear", "OverparamConv2d", "OverparamReport", "overparameterize", "collapse"]

_log = logging.getLogger(__name__)

# Residual skips span this many factors, as in the anchor library's default.
RESIDUAL_INTERVAL = 2


def _is_int(value: object) -> bool:
    """An integer of any kind torch takes for a size (``int``, ``numpy.int64``, ...), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_width(width: object, out_features: int) -> int:
    if (
        not isinstance(width, numbers.Real)
        or isinstance(width, bool)
        or not math.isfinite(width)
        or not width > 0
    ):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    width = float(width) if not _is_int(width) else int(width)
    hidden = int(out_features * width)
    if hidden < 1:
        raise ValueError(
            f"width={width!r} gives hidden size int({out_features} * {width}) = {hidden}, expected >= 1"
        )
    return hidden


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating-point torch.dtype (float16, bfloat16, float32, float64), got {dtype!r}"
        )


def _check_input(x: Tensor, expected: int, dim: int, what: str, layer: _OverparamBase) -> None:
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
    dtype = layer._factor_list()[0].dtype
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{type(layer).__name__}: expected input of dtype {dtype} like the layer, got {x.dtype}")


def _init_factor(factor: Tensor, last: bool, mode: str) -> None:
    # The anchor library's init: Kaiming-normal, gain 1 inside the chain (a linear map follows)
    # and sqrt(2) on the last factor (a ReLU follows the layer).
    nn.init.kaiming_normal_(factor, a=0.0 if last else 1.0, mode=mode, nonlinearity="leaky_relu")


# Call signatures whose association choice a layer remembers.
_PATH_CHOICES_KEPT = 256


_VERSION = operator.attrgetter("_version")
_DATA_PTR = Tensor.data_ptr
_IS = operator.is_

# Optimizer steps begun or finished by any ``torch.optim.Optimizer`` (subclasses included: the
# global hooks run around every ``step``). Fused optimizer kernels (``fused=True``, the Hugging
# Face Trainer's default ``adamw_torch_fused``) update parameters without bumping their version
# counters, so a cache made before a step must not be trusted after it, whatever the counters say.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_pre_hook(_count_optimizer_step)
register_optimizer_step_post_hook(_count_optimizer_step)


class _CollapseCache:
    """The collapsed parameters of an eval-mode layer, valid while nothing they were made of changed.

    A cache lives within one eval window: layers fill it only in eval mode and drop it on every
    ``train()`` / ``eval()`` call, on ``load_state_dict`` and on ``Module._apply`` (``.to()``,
    ``.half()``, ``.cuda()``). Within the window ``fresh`` checks, in order: that no optimizer
    stepped (:data:`_optimizer_steps`; fused kernels skip version counters), that the module's
    tensors are the cached ones (identity: a replaced parameter, ``load_state_dict(assign=True)``,
    FSDP2 swapping sharded and unsharded parameters), their version counters (in-place writes:
    foreach kernels, edits under ``no_grad``, ``copy_``) and their storage addresses (new storage
    under the same object: ``p.data = ...``, ``swap_tensors``, ``vector_to_parameters``). The cache
    keeps the storages it was made of alive (``pins``), so an address can only match the storage it
    was made of, never a new allocation at a freed address. Each check goes through one C-level
    map: 1.8-1.9 us for four factors on a 2-core Xeon. Identity needs the cached tensors alive,
    so the cache holds them (``torch.utils.swap_tensors`` refuses tensors with weak references).
    The one write no check sees is an in-place write through ``tensor.data`` within an eval
    window (``p.data.add_(...)`` outside an optimizer): call ``clear_cache()`` (or ``eval()``) after it.
    """

    __slots__ = ("tensors", "versions", "addresses", "pins", "steps", "value")

    def __init__(self) -> None:
        self.tensors: tuple[Tensor, ...] = ()
        self.versions: tuple[int, ...] = ()
        self.addresses: tuple[int, ...] = ()
        self.pins: tuple[Tensor, ...] = ()
        self.steps = -1
        self.value: tuple[Tensor, Tensor | None] | None = None

    def fresh(self, tensors: Collection[Tensor]) -> bool:
        """Whether ``value`` was made of exactly ``tensors``, unchanged since."""
        cached = self.tensors
        return (
            self.steps == _optimizer_steps
            and self.value is not None
            and len(tensors) == len(cached)
            and all(map(_IS, tensors, cached))
            and tuple(map(_VERSION, cached)) == self.versions
            and tuple(map(_DATA_PTR, cached)) == self.addresses
        )

    def store(self, tensors: Collection[Tensor], value: tuple[Tensor, Tensor | None]) -> None:
        self.tensors = tuple(tensors)
        self.versions = tuple(map(_VERSION, self.tensors))
        self.addresses = tuple(map(_DATA_PTR, self.tensors))
        self.pins = tuple(t.detach() for t in self.tensors)
        self.steps = _optimizer_steps
        self.value = value


def _clear_after_load(module: _OverparamBase, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: drop the cache; accept checkpoints made before
    ``residual_interval`` was saved (they cannot say whether the layer had skips)."""
    module.clear_cache()
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.rpartition(".")[2] == "residual_interval"]:
        missing.remove(key)


class _OverparamBase(nn.Module):
    """Shared machinery: the collapse cache and the choice of when it may be used."""

    def __init__(self) -> None:
        super().__init__()
        self._cache = _CollapseCache()
        # The cost model's choice per call signature (rows or image size, cache, backward): it
        # depends on nothing else, and recomputing it cost about 15 us a call.
        self._path_choices: dict[tuple, bool] = {}
        self.register_load_state_dict_post_hook(_clear_after_load)

    def collapsed_parameters(self) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _derive_constants(self) -> None:
        """Per-call constants derived from the hyper-parameters (recomputed on unpickling)."""

    def clear_cache(self) -> None:
        """Drop the cached collapsed parameters (only needed after in-place writes through
        ``tensor.data`` in eval mode; ``eval()`` drops it too)."""
        self._cache = _CollapseCache()

    def train(self, mode: bool = True) -> _OverparamBase:
        # The cache lives within one eval window: whatever happened to the parameters before
        # (writes through .data included), a call to train() / eval() starts from nothing.
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() give the parameters new storage under the same objects.
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _factor_list(self) -> list[Tensor]:
        """``[W_1, ..., W_L]``: read from the ParameterList's dict, as iterating it cost 7 us a call
        (depth 4, 2-core Xeon) against 0.1 us."""
        return [*self._modules["factors"]._parameters.values()]

    def _state_tensors(self) -> list[Tensor]:
        """Every tensor the collapsed parameters are made of, factors first.

        Read from the modules' dicts rather than ``self.parameters()`` / ``buffers()``: the eval
        path calls this on every forward, and the generic walk cost about 10 us a call.
        """
        tensors = self._factor_list()
        bias = self._parameters["bias"]
        if bias is not None:
            tensors.append(bias)
        norms = self._modules.get("norms")
        if norms is not None:
            for norm in norms:
                tensors += [*norm._parameters.values(), *norm._buffers.values()]
            tensors = [t for t in tensors if t is not None]
        return tensors

    def _remember_path(self, key: tuple, use_collapsed: bool) -> bool:
        # Bounded: inputs of ever new lengths (sequence models) would grow it without end.
        if len(self._path_choices) >= _PATH_CHOICES_KEPT:
            self._path_choices.clear()
        self._path_choices[key] = use_collapsed
        return use_collapsed

    def _collapse_inputs(self) -> Collection[Tensor]:
        """The tensors the cached collapse is made of: the factors alone when the collapsed bias is
        the module's own ``bias`` (read live on every call), else every state tensor."""
        if self._bias_is_own:
            return self._modules["factors"]._parameters.values()
        return self._state_tensors()

    def _parameters_need_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self._state_tensors())

    def _cache_usable(self) -> bool:
        # Training mode never caches: a forward under no_grad there (reentrant gradient
        # checkpointing, a held-out batch) is followed by a step that changes the parameters.
        if self.training or torch.compiler.is_compiling():
            return False
        return not self._parameters_need_grad()

    def _cached_parameters(self) -> tuple[Tensor, Tensor | None]:
        tensors = self._collapse_inputs()
        cache = self._cache
        if not cache.fresh(tensors):
            tensors = tuple(tensors)
            # Cached in the parameters' dtype whatever the autocast state; F.linear / F.conv2d
            # cast it under autocast like any weight. Made outside inference mode: an inference
            # tensor in the cache would break a later call that autograd records (frozen
            # parameters, an input that requires grad).
            with torch.inference_mode(False), torch.no_grad(), \
                    torch.autocast(tensors[0].device.type, enabled=False):
                weight, bias = self.collapsed_parameters()
                # Contiguous: the composed conv kernel is a transposed view, and F.conv2d copied
                # it on every call (resnet18 eval was reported at 1.54x the plain model).
                cache.store(tensors, (weight.contiguous(), bias))
        weight, bias = cache.value
        return weight, self._parameters["bias"] if self._bias_is_own else bias

    def _collapsed(self, cache_usable: bool | None = None) -> tuple[Tensor, Tensor | None]:
        if _is_dtensor(self._factor_list()[0]):  # FSDP2 outside forward: gather the factors
            return collapsed_parameters_of(self)
        if self._cache_usable() if cache_usable is None else cache_usable:
            return self._cached_parameters()
        return self.collapsed_parameters()

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_cache"] = _CollapseCache()
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_cache", _CollapseCache())
        state.setdefault("_path_choices", {})  # absent from layers pickled by older versions
        super().__setstate__(state)
        if _clear_after_load not in self._load_state_dict_post_hooks.values():  # older pickles
            self.register_load_state_dict_post_hook(_clear_after_load)
        self._derive_constants()


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
        # A forward-only call with the collapsed weight cached costs B n_0 n_L, the activation
        # chain B sum(n_j n_{j-1}): whatever B, only a bottleneck chain is cheaper.
        dims = [self.in_features] + [self.hidden_features] * (self.depth - 1) + [self.out_features]
        chain = sum(dims[j] * dims[j + 1] for j in range(self.depth))
        self._inference_collapses = self.in_features * self.out_features <= chain
        # The collapsed bias is the module's own bias (collapsed_parameters) without skips or norms.
        self._bias_is_own = not self.skips and self.norms is None

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
        if self.bias is not None:
            h = h + self.bias.to(h.dtype)
        return h.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if (
            not torch.is_grad_enabled()
            and self._inference_collapses
            and not self.training
            and not torch.compiler.is_compiling()
        ):
            cache = self._cache
            if cache.fresh(self._collapse_inputs()):
                # Inference with a valid cache: one F.linear. The input is checked only when
                # F.linear rejects it (the check cost 1.6 us a call, nn.Linear's whole call 7 us).
                weight, bias = cache.value
                try:
                    return F.linear(x, weight, self._parameters["bias"] if self._bias_is_own else bias)
                except (TypeError, RuntimeError) as error:
                    failure = error
                _check_input(x, self.in_features, -1, "in_features", self)  # a clearer message
                raise failure
            # Otherwise the path below fills the cache.
        _check_input(x, self.in_features, -1, "in_features", self)
        if self.batch_norm and self.training:
            return self._activation_forward(x)
        tensors = self._state_tensors()
        grad_on = torch.is_grad_enabled()
        grad_factors = grad_on and any(t.requires_grad for t in tensors)
        grad_input = grad_on and x.requires_grad
        cached = not grad_factors and not self.training and not torch.compiler.is_compiling()
        rows = x.numel() // self.in_features
        key = (rows, cached, grad_input, grad_factors)
        use_collapsed = self._path_choices.get(key)
        if use_collapsed is None:
            dims = [self.in_features] + [f.shape[0] for f in tensors[: self.depth]]
            activation, collapsed = chain_costs(rows, dims, grad_input=grad_input, grad_factors=grad_factors)
            if cached:
                # The collapsed weight is already paid for; only a bottleneck chain can beat it.
                collapsed = rows * self.in_features * self.out_features
            use_collapsed = self._remember_path(key, collapsed <= activation)
        if use_collapsed:
            weight, bias = self._cached_parameters() if cached else self.collapsed_parameters()
            return F.linear(x, weight, bias)
        if not self.skips and self.norms is None:
            factors, bias = tensors[: self.depth], self._parameters["bias"]
            return _chain_linear_as(x, factors, bias, False, grad_input or grad_factors)
        return self._activation_forward(x)


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


def _matches(name: str, module: nn.Module, patterns: Iterable[object]) -> bool:
    for pattern in patterns:
        if isinstance(pattern, str) and (name == pattern or name.startswith(pattern + ".")):
            return True
        if isinstance(pattern, type) and isinstance(module, pattern):
            return True
    return False


# ---- preserve: factoring an existing weight -----------------------------------------------------

# Above this many multiply-adds (m^2 n for an m x n weight, m <= n) the factorization of an fp32 /
# fp16 / bf16 weight runs in fp32: the three layers of vgg11's classifier (4096 x 25088 the
# largest) take 38.5 s in fp32 on a 2-core CPU, where fp64 SVDs were reported to take 370 s.
# Below it, fp64 costs under a second.
_FP64_FACTOR_BUDGET = 2**31


def _svd_factors(matrix: Tensor, dims: Sequence[int], where: str) -> list[Tensor]:
    """Balanced split through an fp64 SVD, truncated to a bottleneck narrower than the weight.

    ``W_j = Q_j diag(s^(1/L)) Q_{j-1}^T`` with ``Q_0 = V``, ``Q_L = U`` and random orthonormal
    ``Q_j`` in between. Raises ``ValueError`` when the weight's rank exceeds the narrowest width.
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


def _balanced_factors(matrix: Tensor, dims: Sequence[int], where: str) -> list[Tensor]:
    """Factor ``matrix`` (``dims[-1] x dims[0]``) into ``W_1 .. W_L`` (input side first), balanced.

    With ``W = U diag(s) V^T``: ``W_j = Q_j diag(s^(1/L)) Q_{j-1}^T``, ``Q_0 = V``, ``Q_L = U`` and
    random orthonormal ``Q_j`` in between, so every factor carries the same share of the spectrum
    (``W_{j+1}^T W_{j+1} = W_j W_j^T``). When every hidden width is at least ``m = min(out, in)``,
    no SVD is taken: ``U`` and ``s`` come from the eigendecomposition of the ``m x m`` Gram and
    ``W_1 = Q_1 diag(s^(1/L) / s) U^T W``, so the product is ``U U^T W``, ``W`` to the rounding of
    the compute dtype whatever the accuracy of the small singular values. Returns the factors in
    the compute dtype: fp64 for fp64 weights and small ones, fp32 beyond ``_FP64_FACTOR_BUDGET``.
    """
    depth = len(dims) - 1
    if depth == 1:
        return [matrix.detach().clone()]
    rows, cols = matrix.shape
    if rows > cols:  # factor W^T = F_L .. F_1, then W = F_1^T .. F_L^T
        return [f.T for f in reversed(_balanced_factors(matrix.T, dims[::-1], where))]
    if min(dims[1:-1]) < rows:
        return _svd_factors(matrix, dims, where)
    small = rows * rows * cols <= _FP64_FACTOR_BUDGET
    compute = torch.float64 if matrix.dtype == torch.float64 or small else torch.float32
    work = matrix.detach().to(compute)
    eigenvalues, u = torch.linalg.eigh(work @ work.T)
    top = eigenvalues[-1].clamp_min(0)
    if top == 0:
        return [torch.zeros(dims[j + 1], dims[j], dtype=compute, device=work.device) for j in range(depth)]
    # Eigenvalues below the rounding of the Gram are noise (possibly negative): floor them so the
    # spectrum is positive; the product U U^T W does not depend on them.
    s = eigenvalues.clamp_min(top * rows * torch.finfo(compute).eps).sqrt()
    root = s ** (1.0 / depth)
    bases = [
        torch.linalg.qr(torch.randn(n, rows, dtype=compute, device=work.device))[0]
        for n in dims[1:-1]
    ]
    factors = [(bases[0] * (root / s)) @ u.T @ work]
    factors += [(bases[j] * root) @ bases[j - 1].T for j in range(1, depth - 1)]
    factors.append((u * root) @ bases[-1].T)
    return factors


def _preserve_tolerance(compute: torch.dtype, dtype: torch.dtype, fan_in: int, depth: int) -> float:
    """Largest relative change of a layer's output that ``preserve=True`` accepts as rounding.

    The check runs in ``compute`` (fp32 for half layers): its two reductions over ``fan_in`` terms
    round in ``compute``, the ``depth`` factors were rounded to the layer's ``dtype``. The margins
    (16, 8) sit well above the errors measured: 4.6e-6 on the fp32 4096 x 25088 vgg11 classifier
    (tolerance 1.5e-4), 2.9e-4 on an fp16 3x3 conv (tolerance 7.8e-3); a layer whose forward is
    not the plain ``F.linear`` / ``F.conv2d`` of its weight changes its output by 0.1 to 1, or its
    shape.
    """
    unit = torch.finfo(compute).eps / 2
    return 16.0 * unit * math.sqrt(fan_in) + 8.0 * torch.finfo(dtype).eps / 2 * depth


def _probe_input(layer: nn.Module, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed random input for ``layer``: ``(3, in_features)`` or an odd-sized ``(2, C, H, W)``."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Linear):
        shape = (3, layer.in_features)
    else:
        span = [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size)]
        shape = (2, layer.in_channels, span[0] + 2 * layer.stride[0] + 1, span[1] + 3 * layer.stride[1] + 2)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _check_same_function(original: nn.Module, replacement: _OverparamBase, where: str) -> None:
    """Raise ``ValueError`` naming the layer if ``replacement`` does not compute ``original``."""
    layer_dtype = dtype = replacement.factors[0].dtype
    if dtype in (torch.float16, torch.bfloat16):  # judge the factorization, not half rounding
        original, replacement = copy.deepcopy(original).float(), copy.deepcopy(replacement).float()
        dtype = torch.float32
    probe = _probe_input(original, dtype, replacement.factors[0].device)
    kind = type(original).__name__
    with torch.no_grad():
        try:
            expected = original(probe)
        except Exception as error:
            raise ValueError(
                f"preserve=True could not check layer {where} ({kind}): it fails on a probe input "
                f"of shape {tuple(probe.shape)}: {error}"
            ) from error
    # With grad enabled the eval cache stays out of it: a call on a few probe rows runs the
    # activation chain instead of collapsing (and keeping) a large weight.
    with torch.enable_grad():
        actual = replacement(probe).detach()
    hint = (
        f"{kind} is not a plain nn.Linear / nn.Conv2d: its forward is not F.linear / F.conv2d of "
        f"its weight; leave it out of include (or exclude it) to keep it"
    )
    if not isinstance(expected, Tensor) or expected.shape != actual.shape:
        shape = tuple(expected.shape) if isinstance(expected, Tensor) else type(expected).__name__
        raise ValueError(
            f"preserve=True changed layer {where} ({kind}): on a probe input of shape "
            f"{tuple(probe.shape)} the original gives {shape}, the replacement "
            f"{tuple(actual.shape)}. {hint}"
        )
    fan_in = original.weight[0].numel()
    tol = _preserve_tolerance(dtype, layer_dtype, fan_in, replacement.depth)
    scale = expected.double().norm().clamp_min(torch.finfo(torch.float64).tiny)
    error = float((actual.double() - expected.double()).norm() / scale)
    if not error <= tol:
        raise ValueError(
            f"preserve=True changed layer {where} ({kind}): relative error {error:.2e} on a probe "
            f"input of shape {tuple(probe.shape)}, expected <= {tol:.1e} (rounding of {layer_dtype}). {hint}"
        )


# ---- building replacements ------------------------------------------------------------------------


def _copy_preserved(layer: nn.Module, replacement: _OverparamBase, where: str) -> None:
    weight = layer.weight
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            dims = [layer.in_features] + [f.shape[0] for f in replacement.factors]
            for factor, value in zip(replacement.factors, _balanced_factors(weight, dims, where)):
                factor.copy_(value)
        else:
            groups = layer.groups
            out_g, in_g = layer.out_channels // groups, weight.shape[1]
            kh, kw = layer.kernel_size
            dims = [in_g * kh * kw] + [c // groups for c in replacement.channels[1:]]
            for g in range(groups):
                block = weight[g * out_g : (g + 1) * out_g].reshape(out_g, -1)
                pieces = _balanced_factors(block, dims, f"{where} (group {g})")
                for j, (factor, piece) in enumerate(zip(replacement.factors, pieces)):
                    rows = slice(g * dims[j + 1], (g + 1) * dims[j + 1])
                    factor[rows].copy_(piece.reshape(factor[rows].shape))
        if layer.bias is not None:
            replacement.bias.copy_(layer.bias)


def _match_init_scale(layer: nn.Module, replacement: _OverparamBase) -> None:
    """Scale every factor alike so the collapsed weight's mean square equals the layer's weight's.

    The bias is copied from ``layer``. A zero weight (a zero-initialized head) gives a zero last
    factor: the collapsed weight is zero and the factors still get gradients.
    """
    with torch.no_grad():
        target = layer.weight.double().square().mean()
        if target == 0:
            replacement.factors[-1].zero_()
        else:
            current = replacement.collapsed_parameters()[0].double().square().mean()
            scale = float((target / current).sqrt()) ** (1.0 / replacement.depth)
            for factor in replacement.factors:
                factor.mul_(scale)
        if layer.bias is not None:
            replacement.bias.copy_(layer.bias)


def _check_finite_weight(layer: nn.Module, option: str, where: str) -> None:
    """``ValueError`` when ``layer``'s weight or bias holds NaN or Inf: it cannot be factored or matched."""
    for attribute in ("weight", "bias"):
        tensor = getattr(layer, attribute, None)
        if tensor is None:
            continue
        nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
        if nan or inf:
            raise ValueError(
                f"overparameterize: layer {where}: its {attribute} is not finite ({nan} NaN and {inf} Inf of {tensor.numel()} elements); "
                f"{option} needs a finite {attribute} (overparameterize without it starts from a fresh init)"
            )


def _replacement_for(layer: nn.Module, depth: int, width: float) -> _OverparamBase:
    weight = layer.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Linear):
        return OverparamLinear(
            layer.in_features, layer.out_features, depth=depth, width=width,
            bias=layer.bias is not None, **factory,
        )
    return OverparamConv2d(
        layer.in_channels, layer.out_channels,
        kernel_sizes=[tuple(layer.kernel_size)] + [(1, 1)] * (depth - 1),
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
        bias=layer.bias is not None, padding_mode=layer.padding_mode, width=width, **factory,
    )


# ---- overparameterize -----------------------------------------------------------------------------


@dataclass
class OverparamReport:
    """What :func:`overparameterize` did to a model.

    Attributes:
        replaced: ``(name, type name)`` of every replaced layer, in module order.
        skipped: ``(name, type name, reason)`` of every layer holding a weight matrix or kernel that
            was left as it is (excluded, a subclass or type fastrank does not replace, a tied or
            parametrized weight, an uninitialized lazy layer).
    """

    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"overparameterize: replaced {len(self.replaced)} layers, skipped {len(self.skipped)}"]
        lines += [f"  replaced {name or '(top level)'} ({kind})" for name, kind in self.replaced]
        lines += [f"  skipped  {name or '(top level)'} ({kind}): {why}" for name, kind, why in self.skipped]
        return "\n".join(lines)


def _has_weight_matrix(module: nn.Module) -> bool:
    """A layer with a weight matrix or kernel of its own (not a class token or position table)."""
    return any(
        p.dim() >= 2 and "weight" in name for name, p in module.named_parameters(recurse=False)
    ) or (
        isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()
    )


def _skip_reason(
    module: nn.Module, include: tuple[type, ...], owners: dict[int, list[str]], name: str
) -> str | None:
    """Why ``module`` (a layer of an included type, or one holding a weight) is not replaced."""
    kind = type(module).__name__
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialized lazy layer: run one forward pass first (it then becomes a plain layer)"
    if parametrize.is_parametrized(module):
        return (
            "parametrized weight (torch.nn.utils.parametrize): a replacement would drop the "
            "parametrization; remove it first (parametrize.remove_parametrizations) to replace the layer"
        )
    if type(module) not in include:
        if type(module) in (nn.Linear, nn.Conv2d):
            return "not in include"
        for base in (nn.Linear, nn.Conv2d):
            if isinstance(module, base):
                return (
                    f"subclass of nn.{base.__name__} (its forward may differ); pass "
                    f"include=(..., {kind}) to replace it anyway"
                )
        return "type not replaced by fastrank (nn.Linear and nn.Conv2d are)"
    if "weight" not in module._parameters:
        return (
            "weight computed by a hook (torch.nn.utils.weight_norm or spectral_norm): a replacement "
            "would drop it; remove the hook first to replace the layer"
        )
    for attribute in ("weight", "bias"):
        param = module._parameters.get(attribute)
        if param is None:
            continue
        others = [n for n in owners.get(id(param), []) if n != f"{name}.{attribute}".lstrip(".")]
        if others:
            return f"{attribute} tied to {', '.join(repr(n) for n in others)}; replacing it would untie them"
    return None


def _progress_bar(total: int, enabled: bool):
    """A per-layer progress callback ``(done, name)`` on stderr: tqdm when installed, else lines."""
    if not enabled:
        return lambda done, name: None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        def update(done: int, name: str) -> None:
            print(f"overparameterize: {done}/{total} {name}", file=sys.stderr, flush=True)

        return update, lambda: None
    bar = tqdm(total=total, desc="overparameterize", unit="layer", file=sys.stderr, leave=False)

    def update(done: int, name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(done - bar.n)

    return update, bar.close


# Weight elements to factor above which preserve=True shows a progress bar (progress=None): 2^24,
# a few seconds of factoring; vgg11 has 1.3e8.
_PROGRESS_ELEMENTS = 2**24

_INITS = ("paper", "match")


_DEFAULT_INCLUDE = (nn.Linear, nn.Conv2d)


def _warn_unmatched(model: nn.Module, exclude: tuple, include: tuple) -> None:
    """One ``UserWarning`` naming the ``exclude`` entries and ``include`` types matching no module."""
    named = list(model.named_modules())
    unmatched = [
        f"exclude entry {entry!r}" for entry in exclude
        if not any(_matches(name, module, (entry,)) for name, module in named)
    ]
    unmatched += [
        f"include type {kind.__name__}" for kind in include
        if not any(type(module) is kind for _, module in named)
    ]
    if unmatched:
        names = sorted(name for name, _ in named if name)
        warnings.warn(
            f"overparameterize: {'; '.join(unmatched)} matches no module of the model "
            f"(module names include {names[:8]})",
            stacklevel=3,
        )


def overparameterize(
    model: nn.Module,
    depth: int = 2,
    width: float = 1.0,
    include: type | tuple[type, ...] = _DEFAULT_INCLUDE,
    exclude: str | type | Iterable[str | type] = (),
    preserve: bool = False,
    init: str = "paper",
    progress: bool | None = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, OverparamReport]:
    """Replace the ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` by over-parameterized ones, in place.

    Only layers whose type is exactly one of ``include`` are replaced. A subclass (timm's
    ``StdConv2d`` standardizes its weight in ``forward``, ``Conv2dSame`` pads in ``forward``) is a
    different function of its weight, so it is skipped unless named in ``include``. Layers with a
    tied weight (a head sharing an embedding's matrix) or a parametrized one (``weight_norm``,
    ``torch.nn.utils.parametrize``) are skipped too, which keeps the tie or the parametrization,
    and so are uninitialized lazy layers. Every layer holding a weight that is not replaced is
    listed with the reason in the report, logged (logger ``fastrank.layers``, INFO) and, unless
    excluded by the caller, named in one ``UserWarning``.

    Args:
        model: any module; itself replaced (and returned) if it is a matching layer.
        depth: factors per replaced layer. Convolutions keep their kernel on the first factor and
            get 1x1 factors after it, so the collapsed kernel size is unchanged.
        width: hidden size as a multiple of each layer's output size.
        include: layer types to replace, matched exactly: ``nn.Linear``, ``nn.Conv2d`` or
            subclasses of them named explicitly (replaced as if plain); one type or a tuple.
        exclude: qualified module names (``"head"``, ``"features.3"``; a name excludes its
            children too) or module types (matched with ``isinstance``) to leave alone; one name
            or type, or an iterable of them. An entry of ``exclude``, or a type given in
            ``include``, that matches no module of the model is named in a ``UserWarning``
            (a misspelt name would otherwise replace the layer silently).
        preserve: factor each existing weight so the model computes the same function (a
            balanced split, see below), then run each replaced layer and its replacement on a
            probe input: ``ValueError`` naming the layer if the outputs differ beyond rounding or
            when a bottleneck is narrower than the weight's rank.
        init: without ``preserve``, how new layers are initialized. ``"paper"`` (default): every
            factor Kaiming-normal as in Huh et al. (gain 1, sqrt(2) on the last; the collapsed
            weight's scale then differs from the architecture's own init). ``"match"``: the same
            factors scaled alike so the collapsed weight's mean square equals that of the
            replaced layer's weight, whose bias is kept.
        progress: show a per-layer progress bar on stderr (tqdm when installed). ``None``: only
            with ``preserve=True`` on models with more than 2^24 weight elements to factor.
        return_report: also return the :class:`OverparamReport`.

    Returns:
        the model (or ``(model, report)``), with the new layers on the device and dtype of the
        layers they replace.

    ``preserve=True`` needs no SVD when every hidden width is at least ``min(out, in)`` (the
    eigendecomposition of the smaller Gram, in fp32 for large fp32 / half weights: the three
    layers of vgg11's classifier in 38.5 s on a 2-core CPU); a bottleneck takes an fp64 SVD.
    """
    _check_positive_int("depth", depth)
    include_given = include is not _DEFAULT_INCLUDE
    exclude = (exclude,) if isinstance(exclude, (str, type)) else tuple(exclude)
    include = (include,) if isinstance(include, type) else tuple(include)
    for kind in include:
        if not (isinstance(kind, type) and issubclass(kind, (nn.Linear, nn.Conv2d))):
            raise ValueError(f"include may only hold nn.Linear / nn.Conv2d types, got {kind!r}")
    for entry in exclude:
        if not isinstance(entry, (str, type)):
            raise TypeError(
                f"exclude entries must be module names (str) or module types, got {entry!r} "
                f"({type(entry).__name__})"
            )
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    owners: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(param_name)

    report = OverparamReport()
    plan: list[tuple[str, nn.Module]] = []
    excluded: list[tuple[str, str, str]] = []

    def visit(module: nn.Module, name: str) -> None:
        if isinstance(module, _OverparamBase):
            return
        if _matches(name, module, exclude):
            layers = [(f"{name}.{n}".strip("."), m) for n, m in module.named_modules()]
            excluded.extend(
                (n, type(m).__name__, "excluded") for n, m in layers if _has_weight_matrix(m)
            )
            return
        candidate = type(module) in include or isinstance(module, (nn.Linear, nn.Conv2d))
        if candidate or _has_weight_matrix(module):
            reason = _skip_reason(module, include, owners, name)
            if reason is None:
                plan.append((name, module))
                return
            report.skipped.append((name, type(module).__name__, reason))
            if parametrize.is_parametrized(module):
                return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    _warn_unmatched(model, exclude, include if include_given else ())
    elements = sum(layer.weight.numel() for _, layer in plan)
    show = progress if progress is not None else preserve and elements > _PROGRESS_ELEMENTS
    update, close = _progress_bar(len(plan), bool(show))
    replacements: dict[str, nn.Module] = {}
    try:
        for done, (name, layer) in enumerate(plan):
            update(done, name)
            where = repr(name) if name else "the top-level module"
            kind = type(layer).__name__
            if preserve or init == "match":
                _check_finite_weight(layer, "preserve=True" if preserve else "init='match'", f"{where} ({kind})")
            try:
                replacement = _replacement_for(layer, depth, width)
                if preserve:
                    _copy_preserved(layer, replacement, where)
                    _check_same_function(layer, replacement, where)
                elif init == "match":
                    _match_init_scale(layer, replacement)
            except Exception as error:
                if isinstance(error, ValueError) and "preserve=True" in str(error):
                    raise  # already names the layer
                message = f"overparameterize: layer {where} ({kind}): {error}"
                try:
                    named = type(error)(message)
                except Exception:
                    named = RuntimeError(message)
                raise named from error
            replacements[name] = replacement
            report.replaced.append((name, kind))
        update(len(plan), "")
    finally:
        close()
    for name, replacement in replacements.items():
        if not name:
            model = replacement
            continue
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)

    report.skipped.extend(excluded)
    _log.info("%s", report)
    unexpected = [entry for entry in report.skipped if entry[2] not in ("excluded", "not in include")]
    if unexpected:
        listed = "; ".join(f"{n or '(top level)'} ({k}): {why}" for n, k, why in unexpected[:8])
        more = f"; and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        warnings.warn(
            f"overparameterize left {len(unexpected)} layers with weights as they are: {listed}{more} "
            f"(return_report=True lists them all)",
            stacklevel=2,
        )
    return (model, report) if return_report else model


def _plain_from(layer: _OverparamBase) -> nn.Module:
    with torch.no_grad():
        weight, bias = collapsed_parameters_of(layer)  # gathered when FSDP2 has sharded the layer
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
    never imported fastrank. Layers sharded by FSDP2 (``fully_shard``) are gathered
    (:func:`fastrank.sharded.collapsed_parameters_of`): every rank must call ``collapse``, and each
    gets plain layers with the full weights. Works in place; returns the model (or the replacement if ``model``
    itself is an over-parameterized layer).
    """
    if isinstance(model, _OverparamBase):
        return _plain_from(model)
    for child_name, child in list(model.named_children()):
        new = collapse(child)
        if new is not child:
            setattr(model, child_name, new)
    return model
