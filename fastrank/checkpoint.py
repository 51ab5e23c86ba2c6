"""Rank report of a checkpoint: every 2-D and 4-D weight, all layers batched by shape.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a pickle that would run code is
refused, never executed. A few harmless globals that training scripts save beside the weights
are allowed (:data:`SAFE_GLOBALS`: ``argparse.Namespace``, numpy scalars and dtypes); anything
else is named in the error, and a file the user trusts can be loaded fully with
``trusted=True`` (``fastrank rank --trust-checkpoint``). ``.safetensors`` files are read with the
``safetensors`` package (the ``safetensors`` extra). Over-parameterized layers
(``<prefix>.factors.<j>`` entries) are reported as their collapsed weight.
"""

from __future__ import annotations

import argparse
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .chain import collapsed_weight
from .conv import collapse_kernels
from .rank import effective_ranks

__all__ = ["CheckpointError", "SAFE_GLOBALS", "load_weights", "rank_report"]


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


def _collapse_factor_groups(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace ``<prefix>.factors.<j>`` entries by one collapsed ``<prefix>.weight``, in place of
    the first factor (the order of the checkpoint is kept)."""
    groups: dict[str, dict[int, Tensor]] = {}
    order: list[tuple[str, str]] = []  # ("tensor", name) or ("group", prefix)
    for name, tensor in tensors.items():
        parts = name.rsplit(".", 2)
        if len(parts) >= 2 and parts[-2] == "factors" and parts[-1].isdigit():
            prefix = parts[0] if len(parts) == 3 else ""
            if prefix not in groups:
                order.append(("group", prefix))
            groups.setdefault(prefix, {})[int(parts[-1])] = tensor
        else:
            order.append(("tensor", name))
    result: dict[str, Tensor] = {}
    for kind, key in order:
        if kind == "tensor":
            result[key] = tensors[key]
            continue
        factors = [groups[key][j].to(torch.float64) for j in sorted(groups[key])]
        name = f"{key}.weight" if key else "weight"
        if all(f.dim() == 2 for f in factors):
            result[name] = collapsed_weight(factors)
        elif all(f.dim() == 4 for f in factors):
            # factors[1] is (n_2, n_1 / groups, ...) and factors[0] is (n_1, ...).
            groups_count = factors[0].shape[0] // factors[1].shape[1] if len(factors) > 1 else 1
            result[name] = collapse_kernels(factors, groups_count)
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


def _load_torch(path: Path, trusted: bool) -> object:
    if trusted:
        warnings.warn(
            f"loading {path} with weights_only=False: unpickling runs any code the file holds; "
            f"do this only for files from a source you trust",
            stacklevel=3,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise CheckpointError(f"{path} could not be loaded ({_one_line(error)})") from None
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        if allow is None:
            return torch.load(path, map_location="cpu", weights_only=True)
        with allow(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal(path, error) from None
    except Exception as error:  # torch.load raises many types for files that are not checkpoints
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(error).__name__})") from None


def load_weights(path: str | Path, trusted: bool = False) -> list[tuple[str, Tensor]]:
    """The 2-D and 4-D floating-point weights of a checkpoint or state_dict, as ``(name, matrix)``.

    Matrices are ``(out, in)``; conv kernels are flattened to ``(out, in/groups * kh * kw)``.
    Entries named ``*weight`` are taken (embeddings and other weight matrices included), and
    over-parameterized factor chains are collapsed first.

    Args:
        path: a file written by ``torch.save`` (zip or legacy format: a state_dict, a training
            checkpoint holding one, or a whole pickled model) or a ``.safetensors`` file.
        trusted: load a ``torch.save`` file with ``weights_only=False`` (warns): every object
            the pickle holds is constructed, which can run code from the file. Only for files
            from a trusted source; without it, objects beyond tensors, containers and
            :data:`SAFE_GLOBALS` are refused.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint, is refused by the
            weights-only load (the error names the globals it would have to construct), needs
            the missing safetensors package, or holds no weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if _is_safetensors(path, head):
        obj: object = _load_safetensors(path)
    # torch.save writes a zip archive; the legacy format is a pickle (protocol 2+ starts with 0x80).
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        obj = _load_torch(path, trusted)
    else:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive, a pickle nor safetensors)"
        )
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
