"""class_metrics and ClassStatistics against direct computations from the definitions."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from multiprocess import run_processes

import fastrank
from fastrank.classes import ClassStatistics, class_metrics


def _data(n=97, d=13, classes=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    centers = 3 * torch.randn(classes, d, generator=gen)
    x = centers[labels] + torch.randn(n, d, generator=gen)
    return x.to(dtype), labels


def _direct(x, labels):
    """NumPy, straight from the definitions (per-sample outer products, explicit pinv)."""
    h = x.double().numpy()
    y = labels.numpy()
    classes = sorted(set(y.tolist()))
    mu_g = h.mean(0)
    mu = {c: h[y == c].mean(0) for c in classes}
    sigma_w = sum(np.outer(h[i] - mu[y[i]], h[i] - mu[y[i]]) for i in range(len(h))) / len(h)
    sigma_b = sum(np.outer(mu[c] - mu_g, mu[c] - mu_g) for c in classes) / len(classes)
    nc1 = np.trace(sigma_w @ np.linalg.pinv(sigma_b, hermitian=True)) / len(classes)
    nearest = [classes[int(np.argmin([np.linalg.norm(h[i] - mu[c]) for c in classes]))] for i in range(len(h))]
    ncc = float(np.mean(np.array(nearest) == y))
    s = np.linalg.svd(np.stack([mu[c] - mu_g for c in classes]), compute_uv=False)
    p = s[s > 0] / s.sum()
    return {"nc1": nc1, "ncc_accuracy": ncc, "class_mean_effective_rank": math.exp(-(p * np.log(p)).sum())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("n,d,classes", [(97, 13, 5), (7, 40, 3), (200, 3, 10)], ids=["N>d", "d>N", "C>d"])
def test_matches_the_definitions(dtype, n, d, classes):
    x, labels = _data(n, d, classes, dtype=dtype)
    got = class_metrics(x, labels)
    want = _direct(x, labels)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["samples"] == n and got["classes"] == len(set(labels.tolist()))


def test_noncontiguous_input_and_layers():
    x, labels = _data()
    wide = torch.randn(97, 26)
    wide[:, ::2] = x
    layers = {"a": wide[:, ::2], "b": x[:, :4]}
    got = class_metrics(layers, labels)
    assert got["a"] == class_metrics(x.contiguous(), labels)
    assert got["b"]["nc1"] == pytest.approx(_direct(x[:, :4], labels)["nc1"], rel=1e-9)
    assert isinstance(class_metrics([x, x], labels), list)


def test_collapsed_simplex():
    # Every sample on its class mean, the means a simplex: nc1 = 0, NCC perfect, rank C - 1.
    classes = 4
    means = torch.eye(classes, dtype=torch.float64) - 1.0 / classes
    labels = torch.arange(classes).repeat(5)
    got = class_metrics(means[labels], labels)
    assert got["nc1"] == pytest.approx(0.0, abs=1e-12)
    assert got["ncc_accuracy"] == 1.0
    assert got["class_mean_effective_rank"] == pytest.approx(classes - 1, rel=1e-12)


def test_degenerate_cases():
    x, _ = _data(20, 6, 1)
    one = class_metrics(x, torch.zeros(20, dtype=torch.long))
    assert math.isnan(one["nc1"]) and one["ncc_accuracy"] == 1.0 and one["class_mean_effective_rank"] == 0.0
    x, labels = _data(50, 6, 3)
    empty = class_metrics(x, labels * 2, num_classes=6)  # classes 1, 3, 5 never occur
    assert empty["classes"] == 3 and empty["empty_classes"] == 3
    assert empty["nc1"] == pytest.approx(class_metrics(x, labels)["nc1"], rel=1e-12)


def test_bad_input():
    x, labels = _data()
    with pytest.raises(ValueError, match=r"labels has 96 entries, expected one per embedding row \(97\)"):
        class_metrics(x, labels[:-1])
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor, got torch.float32"):
        class_metrics(x, labels.float())
    with pytest.raises(ValueError, match="label 4 is out of range for num_classes=3"):
        class_metrics(x, labels, num_classes=3)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(N, d\), got \(97,\)"):
        class_metrics(x[:, 0], labels)


def test_streaming_equals_one_pass():
    x, labels = _data(90, 11, 4)
    stats = ClassStatistics(4, 11)
    for start in range(0, 90, 25):
        stats.add(x[start : start + 25], labels[start : start + 25])
    whole = class_metrics(x, labels)
    streamed = stats.metrics()
    for key in ("nc1", "class_mean_effective_rank", "samples"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-12), key


def _class_worker(rank, world, out_path):
    x, labels = _data(90, 11, 4)
    shard = slice(rank * 45, (rank + 1) * 45)
    stats = ClassStatistics(4, 11)
    stats.add(x[shard], labels[shard])
    reduced = stats.reduced()
    assert stats.counts.sum() == 45  # the local sums stay
    if rank == 0:
        torch.save(reduced.metrics(), out_path)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one(tmp_path):
    out_path = str(tmp_path / "classes.pt")
    run_processes(_class_worker, 2, tmp_path, out_path)
    reduced = torch.load(out_path)
    whole = class_metrics(*_data(90, 11, 4))
    for key in ("nc1", "class_mean_effective_rank", "samples"):
        assert reduced[key] == pytest.approx(whole[key], rel=1e-12), key


def test_exported():
    assert fastrank.class_metrics is class_metrics


# ---- RankTracker(num_classes=...) --------------------------------------------------------------


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(11, 9), torch.nn.Tanh())
        self.head = torch.nn.Linear(9, 4)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_tracker_class_metrics_equal_one_pass(background):
    net = _Encoder()
    tracker = fastrank.RankTracker(net, embeddings=("encoder",), weights=False, num_classes=4, every=2,
                                   background=background)
    x, labels = _data(90, 11, 4)
    with torch.no_grad():
        for start in range(0, 90, 30):  # one measurement step made of three forwards
            tracker.set_labels(labels[start : start + 30])
            net(x[start : start + 30])
        tracker.step()
        tracker.set_labels(labels[:5])
        net(x[:5])  # not a measurement step: ignored
        tracker.step()
    row = tracker.history[-1]
    want = class_metrics(net.encoder(x).detach(), labels)
    assert row["step"] == 0 and row["samples"] == 90
    for key in ("nc1", "class_mean_effective_rank", "classes", "empty_classes"):
        assert row[key] == pytest.approx(want[key], rel=1e-10), key


def test_tracker_token_embeddings_share_their_sample_label():
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    tracker = fastrank.RankTracker(net, embeddings=("0",), weights=False, num_classes=3)
    x = torch.randn(8, 7, 6)  # 8 sequences of 7 tokens
    labels = torch.arange(8) % 3
    tracker.set_labels(labels)
    out = net(x)
    row = tracker.compute()["0"]
    want = class_metrics(out.detach().reshape(56, 5), labels.repeat_interleave(7))
    assert row["nc1"] == pytest.approx(want["nc1"], rel=1e-10)


def test_tracker_labels_errors():
    net = _Encoder()
    tracker = fastrank.RankTracker(net, embeddings=("encoder",), num_classes=4)
    with pytest.raises(ValueError, match=r"call set_labels\(labels\) before the forward"):
        net(torch.randn(3, 11))
    tracker.set_labels(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="module 'encoder' gave 3 rows for 2 labels"):
        net(torch.randn(3, 11))
    with pytest.raises(ValueError, match="set_labels needs RankTracker"):
        fastrank.RankTracker(net).set_labels(torch.tensor([0]))
