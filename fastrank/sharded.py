"""Rank at the scale of several machines: sharded weights (FSDP2, tensor parallel) and token embeddings.

Sharded weights. ``effective_ranks``, ``spectral_entropy``, ``effective_rank``, ``stable_rank`` and
``rank_metrics`` (hence ``RankTracker``) accept ``torch.distributed`` DTensors and call
:func:`sharded_metric` / :func:`sharded_effective_ranks` here. A weight is never all-gathered:

- The Gram of the *small* side (r = min(m, n); A^T A when n <= m, else A A^T) is what the exact
  method needs, and it is a plain sum over the ranks when the other dim is the sharded one: for a
  row-sharded A, A^T A = sum_r A_r^T A_r; for a column-sharded A, A A^T = sum_r A_r A_r^T. Each
  rank forms its local Gram in fp64 (fp64 products for weights, gram=False; fp32 products summed
  in fp64 for fp32 / half data with gram=True, the rank module's rule), the local Grams of one
  shape group are stacked, and the stack is summed with one ``all_reduce`` over each mesh dim that
  shards the matrix (one for FSDP2's 1-D mesh, two for a 2-D mesh whose both dims shard it):
  O(r^2) traffic per matrix whatever the other side's length.
- When a mesh dim shards the small side instead (a wide weight under FSDP2's row sharding, m < n;
  a tall one under column sharding; a 2-D mesh sharding rows on one mesh dim and columns on the
  other, as FSDP2 + row-wise tensor parallelism does), its Gram's off-diagonal blocks A_r A_s^T
  would need other ranks' shards. That mesh dim is first re-sharded onto the long side with one
  ``all_to_all_single`` in its group: each rank sends away the part of its shard that another
  rank will hold and keeps its share, so it holds about numel / world elements before and after
  (traffic (g - 1) / g of its shard, in the weight's dtype, for a group of g ranks; an all-gather
  would bring every rank the whole weight). The alternative, the large side's Gram, would cost
  max(m, n)^2 fp64 memory and traffic and an eigensolver of that size, which exceeds the re-shard
  for every m != n.
- The eigenvalues go through the rank module's code (``_eigvalsh``, the rounding estimate
  ``_gram_singular_values``, ``_entropy``, ``_stable_of``). Weights whose Gram route could miss
  1e-11 in relative entropy (``exact_tolerance``; singular values below ~1e-6 of the largest)
  are recomputed, as the single-process path does with ``svdvals`` of the matrix, from a
  TSQR: each rank's fp64 R factor of its shard, the R factors of a group all-gathered (g r^2
  values per rank), stacked and factored again; ``svdvals`` of the final r x r R are the singular
  values of the whole matrix with the backward stability of ``svdvals`` (never the weight gathered).
  Every rank of a group agrees on which matrices to recompute (a max all-reduce of the flags),
  so that their collectives match.
- Every rank gets the result: plain float64 tensors of the batch shape, not DTensors.

Placements: every mesh dim ``Shard(d)`` with d one of the matrix dims (-2 or -1; FSDP2's
``_StridedShard`` too: only *which* rows a rank holds matters, not their order) or
``Replicate()`` (no reduction over that mesh dim). ``Partial`` (the local values are summands of
the weight, not parts of it) and shards of a batch dim raise ``ValueError``. Methods: "exact"
and "auto" (which is exact here at every size: there is no distributed sketch; an r x r fp64
``eigvalsh`` runs on every rank); "randomized" / "slq" and ``hermitian=True`` raise.

Sequence models: :func:`select_tokens` is ``RankTracker``'s ``token_rate``: the same token
positions of every sequence are kept, drawn per step from the tracker's seed, so a measurement does
not depend on how the batch is split across ranks.

Over-parameterized layers under FSDP2: outside forward their factors are sharded DTensors, and the
chain's custom ops have no DTensor sharding rule; :func:`collapsed_parameters_of` gathers the
parameters (one all-gather each, what FSDP2's forward does) and returns the collapsed weight and
bias as plain tensors. ``layer.weight`` and ``fastrank.collapse`` go through it, so every rank of
the mesh must make those calls, in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .rank.common import RankEstimate, _entropy, _is_dtensor, _stable_of
from .rank.eigensolver import eigvalsh as _eigvalsh
from .rank.exact import _EXACT_TOL, _ROW_BLOCK, _add_gram, _gram_singular_values

__all__ = [
    "is_sharded",
    "sharded_metric",
    "sharded_effective_ranks",
    "collapsed_parameters_of",
    "collapsed_weight_of",
    "select_tokens",
]

_METRICS = ("effective_rank", "spectral_entropy", "stable_rank", "all")
_SHARDED_METHODS = ("auto", "exact")


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed`` DTensor (a sharded or replicated weight).

    Cheap: never imports ``torch.distributed.tensor`` (no DTensor exists before it is imported).
    """
    return _is_dtensor(tensor)


# ----------------------------------------------------------------------------- layout
class _Layout:
    """Which mesh dims of a DTensor shard its rows (dim -2) and which its columns (dim -1)."""

    def __init__(self, A: Tensor, name: str) -> None:
        from torch.distributed.tensor import Replicate, Shard

        if A.dim() < 2:
            raise ValueError(f"{name}: expected a matrix or a batch of matrices (..., m, n), got shape {tuple(A.shape)}")
        self.mesh = A.device_mesh
        self.row_dims: list[int] = []
        self.column_dims: list[int] = []
        for mesh_dim, placement in enumerate(A.placements):
            if isinstance(placement, Replicate):
                continue
            if isinstance(placement, Shard):
                dim = placement.dim % A.dim()
                if dim == A.dim() - 2:
                    self.row_dims.append(mesh_dim)
                    continue
                if dim == A.dim() - 1:
                    self.column_dims.append(mesh_dim)
                    continue
                raise ValueError(
                    f"{name}: expected a DTensor sharded on its matrix dims ({A.dim() - 2} or {A.dim() - 1}) or "
                    f"replicated, got {placement} on mesh dim {mesh_dim} (a batch dim) for shape {tuple(A.shape)}"
                )
            raise ValueError(
                f"{name}: expected Shard(dim) or Replicate() on every mesh dim, got {placement} on mesh dim "
                f"{mesh_dim}; a Partial DTensor holds summands of the weight, not parts of it: "
                "redistribute it to Shard or Replicate first"
            )

    def group(self, mesh_dim: int):
        return self.mesh.get_group(mesh_dim)


def _check_arguments(name: str, method: str, hermitian: bool) -> None:
    if method not in _SHARDED_METHODS:
        raise ValueError(
            f"{name}: method must be one of {_SHARDED_METHODS} for a DTensor (no distributed sketch), got {method!r}"
        )
    if hermitian:
        raise ValueError(f"{name}: hermitian=True is not supported for a DTensor (its eigenvalues need the whole matrix)")


# ----------------------------------------------------------------------------- collectives
def _all_reduce(tensor: Tensor, groups: Sequence, op=dist.ReduceOp.SUM) -> Tensor:
    for group in groups:  # one mesh dim after another: the sum over their product
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _reshard_features(X: Tensor, group) -> Tensor:
    """(..., p, q) shards that split the columns over ``group`` -> (..., p_own, q_total) that split the rows.

    Every rank of the group holds the same p rows (and its own q columns). The rows are cut into
    g near-equal chunks; rank j receives chunk j of every rank's columns, concatenated in rank
    order (a column permutation, which no Gram eigenvalue sees). One all_gather of the g widths and
    one ``all_to_all_single``.
    """
    size, me = dist.get_world_size(group), dist.get_rank(group)
    width = torch.tensor([X.shape[-1]], dtype=torch.int64, device=X.device)
    widths = [torch.empty_like(width) for _ in range(size)]
    dist.all_gather(widths, width, group=group)
    widths = [int(w) for w in widths]
    p = X.shape[-2]
    rows = [p // size + (j < p % size) for j in range(size)]
    batch = X.shape[:-2]
    count = math.prod(batch)
    send = torch.cat([piece.reshape(-1) for piece in torch.split(X, rows, dim=-2)])
    received = torch.empty(count * rows[me] * sum(widths), dtype=X.dtype, device=X.device)
    dist.all_to_all_single(
        received,
        send,
        output_split_sizes=[count * rows[me] * w for w in widths],
        input_split_sizes=[count * r * X.shape[-1] for r in rows],
        group=group,
    )
    parts = torch.split(received, [count * rows[me] * w for w in widths])
    return torch.cat([part.reshape(*batch, rows[me], w) for part, w in zip(parts, widths)], dim=-1)


def _tsqr_singular_values(X: Tensor, groups: Sequence) -> Tensor:
    """Singular values (..., r) of the matrix whose rows are spread over ``groups`` (local X: (..., p, r)).

    Tall-skinny QR: the local fp64 R factor (padded with zero rows to r x r), all-gathered over each
    group in turn, stacked and factored again; the singular values of the final R are those of the
    whole matrix (Q factors are orthonormal), backward stable like ``svdvals`` of the matrix.
    """
    r = X.shape[-1]
    R = torch.linalg.qr(X.to(torch.float64), mode="r").R
    if R.shape[-2] < r:
        R = torch.cat([R, R.new_zeros(*R.shape[:-2], r - R.shape[-2], r)], dim=-2)
    for group in groups:
        gathered = [torch.empty_like(R) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, R.contiguous(), group=group)
        R = torch.linalg.qr(torch.cat(gathered, dim=-2), mode="r").R
    return torch.linalg.svdvals(R)


# ----------------------------------------------------------------------------- spectrum
def _reduced_gram(tensors: Sequence[Tensor], gram: bool, center: bool, name: str) -> tuple:
    """The summed small-side Grams of B DTensors of one shape, placement and mesh.

    Returns ``(G, X, groups)``: G (B, ..., r, r) fp64, meaningful in its upper triangle, equal on
    every rank; X (B, ..., p, r) this rank's rows of the arranged matrix (A, or A^T when m < n;
    scaled, centered, re-sharded), whose Gram summed over ``groups`` is G.
    """
    first = tensors[0]
    layout = _Layout(first, name)
    m, n = first.shape[-2:]
    local = torch.stack([t.to_local() for t in tensors])  # (B, ..., p, q)
    if local.is_complex():
        raise TypeError(f"{name}: complex input is not supported, got {local.dtype}")
    if not local.is_floating_point():
        local = local.to(torch.float64)
    # One max |a| per matrix over all its shards: NaN / Inf raise on every rank alike, and
    # matrices far from 1 are scaled by a power of two (exact), as the single-process path does.
    peak = torch.zeros(local.shape[:-2], dtype=torch.float64, device=local.device)
    if local.numel():
        peak = torch.maximum(local.amax(dim=(-2, -1)), -local.amin(dim=(-2, -1))).to(torch.float64)
        peak = peak.nan_to_num(nan=math.inf)  # a max all-reduce may drop NaN, never inf
    shard_groups = [layout.group(d) for d in layout.row_dims + layout.column_dims]
    _all_reduce(peak, shard_groups, dist.ReduceOp.MAX)
    if not bool(torch.isfinite(peak).all()):
        raise ValueError(f"{name}: input of shape {tuple(first.shape)} contains NaN or Inf")
    if local.dtype in (torch.float16, torch.bfloat16):
        local = local.to(torch.float32)  # exact; half-precision products would overflow
    safe = 200 if local.dtype == torch.float64 else 20
    exponent = torch.where(peak > 0, torch.floor(torch.log2(peak.clamp_min(1e-300))), torch.zeros_like(peak))
    if bool((exponent.abs() > safe).any()):
        limit = 1000 if local.dtype == torch.float64 else 126
        local = local * torch.exp2(-exponent.clamp(-limit, limit)).to(local.dtype)[..., None, None]
    if center:  # subtract the column mean over all m rows (the rows may be sharded)
        column_sum = local.sum(-2, keepdim=True, dtype=torch.float64)
        _all_reduce(column_sum, [layout.group(d) for d in layout.row_dims])
        work = torch.float64 if local.dtype == torch.float64 else torch.float32
        local = local.to(work) - (column_sum / m).to(work)
    # X: the small side's Gram is X^T X, summed over the ranks that split X's rows.
    if n <= m:
        X, reduce_dims, feature_dims = local, layout.row_dims, layout.column_dims
    else:
        X, reduce_dims, feature_dims = local.mT, layout.column_dims, layout.row_dims
    for mesh_dim in feature_dims:
        X = _reshard_features(X, layout.group(mesh_dim))
    groups = [layout.group(d) for d in reduce_dims + feature_dims]
    r = X.shape[-1]
    if not gram or X.dtype == torch.float64:
        dtype, block_rows = torch.float64, max(1, X.shape[-2])
    else:
        dtype, block_rows = torch.float32, _ROW_BLOCK
    G = torch.zeros(*X.shape[:-2], r, r, dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[-2], block_rows):
        _add_gram(G, X[..., start : start + block_rows, :].to(dtype))  # the upper triangle
    _all_reduce(G, groups)  # the one reduction of the group's Grams
    return G, X, groups


def _group_values(tensors: Sequence[Tensor], gram: bool, center: bool, tolerance: float, name: str) -> Tensor:
    """(B, ..., r) fp64 values v (p = v / sum v) of B DTensors of one shape, placement and mesh."""
    G, X, groups = _reduced_gram(tensors, gram, center, name)
    m, n = tensors[0].shape[-2:]
    lam = _eigvalsh(G, upper=True).clamp_min(0)
    if gram:
        return lam
    s, suspect = _gram_singular_values(lam, m, n, tolerance)
    flags = _all_reduce(suspect.to(torch.float64), groups, dist.ReduceOp.MAX) > 0
    if bool(flags.any()):
        s = s.clone()
        s[flags] = _tsqr_singular_values(X[flags], groups)
    return s


def _metric_of(values: Tensor, metric: str, return_bounds: bool) -> Any:
    if metric == "stable_rank":
        result = _stable_of(values)
    else:
        entropy = _entropy(values)
        if metric == "all":
            return {"spectral_entropy": entropy, "effective_rank": entropy.exp(), "stable_rank": _stable_of(values)}
        result = entropy if metric == "spectral_entropy" else entropy.exp()
    return RankEstimate(result, result, result) if return_bounds else result


def sharded_metric(
    metric: str,
    A: Tensor,
    *,
    gram: bool = False,
    hermitian: bool = False,
    method: str = "auto",
    rank: int | None = None,
    niter: int | None = None,
    seed: int | None = None,
    center: bool = False,
    return_bounds: bool = False,
    exact_tolerance: float = _EXACT_TOL,
) -> Any:
    """One rank metric of a DTensor ``A`` (..., m, n), exact, without gathering it (module docstring).

    What ``fastrank.spectral_entropy`` / ``effective_rank`` / ``stable_rank`` (``metric`` their name)
    and ``rank_metrics`` (``metric="all"``) call for a DTensor. A collective: every rank of A's
    mesh must call it with the same arguments.

    Args:
        metric: "effective_rank", "spectral_entropy", "stable_rank" or "all" (the dict of three).
        A: DTensor of shape (..., m, n), any real dtype, placements Shard(-2) / Shard(-1) /
            Replicate per mesh dim.
        gram, center, return_bounds, exact_tolerance: as in the rank functions; ``method`` "auto"
            or "exact"; ``rank``, ``niter``, ``seed`` are unused (they belong to the sketches).
    Returns:
        float64 tensor of shape (...) on A's local device, equal on every rank (a RankEstimate of
        three equal tensors with ``return_bounds``; a dict for "all").
    Raises:
        ValueError: Partial placements, a sharded batch dim, hermitian=True, method "randomized" /
            "slq", NaN / Inf.
    """
    if metric not in _METRICS:
        raise ValueError(f"sharded_metric: metric must be one of {_METRICS}, got {metric!r}")
    name = "rank_metrics" if metric == "all" else metric
    _check_arguments(name, method, hermitian)
    with torch.no_grad():
        values = _group_values([A.detach()], gram, center, exact_tolerance, name)[0]
    return _metric_of(values, metric, return_bounds and metric != "all")


def sharded_effective_ranks(tensors: Sequence[Tensor], *, metric: str = "effective_rank", **kwargs: Any) -> list:
    """``fastrank.effective_ranks`` of a list of DTensors: one reduction per shape group.

    DTensors are grouped by (global shape, dtype, mesh, placements); each group's local Grams are
    stacked and summed with one all-reduce per mesh dim that shards them (module docstring).
    ``fastrank.effective_ranks`` sends the DTensors of a mixed list here and measures the plain
    tensors itself; a plain tensor given here is refused. Groups are reduced
    in the order of their first member, so every rank must pass the same list. Results: a list in
    input order, as ``effective_ranks`` returns (float64 tensors of each batch shape, equal on
    every rank).
    """
    if metric not in _METRICS:
        raise ValueError(f"effective_ranks: metric must be one of {sorted(_METRICS)}, got {metric!r}")
    method = kwargs.get("method", "auto")
    _check_arguments("effective_ranks", method, kwargs.get("hermitian", False))
    tolerance = kwargs.get("exact_tolerance", _EXACT_TOL) if metric == "all" else _EXACT_TOL
    return_bounds = kwargs.get("return_bounds", False) and metric != "all"
    results: list[Any] = [None] * len(tensors)
    plain = [i for i, t in enumerate(tensors) if not _is_dtensor(t)]
    if plain:
        raise TypeError(
            f"sharded_effective_ranks: expected DTensors only, got a {type(tensors[plain[0]]).__name__} at "
            f"position {plain[0]}; fastrank.effective_ranks takes lists that mix plain tensors and DTensors"
        )
    groups: dict[tuple, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if _is_dtensor(tensor):
            key = (tuple(tensor.shape), tensor.dtype, tensor.device_mesh, tuple(tensor.placements))
            groups.setdefault(key, []).append(index)
    with torch.no_grad():
        for indices in groups.values():
            values = _group_values(
                [tensors[i].detach() for i in indices],
                kwargs.get("gram", False),
                kwargs.get("center", False),
                tolerance,
                "effective_ranks",
            )
            for position, index in enumerate(indices):
                results[index] = _metric_of(values[position], metric, return_bounds)
    return results


# ----------------------------------------------------------------------------- layers and tokens
def collapsed_parameters_of(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``layer.collapsed_parameters()``, also when FSDP2 has sharded the layer's parameters.

    Outside forward, ``fully_shard`` leaves the factors (and the bias) as Shard(0) DTensors, on
    which the chain's custom ops have no sharding rule. A product of factors mixes every row of
    one with every column of the next, so it needs them whole: each sharded parameter is
    all-gathered (``full_tensor()``, in the order of ``named_parameters``, so every rank of the
    mesh must call this) and ``collapsed_parameters`` runs on the gathered copies through
    ``torch.func.functional_call``; the layer keeps its sharded parameters. Differentiable where
    autograd records (the gathers are).

    Args:
        layer: ``OverparamLinear`` / ``OverparamConv2d`` (or any module with ``collapsed_parameters()``).
    Returns:
        ``(weight, bias)`` as plain tensors, the same on every rank: ``(out_features, in_features)``
        (Linear) or ``(out, in / groups, kh, kw)`` (Conv2d), in the factors' dtype, and the
        ``(out,)`` bias or None.
    """
    parameters = dict(layer.named_parameters())
    if not any(_is_dtensor(p) for p in parameters.values()):
        return layer.collapsed_parameters()
    gathered = {f"layer.{name}": p.full_tensor() if _is_dtensor(p) else p for name, p in parameters.items()}
    return torch.func.functional_call(_Collapse(layer), gathered, ())


def collapsed_weight_of(layer: nn.Module) -> Tensor:
    """The collapsed weight of an over-parameterized layer, also when FSDP2 has sharded its factors.

    Sharded layers: :func:`collapsed_parameters_of` (every rank of the mesh must call this, in
    the same order), without an autograd graph. Layers without DTensor parameters return
    ``layer.weight`` (the cached collapsed weight in eval mode under no_grad).

    Args:
        layer: ``OverparamLinear`` / ``OverparamConv2d`` (or any module with
            ``collapsed_parameters()`` and a ``weight``).
    Returns:
        plain tensor: ``(out_features, in_features)`` (Linear) or ``(out, in / groups, kh, kw)``
        (Conv2d), in the factors' dtype, the same on every rank.
    """
    if not any(_is_dtensor(p) for p in layer.parameters()):
        return layer.weight
    with torch.no_grad():
        return collapsed_parameters_of(layer)[0]


class _Collapse(nn.Module):
    """Calls ``layer.collapsed_parameters()`` as a forward, for ``functional_call``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self) -> tuple[Tensor, Tensor | None]:
        return self.layer.collapsed_parameters()


def check_token_rate(token_rate: float | None) -> float | None:
    """``token_rate`` as given, after checking that it is None or a number in (0, 1]."""
    if token_rate is None:
        return None
    if isinstance(token_rate, bool) or not isinstance(token_rate, (int, float)) or not 0 < token_rate <= 1:
        raise ValueError(f"token_rate must be None or a number in (0, 1], got {token_rate!r}")
    return float(token_rate)


def first_output(output: Any) -> Any:
    """A module output's first item where it is a non-empty tuple or list, else the output."""
    return output[0] if isinstance(output, (tuple, list)) and output else output


def select_tokens(output: Any, token_rate: float | None, seed: int, step: int, token_dim: int = 1) -> Any:
    """Keep ``max(1, round(token_rate * T))`` of the T token positions of a sequence output.

    Args:
        output: a module output; a 3-D tensor (or a tuple / list whose first item is one) of shape
            ``(B, T, d)`` with ``token_dim=1`` (batch first) or ``(T, B, d)`` with ``token_dim=0``.
            Anything else is returned as it is.
        token_rate: fraction of positions kept, in (0, 1]; None or 1 keeps all.
        seed, step: the positions are ``randperm(T)`` of a CPU generator seeded with
            ``(seed, step)``, sorted: the same for every sequence of the step and on every rank,
            so a data-parallel measurement equals the one-process measurement of the whole batch.
    Returns:
        the output with ``(B, k, d)`` (``(k, B, d)``) tokens, or the output unchanged.
    """
    first = first_output(output)
    if token_rate is None or token_rate >= 1 or not isinstance(first, Tensor) or first.dim() != 3:
        return output
    length = first.shape[token_dim]
    keep = max(1, round(token_rate * length))
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    positions = torch.randperm(length, generator=generator)[:keep].sort().values.to(first.device)
    return first.index_select(token_dim, positions)
