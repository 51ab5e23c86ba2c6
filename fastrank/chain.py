"""Chain ops: products through a chain of linear factors, and the cost model that associates them.

Everything an over-parameterized layer computes is built on one primitive, the *chain matmul*::

    X_0 = x                      (M, n_0)
    X_j = X_{j-1} @ F_j^T        F_j: (n_j, n_{j-1}),  j = 1..k

returning the intermediates ``[X_1, ..., X_k]``. It serves three purposes:

* the activation chain of a layer ``W = W_L ... W_1``: ``x`` through ``W_1 .. W_L``;
* the collapsed weight: ``W_L`` through ``W_{L-1}^T .. W_1^T`` gives ``P = W_L ... W_1``, and its
  intermediates are the partial products ``W_L ... W_j`` that the backward of the collapsed form needs;
* the backward itself: the gradient runs the reverse chain through ``W_L^T .. W_1^T``, and the factor
  gradients are the group of products ``dF_j = G_j^T X_{j-1}`` (:func:`chain_factor_grads`).

Both ops are ``torch.library`` custom ops: the torch bodies below are the CPU path and the readable
specification; on CUDA the Triton kernels of ``fastrank.kernels.chain`` are registered when Triton
is importable. fp16 / bf16 steps accumulate in fp32 and round each ``X_j`` to the input dtype, the
next step starting from the rounded ``X_j``: exactly the rounding of the naive chain of matmuls,
on both paths.

:func:`chain_linear` is the autograd-aware layer op: it picks, per call and from the shapes alone,
the cheaper association (activation chain or collapsed product) with :func:`chain_costs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "chain_matmul",
    "chain_factor_grads",
    "chain_matmul_backward",
    "chain_costs",
    "chain_linear",
    "collapsed_weight",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_chain(x: Tensor, factors: Sequence[Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"chain_matmul: x must be 2-D (M, n_0), got shape {tuple(x.shape)}")
    if len(factors) == 0:
        raise ValueError("chain_matmul: expected at least one factor, got none")
    width, dtype, device = x.shape[1], x.dtype, x.device
    for j, factor in enumerate(factors):
        if factor.dim() != 2 or factor.shape[1] != width:
            raise ValueError(
                f"chain_matmul: factor {j} must have shape (n_{j + 1}, {width}), "
                f"got {tuple(factor.shape)}"
            )
        if factor.dtype != dtype or factor.device != device:
            raise TypeError(
                f"chain_matmul: factor {j} is {factor.dtype} on {factor.device}, "
                f"expected {x.dtype} on {x.device} like x"
            )
        width = factor.shape[0]


# --------------------------------------------------------------------------------------------
# torch twins (the CPU path and the specification of the CUDA kernels)
# --------------------------------------------------------------------------------------------


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=), CUDA only


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of fp16 / bf16 matrices accumulated and returned in fp32: on CUDA
    ``torch.mm(..., out_dtype=torch.float32)`` (no upcast copies; cuBLAS's own half-precision GEMM
    may reduce split-K partial sums in half precision), elsewhere on upcast copies."""
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _MatmulRoundedOnce(torch.autograd.Function):
    """``a @ b`` of fp16 / bf16 matrices rounded once, with the upcast chain's gradients
    (``dA = dY B^T``, ``dB = A^T dY``, each accumulated in fp32 and rounded once). torch has no
    derivative for the ``out_dtype`` overload of ``mm`` (on CUDA its backward raised "derivative for
    aten::mm is not implemented"); the backward runs through :func:`_matmul_rounded_once` itself, so
    it is differentiable again under ``create_graph``."""

    generate_vmap_rule = True  # torch.func transforms: forward and setup_context kept apart

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return _mm_fp32(a, b).to(a.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        grad_a = _matmul_rounded_once(grad, b.T) if ctx.needs_input_grad[0] else None
        grad_b = _matmul_rounded_once(a.T, grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _matmul_rounded_once(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated in fp32 (fp64 for fp64) and rounded once to the inputs' dtype;
    differentiable (fp16 / bf16 under autograd through :class:`_MatmulRoundedOnce`)."""
    if a.dtype in _HALF_DTYPES:
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return _MatmulRoundedOnce.apply(a, b)
        return _mm_fp32(a, b).to(a.dtype)
    return a @ b


def _linear_rounded_once(a: Tensor, weight: Tensor) -> Tensor:
    """``a @ weight^T`` rounded as :func:`_matmul_rounded_once`; ``F.linear`` for fp32 / fp64, which
    under autograd records one transpose and one matmul (``a @ weight.T`` recorded a permute,
    about 1 us more a step on a 2-core Xeon, forward and backward)."""
    if a.dtype in _HALF_DTYPES:
        return _matmul_rounded_once(a, weight.T)
    return F.linear(a, weight)


def chain_matmul_ref(x: Tensor, factors: Sequence[Tensor], return_all: bool = True) -> list[Tensor]:
    """Torch twin of the chain matmul, the specification of the kernel and the CPU path.

    ``X_j = X_{j-1} @ F_j^T`` for j = 1..k, each step accumulated in fp32 (float64 stays float64)
    and rounded to ``x.dtype``; the next step starts from the rounded ``X_j``. Differentiable by
    autograd: for fp32 / fp64 its graph is the naive chain's.
    """
    _check_chain(x, factors)
    outputs, block = [], x
    for factor in factors:
        block = _linear_rounded_once(block, factor)
        outputs.append(block)
    return outputs if return_all else outputs[-1:]


def _check_factor_grads(grads: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    if len(grads) != len(inputs):
        raise ValueError(
            f"chain_factor_grads: got {len(grads)} grads and {len(inputs)} inputs, expected equal counts"
        )
    for j, (grad, inp) in enumerate(zip(grads, inputs)):
        if grad.dim() != 2 or inp.dim() != 2 or grad.shape[0] != inp.shape[0]:
            raise ValueError(
                f"chain_factor_grads: pair {j} must be (M, n_j) and (M, n_(j-1)) with equal M, "
                f"got {tuple(grad.shape)} and {tuple(inp.shape)}"
            )
        if grad.shape[0] != grads[0].shape[0]:
            raise ValueError(
                f"chain_factor_grads: pair {j} has M = {grad.shape[0]}, pair 0 has M = {grads[0].shape[0]}"
            )
        for name, t in (("grad", grad), ("input", inp)):
            if t.dtype != grads[0].dtype or t.device != grads[0].device:
                raise TypeError(
                    f"chain_factor_grads: {name} {j} is {t.dtype} on {t.device}, "
                    f"expected {grads[0].dtype} on {grads[0].device} like grad 0"
                )


def chain_factor_grads_ref(grads: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    """Torch twin of the grouped factor gradients: ``dF_j = grads[j]^T @ inputs[j]``, accumulated in
    fp32 (float64 stays float64) and rounded once to the input dtype."""
    _check_factor_grads(grads, inputs)
    return [_matmul_rounded_once(grad.T, inp) for grad, inp in zip(grads, inputs)]


def _check_backward(x: Tensor, factors: Sequence[Tensor], grad_output: Tensor) -> None:
    _check_chain(x, factors)
    expected = (x.shape[0], factors[-1].shape[0])
    if tuple(grad_output.shape) != expected:
        raise ValueError(
            f"chain_matmul_backward: grad_output must have shape {expected} (M, n_k), "
            f"got {tuple(grad_output.shape)}"
        )
    if grad_output.dtype != x.dtype or grad_output.device != x.device:
        raise TypeError(
            f"chain_matmul_backward: grad_output is {grad_output.dtype} on {grad_output.device}, "
            f"expected {x.dtype} on {x.device} like x"
        )


def compose_chain_backward(
    x: Tensor, factors: Sequence[Tensor], grad_output: Tensor, needs_x: bool, chain, factor_grads
) -> list[Tensor]:
    """The recomputing backward of ``chain_matmul(x, factors, return_all=False)`` from two chain
    primitives: ``chain`` (a chain matmul) recomputes ``X_1 .. X_{k-1}`` and runs the reverse chain
    ``dX_{j-1} = dX_j F_j`` (each step rounded once), ``factor_grads`` forms every
    ``dF_j = dX_j^T X_{j-1}`` (fp32 accumulation, one rounding). Returns ``[dF_1, ..., dF_k]``
    (each in its factor's layout: :func:`_factor_grads_in_layout`), then ``dX_0`` when ``needs_x``."""
    k = len(factors)
    inputs = [x, *chain(x, factors[:-1])] if k > 1 else [x]  # X_0 .. X_{k-1}
    stop = 0 if needs_x else 1  # without dX_0 the reverse chain ends at dX_1
    reverse = [f.T for f in reversed(factors[stop:])]  # F_k^T .. F_{stop+1}^T
    backs = chain(grad_output, reverse) if reverse else []  # dX_{k-1} .. dX_stop
    grads = [grad_output, *backs][:k][::-1]  # dX_1 .. dX_k
    return _factor_grads_in_layout(factor_grads, factors, grads, inputs) + (backs[-1:] if needs_x else [])


def _factor_grads_in_layout(factor_grads, factors: Sequence[Tensor], grads: Sequence[Tensor],
                           inputs: Sequence[Tensor]) -> list[Tensor]:
    """``dF_j = grads[j]^T inputs[j]`` for each factor ``F_j`` through one ``factor_grads`` call (a
    grouped product: :func:`chain_factor_grads` or its twin), each in ``F_j``'s layout: for a
    factor that is a transposed view of a contiguous matrix (column-major, such as the weight
    chain's ``W_j^T``) the call forms ``dF_j^T = inputs[j]^T grads[j]`` and this returns its
    transpose, as torch's mm backward lays out a gradient (AccumulateGrad copies one whose strides
    differ from its parameter's: a launch on CUDA); contiguous for any other factor."""
    flipped = [_transposed_view(f) for f in factors]
    products = factor_grads(
        [i if flip else g for g, i, flip in zip(grads, inputs, flipped)],
        [g if flip else i for g, i, flip in zip(grads, inputs, flipped)],
    )
    return [product.T if flip else product for product, flip in zip(products, flipped)]


def _transposed_view(t: Tensor) -> bool:
    """Whether the 2-D ``t`` is a transposed view of a contiguous matrix (and not contiguous itself)."""
    return t.stride(0) == 1 and t.stride(1) == t.shape[0] and not t.is_contiguous()


def chain_matmul_backward_ref(
    x: Tensor, factors: Sequence[Tensor], grad_output: Tensor, needs_x: bool
) -> list[Tensor]:
    """Torch twin of the fused backward kernel (the specification and the CPU path): the gradients
    of ``chain_matmul(x, factors, return_all=False)`` from ``x``, the factors and
    ``grad_output = dX_k`` (M, n_k) alone, recomputing the intermediates. Returns ``[dF_1, ...,
    dF_k]`` (``(n_j, n_{j-1})``), then ``dX_0`` (M, n_0) when ``needs_x``; rounding as the naive
    chain's backward in x's dtype (see :func:`compose_chain_backward`)."""
    _check_backward(x, factors, grad_output)
    return compose_chain_backward(x, factors, grad_output, needs_x, chain_matmul_ref, chain_factor_grads_ref)


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastrank::chain_matmul", mutates_args=())
def _chain_matmul_op(x: Tensor, factors: list[Tensor], return_all: bool) -> list[Tensor]:
    return chain_matmul_ref(x, factors, return_all)


@_chain_matmul_op.register_fake
def _(x, factors, return_all):
    _check_chain(x, factors)
    kept = factors if return_all else factors[-1:]
    return [x.new_empty((x.shape[0], f.shape[0])) for f in kept]


@torch.library.custom_op("fastrank::chain_factor_grads", mutates_args=())
def _chain_factor_grads_op(grads: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
    return chain_factor_grads_ref(grads, inputs)


@_chain_factor_grads_op.register_fake
def _(grads, inputs):
    return [g.new_empty((g.shape[1], i.shape[1])) for g, i in zip(grads, inputs)]


@torch.library.custom_op("fastrank::chain_matmul_backward", mutates_args=())
def _chain_matmul_backward_op(
    x: Tensor, factors: list[Tensor], grad_output: Tensor, needs_x: bool
) -> list[Tensor]:
    return chain_matmul_backward_ref(x, factors, grad_output, needs_x)


@_chain_matmul_backward_op.register_fake
def _(x, factors, grad_output, needs_x):
    _check_backward(x, factors, grad_output)
    grads = [f.new_empty(f.shape[::-1]).T if _transposed_view(f) else f.new_empty(f.shape) for f in factors]
    return grads + ([x.new_empty(x.shape)] if needs_x else [])


def _chain_matmul_setup_context(ctx, inputs, output):
    x, factors, return_all = inputs
    # Outputs whose gradient is never used (all but the last, in the common case) arrive as None
    # instead of as materialized zero tensors of shape (M, n_j).
    ctx.set_materialize_grads(False)
    ctx.return_all = return_all
    ctx.num_factors = len(factors)
    if return_all:
        ctx.save_for_backward(x, *factors, *output[:-1])
    else:
        ctx.save_for_backward(x, *factors)


def _chain_matmul_backward(ctx, grad_outputs):
    grad_x, grad_factors = _chain_backward(
        ctx.saved_tensors, ctx.num_factors, ctx.return_all, grad_outputs,
        ctx.needs_input_grad[0], list(ctx.needs_input_grad[1]),
    )
    return grad_x, grad_factors, None


def _chain_backward(saved, k, return_all, grad_outputs, needs_x, needs_factor):
    """Gradients of x and of the factors from what the forward saved: ``(x, *factors, [X_1 ..
    X_{k-1}])``; the reverse chain and the grouped factor gradients (the naive chain's math)."""
    x, factors = saved[0], list(saved[1 : 1 + k])
    if all(g is None for g in grad_outputs):
        return None, None
    if torch.is_grad_enabled():  # backward(create_graph=True)
        return _recorded_backward(x, factors, return_all, grad_outputs, needs_x, needs_factor)
    if return_all:
        intermediates = list(saved[1 + k :])
        grad_outputs = list(grad_outputs)
    elif all(needs_factor):
        # Only X_k was kept: one op recomputes X_1 .. X_{k-1} and forms every gradient (on CUDA one
        # fused launch for narrow chains, which never writes the intermediates out).
        results = chain_matmul_backward(x, factors, grad_outputs[0], needs_x)
        return (results[k] if needs_x else None), results[:k]
    else:
        intermediates = chain_matmul(x, factors[:-1]) if k > 1 else []
        grad_outputs = [None] * (k - 1) + list(grad_outputs)
    inputs = [x, *intermediates]  # X_0 .. X_{k-1}

    # Gradient w.r.t. X_j for j = k..1 (and X_0 if x needs it).
    # dF_j needs the gradient of X_j, so without a gradient for x the reverse chain stops at X_1.
    stop = 0 if needs_x else 1
    grads_x: list[Tensor | None] = [None] * (k + 1)
    if all(g is None for g in grad_outputs[:-1]):
        # The common case: only the last output is used. One reverse chain through F_k^T .. F_1^T.
        grads_x[k] = grad_outputs[-1]
        if k > stop:
            reverse = [f.T for f in reversed(factors[stop:])]  # F_k^T .. F_{stop+1}^T
            backs = chain_matmul(grad_outputs[-1], reverse)
            for j, g in zip(range(k - 1, stop - 1, -1), backs):
                grads_x[j] = g
    else:
        running = None
        for j in range(k, stop - 1, -1):
            incoming = grad_outputs[j - 1] if j >= 1 else None
            if running is None:
                running = incoming
            elif incoming is not None:
                running = running + incoming
            grads_x[j] = running
            if j > stop and running is not None:
                running = running @ factors[j - 1]
    grad_x = grads_x[0] if needs_x else None
    grad_factors = None
    if any(needs_factor):
        pairs = [(j, grads_x[j + 1]) for j in range(k) if needs_factor[j] and grads_x[j + 1] is not None]
        products = _factor_grads_in_layout(
            chain_factor_grads, [factors[j] for j, _ in pairs], [g for _, g in pairs], [inputs[j] for j, _ in pairs]
        )
        grad_factors = [None] * k
        for (j, _), product in zip(pairs, products):
            grad_factors[j] = product
    return grad_x, grad_factors


def _recorded_backward(x, factors, return_all, grad_outputs, needs_x, needs_factor):
    """:func:`_chain_backward` when the backward itself is recorded (``create_graph=True``: gradient
    penalties, second-order meta-learning, Hessian-vector products). The kernels' outputs carry no
    graph, so a second derivative through them would silently miss every term they form, and the
    custom ops have no derivative of their own; here the vector-Jacobian product of the torch twin
    of the forward, recomputed from the saved inputs at a ``torch.func.vjp`` level of its own (the
    derivative with respect to the chain's own inputs alone, even where x depends on a factor: a
    layer applied twice), is formed by ops that autograd records, so that it is differentiable
    again."""
    used = [j for j, grad in enumerate(grad_outputs) if grad is not None]

    def chain(x, *factors):
        outputs = chain_matmul_ref(x, list(factors), return_all)
        return tuple(outputs[j] for j in used)

    _, vjp = torch.func.vjp(chain, x, *factors)
    grad_x, *grad_factors = vjp(tuple(grad_outputs[j] for j in used))
    return (grad_x if needs_x else None), [g if need else None for g, need in zip(grad_factors, needs_factor)]


_chain_matmul_op.register_autograd(_chain_matmul_backward, setup_context=_chain_matmul_setup_context)


# Eager calls skip the custom-op dispatcher (about 100 us of Python per call, measured on a 2-core
# CPU: a depth-4 layer's train step at d=64, B=1 took 411 us against 118 us for the sequential
# chain); under torch.compile the ops are what the graph sees. Where the Triton kernels serve the
# call, eager autograd runs the same bodies through a torch.autograd.Function with the op's
# backward. Everywhere else the body is the torch twin, whose matmuls autograd differentiates
# itself: that graph is the naive chain's own, with no Python backward (the Function cost 60 to
# 100 us a train step more than the sequential chain at d=64, B=1 on the same CPU).
_CUDA_KERNELS = None  # fastrank.kernels.chain once registered


def _traced(x: Tensor) -> bool:
    """Whether this call is traced rather than run: by Dynamo (torch.compile's front end), or by
    AOTAutograd / make_fx / any dispatch mode, which run the backward formula on fake or functional
    tensors. Traced calls must reach the custom ops, which the tracers see as one node; the eager
    bodies launch kernels on real memory."""
    return (
        torch.compiler.is_compiling()
        or (type(x) is not Tensor and type(x) is not torch.nn.Parameter)
        or torch._C._len_torch_dispatch_stack() > 0
    )


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...) is active.
    Its tensors are wrappers without storage, which the Triton kernels cannot read; the chain's
    autograd Function has no vmap or forward-mode rule, nor the custom ops a batching rule. Under a
    transform the chain runs as plain torch ops (the naive chain, the torch twins), which every
    transform batches and differentiates."""
    return torch._C._are_functorch_transforms_active()


def _runs_kernels(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """Whether the chain's body for x (M, n_0) and factors is the Triton chain kernel (which has no
    autograd of its own): CUDA, the kernels registered, and inputs the on-chip kernel takes. Wider
    chains run the torch twin on CUDA too (one cuBLAS matmul per step), which autograd can
    differentiate as the naive chain itself."""
    return x.is_cuda and _CUDA_KERNELS is not None and _CUDA_KERNELS.runs_on_chip(x, factors)


_PLAIN_DTYPES = (torch.float32, torch.float64)
# One C call, 0.13 us, where torch.is_autocast_enabled(x.device.type) took 0.66 us (2-core Xeon).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_enabled(x: Tensor) -> bool:
    if _any_autocast is not None and not torch.compiler.is_compiling() and not _any_autocast():
        return False
    return torch.is_autocast_enabled(x.device.type)


def _eager_plain(x: Tensor) -> bool:
    """Whether a layer's chain on x runs as the naive chain of plain torch matmuls, differentiated by
    autograd: an eager call (not traced), fp32 or fp64 (the torch twin rounds nothing) and no
    autocast cast to apply first; on CUDA too, where the Triton kernels would serve the call: on an
    H100 an fp32 OverparamLinear(64, 64, depth=4) train step at B=1 took 0.89 ms through the kernels
    and the Function against 0.39 ms for the sequential chain (each Triton launch of the grouped
    kernels costs host time that cuBLAS calls do not). Layers then fuse the bias into the last
    step and multiply the collapsed weight without transposes (each saved a few us a train step at
    d=64, B=1 on a 2-core Xeon: against 82 us for the whole step). fp16 / bf16 keep the kernels,
    which round every step once, as the chain op does; torch.compile sees the ops."""
    return x.dtype in _PLAIN_DTYPES and not _autocast_enabled(x) and not _traced(x)


def _plain_half_on_cuda(x: Tensor, depth: int, widest: int) -> bool:
    """Whether a layer's eager fp16 / bf16 train step on x, a chain of ``depth`` factors whose widest
    layer (max over n_0 .. n_L) is ``widest``, runs as plain torch ops under autograd (the naive
    chain, or the collapsed weight, as the cost model picks) instead of the chain ops, on CUDA: at
    depth 2, and wherever the chain kernel would not run (:func:`_kernels_take_width`).

    Depth 2, measured on an NVIDIA H200 (2026-12-04, torch 2.11, Triton 3.6, bf16,
    OverparamLinear(d, d, depth=L) at d 64 / 256, B 1 / 64 / 1024 / 8192,
    benchmarks/results/h200/README.md), against the better of the sequential chain and collapsed
    autograd, every step host-bound (about 1 ms): at depth 2 the kernels took 1.26-1.63x at 6 of 8
    shapes, at depth 4 and 8 they met 1.1x at 7 of 10 (0.66-0.93x at five).

    Wider chains: the chain ops' torch twin, which serves them, runs each step as an fp32-output
    matmul and a cast (two launches where cuBLAS takes one, and four or more in the backward where
    autograd's mm backward takes two) through a Python autograd Function; on the same H200 its
    forward of an 8192-row bf16 chain at d = 1024, L = 4 took 196.7 us of device time against
    107.8 us for one bf16 torch.matmul per step (benchmarks/results/h200/chain-kernel-2026-12-04.json).

    The rule is the same while a stream captures a CUDA graph, although device time decides
    there (the kernels' replays took 1.15-1.33x the naive forms' at d = 256, 0.80-1.02x at
    d = 64): a capture must launch only what its eager warm-up launched. A Triton kernel's first
    launch compiles and autotunes, which synchronizes; cuBLAS's first call creates its handle,
    which fails inside a capture (pytorch/pytorch#99397); either invalidates the capture.

    The plain ops are cuBLAS GEMMs in the half dtype: fp32 accumulation, one rounding per product,
    as the kernels round. Under ``torch.autocast`` with a half dtype (fp32 parameters, the usual
    mixed-precision training) the step is the same: autocast casts each plain op's operands, as the
    chain ops cast theirs (:func:`_routes_half_to_plain`).
    """
    return x.is_cuda and _routes_half_to_plain(x, depth, widest)


def _routes_half_to_plain(x: Tensor, depth: int, widest: int) -> bool:
    """:func:`_plain_half_on_cuda` on any device: an eager step whose products run in fp16 / bf16
    (x's dtype, or autocast's where autocast is on for x's device), at depth 2 or at a width the
    chain kernel does not take."""
    if not (depth == 2 or not _kernels_take_width(widest)) or _traced(x):
        return False
    if _autocast_enabled(x):  # which leaves fp64 as it is
        return x.dtype != torch.float64 and torch.get_autocast_dtype(x.device.type) in _HALF_DTYPES
    return x.dtype in _HALF_DTYPES


def _autocast_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as autocast casts a matmul's operand: floating point other than fp64 to ``dtype``."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


def _kernels_take_width(widest: int) -> bool:
    """Whether the Triton chain kernel is registered and takes fp16 / bf16 chains whose widest layer
    is ``widest`` (``fastrank.kernels.chain.MAX_ONCHIP_WIDTH``, read at each call)."""
    return _CUDA_KERNELS is not None and widest <= _CUDA_KERNELS.MAX_ONCHIP_WIDTH


def _plain_product(factors: Sequence[Tensor]) -> Tensor:
    """``W_L ... W_1`` as plain matmuls, which autograd differentiates (and whose prefix products
    it keeps)."""
    weight = factors[0]
    for factor in factors[1:]:
        weight = torch.mm(factor, weight)
    return weight


def _chain_matmul_body(x: Tensor, factors: list[Tensor], return_all: bool) -> list[Tensor]:
    """The op's body for x's device: the Triton kernel on CUDA, the torch twin elsewhere."""
    if x.is_cuda and _CUDA_KERNELS is not None:
        return _CUDA_KERNELS.chain_matmul(x, factors, return_all)
    return chain_matmul_ref(x, factors, return_all)


def _chain_matmul_backward_body(x: Tensor, factors: list[Tensor], grad_output: Tensor, needs_x: bool) -> list[Tensor]:
    if x.is_cuda and _CUDA_KERNELS is not None:
        return _CUDA_KERNELS.chain_matmul_backward(x, factors, grad_output, needs_x)
    return chain_matmul_backward_ref(x, factors, grad_output, needs_x)


def _recomputes_backward(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """Whether the backward of a chain on x (M, n_0) recomputes the intermediates at about the cost
    of reading them (narrow chains on CUDA: the fused kernel): layers then keep only x, one layer's
    activation memory instead of L."""
    return x.is_cuda and _CUDA_KERNELS is not None and _CUDA_KERNELS.recomputes_backward(x, factors)


def _chain_factor_grads_body(grads: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
    if grads[0].is_cuda and _CUDA_KERNELS is not None:
        return _CUDA_KERNELS.chain_factor_grads(grads, inputs)
    return chain_factor_grads_ref(grads, inputs)


class _ChainMatmul(torch.autograd.Function):
    """Eager twin of ``fastrank::chain_matmul`` with its autograd formula (``_chain_backward``)."""

    @staticmethod
    def forward(ctx, x, return_all, *factors):
        outputs = _chain_matmul_body(x, list(factors), return_all)
        _chain_matmul_setup_context(ctx, (x, factors, return_all), outputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        k = ctx.num_factors
        grad_x, grad_factors = _chain_backward(
            ctx.saved_tensors, k, ctx.return_all, grad_outputs,
            ctx.needs_input_grad[0], list(ctx.needs_input_grad[2:]),
        )
        return (grad_x, None, *(grad_factors if grad_factors is not None else [None] * k))


def register_cuda_kernels(chain_kernels) -> None:
    """Route the ops to the Triton kernels of ``chain_kernels`` (``fastrank.kernels.chain``) on CUDA.

    Called by ``fastrank._cuda_kernels`` when Triton imports; the kernel module imports this one
    (its torch twins and checks), so this module never imports it. Without it the torch bodies
    serve CUDA too.
    """
    global _CUDA_KERNELS
    _CUDA_KERNELS = chain_kernels

    @_chain_matmul_op.register_kernel("cuda")
    def _(x, factors, return_all):
        _check_chain(x, factors)
        return chain_kernels.chain_matmul(x, factors, return_all)

    @_chain_factor_grads_op.register_kernel("cuda")
    def _(grads, inputs):
        return chain_kernels.chain_factor_grads(grads, inputs)

    @_chain_matmul_backward_op.register_kernel("cuda")
    def _(x, factors, grad_output, needs_x):
        return chain_kernels.chain_matmul_backward(x, factors, grad_output, needs_x)



# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def chain_matmul(x: Tensor, factors: Sequence[Tensor], return_all: bool = True) -> list[Tensor]:
    """Run ``x`` through a chain of linear factors.

    Args:
        x: ``(M, n_0)`` float tensor (fp64, fp32, fp16 or bf16), any strides.
        factors: ``F_1 .. F_k`` with ``F_j`` of shape ``(n_j, n_{j-1})``, same dtype and device as x.
        return_all: return every intermediate ``[X_1, ..., X_k]``; otherwise only ``[X_k]``.

    Returns:
        list of ``(M, n_j)`` tensors in x's dtype, ``X_j = X_{j-1} @ F_j^T``. Differentiable in x
        and every factor; the backward is the reverse chain plus one grouped factor-gradient op.
        Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``F.linear``
        does (fp64 ones stay fp64).
    """
    if _autocast_enabled(x):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, factors = _autocast_cast(x, dtype), [_autocast_cast(f, dtype) for f in factors]
    if _transformed():
        return chain_matmul_ref(x, list(factors), return_all)
    if _traced(x):  # one op in the graph
        return _chain_matmul_op(x, list(factors), return_all)
    if not torch.is_grad_enabled() or (return_all and not _runs_kernels(x, factors)):
        # Eager without autograd, or a torch twin that autograd differentiates as the naive chain
        # (return_all: its intermediates are kept, as the Function keeps them).
        return _chain_matmul_body(x, list(factors), return_all)
    # A kernel body, or return_all=False: the Function recomputes X_1 .. X_{k-1} in the backward
    # instead of keeping them.
    return list(_ChainMatmul.apply(x, return_all, *factors))


def chain_factor_grads(grads: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    """Grouped products ``dF_j = grads[j]^T @ inputs[j]`` (``(M, n_j)``, ``(M, m_j)`` -> ``(n_j, m_j)``)."""
    if len(grads) == 0:
        return []
    if _transformed():
        return chain_factor_grads_ref(list(grads), list(inputs))
    if _traced(grads[0]):
        return _chain_factor_grads_op(list(grads), list(inputs))
    return _chain_factor_grads_body(list(grads), list(inputs))


def chain_matmul_backward(
    x: Tensor, factors: Sequence[Tensor], grad_output: Tensor, needs_x: bool = True
) -> list[Tensor]:
    """Gradients of ``chain_matmul(x, factors, return_all=False)`` from its inputs and the gradient
    of its output alone: the intermediates are recomputed, never kept.

    Args:
        x: ``(M, n_0)`` float tensor, as given to :func:`chain_matmul`.
        factors: ``F_1 .. F_k``, ``F_j`` of shape ``(n_j, n_{j-1})``, same dtype and device as x.
        grad_output: ``dX_k``, ``(M, n_k)``, same dtype and device.
        needs_x: also return ``dX_0``.

    Returns:
        ``[dF_1, ..., dF_k]`` (``(n_j, n_{j-1})``), then ``dX_0`` (``(M, n_0)``) when ``needs_x``, in
        x's dtype, each rounded as the naive chain's backward rounds it: the reverse chain
        ``dX_{j-1} = dX_j F_j`` once per step, ``dF_j = dX_j^T X_{j-1}`` accumulated in fp32 and
        rounded once. On CUDA a narrow chain (every width at most
        ``fastrank.kernels.chain.MAX_RESIDENT_WIDTH``, at most ``FACTORS_PER_LAUNCH`` factors) takes
        one fused launch that keeps its row block's intermediates on chip.
    """
    if _transformed():
        return chain_matmul_backward_ref(x, list(factors), grad_output, needs_x)
    if _traced(x):
        return _chain_matmul_backward_op(x, list(factors), grad_output, needs_x)
    return _chain_matmul_backward_body(x, list(factors), grad_output, needs_x)


def collapsed_weight(factors: Sequence[Tensor]) -> Tensor:
    """The product ``W_L ... W_1`` of factors given input side first (``factors[0]`` is ``W_1``).

    Args:
        factors: ``W_j`` of shape ``(n_j, n_{j-1})``.

    Returns:
        ``(n_L, n_0)`` tensor in the factors' dtype (computed in fp32 for halves), differentiable.
    """
    if len(factors) == 1:
        return factors[0]
    if _eager_plain(factors[0]):
        return _plain_product(factors)
    # The chain starts at the output side, X_0 = W_L, and takes W_{L-1} .. W_1 as transposed views
    # (X_j = X_{j-1} W_{L-j}): its last output is the product itself, W_L's gradient comes back as
    # dX_0 in W_L's layout and the others as transposed products in theirs (_chain_backward), so
    # autograd copies none of them. Started at W_1^T, W_1's gradient came back transposed and
    # AccumulateGrad copied it: one more launch in every collapsed train step. Under autograd the
    # partial products are kept for the backward, unless it recomputes them at about the cost of
    # reading them (narrow chains on CUDA: one fused launch instead of the reverse chain and the
    # grouped factor gradients).
    x, rest = factors[-1], [f.T for f in reversed(factors[:-1])]
    keep = torch.is_grad_enabled() and any(f.requires_grad for f in factors) and not _recomputes_backward(x, rest)
    return chain_matmul(x, rest, return_all=keep)[-1]


def chain_costs(
    batch: int, dims: Sequence[int], *, grad_input: bool = True, grad_factors: bool = True
) -> tuple[int, int]:
    """Multiply-add counts of one call through the chain, for both associations.

    Args:
        batch: number of rows B of the input.
        dims: ``[n_0, n_1, ..., n_L]`` (input width first).
        grad_input / grad_factors: which gradients the backward must produce; both False means
            forward only.

    Returns:
        ``(activation, collapsed)``: the activation chain ``x W_1^T ... W_L^T`` costs
        ``B S`` forward (``S = sum n_j n_{j-1}``), the same again for the factor gradients and
        for the propagated gradient. The collapsed form costs ``R = n_0 sum_{j>=2} n_{j-1} n_j``
        for the prefix products, ``B n_0 n_L`` forward, and in the backward ``B n_0 n_L`` per
        requested gradient of x or of the product, plus ``2 R`` to bring ``dP`` to the factors.
    """
    n0, nL = dims[0], dims[-1]
    steps = [dims[j] * dims[j - 1] for j in range(1, len(dims))]
    total = sum(steps)
    prefix = n0 * (total - steps[0])
    activation = batch * total
    collapsed = prefix + batch * n0 * nL
    if grad_factors:
        activation += batch * total + batch * (total - steps[0])
        collapsed += batch * n0 * nL + 2 * prefix
    if grad_input:
        activation += batch * steps[0] if grad_factors else batch * total
        collapsed += batch * n0 * nL
    return activation, collapsed


def chain_linear(x: Tensor, factors: Sequence[Tensor], bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, W_L ... W_1, bias)`` with the cheaper association chosen from the shapes.

    Args:
        x: ``(..., n_0)`` input.
        factors: ``W_1 .. W_L``, ``W_j`` of shape ``(n_j, n_{j-1})``, input side first.
        bias: optional ``(n_L,)``.

    Returns:
        ``(..., n_L)``. Gradients of x, every factor and the bias equal those of the naive autograd
        chain up to float rounding; which association runs is decided by :func:`chain_costs`.
    """
    in_features = factors[0].shape[1]
    if len(factors) == 1:
        return F.linear(x, factors[0], bias)
    grad_on = torch.is_grad_enabled()
    grad_input = grad_on and x.requires_grad
    grad_factors = grad_on and any(f.requires_grad for f in factors)
    rows = x.numel() // max(in_features, 1)
    dims = [in_features] + [f.shape[0] for f in factors]
    activation, collapsed = chain_costs(rows, dims, grad_input=grad_input, grad_factors=grad_factors)
    backward = grad_input or grad_factors
    plain = backward and _plain_half_on_cuda(x, len(factors), max(dims))
    return _chain_linear_as(x, factors, bias, collapsed <= activation, backward, plain)


def _chain_linear_as(
    x: Tensor, factors: Sequence[Tensor], bias: Tensor | None, collapse: bool, backward: bool, plain: bool = False
) -> Tensor:
    """:func:`chain_linear` with the association already chosen (layers remember their choice).

    ``collapse``: one ``F.linear`` with the collapsed weight, else the activation chain;
    ``backward``: some gradient (of x or of a factor) will be asked for, so the activation chain
    keeps its intermediates; ``plain``: plain torch matmuls under autograd, as for fp32 / fp64
    (an fp16 / bf16 train step that :func:`_plain_half_on_cuda` routes).
    """
    if collapse:
        return F.linear(x, _plain_product(factors) if plain else collapsed_weight(factors), bias)
    flat = x.dim() == 2
    rows = x if flat else x.reshape(-1, factors[0].shape[1])
    if plain or _eager_plain(rows):
        # The naive chain itself, its last step carrying the bias (one addmm, not a matmul and an
        # add), under autograd, on every device (on CUDA the op's body is a Triton kernel, which
        # autograd cannot differentiate). F.linear records one transpose and one matmul per step.
        hidden = rows
        if len(factors) > 1:
            if _autocast_enabled(rows):  # F.linear's own casts, made first so that the check holds
                dtype = torch.get_autocast_dtype(rows.device.type)
                hidden = _autocast_cast(rows, dtype)
                factors = [*(_autocast_cast(f, dtype) for f in factors[:-1]), factors[-1]]
            _check_chain(hidden, factors[:-1])
        for factor in factors[:-1]:
            hidden = F.linear(hidden, factor)
        out = F.linear(hidden, factors[-1], bias)
    else:
        # A backward that recomputes the intermediates (the fused kernel) needs only x kept.
        keep = backward and not _recomputes_backward(rows, factors)
        out = chain_matmul(rows, factors, return_all=keep)[-1]
        if bias is not None:
            out = out + bias.to(out.dtype)  # autocast: the chain ran in the autocast dtype
    return out if flat else out.reshape(*x.shape[:-1], out.shape[-1])
