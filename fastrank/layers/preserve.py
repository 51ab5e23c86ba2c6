"""Factoring an existing weight across a chain (``overparameterize(preserve=True)``), checking that
the replacement computes the same function, and ``init="match"``'s scaling."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .base import _OverparamBase
from .hf import OverparamConv1D
from .linear import OverparamLinear

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


def _probe_input(layer: nn.Module, replacement: _OverparamBase, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed random input for ``layer``: ``(3, in_features)`` for a linear map, or an odd-sized
    ``(2, C, L)`` / ``(2, C, H, W)`` for a convolution."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(replacement, OverparamLinear):
        shape = (3, replacement.in_features)
    else:
        span = [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size)]
        shape = (2, layer.in_channels, *(n + (2 + i) * s + 1 + i for i, (n, s) in enumerate(zip(span, layer.stride))))
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _check_same_function(original: nn.Module, replacement: _OverparamBase, where: str) -> None:
    """Raise ``ValueError`` naming the layer if ``replacement`` does not compute ``original``."""
    layer_dtype = dtype = replacement.factors[0].dtype
    if dtype in (torch.float16, torch.bfloat16):  # judge the factorization, not half rounding
        original, replacement = copy.deepcopy(original).float(), copy.deepcopy(replacement).float()
        dtype = torch.float32
    probe = _probe_input(original, replacement, dtype, replacement.factors[0].device)
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
        f"{kind} is not a plain linear or convolutional layer: its forward is not the plain "
        f"linear map of its weight; leave it out of include (or exclude it) to keep it"
    )
    if not isinstance(expected, Tensor) or expected.shape != actual.shape:
        shape = tuple(expected.shape) if isinstance(expected, Tensor) else type(expected).__name__
        raise ValueError(
            f"preserve=True changed layer {where} ({kind}): on a probe input of shape "
            f"{tuple(probe.shape)} the original gives {shape}, the replacement "
            f"{tuple(actual.shape)}. {hint}"
        )
    fan_in = replacement.in_features if isinstance(replacement, OverparamLinear) else original.weight[0].numel()
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
    # (out, in) as nn.Linear stores it; transformers' Conv1D stores (in, out)
    weight = layer.weight.T if isinstance(replacement, OverparamConv1D) else layer.weight
    with torch.no_grad():
        if isinstance(replacement, OverparamLinear):
            dims = [replacement.in_features] + [f.shape[0] for f in replacement.factors]
            for factor, value in zip(replacement.factors, _balanced_factors(weight, dims, where)):
                factor.copy_(value)
        else:
            groups = layer.groups
            out_g, in_g = layer.out_channels // groups, weight.shape[1]
            dims = [in_g * math.prod(layer.kernel_size)] + [c // groups for c in replacement.channels[1:]]
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
