"""The rank family on CUDA: cuSOLVER's batched eigensolver (fastrank.rank.eigensolver), the solver policy
(FASTRANK_EIGENSOLVER), memory-bounded chunks in effective_ranks, and every method against the fp64
CPU result. The chunking arithmetic and the CLI's device option run on the CPU too."""

import json
import math

import pytest
import torch
from eigensolver_cases import record_host_solves, symmetric_with_garbage

import fastrank
from fastrank.rank import api as rank_module
from fastrank.rank import eigensolver as _cusolver

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cusolver = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cusolver.available()), reason="needs cusolverDnXsyevBatched"
)


def test_chunk_size_keeps_each_call_within_int32():
    assert _cusolver.chunk_size(1024, 5000) == (2**31 - 1) // 1024**2 == 2047
    assert _cusolver.chunk_size(4096, 224) == 127
    assert _cusolver.chunk_size(64, 10) == 10
    with pytest.raises(ValueError, match="more than 2\\*\\*31 - 1 elements"):
        _cusolver.chunk_size(46341, 1)
    with pytest.raises(ValueError, match="n=0"):
        _cusolver.chunk_size(0, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cusolver_unavailable_without_cuda():
    assert not _cusolver.available()
    with pytest.raises(RuntimeError, match="not available"):
        _cusolver.cusolver_eigvalsh(torch.eye(3))


@needs_cusolver
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("upper", [True, False], ids=["upper", "lower"])
@pytest.mark.parametrize("batch,n", [((7,), 33), ((2, 3), 64), ((5,), 1), ((3,), 257)])
def test_cusolver_eigvalsh_matches_fp64(batch, n, dtype, upper):
    G, S = symmetric_with_garbage(batch, n, dtype, upper, seed=n)
    values = _cusolver.cusolver_eigvalsh(G.cuda(), upper=upper)
    assert values.shape == (*batch, n) and values.dtype == dtype and values.is_cuda
    reference = torch.linalg.eigvalsh(S)
    scale = reference.abs().amax(-1, keepdim=True)
    eps = torch.finfo(dtype).eps
    error = ((values.cpu().double() - reference).abs() / scale).max().item()
    assert error <= 20 * math.sqrt(n) * eps, f"relative eigenvalue error {error:.2e}"
    assert bool((values[..., 1:] >= values[..., :-1]).all()), "eigenvalues not ascending"


@needs_cusolver
def test_cusolver_eigvalsh_in_several_calls_equals_one(monkeypatch):
    G, _ = symmetric_with_garbage((7,), 33, torch.float64, True, seed=1)
    whole = _cusolver.cusolver_eigvalsh(G.cuda())
    monkeypatch.setattr(_cusolver, "_INT32_MAX", 3 * 33 * 33)  # 3 matrices a call: 3 + 3 + 1
    assert _cusolver.chunk_size(33, 7) == 3
    torch.testing.assert_close(_cusolver.cusolver_eigvalsh(G.cuda()), whole, rtol=0, atol=0)


@needs_cusolver
def test_cusolver_eigvalsh_rejects_bad_input():
    with pytest.raises(TypeError, match="float32 or float64 CUDA tensor"):
        _cusolver.cusolver_eigvalsh(torch.eye(3, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="square"):
        _cusolver.cusolver_eigvalsh(torch.ones(2, 3, 4, device="cuda"))


def _weights(seed):
    generator = torch.Generator().manual_seed(seed)
    decay = 0.9 ** torch.arange(40, dtype=torch.float64)
    low_rank = torch.randn(6, 70, 40, generator=generator, dtype=torch.float64) * decay
    return {
        "square fp32": torch.randn(5, 48, 48, generator=generator),
        "wide fp64": torch.randn(4, 20, 90, generator=generator, dtype=torch.float64),
        "decaying fp64": low_rank,
        "single fp32": torch.randn(31, 17, generator=generator),
    }


@cuda
@pytest.mark.parametrize("solver", ["auto", "torch", "cusolver"])
def test_exact_metrics_on_cuda_equal_the_cpu_result(monkeypatch, solver):
    if solver == "cusolver" and not _cusolver.available():
        pytest.skip("needs cusolverDnXsyevBatched")
    monkeypatch.setenv("FASTRANK_EIGENSOLVER", solver)
    weights = _weights(3)
    on_cpu = fastrank.effective_ranks(weights, metric="all", method="exact")
    on_cuda = fastrank.effective_ranks({k: w.cuda() for k, w in weights.items()}, metric="all", method="exact")
    for name in weights:
        for metric, value in on_cpu[name].items():
            got = on_cuda[name][metric]
            assert got.is_cuda and got.dtype == torch.float64
            torch.testing.assert_close(got.cpu(), value, rtol=1e-10, atol=0, msg=f"{name} {metric}")


@cuda
@pytest.mark.parametrize("solver", ["auto", "torch"])
def test_gram_and_hermitian_on_cuda_equal_the_cpu_result(monkeypatch, solver):
    monkeypatch.setenv("FASTRANK_EIGENSOLVER", solver)
    generator = torch.Generator().manual_seed(4)
    X = torch.randn(3, 500, 24, generator=generator, dtype=torch.float64)
    G = X.mT @ X
    for kwargs, A in (({"gram": True}, X), ({"hermitian": True}, G)):
        cpu = fastrank.spectral_entropy(A, method="exact", **kwargs)
        gpu = fastrank.spectral_entropy(A.cuda(), method="exact", **kwargs)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=0)


@cuda
def test_randomized_and_slq_bounds_on_cuda_contain_the_exact_value():
    generator = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(6, 300, 300, generator=generator, dtype=torch.float64)).Q
    A = (U * 0.97 ** torch.arange(300, dtype=torch.float64)) @ U.mT
    exact = fastrank.spectral_entropy(A, method="exact")
    for method in ("randomized", "slq"):
        bounds = fastrank.spectral_entropy(A.cuda(), method=method, rank=96 if method == "randomized" else None,
                                           seed=0, return_bounds=True)
        assert bool(((bounds.lower.cpu() <= exact) & (exact <= bounds.upper.cpu())).all()), (method, bounds, exact)


@cuda
def test_effective_ranks_chunks_a_group_to_bound_memory(monkeypatch):
    weights = [w.cuda() for w in torch.randn(9, 40, 40, generator=torch.Generator().manual_seed(6)).unbind()]
    whole = fastrank.effective_ranks(weights, method="exact")
    calls = []
    original = rank_module.effective_rank

    def counting(batch, **kwargs):
        calls.append(batch.shape[0])
        return original(batch, **kwargs)

    # 2 GiB floor and a quarter of free memory both shrunk to about two matrices' working set
    per_matrix = 2 * 40 * 40 * 4 + 16 * 40 * 40
    monkeypatch.setattr(rank_module, "_CUDA_CHUNK_BYTES", 2 * per_matrix)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    monkeypatch.setattr(rank_module, "effective_rank", counting)
    chunked = rank_module.effective_ranks(weights, method="exact")
    assert calls == [2, 2, 2, 2, 1]
    torch.testing.assert_close(torch.stack(chunked), torch.stack(whole), rtol=1e-12, atol=0)


@needs_cusolver
@pytest.mark.parametrize(
    "batch,n,batched",
    [(2, 64, True), (1, 64, False), (7, 2049, False), (8, 2049, True)],
    ids=["small-batch", "one-matrix", "large-n-few", "large-n-eight"],
)
def test_auto_eigensolver_policy(monkeypatch, batch, n, batched):
    calls = []
    real = _cusolver.cusolver_eigvalsh

    def recording(G, upper=True):
        calls.append(G.shape)
        return real(G, upper)

    monkeypatch.setattr(_cusolver, "cusolver_eigvalsh", recording)
    monkeypatch.delenv("FASTRANK_EIGENSOLVER", raising=False)
    G = torch.eye(n, device="cuda", dtype=torch.float64).expand(batch, n, n) * 2
    values = _cusolver.eigvalsh(G)
    assert bool((values == 2).all())
    assert bool(calls) == batched, (batch, n, calls)


@cuda
def test_bad_eigensolver_setting_is_named(monkeypatch):
    monkeypatch.setenv("FASTRANK_EIGENSOLVER", "magma")
    with pytest.raises(ValueError, match="FASTRANK_EIGENSOLVER must be one of .* got 'magma'"):
        fastrank.effective_rank(torch.randn(3, 8, 8, device="cuda"), method="exact")


@cuda
def test_cli_rank_on_cuda_equals_cpu(tmp_path, capsys):
    from fastrank.bench.cli import main

    torch.manual_seed(7)
    state = {"a.weight": torch.randn(32, 16), "b.weight": torch.randn(32, 16), "c.weight": torch.randn(8, 40)}
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    rows = {}
    for device in ("cpu", "cuda"):
        assert main(["rank", str(path), "--device", device, "--json", str(tmp_path / f"{device}.json")]) == 0
        rows[device] = json.loads((tmp_path / f"{device}.json").read_text())
    for cpu_row, cuda_row in zip(rows["cpu"], rows["cuda"]):
        assert cpu_row["name"] == cuda_row["name"]
        assert cuda_row["effective_rank"] == pytest.approx(cpu_row["effective_rank"], rel=1e-10)


@cuda
def test_background_tracker_on_cuda_measures_on_its_own_stream_and_equals_the_foreground():
    # RankTracker(background=True) on a CUDA model: the worker measures on a stream of its own
    # (after the snapshot's copies on the loop's stream) and records what a foreground tracker does,
    # while the loop's stream keeps training (the weights change in place after each snapshot).
    torch.manual_seed(0)
    def model():
        return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), fastrank.OverparamLinear(40, 16, depth=3)).cuda()

    net, twin = model(), model()
    twin.load_state_dict(net.state_dict())
    trackers = [fastrank.RankTracker(model, embeddings=("1",), every=2, background=background)
                for model, background in ((net, True), (twin, False))]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.05) for model in (net, twin)]
    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(6):
        x = torch.randn(64, 24, device="cuda", generator=generator)
        for model, tracker, optimizer in zip((net, twin), trackers, optimizers):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            tracker.step()
            optimizer.step()
    background, foreground = (tracker.history for tracker in trackers)
    assert trackers[0]._streams and not trackers[1]._streams
    assert [(r["step"], r["name"]) for r in background] == [(r["step"], r["name"]) for r in foreground]
    assert {r["step"] for r in background} == {0, 2, 4}
    for row, want in zip(background, foreground):
        for key in row:
            if key not in ("step", "name"):
                assert row[key] == pytest.approx(want[key], rel=1e-6), (row["step"], row["name"], key)


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("upper", [True, False], ids=["upper", "lower"])
def test_host_eigvalsh_of_a_cuda_batch_comes_back_to_its_device(dtype, upper):
    # The batch is copied to pinned host memory on the current stream, solved by LAPACK threads and
    # returned to the device: a stream other than the default one must have finished writing it.
    G_cpu, S = symmetric_with_garbage((6,), 48, dtype, upper, seed=7)
    source = G_cpu.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        G = torch.zeros_like(source)
        torch.cuda._sleep(50_000_000)  # the copy below lands well after the host asks for G
        G.copy_(source)
        values = _cusolver.host_eigvalsh(G, 3, upper=upper)
    assert values.device == G.device and values.dtype == dtype and values.shape == (6, 48)
    want = torch.linalg.eigvalsh(S)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    assert ((values.cpu().double() - want).abs() <= tolerance * want.abs().amax(-1, keepdim=True)).all()


@cuda
def test_tracker_with_host_threads_on_cuda_solves_on_the_host_and_equals_the_device_solver(monkeypatch):
    calls = record_host_solves(monkeypatch)
    histories = {}
    for host_threads in (None, 2):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                                  fastrank.OverparamLinear(40, 40, depth=3)).cuda()
        tracker = fastrank.RankTracker(net, embeddings=("1",), every=2, background=True, host_threads=host_threads)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        generator = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(4):
            optimizer.zero_grad()
            net(torch.randn(64, 24, device="cuda", generator=generator)).square().mean().backward()
            tracker.step()
            optimizer.step()
        histories[host_threads] = tracker.history
        assert bool(calls) == (host_threads is not None)
    assert {call.device for call in calls} == {"cuda"} and {call.threads for call in calls} == {2}
    for row, want in zip(histories[2], histories[None]):
        assert (row["step"], row["name"]) == (want["step"], want["name"])
        for key in row:
            if key not in ("step", "name"):
                assert row[key] == pytest.approx(want[key], rel=1e-9), (row["step"], row["name"], key)
