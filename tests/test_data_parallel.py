"""``nn.DataParallel``: what Hugging Face's Trainer wraps a model in when one process sees several
GPUs. Every forward replicates the module (``torch.nn.parallel.replicate``: a replica holds its
parameters as plain attributes, copies whose gradients autograd carries back to the module's) and
runs each replica on a thread of its own, on a slice of the batch.

Without several GPUs, the replicas are made by torch's own ``replicate`` with its broadcast
replaced by differentiable copies on the CPU, and run each on a thread of its own, as
``parallel_apply`` runs them (it needs an accelerator); the slices are ``torch.chunk``'s, as
DataParallel's scatter makes them, and the outputs concatenated, as its gather does. The layers must give the outputs and gradients of the module on the whole batch, and
the tracker the rank of every row."""

import contextlib
import math
import sys
import threading

import pytest
import torch
import torch.nn as nn

import fastrank
from fastrank import RankTracker

_replicate_module = sys.modules["torch.nn.parallel.replicate"]


def _copies(tensors, devices, detach=False):
    """``_broadcast_coalesced_reshape`` on the CPU: one copy of ``tensors`` per device, through
    autograd unless ``detach`` (as ``Broadcast.apply``)."""
    return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]


def _data_parallel(module: nn.Module, x: torch.Tensor, replicas: int, monkeypatch, wrap=None) -> torch.Tensor:
    """``nn.DataParallel(module, device_ids=range(replicas))(x)``, on the CPU (see the module
    docstring): the replicas' threads start together, so their forwards overlap; an exception on
    one is raised here. ``wrap``: each replica runs as ``wrap(replica)`` (a compiled replica)."""
    monkeypatch.setattr(_replicate_module, "_broadcast_coalesced_reshape", _copies)
    copies = _replicate_module.replicate(module, list(range(replicas)))
    forwards = [wrap(c) if wrap is not None else c for c in copies]
    assert all(c._is_replica and not list(c.parameters()) for c in copies)  # as on GPUs
    chunks = x.chunk(replicas)
    start = threading.Barrier(len(chunks))
    results: dict[int, object] = {}
    grad_enabled = torch.is_grad_enabled()

    def run(i: int) -> None:
        torch.set_grad_enabled(grad_enabled)  # per thread, as parallel_apply's workers set it
        start.wait()
        try:
            results[i] = forwards[i](chunks[i])
        except BaseException as error:  # noqa: BLE001  (raised on the calling thread)
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chunks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(len(chunks)):
        if isinstance(results[i], BaseException):
            raise results[i]
    return torch.cat([results[i] for i in range(len(chunks))])


def _layers():
    return {
        "linear depth 2": lambda: fastrank.OverparamLinear(7, 5, depth=2, dtype=torch.float64),
        "linear depth 4 no bias": lambda: fastrank.OverparamLinear(7, 5, depth=4, bias=False, dtype=torch.float64),
        "linear residual batch norm": lambda: fastrank.OverparamLinear(
            6, 6, depth=3, residual=True, batch_norm=True, dtype=torch.float64),
        "conv2d": lambda: fastrank.OverparamConv2d(3, 4, kernel_sizes=(3, 1), padding=1, dtype=torch.float64),
        "conv1d": lambda: fastrank.OverparamConv1d(3, 4, kernel_sizes=(3, 1), padding=1, dtype=torch.float64),
        "gpt-2 conv1d": lambda: fastrank.OverparamConv1D(5, 7, depth=3, dtype=torch.float64),
    }


def _input(name: str, rows: int, generator: torch.Generator) -> torch.Tensor:
    shape = {"conv2d": (rows, 3, 5, 6), "conv1d": (rows, 3, 9), "gpt-2 conv1d": (rows, 4, 7),
             "linear residual batch norm": (rows, 6)}.get(name, (rows, 7))
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("name", list(_layers()))
def test_replicas_train_as_the_module_on_the_whole_batch(monkeypatch, name, replicas):
    torch.manual_seed(0)
    layer = _layers()[name]()
    generator = torch.Generator().manual_seed(1)
    x = _input(name, 11, generator)  # 11 rows: chunks of 4, 4, 3 (or 6, 5)
    target = torch.randn(layer(x).shape, generator=generator, dtype=torch.float64)
    if "batch norm" in name:  # replicas normalize each chunk by its own statistics, as nn.BatchNorm1d's
        layer.eval()
    for step in range(3):
        expected_out = layer(x)
        expected = torch.autograd.grad((expected_out - target).square().sum(), list(layer.parameters()))
        out = _data_parallel(layer, x, replicas, monkeypatch)
        grads = torch.autograd.grad((out - target).square().sum(), list(layer.parameters()))
        torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-14, msg=lambda m: f"output, step {step}: {m}")
        for (pname, _), got, want in zip(layer.named_parameters(), grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=lambda m: f"{pname}, step {step}: {m}")
        with torch.no_grad():  # a step, so that a stale collapse would show at the next one
            for p, g in zip(layer.parameters(), expected):
                p -= 0.1 * g


def test_replicas_train_the_norms_of_frozen_factors(monkeypatch):
    """Frozen factors and no bias, trained norms (eval mode: their running statistics): the
    replicas' gradients reach the norms' parameters, as the module's own do, where a replica that
    missed its norms' parameters would collapse the frozen chain without autograd."""
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(6, 6, depth=3, bias=False, residual=True, batch_norm=True, dtype=torch.float64).eval()
    layer.factors.requires_grad_(False)
    for norm in layer.norms:  # statistics and affine parameters away from their initial values
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_()
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert len(trained) == 2 * len(layer.norms)  # every norm's weight and bias
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = torch.autograd.grad(layer(x).square().sum(), trained)
    grads = torch.autograd.grad(_data_parallel(layer, x, 3, monkeypatch).square().sum(), trained)
    for j, (got, want) in enumerate(zip(grads, expected)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=lambda m: f"parameter {j}: {m}")


@pytest.mark.parametrize("name", list(_layers()))
def test_replicas_in_eval_leave_the_module_cache_alone(monkeypatch, name):
    torch.manual_seed(0)
    layer = _layers()[name]().eval()
    x = _input(name, 9, torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer(x)  # fills the module's cache
        cache = layer._cache
        cached = cache.value
        for _ in range(2):
            torch.testing.assert_close(_data_parallel(layer, x, 3, monkeypatch), expected, rtol=1e-12, atol=1e-14)
        # The replicas' copies never entered the module's cache: it still holds, and serves, its own.
        assert layer._cache is cache and cache.value is cached and cache.fresh(layer._collapse_inputs())
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        with torch.no_grad():
            next(layer.parameters()).mul_(1.5)
        torch.testing.assert_close(_data_parallel(layer, x, 2, monkeypatch), layer(x), rtol=1e-12, atol=1e-14)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(fastrank.OverparamLinear(12, 40, depth=3), nn.Tanh())
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_tracker_sums_every_replicas_rows(monkeypatch):
    """A replica's hook runs on its thread; the tracker folds each one's rows into one Gram (the
    same as without replicas, to fp64 rounding: the threads add in any order). The replicas'
    threads enter the accumulator together where they can (a barrier that a thread waiting alone,
    behind the tracker's lock, passes after a timeout), so that additions that are not serialized
    would overlap: the first rows making the sums at once, in-place adds of the same Gram."""
    add = fastrank.tracking._EmbeddingAccumulator.add
    together = threading.Barrier(4, timeout=0.05)

    def add_together(accumulator, rows):
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait()
        add(accumulator, rows)

    net = _Net().double()
    plain = RankTracker(net, embeddings=("encoder",), weights=False, every=1)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 12, generator=generator, dtype=torch.float64) for n in (2003, 1001, 4007, 999, 3001, 57, 2500, 7)]
    for batch in batches:
        net(batch)
    expected = plain.compute()["encoder"]
    plain.remove()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, every=1)
    monkeypatch.setattr(fastrank.tracking._EmbeddingAccumulator, "add", add_together)
    for batch in batches:
        together.reset()
        _data_parallel(net, batch, 4, monkeypatch)
    got = tracker.compute()["encoder"]
    assert got["samples"] == expected["samples"] == 13575
    for metric in ("spectral_entropy", "effective_rank", "stable_rank"):
        assert got[metric] == pytest.approx(expected[metric], rel=1e-12), metric
    assert math.isfinite(got["effective_rank"]) and got["effective_rank"] > 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tracker_class_metrics_under_replicas_raise(monkeypatch, compiled):
    # Compiled replicas too: the traced hook tells the tracker's op that the module is a replica.
    net = _Net().double()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, every=1, num_classes=3)
    x = torch.randn(8, 12, dtype=torch.float64)
    tracker.set_labels(torch.arange(8) % 3)
    wrap = (lambda replica: torch.compile(replica, backend="eager")) if compiled else None
    with pytest.raises(ValueError, match="DataParallel replica.*DistributedDataParallel"):
        _data_parallel(net, x, 2, monkeypatch, wrap)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_data_parallel_on_two_gpus_trains_as_one():
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(64, 48, depth=4).cuda()
    wrapped = nn.DataParallel(layer, device_ids=[0, 1])
    x = torch.randn(37, 64, device="cuda")
    expected_out = layer(x)
    expected = torch.autograd.grad(expected_out.square().sum(), list(layer.parameters()))
    out = wrapped(x)
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(out, expected_out)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
