"""Cases of the chain suite: over-parameterized layers against the layers they replace.

:func:`chain_cases` (every device): a train step and an eval call of
``OverparamLinear(d, d, depth=L)`` against

* ``nn.Linear`` (the baseline: what the layer costs without over-parameterization),
* ``sequential chain``: one ``F.linear`` per factor (the anchor library's training forward),
* ``collapsed autograd``: plain autograd through ``W_L @ ... @ W_1``, then ``F.linear``,
* ``torch.compile chain``: ``torch.compile`` of the sequential chain.

:func:`small_layer_cases` (every device, part of :func:`chain_cases`' defaults): the same
comparison where fixed per-call costs dominate (d = 64, 128, 256, B = 1, 16, 64, L = 2, 4, in
training and in eval), and ``OverparamConv2d`` against ``nn.Conv2d`` in eval at small images.

:func:`chain_kernel_cases` (CUDA): the Triton chain kernel (``fastrank.kernels.chain.chain_matmul``)
against one ``torch.matmul`` per factor and ``torch.compile`` of that loop; the d x d work of a
collapsed train step (the weight chain with its partial products, the grouped factor gradients)
against one ``torch.matmul`` per factor, each also replayed from a CUDA graph (the device's time
without the host's launch costs); the narrow activation chain's train step (forward and
backward) with its intermediates kept or recomputed (the fused backward kernel) against autograd
through one ``torch.matmul`` per factor.

Errors are relative to an fp64 evaluation of the same chain: the gradients of the factors and of x
after a train step, the output after an eval call (``nn.Linear`` is another layer: no error).
TFLOP/s count the work each variant actually does (``fastrank.chain_costs``), so a variant that
does less work than the sequential chain shows it in the time, not in the TFLOP/s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._backend import cuda_matmul_allows_tf32
from ..chain import chain_costs
from ..layers import OverparamConv2d, OverparamLinear
from .cases import Case, Prepared

__all__ = [
    "FLOOR", "LINEAR_VARIANTS", "SMALL_VARIANTS", "CONV_VARIANTS", "KERNEL_VARIANTS", "chain_cases",
    "small_layer_cases", "chain_kernel_cases", "WEIGHT_CHAIN_VARIANTS", "FACTOR_GRADS_VARIANTS",
    "NARROW_STEP_VARIANTS", "GRAPHED",
]

FLOOR = "one matmul of the same FLOPs (floor)"
LINEAR_VARIANTS = ("nn.Linear", "fastrank", "sequential chain", "collapsed autograd", "torch.compile chain", FLOOR)
SMALL_VARIANTS = ("nn.Linear", "fastrank", "sequential chain", "collapsed autograd", FLOOR)
CONV_VARIANTS = ("nn.Conv2d", "fastrank", "sequential convs", FLOOR)
KERNEL_VARIANTS = ("torch.matmul x L", "chain_matmul", "chain_matmul last", "torch.compile chain", FLOOR)
PER_FACTOR = "torch.matmul per factor"
GRAPHED = " (CUDA graph)"
WEIGHT_CHAIN_VARIANTS = (PER_FACTOR, "chain_matmul", PER_FACTOR + GRAPHED, "chain_matmul" + GRAPHED, FLOOR)
NARROW_STEP_BASELINE = "torch.matmul x L, autograd"
NARROW_STEP_VARIANTS = (NARROW_STEP_BASELINE, "chain_matmul keep", "chain_matmul recompute", FLOOR)
FACTOR_GRADS_VARIANTS = (PER_FACTOR, "chain_factor_grads", PER_FACTOR + GRAPHED, "chain_factor_grads" + GRAPHED,
                         FLOOR)


def _matmul_floor(flops: float, features: int, device, dtype) -> Callable[[], torch.Tensor]:
    """One ``(rows, d) @ (d, d)`` matmul doing ``flops`` floating-point operations (rows rounded):
    what this machine's BLAS does with the work of a variant, in one call."""
    rows = max(1, round(flops / (2.0 * features * features)))
    gen = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(rows, features, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(features, features, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(rows, features, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


class _FactorsOf(nn.Module):
    """A naive form of an ``OverparamLinear``'s forward, sharing its factors and bias."""

    def __init__(self, layer: OverparamLinear):
        super().__init__()
        self.factors = layer.factors
        self.bias = layer.bias


class _SequentialChain(_FactorsOf):
    """The anchor library's training forward: one linear layer per factor, run in sequence."""

    def forward(self, x):
        for factor in self.factors:
            x = F.linear(x, factor)
        return x + self.bias


class _CollapsedAutograd(_FactorsOf):
    """Plain autograd through the collapsed product ``W_L @ ... @ W_1``, then ``F.linear``."""

    def forward(self, x):
        weight = self.factors[-1]
        for factor in reversed(self.factors[:-1]):
            weight = weight @ factor
        return F.linear(x, weight, self.bias)


def _layer_calls(features: int, depth: int, batch: int, mode: str, device, dtype):
    """``OverparamLinear(features, features, depth)``, ``nn.Linear`` of the same shape, the input
    x (batch, features) and ``make(module)``: one train step (x requires grad, as inside a network)
    or one eval call of a module on x, as a zero-argument callable."""
    factory = {"device": device, "dtype": dtype}
    torch.manual_seed(0)
    layer = OverparamLinear(features, features, depth=depth, **factory)
    linear = nn.Linear(features, features, **factory)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, features, generator=gen).to(**factory)
    if mode == "train":
        x.requires_grad_(True)
        watched = list(layer.factors) + [x]

        def make(module):
            return _train_step(module, x, watched)
    else:
        layer.eval()

        def make(module):
            return _eval_step(module, x)

    return layer, linear, x, make


def _train_step(module: nn.Module, x: torch.Tensor, watched: list[torch.Tensor]) -> Callable[[], list]:
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).sum().backward()
        return [w.grad for w in watched]

    return step


def _eval_step(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step():
        with torch.no_grad():
            return module(x)

    return step


def _compiled(module: nn.Module) -> nn.Module:
    # A fresh dynamo cache per case: the cases share _SequentialChain.forward, and more shapes than
    # the recompile limit would silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False)


def _relative_error(results, references) -> float:
    """max over tensors of max |result - reference| / max |reference|."""
    worst = 0.0
    for result, reference in zip(results, references):
        scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        worst = max(worst, float((result.double() - reference).abs().max() / scale))
    return worst


def _chain_error(variant: str, result, reference) -> dict:
    if variant in ("nn.Linear", FLOOR):  # other computations: nothing to compare
        return {}
    results = result if isinstance(result, list) else [result]
    return {"error": _relative_error(results, reference)}


def _fp64_reference(layer: OverparamLinear, x: torch.Tensor, mode: str) -> Callable[[], list]:
    def reference():
        factors = [f.detach().double().requires_grad_(mode == "train") for f in layer.factors]
        x64 = x.detach().double().requires_grad_(mode == "train")
        h = x64
        for factor in factors:
            h = h @ factor.T
        h = h + layer.bias.detach().double()
        if mode == "eval":
            return [h.detach()]
        h.sum().backward()
        return [f.grad for f in factors] + [x64.grad]

    return reference


def _linear_flops(mode: str, batch: int, features: int, depth: int) -> dict[str, float]:
    """Floating-point operations (2 x multiply-adds) of one call of each variant."""
    dims = [features] * (depth + 1)
    grads = mode == "train"
    activation, collapsed = chain_costs(batch, dims, grad_input=grads, grad_factors=grads)
    linear = batch * features * features * (3 if grads else 1)
    if mode == "eval":
        fastrank = linear  # one F.linear with the cached collapsed weight
    else:
        fastrank = min(activation, collapsed)  # the association the layer picks
    macs = {
        "nn.Linear": linear,
        "fastrank": fastrank,
        "sequential chain": activation,
        "collapsed autograd": collapsed,
        "torch.compile chain": activation,
        FLOOR: fastrank,  # the floor does fastrank's work in one matmul
    }
    return {name: 2.0 * value for name, value in macs.items()}


def chain_cases(
    quick: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    features: int | None = None,
    depth: int = 4,
    batches: tuple[int, ...] | None = None,
    compile_batches: tuple[int, ...] | None = None,
    repeats: int | None = None,
    small_layers: bool | None = None,
) -> list[Case]:
    """Train-step and eval cases of ``OverparamLinear(features, features, depth)`` vs ``nn.Linear``.

    Defaults: ``features=1024, batches=(256, 2048, 16384)``; with ``quick``: ``features=256,
    batches=(64, 1024, 8192)`` and fewer repeats. ``small_layers`` (default: when neither
    ``features`` nor ``batches`` is given) appends :func:`small_layer_cases`. The ``torch.compile chain`` variant runs for the
    batches in ``compile_batches`` (default: all; with ``quick``: only the middle batch, because
    compiling costs 5-10 s per case on a 2-core CPU, as much as the rest of a case) and is listed
    as skipped in the others. Where torch.compile fails (no C++ compiler, unsupported platform) the
    variant is reported as failed with the error, and the other variants still run.
    """
    if small_layers is None:
        small_layers = features is None and batches is None
    features = features or (256 if quick else 1024)
    batches = batches or ((64, 1024, 8192) if quick else (256, 2048, 16384))
    if compile_batches is None:
        compile_batches = (batches[len(batches) // 2],) if quick else batches
    repeats = repeats or (5 if quick else 9)
    dtype_name = str(dtype).replace("torch.", "")
    cases = []
    for mode in ("train", "eval"):
        for batch in batches:

            def setup(batch=batch, mode=mode) -> Prepared:
                layer, linear, x, make = _layer_calls(features, depth, batch, mode, device, dtype)
                chain = _SequentialChain(layer)

                variants = {
                    "nn.Linear": make(linear),
                    "fastrank": make(layer),
                    "sequential chain": make(chain),
                    "collapsed autograd": make(_CollapsedAutograd(layer)),
                }
                floor_flops = _linear_flops(mode, batch, features, depth)[FLOOR]
                variants[FLOOR] = _matmul_floor(floor_flops, features, device, dtype)
                skipped = {}
                if batch in compile_batches:
                    variants["torch.compile chain"] = make(_compiled(chain))
                else:
                    skipped["torch.compile chain"] = (
                        f"compiled only at B={', '.join(map(str, compile_batches))} under --quick (compile time)"
                        if compile_batches else "torch.compile not asked for"
                    )
                return Prepared(variants, _fp64_reference(layer, x, mode), skipped)

            cases.append(
                Case(
                    suite="chain",
                    name=f"{mode} B={batch}",
                    shape=f"B={batch} d={features} L={depth}",
                    dtype=dtype_name,
                    baseline="nn.Linear",
                    variants=LINEAR_VARIANTS,
                    setup=setup,
                    flops=_linear_flops(mode, batch, features, depth),
                    error=_chain_error,
                    repeats=repeats,
                    warmup=2 if batch in compile_batches else 1,  # compile traces the backward on the second call
                    floor=FLOOR,
                )
            )
    if small_layers:
        cases += small_layer_cases(quick=quick, device=device, dtype=dtype)
    return cases


# ----------------------------------------------------------------------------- small layers
# (d, B, L) of the train-step and of the eval cases, the grid of the targets: d in (64, 128, 256),
# B in (1, 16, 64), L in (2, 4); quick keeps one of each.
_SMALL_GRID = [(d, b, length) for d in (64, 128, 256) for b in (1, 16, 64) for length in (2, 4)]
_SMALL_TRAIN = _SMALL_GRID
_SMALL_TRAIN_QUICK = [(64, 1, 4)]
_SMALL_EVAL = _SMALL_GRID
_SMALL_EVAL_QUICK = [(64, 1, 4)]
# (channels, image side, batch) of the conv eval cases, kernel sizes (3, 1), padding 1.
_SMALL_CONV = [(32, 8, 1), (64, 16, 8)]
_SMALL_CONV_QUICK = [(32, 8, 1)]
# Calls of a few to a few hundred microseconds: many repeats keep the medians steady (the
# interleaved quartiles of the d=64 eval cases stay within 5% of the median at 200, 2-core Xeon).
_SMALL_REPEATS = 200
_SMALL_REPEATS_QUICK = 60


def _small_linear_case(mode: str, features: int, batch: int, depth: int, device, dtype, repeats: int) -> Case:
    def setup() -> Prepared:
        layer, linear, x, make = _layer_calls(features, depth, batch, mode, device, dtype)
        flops = _linear_flops(mode, batch, features, depth)
        variants = {
            "nn.Linear": make(linear),
            "fastrank": make(layer),
            "sequential chain": make(_SequentialChain(layer)),
            "collapsed autograd": make(_CollapsedAutograd(layer)),
            FLOOR: _matmul_floor(flops[FLOOR], features, device, dtype),
        }
        return Prepared(variants, _fp64_reference(layer, x, mode))

    target = (
        "target: fastrank <= 1.1x the cheaper of sequential chain and collapsed autograd"
        if mode == "train" else "target: fastrank <= 1.1x nn.Linear"
    )
    return Case(
        suite="chain",
        name=f"small {mode} d={features} B={batch} L={depth}",
        shape=f"B={batch} d={features} L={depth}",
        dtype=str(dtype).replace("torch.", ""),
        baseline="nn.Linear",
        variants=SMALL_VARIANTS,
        setup=setup,
        flops=_linear_flops(mode, batch, features, depth),
        error=_chain_error,
        repeats=repeats,
        warmup=5,
        note=f"per-call overhead; {target}",
        floor=FLOOR,
    )


class _SequentialConvs(nn.Module):
    """One convolution per factor of an ``OverparamConv2d`` (padding on the first, bias on the last)."""

    def __init__(self, layer: OverparamConv2d):
        super().__init__()
        self.factors = layer.factors
        self.bias = layer.bias
        self.padding = layer._conv_padding

    def forward(self, x):
        last = len(self.factors) - 1
        for j, factor in enumerate(self.factors):
            x = F.conv2d(x, factor, self.bias if j == last else None, padding=self.padding if j == 0 else 0)
        return x


def _conv_error(variant: str, result, reference) -> dict:
    if variant in ("nn.Conv2d", FLOOR):
        return {}
    return {"error": _relative_error([result], reference)}


def _small_conv_case(channels: int, side: int, batch: int, device, dtype, repeats: int) -> Case:
    # kernel sizes (3, 1), padding 1: a 3x3 conv then a 1x1 conv, collapsed 3x3
    conv_macs = batch * side * side * channels * channels * (9 + 1)
    flops = {
        "nn.Conv2d": 2.0 * batch * side * side * channels * channels * 9,
        "fastrank": 2.0 * batch * side * side * channels * channels * 9,  # the cached 3x3 kernel
        "sequential convs": 2.0 * conv_macs,
    }
    flops[FLOOR] = flops["fastrank"]

    def setup() -> Prepared:
        factory = {"device": device, "dtype": dtype}
        torch.manual_seed(0)
        layer = OverparamConv2d(channels, channels, kernel_sizes=(3, 1), padding=1, **factory).eval()
        conv = nn.Conv2d(channels, channels, 3, padding=1, **factory)
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, channels, side, side, generator=gen).to(**factory)

        def reference():
            h = x.double()
            for j, factor in enumerate(layer.factors):
                h = F.conv2d(h, factor.detach().double(), padding=1 if j == 0 else 0)
            return [h + layer.bias.detach().double()[:, None, None]]

        variants = {
            "nn.Conv2d": _eval_step(conv, x),
            "fastrank": _eval_step(layer, x),
            "sequential convs": _eval_step(_SequentialConvs(layer), x),
            FLOOR: _matmul_floor(flops[FLOOR], channels, device, dtype),
        }
        return Prepared(variants, reference)

    return Case(
        suite="chain",
        name=f"small conv eval C={channels} {side}x{side} B={batch}",
        shape=f"B={batch} C={channels} H=W={side} k=(3, 1)",
        dtype=str(dtype).replace("torch.", ""),
        baseline="nn.Conv2d",
        variants=CONV_VARIANTS,
        setup=setup,
        flops=flops,
        error=_conv_error,
        repeats=repeats,
        warmup=5,
        note="per-call overhead; target: fastrank <= 1.1x nn.Conv2d",
        floor=FLOOR,
    )


def small_layer_cases(quick: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Case]:
    """Cases where a layer's fixed per-call cost shows: small widths and batches (ViT-tiny, RL MLPs).

    Train steps and eval calls of ``OverparamLinear(d, d, depth=L)`` (bias included) for d in (64,
    128, 256), B in (1, 16, 64), L in (2, 4): 18 of each; ``OverparamConv2d(C, C, (3, 1),
    padding=1)`` in eval against ``nn.Conv2d`` at C=32 on 8x8 (B=1) and C=64 on 16x16 (B=8). With
    ``quick``: one case of each kind (d=64, B=1, L=4). The targets (in each case's note), measured
    with one thread (``fastrank bench --threads 1``) in fp32: train steps within 1.1x of the
    cheaper naive form (sequential chain, collapsed autograd), eval calls within 1.1x of the plain
    layer.
    """
    repeats = _SMALL_REPEATS_QUICK if quick else _SMALL_REPEATS
    cases = [
        _small_linear_case("train", d, b, length, device, dtype, repeats)
        for d, b, length in (_SMALL_TRAIN_QUICK if quick else _SMALL_TRAIN)
    ]
    cases += [
        _small_linear_case("eval", d, b, length, device, dtype, repeats)
        for d, b, length in (_SMALL_EVAL_QUICK if quick else _SMALL_EVAL)
    ]
    cases += [
        _small_conv_case(c, side, b, device, dtype, repeats)
        for c, side, b in (_SMALL_CONV_QUICK if quick else _SMALL_CONV)
    ]
    return cases


# ----------------------------------------------------------------------------- CUDA chain kernel
_KERNEL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _sequential_matmuls(x, factors):
    outputs, block = [], x
    for factor in factors:
        block = torch.matmul(block, factor.T)
        outputs.append(block)
    return outputs


def _kernel_error(variant: str, result, reference) -> dict:
    if variant == FLOOR:
        return {}
    return {"error": _relative_error(result[-1:], reference)}


def chain_kernel_cases(
    quick: bool = False,
    widths: tuple[int, ...] | None = None,
    batches: tuple[int, ...] | None = None,
    lengths: tuple[int, ...] | None = None,
    dtypes: tuple[str, ...] | None = None,
    repeats: int | None = None,
) -> list[Case]:
    """CUDA cases of the Triton chain kernel: ``[X_1 .. X_L]``, ``X_j = X_{j-1} @ W_j^T`` (W_j: d x d).

    Variants: ``torch.matmul x L`` (the baseline, cuBLAS), ``chain_matmul`` (every intermediate),
    ``chain_matmul last`` (only X_L), ``torch.compile chain``. The note says which path
    ``chain_matmul`` takes for the width (the kernel up to ``MAX_ONCHIP_WIDTH``, one matmul per
    step above) and whether TF32 is allowed. Defaults: widths (256, 1024, 4096), batches (512, 8192,
    65536), lengths (2, 4, 8), bf16 and fp32; with ``quick``: widths (256, 1024), batch 8192,
    length 4, bf16 and fp32.

    With bf16 among ``dtypes`` it adds a collapsed train step's d x d work, each against one
    ``torch.matmul`` per factor: the weight chain with all partial products (``chain_matmul`` of
    ``W_L`` through L - 1 transposed factors; d, L in (256, 4), (256, 8), (1024, 4)) and the grouped factor
    gradients (L = 4 products of (d, d) operands, M = d; d in 256, 1024). ``quick`` keeps d = 256, L = 4.
    """
    widths = widths or ((256, 1024) if quick else (256, 1024, 4096))
    batches = batches or ((8192,) if quick else (512, 8192, 65536))
    lengths = lengths or ((4,) if quick else (2, 4, 8))
    dtypes = dtypes or tuple(_KERNEL_DTYPES)
    repeats = repeats or (10 if quick else 20)
    from ..kernels.chain import runs_on_chip  # imports triton: CUDA suites only

    cases = []
    for dtype_name in dtypes:
        for d in widths:
            for batch in batches:
                for length in lengths:

                    def setup(dtype_name=dtype_name, d=d, batch=batch, length=length) -> Prepared:
                        from ..kernels.chain import chain_matmul

                        dtype = _KERNEL_DTYPES[dtype_name]
                        gen = torch.Generator(device="cuda").manual_seed(0)
                        x = torch.randn(batch, d, device="cuda", generator=gen).to(dtype)
                        factors = [
                            (torch.randn(d, d, device="cuda", generator=gen) / d**0.5).to(dtype)
                            for _ in range(length)
                        ]
                        torch._dynamo.reset()
                        compiled = torch.compile(_sequential_matmuls, dynamic=False)

                        def reference():
                            return _sequential_matmuls(x.double(), [f.double() for f in factors])[-1:]

                        return Prepared(
                            {
                                "torch.matmul x L": lambda: _sequential_matmuls(x, factors),
                                "chain_matmul": lambda: chain_matmul(x, factors, return_all=True),
                                "chain_matmul last": lambda: chain_matmul(x, factors, return_all=False),
                                "torch.compile chain": lambda: compiled(x, factors),
                                FLOOR: _matmul_floor(2.0 * batch * d * d * length, d, "cuda", dtype),
                            },
                            reference,
                        )

                    # The rule chain_matmul applies (dtype, widths, TF32 setting), on shape-only tensors.
                    kernel_dtype = _KERNEL_DTYPES[dtype_name]
                    takes_kernel = runs_on_chip(
                        torch.empty(batch, d, dtype=kernel_dtype, device="meta"),
                        [torch.empty(d, d, dtype=kernel_dtype, device="meta")] * length,
                    )
                    path = "Triton kernel" if takes_kernel else "torch.matmul per step"
                    cases.append(
                        _kernel_case(
                            f"{dtype_name} d={d} B={batch} L={length}",
                            f"B={batch} d={d} L={length}",
                            KERNEL_VARIANTS, setup, 2.0 * batch * d * d * length, repeats,
                            f"chain_matmul path: {path}; tf32 {'on' if cuda_matmul_allows_tf32() else 'off'}",
                            dtype=str(_KERNEL_DTYPES[dtype_name]).replace("torch.", ""),
                            error=_kernel_error,
                        )
                    )
    if "bf16" in dtypes:
        cases += [_weight_chain_case(d, length, repeats) for d, length in (_WEIGHT_CHAIN_QUICK if quick else _WEIGHT_CHAIN)]
        cases += [_factor_grads_case(d, length, repeats) for d, length in (_FACTOR_GRADS_QUICK if quick else _FACTOR_GRADS)]
        cases += [_narrow_step_case(d, batch, length, repeats)
                  for d, batch, length in (_NARROW_STEP_QUICK if quick else _NARROW_STEP)]
    return cases


# ----------------------------------------------------------------------------- a collapsed step's d x d work
# (d, L) of the weight-chain and factor-gradient cases (bf16, M = d); quick keeps the cheap d = 256 ones.
_WEIGHT_CHAIN = [(256, 4), (256, 8), (1024, 4)]
_WEIGHT_CHAIN_QUICK = [(256, 4)]
_FACTOR_GRADS = [(256, 4), (1024, 4)]
_FACTOR_GRADS_QUICK = [(256, 4)]


# (d, B, L) of the narrow train-step cases (bf16): the fused backward up to d = 64, composed at 256.
_NARROW_STEP = [(64, 64, 4), (64, 1024, 4), (32, 256, 8), (256, 1024, 4)]
_NARROW_STEP_QUICK = [(64, 64, 4)]


def _all_errors(variant: str, result, reference) -> dict:
    if variant == FLOOR:
        return {}
    return {"error": _relative_error(result, reference)}


def _square_factors(d: int, count: int, seed: int, device: str = "cuda") -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(d, d, device=device, generator=gen) / d**0.5).to(torch.bfloat16) for _ in range(count)]


def _kernel_case(name: str, shape: str, variants: tuple[str, ...], setup, flops: float, repeats: int,
                 note: str, dtype: str = "bfloat16", error=_all_errors) -> Case:
    """A chain-kernel case whose first variant is its baseline (one torch.matmul per factor, with
    autograd where the case trains); every variant, the floor included, does ``flops``."""
    return Case(
        suite="chain-kernel",
        name=name,
        shape=shape,
        dtype=dtype,
        baseline=variants[0],
        variants=variants,
        setup=setup,
        flops=dict.fromkeys(variants, flops),
        error=error,
        repeats=repeats,
        warmup=3,
        floor=FLOOR,
        note=note,
    )


def _graphed(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` captured in a CUDA graph at its first use and replayed from then on: the device's time
    without the host's launch costs (which dominate these small calls). Three eager calls on a side
    stream come first, so that autotuning and allocation happen outside the capture."""
    captured: dict = {}

    def replay():
        if not captured:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    call()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured["out"] = call()
            captured["graph"] = graph
        captured["graph"].replay()
        return captured["out"]

    return replay


def _with_graphs(variants: dict) -> dict:
    """``variants`` (name -> call) with a CUDA-graph replay of each but the floor, before the floor."""
    floor = variants.pop(FLOOR)
    graphed = {name + GRAPHED: _graphed(call) for name, call in variants.items()}
    return {**variants, **graphed, FLOOR: floor}


def _weight_chain_case(d: int, length: int, repeats: int) -> Case:
    """The forward of a collapsed OverparamLinear(d, d, depth=L) as ``collapsed_weight`` runs it:
    ``W_L`` through ``W_{L-1} .. W_1`` as transposed views, keeping every partial product."""
    flops = 2.0 * d * d * d * (length - 1)

    def setup() -> Prepared:
        from ..kernels.chain import chain_matmul

        *first, last = _square_factors(d, length, seed=0)
        x, rest = last, [f.T for f in reversed(first)]

        def reference():
            return _sequential_matmuls(x.double(), [f.double() for f in rest])

        return Prepared(
            _with_graphs({
                PER_FACTOR: lambda: _sequential_matmuls(x, rest),
                "chain_matmul": lambda: chain_matmul(x, rest, return_all=True),
                FLOOR: _matmul_floor(flops, d, "cuda", torch.bfloat16),
            }),
            reference,
        )

    path = "one launch" if d <= _onchip_width() else "one matmul per step (wider than the kernel's limit)"
    return _kernel_case(
        f"weight chain bf16 d={d} L={length}",
        f"x=W_L ({d}, {d}), {length - 1} transposed factors {d}x{d}, all partial products",
        WEIGHT_CHAIN_VARIANTS, setup, flops, repeats,
        f"chain_matmul path: {path}; against {length - 1} cuBLAS calls",
    )


def _factor_grads_case(d: int, length: int, repeats: int) -> Case:
    """The factor gradients of a collapsed OverparamLinear(d, d, depth=L)'s backward: L products
    ``G_j^T X_{j-1}`` of (d, d) operands (M = d)."""
    flops = 2.0 * d * d * d * length

    def setup() -> Prepared:
        from ..kernels.chain import chain_factor_grads

        grads = _square_factors(d, length, seed=1)
        inputs = _square_factors(d, length, seed=2)

        def reference():
            return [g.double().T @ i.double() for g, i in zip(grads, inputs)]

        return Prepared(
            _with_graphs({
                PER_FACTOR: lambda: [torch.matmul(g.T, i) for g, i in zip(grads, inputs)],
                "chain_factor_grads": lambda: chain_factor_grads(grads, inputs),
                FLOOR: _matmul_floor(flops, d, "cuda", torch.bfloat16),
            }),
            reference,
        )

    return _kernel_case(
        f"factor grads bf16 d={d} M={d} L={length}",
        f"{length} x (G^T X), G, X: ({d}, {d})",
        FACTOR_GRADS_VARIANTS, setup, flops, repeats,
        f"one grouped launch against {length} cuBLAS calls; target: >= 2x faster",
    )


def _narrow_step_case(d: int, batch: int, length: int, repeats: int, device: str = "cuda") -> Case:
    """The activation chain's train step of a narrow OverparamLinear(d, d, depth=L) at B rows: X_L
    and the gradients of x and of every factor. ``chain_matmul keep`` keeps X_1 .. X_{L-1} for the
    backward (reverse chain and grouped factor gradients: two launches); ``chain_matmul recompute``
    keeps only x and recomputes (the fused backward kernel: one launch, where it serves the widths).
    ``device`` other than CUDA: the same code on the torch twins (for the tests)."""
    flops = 2.0 * batch * d * d * (3 * length - 1)

    def setup() -> Prepared:
        from ..chain import chain_matmul

        gen = torch.Generator(device=device).manual_seed(3)
        x = torch.randn(batch, d, device=device, generator=gen).to(torch.bfloat16).requires_grad_(True)
        factors = [f.requires_grad_(True) for f in _square_factors(d, length, seed=4, device=device)]
        grad = torch.randn(batch, d, device=device, generator=gen).to(torch.bfloat16)
        leaves = [x, *factors]

        def step(forward):
            return lambda: torch.autograd.grad(forward(), leaves, grad)

        def reference():
            leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
            out = _sequential_matmuls(leaves64[0], leaves64[1:])[-1]
            return torch.autograd.grad(out, leaves64, grad.double())

        return Prepared(
            {
                NARROW_STEP_BASELINE: step(lambda: _sequential_matmuls(x, factors)[-1]),
                "chain_matmul keep": step(lambda: chain_matmul(x, factors, return_all=True)[-1]),
                "chain_matmul recompute": step(lambda: chain_matmul(x, factors, return_all=False)[-1]),
                FLOOR: _matmul_floor(flops, d, device, torch.bfloat16),
            },
            reference,
        )

    from ..kernels.chain import fuses_backward  # imports triton: CUDA suites only

    fused = fuses_backward(torch.empty(batch, d, dtype=torch.bfloat16, device="meta"),
                           [torch.empty(d, d, dtype=torch.bfloat16, device="meta")] * length)
    recompute = "one fused backward launch" if fused else "chain kernel recompute + reverse chain + grouped grads"
    return _kernel_case(
        f"narrow train step bf16 d={d} B={batch} L={length}",
        f"B={batch} d={d} L={length}, x and {length} factors {d}x{d}",
        NARROW_STEP_VARIANTS, setup, flops, repeats,
        f"recompute: {recompute}; keep: reverse chain + grouped grads, L - 1 intermediates kept",
    )


def _onchip_width() -> int:
    from ..kernels.chain import MAX_ONCHIP_WIDTH  # imports triton: CUDA suites only

    return MAX_ONCHIP_WIDTH
