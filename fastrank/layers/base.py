"""What every over-parameterized layer shares: argument checks, the factors' init, the eval cache
of the collapsed parameters and the rules for when it may serve a call."""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import threading
from collections.abc import Callable, Collection

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ..chain import _transformed
from ..rank.common import _is_dtensor
from ..sharded import collapsed_parameters_of


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

# The size a symbolic one is costed as when a layer picks its association, where the tracer shows it
# as a SymInt (torch.export's non-strict tracing of a Dim; Dynamo shows its symbolic sizes as ints,
# and a comparison with them is a guard): the large-size choice, made without a guard on the size
# (which torch.export rejects for a dynamic dim), one program for every size.
_SYMBOLIC_SIZE = 1 << 16


def _costed_size(n: int | torch.SymInt) -> int:
    """``n``, or :data:`_SYMBOLIC_SIZE` for a size the tracer shows as a ``torch.SymInt``."""
    return n if type(n) is int else _SYMBOLIC_SIZE


def _factor_getter(depth: int) -> Callable[[dict], tuple]:
    """``items(params)``: the factors ``params["0"] .. params[str(depth - 1)]`` of a ParameterList's
    parameter dict as a tuple, in index order whatever the dict's order (``torch.nn.utils.prune``'s
    ``remove`` re-inserts a factor last), in one C call; KeyError where one is missing."""
    if depth == 1:
        return _first_factor
    return operator.itemgetter(*(str(j) for j in range(depth)))


def _first_factor(params: dict) -> tuple:
    """:func:`_factor_getter` of one factor (an ``itemgetter`` of one key returns no tuple)."""
    return (params["0"],)


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
    map: 0.9 us for four factors on a 2-core Xeon with everything in cache, about 1.7 us inside a
    layer call between other work (it reads each factor's tensor, version counter and storage). Identity needs the cached tensors alive,
    so the cache holds them (``torch.utils.swap_tensors`` refuses tensors with weak references).
    The writes no check sees are an in-place write through ``tensor.data`` within an eval window
    (``p.data.add_(...)`` outside an optimizer) and the replay of a CUDA graph that updates the
    parameters (a captured optimizer step runs no hook and bumps no counter): call
    ``clear_cache()`` (or ``eval()``) after them.

    Under a ``torch.func`` transform it does not store (the tensors may be its wrappers, without
    storage). While the current stream captures a CUDA graph the cache neither serves nor stores:
    the graph computes the collapsed parameters from the parameters' memory at every replay, as a
    graph of ``nn.Linear`` reads its weight's. A cached weight in a graph would stay the one of the
    capture when an optimizer later updates the parameters in place between replays.
    """

    __slots__ = ("tensors", "state", "pins", "steps", "value", "on_cuda")

    def __init__(self) -> None:
        self.tensors: tuple[Tensor, ...] = ()  # empty until filled: no layer has fewer than one factor
        self.state: tuple[int, ...] = ()  # the version counters of ``tensors``, then their addresses
        self.pins: tuple[Tensor, ...] = ()
        self.steps = -1
        self.value: tuple[Tensor, Tensor | None] | None = None
        self.on_cuda = False

    def fresh(self, tensors: Collection[Tensor]) -> bool:
        """Whether ``value`` was made of exactly ``tensors``, unchanged since, and may serve now."""
        cached = self.tensors
        # Versions and addresses in one tuple: one comparison instead of two (0.04 us of the
        # check's 0.9 us at four factors, 2-core Xeon).
        return (
            self.steps == _optimizer_steps
            and len(tensors) == len(cached)
            and all(map(_IS, tensors, cached))
            and (*map(_VERSION, cached), *map(_DATA_PTR, cached)) == self.state
            and not (self.on_cuda and _capturing())
        )

    def store(self, tensors: Collection[Tensor], value: tuple[Tensor, Tensor | None]) -> None:
        """Keep ``value``, made of ``tensors`` (not while a CUDA graph is being captured, nor under a
        ``torch.func`` transform: ``vmap`` over stacked parameters, as in model ensembling with
        ``functional_call``, passes tensors without storage, whose wrappers must not outlive it)."""
        if (value[0].is_cuda and _capturing()) or _transformed():
            return
        self.tensors = tuple(tensors)
        self.state = (*map(_VERSION, self.tensors), *map(_DATA_PTR, self.tensors))
        self.pins = tuple(t.detach() for t in self.tensors)
        self.steps = _optimizer_steps
        self.value = value
        self.on_cuda = value[0].is_cuda


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (called for CUDA tensors only)."""
    return torch.cuda.is_current_stream_capturing()


def _clear_after_load(module: _OverparamBase, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: drop the cache; accept checkpoints made before
    ``residual_interval`` was saved (they cannot say whether the layer had skips)."""
    module.clear_cache()
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.rpartition(".")[2] == "residual_interval"]:
        missing.remove(key)


# Per thread, the tensors read once for each layer call under way whose factors or bias are
# parametrized (see _OverparamBase._reading_once): id(layer) -> {"factors": [...], "bias": ...}.
_CALL_READS = threading.local()


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
        """Per-call constants derived from the hyper-parameters (recomputed on unpickling); here
        ``_factor_items``, which reads the factors from the list's dict in order."""
        self._factor_items = _factor_getter(self.depth)

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
        """``[W_1, ..., W_L]``: read from the ParameterList's dict by key (:func:`_factor_getter`), as
        iterating the list cost 7 us a call (depth 4, 2-core Xeon) against 0.1 us. Iterated where
        the dict lacks one: a factor is then a plain tensor attribute, as in an ``nn.DataParallel``
        replica (``torch.nn.parallel.replicate`` sets copies whose gradients autograd carries back
        to the module's) and under FSDP1 without ``use_orig_params`` (views of its gathered flat
        parameter), or a property of ``torch.nn.utils.parametrize`` (``orthogonal``,
        ``spectral_norm``, a user's own), computed at each read. The list's forward pre-hooks run
        first, as they would if the list were called (it never is): ``torch.nn.utils.prune``'s,
        which set a pruned factor to its original times its mask. Within a call that reads them
        once (:meth:`_reading_once`), every read after the first returns the first's tensors.
        Traced (torch.compile), the list is iterated too: Dynamo traces no ``itemgetter``, and the
        cost is the trace's."""
        factors = self._modules["factors"]
        hooks = factors._forward_pre_hooks
        if not hooks and not torch.compiler.is_compiling():
            try:
                return [*self._factor_items(factors._parameters)]
            except KeyError:
                pass
        reads = self._call_reads()
        if reads is not None:
            if "factors" not in reads:
                reads["factors"] = self._read_factors(factors)
            return [*reads["factors"]]
        return self._read_factors(factors)

    @staticmethod
    def _read_factors(factors: nn.ParameterList) -> list[Tensor]:
        for hook in [*factors._forward_pre_hooks.values()]:
            hook(factors, ())
        return list(factors)  # Dynamo of torch 2.11 cannot trace [*factors] (it can list())

    def _bias_parameter(self) -> Tensor | None:
        """The ``bias`` parameter, or None: read from the module's dict, else as an attribute (see
        :meth:`_factor_list`)."""
        try:
            return self._parameters["bias"]
        except KeyError:
            pass
        reads = self._call_reads()
        if reads is None:
            return self.bias
        if "bias" not in reads:
            reads["bias"] = self.bias
        return reads["bias"]

    def _parametrized(self) -> bool:
        """Whether a factor or the bias is under ``torch.nn.utils.parametrize`` in an eager call."""
        return (
            ("parametrizations" in self._modules["factors"]._modules or "parametrizations" in self._modules)
            and not torch.compiler.is_compiling()
        )

    def _call_reads(self) -> dict | None:
        """This thread's reads of the call under way (:meth:`_reading_once`), or None (always while
        traced: Dynamo would break the graph at the thread-local)."""
        if torch.compiler.is_compiling():
            return None
        calls = getattr(_CALL_READS, "calls", None)
        return calls.get(id(self)) if calls else None

    @contextlib.contextmanager
    def _reading_once(self):
        """Within the block, this thread reads the factors and the bias once: a parametrized tensor
        is computed at each read (``orthogonal``: a matrix exponential; ``spectral_norm`` advances
        its power iteration at each read in training), and a call's general path reads them up to
        six times (the input check, the state tensors, the costs, the collapse, the chain), so that
        a call computes each parametrization once, as ``nn.Linear`` does its weight's, every read
        the same tensor (gradients of one computation). Per thread and per layer, unlike
        ``parametrize.cached()``, whose one process-wide cache would serve other threads' reads
        too; a block within a block of the same layer reuses the outer one's reads."""
        calls = getattr(_CALL_READS, "calls", None)
        if calls is None:
            calls = _CALL_READS.calls = {}
        key = id(self)
        if key in calls:
            yield
            return
        calls[key] = {}
        try:
            yield
        finally:
            del calls[key]

    def _replicate_for_data_parallel(self) -> _OverparamBase:
        # nn.DataParallel's replica (torch.nn.parallel.replicate) starts as a shallow copy of this
        # module's __dict__: without a cache of its own it would fill this module's with its
        # parameter copies, from the replicas' threads at once. It lives for one forward.
        replica = super()._replicate_for_data_parallel()
        replica._cache = _CollapseCache()
        return replica

    def _state_tensors(self) -> list[Tensor]:
        """Every tensor the collapsed parameters are made of, factors first.

        Read from the modules' dicts rather than ``self.parameters()`` / ``buffers()``: the eval
        path calls this on every forward, and the generic walk cost about 10 us a call.
        """
        tensors = self._factor_list()
        bias = self._bias_parameter()
        if bias is not None:
            tensors.append(bias)
        norms = self._modules.get("norms")
        if norms is not None:
            for norm in norms:  # BatchNorm1d: its affine parameters read as attributes (see _factor_list)
                tensors += [norm.weight, norm.bias, *norm._buffers.values()]
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
            return self._factor_list()
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
                value = (weight.contiguous(), bias)
                cache.store(tensors, value)
        else:
            value = cache.value
        weight, bias = value
        return weight, self._bias_parameter() if self._bias_is_own else bias

    def _collapsed(self, cache_usable: bool | None = None) -> tuple[Tensor, Tensor | None]:
        if self._parametrized():
            with self._reading_once():
                return self._collapsed_now(cache_usable)
        return self._collapsed_now(cache_usable)

    def _collapsed_now(self, cache_usable: bool | None) -> tuple[Tensor, Tensor | None]:
        if _is_dtensor(self._factor_list()[0]):  # FSDP2 outside forward: gather the factors
            return collapsed_parameters_of(self)
        if self._cache_usable() if cache_usable is None else cache_usable:
            return self._cached_parameters()
        return self.collapsed_parameters()

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_cache", None)  # made anew on unpickling: a pickle names no cache class
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_cache", _CollapseCache())
        state.setdefault("_path_choices", {})  # absent from layers pickled by older versions
        super().__setstate__(state)
        if _clear_after_load not in self._load_state_dict_post_hooks.values():  # older pickles
            self.register_load_state_dict_post_hook(_clear_after_load)
        self._derive_constants()
