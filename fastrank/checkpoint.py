"""Rank report of a checkpoint: every 2-D and 4-D weight, all layers batched by shape.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a pickle that would run code is
refused, never executed. A few harmless globals that training scripts save beside the weights
are allowed (:data:`SAFE_GLOBALS`: ``argparse.Namespace``, numpy scalars and dtypes); anything
else is named in the error, and a file the user trusts can be loaded fully with
``trusted=True`` (``fastrank rank --trust-checkpoint``). ``.safetensors`` files are read with the
``safetensors`` package (the ``safetensors`` extra). A Hugging Face ``save_pretrained`` folder
is read through its weights file or its sharded index (:data:`MODEL_FOLDER_FILES`).

Over-parameterized layers (``<prefix>.factors.<j>`` entries) are reported as their collapsed
weight: the ``collapsed_parameters()`` of the ``OverparamLinear`` (or ``OverparamConv1D``, whose
entries are the same), ``OverparamConv1d`` or ``OverparamConv2d`` rebuilt from the entries, so
that the eval-mode batch norms of a ``batch_norm=True`` layer (``norms.<j>.*``) and the skips of a
``residual=True`` layer (its ``residual_interval`` buffer) are folded in. A layer whose entries do
not say how to collapse it is left out with a warning that says why. Residual layers saved
before fastrank wrote ``residual_interval`` cannot be told from plain chains and are read as
plain chains (the product of the factors).

:func:`load_overparameterized` goes the other way: it puts the over-parameterized layers a
checkpoint holds back into the plain architecture the model was built from and loads the state.
Both derive a layer's configuration from its entries in one place (``_layer_config``).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .layers import RESIDUAL_INTERVAL, OverparamConv1D, OverparamConv1d, OverparamConv2d, OverparamLinear, _OverparamBase
from .layers.hf import is_hf_conv1d
from .rank import effective_ranks

__all__ = ["CheckpointError", "MODEL_FOLDER_FILES", "SAFE_GLOBALS", "load_overparameterized", "load_weights", "rank_report"]


def _numpy_globals() -> list[object]:
    """numpy's scalar constructor (``numpy._core`` in numpy 2, ``numpy.core`` before) and dtypes."""
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [
        cls for name, cls in vars(getattr(np, "dtypes", object)).items()
        if isinstance(cls, type) and name.endswith("DType")
    ]
    return [core.multiarray.scalar, np.dtype, *dtype_classes]


# Globals a weights-only load may construct: plain data that runs no code of the file.
# argparse.Namespace: the `args` of torchvision / timm train.py checkpoints; numpy scalars and
# dtypes: metrics such as `best_acc1` saved as np.float64.
SAFE_GLOBALS: list[object] = [argparse.Namespace, *_numpy_globals()]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

class CheckpointError(ValueError):
    """A file that cannot be reported on, with a one-line reason."""


def _flatten(obj: object, prefix: str = "") -> dict[str, Tensor]:
    """Tensors of nested dicts / lists, keyed by dotted path."""
    if isinstance(obj, Tensor):
        return {prefix: obj}
    if isinstance(obj, torch.nn.Module):  # a whole pickled model (trusted loads only)
        obj = obj.state_dict()
    items: list[tuple[str, object]] = []
    if isinstance(obj, Mapping):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    found: dict[str, Tensor] = {}
    for key, value in items:
        found.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return found


# A state_dict entry of an over-parameterized layer, relative to the layer.
_LAYER_ENTRY = re.compile(r"factors\.\d+|norms\.\d+\.\w+|bias|residual_interval")


def _layer_entry(name: str, prefixes: set[str]) -> tuple[str, str] | None:
    """``(prefix, entry)`` when ``name`` is an entry of the layer at one of ``prefixes``."""
    parts = name.split(".")
    for count in range(1, min(3, len(parts)) + 1):  # bias, factors.<j>, norms.<j>.<name>
        prefix, entry = ".".join(parts[:-count]), ".".join(parts[-count:])
        if prefix in prefixes and _LAYER_ENTRY.fullmatch(entry):
            return prefix, entry
    return None


def _width_for(hidden: int, out: int) -> float:
    """A ``width`` with ``int(out * width) == hidden`` (``hidden / out`` alone can round below:
    ``7 * (61 / 7) < 61``)."""
    width = hidden / out
    while int(out * width) < hidden:
        width = math.nextafter(width, math.inf)
    return width


# The over-parameterized layers by the number of dimensions of their factors.
_BY_FACTOR_DIMS: dict[int, type[OverparamLinear] | type[OverparamConv1d] | type[OverparamConv2d]] = {
    2: OverparamLinear, 3: OverparamConv1d, 4: OverparamConv2d,
}


def _factors_of(entries: Mapping[str, Tensor]) -> list[Tensor]:
    """``[W_1, ..., W_L]`` from a layer's entries (``factors.<j>``, names relative to the layer)."""
    return [entries[f"factors.{j}"] for j in sorted(
        int(name.rsplit(".", 1)[1]) for name in entries if name.startswith("factors.")
    )]


def _replacement_class(plain: torch.nn.Module) -> type[_OverparamBase] | None:
    """The over-parameterized layer that ``overparameterize`` puts in place of ``plain``; None
    for a module it does not replace."""
    if is_hf_conv1d(plain):
        return OverparamConv1D
    for base, replacement in ((torch.nn.Linear, OverparamLinear), (torch.nn.Conv1d, OverparamConv1d),
                              (torch.nn.Conv2d, OverparamConv2d)):
        if isinstance(plain, base):
            return replacement
    return None


def _layer_config(
    entries: Mapping[str, Tensor], plain: torch.nn.Module | None = None
) -> tuple[type[_OverparamBase], dict[str, object]]:
    """The over-parameterized layer that saved ``entries`` (names relative to the layer), as its
    class and constructor arguments (without device and dtype).

    From the entries: the depth and hidden width of the factors, a convolution's kernel sizes
    from their shapes, ``batch_norm`` from ``norms.<j>.*`` and ``residual`` from the
    ``residual_interval`` buffer. The sizes, ``bias`` and a convolution's groups come from the
    factors and a ``bias`` entry, or, given ``plain`` (the layer the over-parameterized one
    replaced), from ``plain``, with its stride, padding, dilation and padding mode; the class is
    then the one ``overparameterize`` puts in place of ``plain`` (``Conv1D`` -> ``OverparamConv1D``).
    Whether the entries fit the layer built is :func:`_check_entries`'s question.

    Raises:
        ValueError: factors of mixed or other dimensions than 2, 3, 4, or not those of ``plain``'s
            replacement.
    """
    factors = _factors_of(entries)
    ndims = sorted({factor.dim() for factor in factors})
    if len(ndims) != 1 or ndims[0] not in _BY_FACTOR_DIMS:
        raise ValueError(
            f"factors of {ndims} dimensions, expected all 2-D (OverparamLinear), all 3-D "
            f"(OverparamConv1d) or all 4-D (OverparamConv2d)"
        )
    kind = _BY_FACTOR_DIMS[ndims[0]]
    geometry: dict[str, object] = {}  # a convolution's, beyond its sizes
    residual = "residual_interval" in entries
    batch_norm = any(name.startswith("norms.") for name in entries)
    if plain is None:
        bias = "bias" in entries
        out = factors[-1].shape[0]
        # factors[1] is (n_2, n_1 / groups, ...) and factors[0] is (n_1, n_0 / groups, ...).
        groups = factors[0].shape[0] // factors[1].shape[1] if kind is not OverparamLinear and len(factors) > 1 else 1
        sizes = (factors[0].shape[1] * groups, out)
        geometry["groups"] = groups
    else:
        replacement = _replacement_class(plain)
        expected_dims = {OverparamConv1d: 3, OverparamConv2d: 4}.get(replacement, 2)
        if ndims[0] != expected_dims:
            raise ValueError(
                f"its factors are {ndims[0]}-D (an {kind.__name__}'s); a {type(plain).__name__} becomes "
                f"{replacement.__name__}, whose factors are {expected_dims}-D"
            )
        kind, bias = replacement, plain.bias is not None
        if kind is OverparamConv1D:
            sizes = (plain.nx, plain.nf)
        elif kind is OverparamLinear:
            sizes = (plain.in_features, plain.out_features)
        else:
            sizes = (plain.in_channels, plain.out_channels)
            geometry = {"stride": plain.stride, "padding": plain.padding, "dilation": plain.dilation,
                        "groups": plain.groups, "padding_mode": plain.padding_mode}
        out = sizes[1]
    width = _width_for(factors[0].shape[0], out)
    if kind is OverparamConv1D:  # always a bias; no skips or norms (entries for them are unexpected)
        return kind, {"nf": out, "nx": sizes[0], "depth": len(factors), "width": width}
    if kind is OverparamLinear:
        return kind, {"in_features": sizes[0], "out_features": out, "depth": len(factors), "width": width,
                      "bias": bias, "residual": residual, "batch_norm": batch_norm}
    # no skips or norms in a convolution: entries for them are unexpected
    return kind, {"in_channels": sizes[0], "out_channels": out, "kernel_sizes": [tuple(f.shape[2:]) for f in factors],
                  "width": width, "bias": bias, **geometry}


def _check_entries(layer: _OverparamBase, entries: Mapping[str, Tensor], keys: bool = True) -> None:
    """Raise ValueError unless ``entries`` (names relative to ``layer``) are what ``layer`` saves
    (``keys``: each of them, no other), in its shapes, with skips over :data:`RESIDUAL_INTERVAL`
    factors; the message names the entries and the layer."""
    saved = layer.state_dict(keep_vars=True)
    described = f"{type(layer).__name__}({layer.extra_repr()})"
    missing = [name for name in saved if name not in entries]
    unexpected = [name for name in entries if name not in saved]
    if keys and missing:
        raise ValueError(f"it lacks {', '.join(missing)}, which {described} saves")
    if keys and unexpected:
        raise ValueError(f"it has {', '.join(unexpected)}, which {described} does not save")
    wrong = [
        f"{name} {tuple(entries[name].shape)} where it has {tuple(tensor.shape)}"
        for name, tensor in saved.items() if name in entries and entries[name].shape != tensor.shape
    ]
    if wrong:
        raise ValueError(f"size mismatch with {described}: {'; '.join(wrong)}")
    interval = entries.get("residual_interval")
    if interval is not None and "residual_interval" in saved and int(interval) != RESIDUAL_INTERVAL:
        raise ValueError(
            f"its residual skips span residual_interval={int(interval)} factors; this version of "
            f"fastrank builds skips over {RESIDUAL_INTERVAL}"
        )


def _rebuilt_layer(entries: dict[str, Tensor]) -> OverparamLinear | OverparamConv1d | OverparamConv2d:
    """The fastrank layer that saved ``entries`` (names relative to the layer), in float64, as
    :func:`_layer_config` derives it from the entries alone (an ``OverparamConv1D``'s entries give
    the ``OverparamLinear`` of the same factors).

    Built on the meta device and loaded with ``assign=True``: nothing is initialized or copied.

    Raises:
        ValueError: the entries are not exactly those of such a layer (the message says which).
    """
    kind, config = _layer_config(entries)
    layer = kind(**config, device="meta", dtype=torch.float64)
    _check_entries(layer, entries)
    layer.load_state_dict(
        {name: t.to(torch.float64) if t.is_floating_point() else t for name, t in entries.items()}, assign=True
    )
    return layer


def _collapse_factor_groups(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace the entries of each over-parameterized layer (``<prefix>.factors.<j>`` with its
    ``bias``, ``norms.<j>.*`` and ``residual_interval``) by its collapsed ``<prefix>.weight``, in
    place of its first entry (the order of the checkpoint is kept).

    The weight is the rebuilt layer's ``collapsed_parameters()``: skips and eval-mode batch norms
    included. A layer whose entries do not say how to collapse it is left out with a warning.
    """
    prefixes: set[str] = set()
    for name in tensors:
        parts = name.rsplit(".", 2)
        if len(parts) >= 2 and parts[-2] == "factors" and parts[-1].isdigit():
            prefixes.add(parts[0] if len(parts) == 3 else "")
    groups: dict[str, dict[str, Tensor]] = {}
    order: list[tuple[str, str]] = []  # ("tensor", name) or ("group", prefix)
    for name, tensor in tensors.items():
        found = _layer_entry(name, prefixes)
        if found is None:
            order.append(("tensor", name))
            continue
        prefix, entry = found
        if prefix not in groups:
            order.append(("group", prefix))
        groups.setdefault(prefix, {})[entry] = tensor
    result: dict[str, Tensor] = {}
    for kind, key in order:
        if kind == "tensor":
            result[key] = tensors[key]
            continue
        name = f"{key}.weight" if key else "weight"
        try:
            layer = _rebuilt_layer(groups[key])
        except (ValueError, RuntimeError, TypeError) as error:  # a config or load_state_dict refusal
            warnings.warn(
                f"{name} is not reported: the factors of {key or 'the layer'} cannot be collapsed "
                f"from the checkpoint: {_one_line(error)}",
                stacklevel=3,
            )
            continue
        with torch.no_grad():  # a convolution's kernel as (out, in / groups * kernel size)
            weight = layer.collapsed_parameters()[0]
        result[name] = weight.reshape(weight.shape[0], -1)
    return result


def _is_safetensors(path: Path, head: bytes) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if path.suffix == ".safetensors":
        return True
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file; reading it needs the safetensors package "
            f"(pip install 'fastrank[safetensors]')"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors file ({_one_line(error)})") from None


def _one_line(error: BaseException) -> str:
    """The whole message of ``error`` on one line, without terminal escape codes."""
    text = " ".join(_ANSI.sub("", str(error)).split())
    return text or type(error).__name__


def _refusal(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """The reason a weights-only load refused ``path``: the globals it would have to construct."""
    unsafe: list[str] = []
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
            unsafe = [name for name in finder(str(path)) if name not in allowed]
        except Exception:
            unsafe = []
    if not unsafe:
        unsafe = re.findall(r"GLOBAL (\S+) was not an allowed global", _ANSI.sub("", str(error)))
    if unsafe:
        cause = (
            f"it holds Python objects a weights-only load does not construct, since loading them "
            f"may run code from the file: {', '.join(unsafe)}"
        )
    else:
        cause = f"a weights-only load refused it: {_one_line(error)}"
    return CheckpointError(
        f"{path} is not a checkpoint that can be loaded safely: {cause}. If you trust the file, "
        f"load it fully with --trust-checkpoint (load_weights(path, trusted=True))."
    )


# torch.save writes a zip archive; the legacy format is a pickle (protocol 2+ starts with 0x80).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
# A legacy torch.save file starts with five pickles (magic number, protocol, system info, the
# object, the storage keys); the storages' bytes follow.
_LEGACY_PICKLES = 5


def _pickles_end_early(path: Path) -> bool:
    """Whether the pickles at the start of a legacy ``torch.save`` file stop before their end."""
    with open(path, "rb") as f:
        try:
            for _ in range(_LEGACY_PICKLES):
                for _ in pickletools.genops(f):
                    pass
        except Exception:  # genops: ValueError at the end of the data, others on garbage
            return True
    return False


def _unreadable(path: Path, head: bytes, error: BaseException) -> CheckpointError:
    """Why ``torch.load`` failed on ``path``, a file whose ``head`` is a ``torch.save`` file's."""
    size = f"{path.stat().st_size} bytes"
    zipped = head.startswith(_ZIP_MAGIC)
    if zipped and zipfile.is_zipfile(path):
        return CheckpointError(
            f"{path} ({size}) is a zip archive that torch.load cannot read: damaged, or not written "
            f"by torch.save ({_one_line(error)})"
        )
    cause = (
        "has no zip directory at its end, which torch.save writes last" if zipped
        else f"torch.load fails ({_one_line(error)})"
    )
    kind = "zip archive" if zipped else "pickle"
    return CheckpointError(f"{path} is truncated or damaged ({size}): it starts as a torch.save {kind} but {cause}")


def _load_torch(path: Path, head: bytes, trusted: bool) -> object:
    if trusted:
        warnings.warn(
            f"loading {path} with weights_only=False: unpickling runs any code the file holds; "
            f"do this only for files from a source you trust",
            stacklevel=4,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise _unreadable(path, head, error) from None
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        if allow is None:
            return torch.load(path, map_location="cpu", weights_only=True)
        with allow(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A legacy pickle cut short can end inside a global's name ("GLOBAL to. was not allowed").
        if head.startswith(_PICKLE_MAGIC) and _pickles_end_early(path):
            raise _unreadable(path, head, error) from None
        raise _refusal(path, error) from None
    except Exception as error:  # torch.load raises many types for damaged files
        raise _unreadable(path, head, error) from None


def _load_file(path: Path, trusted: bool) -> object:
    """The object saved in ``path``: a safetensors file or a ``torch.save`` file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if _is_safetensors(path, head):
        return _load_safetensors(path)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return _load_torch(path, head, trusted)
    raise CheckpointError(
        f"{path} is not a PyTorch checkpoint (neither a zip archive, a pickle nor safetensors)"
    )


# What a Hugging Face ``save_pretrained`` folder holds, in the order transformers prefers them.
MODEL_FOLDER_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


def _load_shards(index: Path, trusted: bool) -> dict[str, Tensor]:
    """The tensors of a sharded checkpoint: every shard named by the index's ``weight_map``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f"{index} is not a sharded-checkpoint index: expected JSON with a \"weight_map\" of "
            f"tensor name -> shard file, as save_pretrained writes"
        ) from None
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        path = index.parent / str(shard)
        if not path.is_file():
            raise CheckpointError(f"{index} names the shard {shard}, which is not in {index.parent}")
        tensors.update(_flatten(_load_file(path, trusted)))
    return tensors


def _load_folder(folder: Path, trusted: bool) -> object:
    """The weights of a ``save_pretrained`` folder (:data:`MODEL_FOLDER_FILES`, first found)."""
    for name in MODEL_FOLDER_FILES:
        path = folder / name
        if path.is_file():
            return _load_shards(path, trusted) if name.endswith(".index.json") else _load_file(path, trusted)
    held = sorted(p.name for p in folder.iterdir())
    listing = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "")
    raise CheckpointError(
        f"{folder} is a folder without model weights: looked for {', '.join(MODEL_FOLDER_FILES)} "
        f"(a Hugging Face save_pretrained folder); it holds {listing or 'nothing'}"
    )


def load_weights(path: str | Path, trusted: bool = False) -> list[tuple[str, Tensor]]:
    """The 2-D and 4-D floating-point weights of a checkpoint or state_dict, as ``(name, matrix)``.

    Matrices are ``(out, in)``; conv kernels are flattened to ``(out, in/groups * kh * kw)``
    (``OverparamConv1d`` kernels too: ``(out, in/groups * k)``; 3-D weights of other modules are
    not taken, since a 3-D ``weight`` need not be a kernel).
    Entries named ``*weight`` are taken (embeddings and other weight matrices included), and
    over-parameterized layers are collapsed first (see the module docstring); one whose entries
    do not say how is left out with a ``UserWarning`` naming it and the reason.

    Args:
        path: a file written by ``torch.save`` (zip or legacy format: a state_dict, a training
            checkpoint holding one, or a whole pickled model), a ``.safetensors`` file, or a
            folder written by Hugging Face ``save_pretrained`` (its ``model.safetensors``,
            ``pytorch_model.bin`` or their sharded ``*.index.json``, see
            :data:`MODEL_FOLDER_FILES`).
        trusted: load a ``torch.save`` file with ``weights_only=False`` (warns): every object
            the pickle holds is constructed, which can run code from the file. Only for files
            from a trusted source; without it, objects beyond tensors, containers and
            :data:`SAFE_GLOBALS` are refused.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint, is truncated or damaged (the
            error names the file and its size), is refused by the weights-only load (the error
            names the globals it would have to construct), needs the missing safetensors
            package, or holds no weights; a folder holds none of :data:`MODEL_FOLDER_FILES` or
            lacks a shard its index names.
    """
    path = Path(path)
    if path.is_dir():
        obj = _load_folder(path, trusted)
    elif path.is_file():
        obj = _load_file(path, trusted)
    else:
        raise CheckpointError(f"no such file or folder: {path}")
    tensors = _collapse_factor_groups(_flatten(obj))
    weights = []
    for name, tensor in tensors.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf != "weight" or not tensor.is_floating_point() or tensor.dim() not in (2, 4):
            continue
        weights.append((name, tensor.detach().reshape(tensor.shape[0], -1)))
    if not weights:
        raise CheckpointError(f"{path} holds no 2-D or 4-D weight tensors")
    return weights


def rank_report(
    weights: list[tuple[str, Tensor]],
    method: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """One row per weight: name, shape, effective rank, spectral entropy, stable rank.

    All weights of one shape go through one batched call (see :func:`fastrank.effective_ranks`),
    the three metrics from one spectrum, on ``device`` (each shape group is moved there in turn).
    ``progress(done, total)`` is called per shape group.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (_, matrix) in enumerate(weights):
        groups.setdefault(tuple(matrix.shape), []).append(index)
    measured: list[dict | None] = [None] * len(weights)
    for done, indices in enumerate(groups.values(), start=1):
        # One batched call per shape (effective_ranks groups the same way), one spectrum each.
        for index, values in zip(indices, effective_ranks(
            [weights[i][1].to(device) for i in indices], metric="all", method=method
        )):
            measured[index] = values
        if progress is not None:
            progress(done, len(groups))
    return [
        {"name": name, "shape": list(matrix.shape), **{key: float(v) for key, v in values.items()}}
        for (name, matrix), values in zip(weights, measured)
    ]


# ---- loading a fastrank checkpoint into its plain architecture ---------------------------------------


def _read_state(source: Mapping[str, Tensor] | str | Path, trusted: bool) -> dict[str, Tensor]:
    """The flat ``name -> tensor`` state of ``source``: a mapping, a file or a folder (see load_weights)."""
    if isinstance(source, Mapping):
        return _flatten(dict(source))
    path = Path(source)
    if path.is_dir():
        return _flatten(_load_folder(path, trusted))
    if path.is_file():
        return _flatten(_load_file(path, trusted))
    raise CheckpointError(f"no such file or folder: {path}")


def _replace(model: torch.nn.Module, prefix: str, layer: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its submodule ``prefix`` replaced by ``layer`` (``layer`` itself for ``""``)."""
    if not prefix:
        return layer
    parent, _, child = prefix.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
    return model


def _listed(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def load_overparameterized(
    model: torch.nn.Module, source: Mapping[str, Tensor] | str | Path, strict: bool = True, trusted: bool = False
) -> torch.nn.Module:
    """Load a checkpoint of an over-parameterized model into its plain architecture, in place.

    Every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / transformers ``Conv1D`` of ``model`` whose
    name has ``<name>.factors.<j>`` entries in the checkpoint is replaced by the layer
    ``overparameterize`` would have put there, as the entries imply: the depth and hidden width
    of its factors, a convolution's kernel sizes from theirs, ``residual`` / ``batch_norm`` from
    ``residual_interval`` / ``norms.<j>.*`` entries; its sizes, bias, stride, padding, dilation,
    groups and padding mode are those of the layer it replaces, and so are its device, dtype (the
    checkpoint's values are cast to it) and training mode. Then the whole state is loaded. What ``overparameterize`` and training wrote
    (a ``Trainer`` checkpoint folder, a ``save_pretrained`` folder,
    ``torch.save(model.state_dict())``) comes back as it was saved; layers already
    over-parameterized and the other modules are loaded as they are.

    Args:
        model: the plain architecture, e.g. ``LlamaForCausalLM(config)`` (its own weights are
            replaced; built on any device and dtype).
        source: a state_dict (mapping of name -> tensor), a ``torch.save`` / ``.safetensors``
            file, or a folder holding one of :data:`MODEL_FOLDER_FILES` (``save_pretrained``, its
            sharded form, a Trainer ``checkpoint-N`` folder).
        strict: as ``load_state_dict``: every key of the model must be in the checkpoint (a
            parameter tied to one that is, such as a head tied to the embedding, which
            safetensors saves once, counts as present) and every key of the checkpoint in the
            model; each replaced layer must find exactly its entries. Shapes must match either way.
        trusted: as :func:`load_weights`.

    Returns:
        ``model`` with its over-parameterized layers and the checkpoint's values (the new layer
        itself when ``model`` is a single layer with factors at the top level, names ``factors.<j>``).

    Raises:
        CheckpointError: the source cannot be read; factor entries under a name that is not a
            replaceable layer of ``model``, or entries that do not fit the layer they imply there
            (the message names the layer, its entries and what it expected); keys or shapes that
            do not match (named; with ``strict``, missing and unexpected keys too).
    """
    state = _read_state(source, trusted)
    found = (re.search(r"(?:^|\.)factors\.\d+$", name) for name in state)
    prefixes = sorted({match.string[: match.start()] for match in found if match})
    modules = dict(model.named_modules())
    for prefix in prefixes:
        layer = modules.get(prefix)
        if isinstance(layer, _OverparamBase):
            continue  # already over-parameterized: loaded as it is
        where = repr(prefix) + ("" if prefix else " (the top-level module)")
        if layer is None or _replacement_class(layer) is None:
            kind = "no module" if layer is None else f"a {type(layer).__name__}"
            raise CheckpointError(
                f"load_overparameterized: the checkpoint holds the factors of an over-parameterized layer {where}, but "
                f"the model has {kind} there; expected nn.Linear, nn.Conv1d, nn.Conv2d or transformers' Conv1D (the "
                f"architecture it was trained from)"
            )
        head = f"{prefix}." if prefix else ""
        entries = {name[len(head):]: t for name, t in state.items()
                   if name.startswith(head) and _LAYER_ENTRY.fullmatch(name[len(head):])}
        try:
            kind, config = _layer_config(entries, plain=layer)
            replacement = kind(**config, device=layer.weight.device, dtype=layer.weight.dtype)
            _check_entries(replacement, entries, keys=strict)
        except ValueError as error:
            raise CheckpointError(
                f"load_overparameterized: the checkpoint's entries of layer {where} ({type(layer).__name__}; "
                f"{_listed([head + name for name in entries])}) do not fit the layer they imply: {_one_line(error)}"
            ) from None
        model = _replace(model, prefix, replacement.train(layer.training))
    try:
        keys = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ, in the layers not replaced
        raise CheckpointError(f"load_overparameterized: the checkpoint does not match the model: {_one_line(error)}") from None
    if strict:
        # a key missing from the file but tied to one that is there (safetensors stores a tie once)
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        aliases: dict[int, list[str]] = {}
        for name, tensor in named:
            aliases.setdefault(id(tensor), []).append(name)
        tensor_of = dict(named)
        missing = [
            key for key in keys.missing_keys
            if key not in tensor_of or not any(alias in state for alias in aliases[id(tensor_of[key])])
        ]
        problems = [f"{kind} {_listed(names)}" for kind, names in (("missing", missing), ("unexpected", keys.unexpected_keys)) if names]
        if problems:
            raise CheckpointError(f"load_overparameterized: the checkpoint does not match the model: {'; '.join(problems)}")
    return model
