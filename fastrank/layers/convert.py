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
from .convolution import OverparamConv2d
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
