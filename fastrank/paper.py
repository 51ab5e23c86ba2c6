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

from .bench import _pyplot, environment
from .layers import OverparamLinear
from .rank import effective_rank, spectral_entropy

__all__ = ["init_entropy", "matrix_completion", "optimizer_sweep", "init_sweep", "reproduce", "format_markdown", "plot"]

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


def reproduce(quick: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Observations 1-4 with the settings of ``fastrank paper`` (``quick``: fewer seeds and steps).

    Returns a dict with ``settings``, ``observation1`` .. ``observation4`` rows, the seconds each
    took and the environment (device name, versions, date).
    """
    log = log or (lambda text: None)
    observation1_settings = {"depths": (1, 2, 4, 8, 16), "features": 256, "samples": 512, "seeds": 5}
    observation2_settings = {
        "depths": (1, 2, 3, 4), "size": 48, "rank": 3, "observed": 0.35, "lr": 0.01, "init_scale": 1e-3,
        "steps": 800 if quick else 2000, "seeds": (0,) if quick else (0, 1, 2),
    }
    log("observation 1: spectral entropy at initialization ...")
    start = time.perf_counter()
    observation1 = init_entropy(**observation1_settings)
    seconds1 = time.perf_counter() - start
    log(f"observation 1: {seconds1:.1f} s; observation 2: matrix completion ...")
    start = time.perf_counter()
    observation2 = matrix_completion(**observation2_settings)
    seconds2 = time.perf_counter() - start
    log(f"observation 2: {seconds2:.1f} s; observation 3: optimizers ...")
    sweep_settings = {"depths": (1, 2, 4, 8), "size": 48, "rank": 3, "observed": 0.35,
                      "steps": 800 if quick else 2000, "seeds": (0,) if quick else (0, 1, 2)}
    observation3_settings = {**sweep_settings, "init_scale": 1e-3, "learning_rates": dict(LEARNING_RATES)}
    start = time.perf_counter()
    observation3 = optimizer_sweep(**{k: v for k, v in observation3_settings.items() if k != "learning_rates"})
    seconds3 = time.perf_counter() - start
    log(f"observation 3: {seconds3:.1f} s; observation 4: initializations ...")
    observation4_settings = {**sweep_settings, "scales": (1e-3, 1e-1)}
    start = time.perf_counter()
    observation4 = init_sweep(**observation4_settings)
    seconds4 = time.perf_counter() - start
    log(f"observation 4: {seconds4:.1f} s")
    return {
        "quick": quick,
        "settings": {"observation1": observation1_settings, "observation2": observation2_settings,
                     "observation3": observation3_settings, "observation4": observation4_settings},
        "observation1": observation1,
        "observation2": observation2,
        "observation3": observation3,
        "observation4": observation4,
        "seconds": {"observation1": seconds1, "observation2": seconds2, "observation3": seconds3,
                    "observation4": seconds4},
        "environment": environment("cpu"),
    }


def format_markdown(results: dict) -> str:
    """Both tables as markdown, with the settings they were measured with."""
    s1, s2 = results["settings"]["observation1"], results["settings"]["observation2"]
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
    rows2 = results["observation2"]
    lines += [
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
    seconds = results["seconds"]
    lines += [
        "",
        "Measured in " + " + ".join(f"{seconds[key]:.0f} s" for key in sorted(seconds))
        + f" ({'--quick' if results['quick'] else 'full'}).",
    ]
    return "\n".join(lines)


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
    """Two panels: entropy against depth (Observation 1), effective rank and test error (2)."""
    plt = _pyplot()
    sweeps = "observation3" in results and "observation4" in results
    fig, axes = plt.subplots(2 if sweeps else 1, 2, figsize=(9, 7.2 if sweeps else 3.6), dpi=90, squeeze=False)
    left, right = axes[0]
    s1 = results["settings"]["observation1"]
    for kind, marker in zip(KINDS, "osD"):
        rows = [row for row in results["observation1"] if row["kind"] == kind]
        left.errorbar(
            [row["depth"] for row in rows], [row["mean"] for row in rows],
            yerr=[row["std"] for row in rows], marker=marker, capsize=3, label=kind,
        )
    if s1["features"] == 256:
        depths = sorted(REFERENCE_RHO_256)
        left.plot(depths, [REFERENCE_RHO_256[d] for d in depths], "k:", marker="x",
                  label="anchor library, collapsed weight")
    left.axhline(math.log(s1["features"]), color="grey", linewidth=0.8, linestyle="--")
    left.set_xscale("log", base=2)
    left.set_xticks(s1["depths"], [str(d) for d in s1["depths"]])
    left.set_xlabel("depth L")
    left.set_ylabel("spectral entropy (nats)")
    left.set_title(f"Observation 1: at init, d={s1['features']}, {s1['seeds']} seeds", fontsize=9)
    left.legend(fontsize=7)
    rows = results["observation2"]
    depths = [row["depth"] for row in rows]
    right.plot(depths, [row["effective_rank"] for row in rows], "o-", color="tab:blue", label="effective rank")
    right.axhline(rows[0]["target_effective_rank"], color="tab:blue", linestyle=":", linewidth=0.8,
                  label="target's effective rank")
    right.set_xlabel("depth L")
    right.set_xticks(depths)
    right.set_ylabel("effective rank of the solution", color="tab:blue")
    twin = right.twinx()
    twin.plot(depths, [row["test_error"] for row in rows], "s--", color="tab:red", label="test error")
    twin.set_ylabel("held-out error (relative RMS)", color="tab:red")
    twin.set_ylim(bottom=0)
    s2 = results["settings"]["observation2"]
    right.set_title(
        f"Observation 2: completion {s2['size']}x{s2['size']}, rank {s2['rank']}, {s2['steps']} steps",
        fontsize=9,
    )
    handles = right.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    right.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7)
    if sweeps:
        for axis, rows, key, title in (
            (axes[1][0], results["observation3"], "optimizer", "Observation 3: optimizers"),
            (axes[1][1], [{**r, "variant": f"{r['init']}, {r['scale']:g}"} for r in results["observation4"]],
             "variant", "Observation 4: init, start RMS"),
        ):
            for name in dict.fromkeys(row[key] for row in rows):
                mine = [row for row in rows if row[key] == name]
                axis.plot([row["depth"] for row in mine], [row["effective_rank"] for row in mine], "o-",
                          label=name, markersize=3)
            target = results["observation2"][0]["target_effective_rank"]
            axis.axhline(target, color="grey", linestyle=":", linewidth=0.8)
            axis.set_xscale("log", base=2)
            depths = sorted({row["depth"] for row in rows})
            axis.set_xticks(depths, [str(d) for d in depths])
            axis.set_yscale("log")
            axis.set_xlabel("depth L")
            axis.set_ylabel("effective rank after training")
            axis.set_title(title, fontsize=9)
            axis.legend(fontsize=6)
    env = results["environment"]
    fig.suptitle(
        f"fastrank {env['fastrank']} paper{' --quick' if results['quick'] else ''}: "
        f"{env['device_name']}, torch {env['torch']}, {env['date'][:10]}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
