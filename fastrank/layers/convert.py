"""``overparameterize`` and ``collapse``: swapping a model's layers for over-parameterized ones and
back, with the report of what was left as it is and why."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..sharded import collapsed_parameters_of
from .base import _check_positive_int, _OverparamBase
from .convolution import OverparamConv1d, OverparamConv2d
from .hf import OverparamConv1D, is_hf_conv1d
from .linear import OverparamLinear
from .preserve import (
    _check_finite_weight,
    _check_same_function,
    _copy_preserved,
    _match_init_scale,
)

__all__ = ["OverparamReport", "overparameterize", "collapse"]

_log = logging.getLogger("fastrank.layers")


def _matches(name: str, module: nn.Module, patterns: Iterable[object]) -> bool:
    for pattern in patterns:
        if isinstance(pattern, str) and (name == pattern or name.startswith(pattern + ".")):
            return True
        if isinstance(pattern, type) and isinstance(module, pattern):
            return True
    return False


# The plain layer types fastrank replaces (and transformers' Conv1D, recognized by name), each
# with its over-parameterized counterpart.
_REPLACED = {nn.Linear: OverparamLinear, nn.Conv1d: OverparamConv1d, nn.Conv2d: OverparamConv2d}
_REPLACED_NAMES = "nn.Linear, nn.Conv1d, nn.Conv2d and transformers' Conv1D"


def _base_kind(module: nn.Module) -> type | str | None:
    """The replaceable layer type ``module`` is or derives from (``"Conv1D"`` for transformers'), or None."""
    for base in _REPLACED:
        if isinstance(module, base):
            return base
    return "Conv1D" if is_hf_conv1d(module, exact=False) else None


def _is_linear_map(module: nn.Module) -> bool:
    """A layer that is a linear map of its own weight: what a user may expect to see replaced
    (embeddings, norms and attention blocks are not, and are never reported)."""
    return (
        _base_kind(module) is not None
        or isinstance(module, (nn.modules.conv._ConvNd, nn.Bilinear))
        or (isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params())
    )


def _replacement_for(layer: nn.Module, depth: int, width: float) -> _OverparamBase:
    weight = layer.weight
    factory = {"device": weight.device, "dtype": weight.dtype}
    kind = _base_kind(layer)
    if kind == "Conv1D":
        return OverparamConv1D(layer.nf, layer.nx, depth=depth, width=width, **factory)
    if kind is nn.Linear:
        return OverparamLinear(
            layer.in_features, layer.out_features, depth=depth, width=width,
            bias=layer.bias is not None, **factory,
        )
    ones = (1,) * len(layer.kernel_size)
    return _REPLACED[kind](
        layer.in_channels, layer.out_channels,
        kernel_sizes=[tuple(layer.kernel_size)] + [ones] * (depth - 1),
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
        bias=layer.bias is not None, padding_mode=layer.padding_mode, width=width, **factory,
    )


@dataclass
class OverparamReport:
    """What :func:`overparameterize` did to a model.

    Attributes:
        replaced: ``(name, type name)`` of every replaced layer, in module order.
        skipped: ``(name, type name, reason)`` of every linear or convolutional layer left as it
            is (excluded, not in ``include``, a subclass or type fastrank does not replace, a tied
            or parametrized weight, an uninitialized lazy layer), each reason saying what to do.
            Layers that are not linear maps of a weight (embeddings, norms) are not listed.
    """

    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"overparameterize: replaced {len(self.replaced)} layers, skipped {len(self.skipped)}"]
        lines += [f"  replaced {name or '(top level)'} ({kind})" for name, kind in self.replaced]
        lines += [f"  skipped  {name or '(top level)'} ({kind}): {why}" for name, kind, why in self.skipped]
        return "\n".join(lines)


def _included(module: nn.Module, include: tuple[type, ...], default: bool) -> bool:
    """``module``'s type is exactly one of ``include`` (by default also transformers' Conv1D)."""
    return type(module) in include or (default and is_hf_conv1d(module))


def _skip_reason(
    module: nn.Module, include: tuple[type, ...], default: bool, owners: dict[int, list[str]], name: str
) -> str | None:
    """Why ``module`` (a linear map, :func:`_is_linear_map`) is not replaced, with what to do."""
    kind = type(module).__name__
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialized lazy layer: run one forward pass first (it then becomes a plain layer)"
    if parametrize.is_parametrized(module):
        return (
            "parametrized weight (torch.nn.utils.parametrize): a replacement would drop the "
            "parametrization; remove it first (parametrize.remove_parametrizations) to replace the layer"
        )
    if not _included(module, include, default):
        base = _base_kind(module)
        if type(module) in _REPLACED or is_hf_conv1d(module):
            return "not in include"
        if base is not None:
            base_name = "transformers' Conv1D" if base == "Conv1D" else f"nn.{base.__name__}"
            return (
                f"subclass of {base_name} (its forward may differ); pass "
                f"include=(..., {kind}) to replace it anyway"
            )
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return (
                "transposed convolution: fastrank composes chains of forward convolutions only; "
                "exclude it to silence this"
            )
        return f"type not replaced by fastrank ({_REPLACED_NAMES} are); exclude it to silence this"
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
            return (
                f"{attribute} tied to {', '.join(repr(n) for n in others)}; replacing it would untie "
                f"them: untie them first to replace it (Hugging Face models: tie_word_embeddings=False "
                f"in the config), or exclude it to silence this"
            )
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


# Every type fastrank replaces; transformers' Conv1D too (matched by name: no import of transformers).
_DEFAULT_INCLUDE = tuple(_REPLACED)


def _replaceable_type(kind: object) -> bool:
    return isinstance(kind, type) and (
        issubclass(kind, tuple(_REPLACED))
        or any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in kind.__mro__)
    )


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
    """Replace the linear and convolutional layers of ``model`` by over-parameterized ones, in place.

    ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and transformers' ``Conv1D`` (GPT-2's projections,
    weight stored ``(in, out)``) become :class:`OverparamLinear`, :class:`OverparamConv1d`,
    :class:`OverparamConv2d` and :class:`OverparamConv1D`. Only layers whose type is exactly one
    of ``include`` are replaced. A subclass (timm's
    ``StdConv2d`` standardizes its weight in ``forward``, ``Conv2dSame`` pads in ``forward``) is a
    different function of its weight, so it is skipped unless named in ``include``. Layers with a
    tied weight (a head sharing an embedding's matrix) or a parametrized one (``weight_norm``,
    ``torch.nn.utils.parametrize``) are skipped too, which keeps the tie or the parametrization,
    and so are uninitialized lazy layers. Every linear or convolutional layer that is not replaced
    is listed with the reason (and what to do) in the report, logged (logger ``fastrank.layers``,
    INFO) and, unless excluded or left out of ``include`` by the caller, named in one
    ``UserWarning``; embeddings and norms are not linear maps of a weight and are not listed.

    Args:
        model: any module; itself replaced (and returned) if it is a matching layer.
        depth: factors per replaced layer. Convolutions keep their kernel on the first factor and
            get size-1 factors after it, so the collapsed kernel size is unchanged.
        width: hidden size as a multiple of each layer's output size.
        include: layer types to replace, matched exactly: ``nn.Linear``, ``nn.Conv1d``,
            ``nn.Conv2d``, transformers' ``Conv1D`` or subclasses of them named explicitly
            (replaced as if plain); one type or a tuple. Default: the four plain types.
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
    default = include is _DEFAULT_INCLUDE
    exclude = (exclude,) if isinstance(exclude, (str, type)) else tuple(exclude)
    include = (include,) if isinstance(include, type) else tuple(include)
    for kind in include:
        if not _replaceable_type(kind):
            raise ValueError(f"include may only hold {_REPLACED_NAMES} types (or subclasses), got {kind!r}")
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
                (n, type(m).__name__, "excluded") for n, m in layers if _is_linear_map(m)
            )
            return
        if _is_linear_map(module):
            reason = _skip_reason(module, include, default, owners, name)
            if reason is None:
                plan.append((name, module))
                return
            report.skipped.append((name, type(module).__name__, reason))
            if parametrize.is_parametrized(module):
                return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    _warn_unmatched(model, exclude, () if default else include)
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
            f"overparameterize left {len(unexpected)} layers as they are: {listed}{more} "
            f"(return_report=True lists them all)",
            stacklevel=2,
        )
    return (model, report) if return_report else model


def _plain_from(layer: _OverparamBase) -> nn.Module:
    with torch.no_grad():
        weight, bias = collapsed_parameters_of(layer)  # gathered when FSDP2 has sharded the layer
    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, OverparamConv1D):
        plain = layer.to_plain(weight, bias)
        plain.train(layer.training)
        return plain
    if isinstance(layer, OverparamLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, **factory)
    else:
        conv = nn.Conv1d if isinstance(layer, OverparamConv1d) else nn.Conv2d
        plain = conv(
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
    """Replace every over-parameterized layer of ``model`` by a plain layer: ``nn.Linear``,
    ``nn.Conv1d``, ``nn.Conv2d``, or transformers' ``Conv1D`` (same ``(nx, nf)`` layout) for
    :class:`OverparamConv1D`.

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
