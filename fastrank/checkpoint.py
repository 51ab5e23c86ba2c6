"""Rank report of a checkpoint: every 2-D and 4-D weight, all layers batched by shape.

Checkpoints are read with ``torch.load(..., weights_only=True)``: a pickle that would run code is
refused, never executed. Over-parameterized layers (``<prefix>.factors.<j>`` entries) are reported
as their collapsed weight.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .chain import collapsed_weight
from .conv import collapse_kernels
from .rank import effective_ranks

__all__ = ["CheckpointError", "load_weights", "rank_report"]

class CheckpointError(ValueError):
    """A file that cannot be reported on, with a one-line reason."""


def _flatten(obj: object, prefix: str = "") -> dict[str, Tensor]:
    """Tensors of nested dicts / lists, keyed by dotted path."""
    if isinstance(obj, Tensor):
        return {prefix: obj}
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


def load_weights(path: str | Path) -> list[tuple[str, Tensor]]:
    """The 2-D and 4-D floating-point weights of a checkpoint or state_dict, as ``(name, matrix)``.

    Matrices are ``(out, in)``; conv kernels are flattened to ``(out, in/groups * kh * kw)``.
    Entries named ``*weight`` are taken (embeddings and other weight matrices included), and
    over-parameterized factor chains are collapsed first.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint readable with
            ``weights_only=True`` (a pickle that would execute code is one), or holds no weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; the legacy format is a pickle (protocol 2+ starts with 0x80).
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint that can be loaded safely (weights_only=True refused it: {first})"
        ) from None
    except Exception as error:  # torch.load raises many types for files that are not checkpoints
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(error).__name__})") from None
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
) -> list[dict]:
    """One row per weight: name, shape, effective rank, spectral entropy, stable rank.

    All weights of one shape go through one batched call (see :func:`fastrank.effective_ranks`),
    the three metrics from one spectrum. ``progress(done, total)`` is called per shape group.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (_, matrix) in enumerate(weights):
        groups.setdefault(tuple(matrix.shape), []).append(index)
    measured: list[dict | None] = [None] * len(weights)
    for done, indices in enumerate(groups.values(), start=1):
        # One batched call per shape (effective_ranks groups the same way), one spectrum each.
        for index, values in zip(indices, effective_ranks([weights[i][1] for i in indices], metric="all", method=method)):
            measured[index] = values
        if progress is not None:
            progress(done, len(groups))
    return [
        {"name": name, "shape": list(matrix.shape), **{key: float(v) for key, v in values.items()}}
        for (name, matrix), values in zip(weights, measured)
    ]
