"""Sharded weights and sequence embeddings on gloo (2 and 4 CPU processes): DTensor weights of every
placement, FSDP2 training of over-parameterized layers, and RankTracker on a sharded transformer,
each equal to one process on the whole tensors."""

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from multiprocess import run_processes
from small_models import conv_mlp, conv_mlp_data

import fastrank
from fastrank.sharded import check_token_rate, is_sharded, select_tokens

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

RTOL = 1e-10  # fp64: the sharded sums differ from one process's only in summation order
FUNCTIONS = {
    "effective_rank": fastrank.effective_rank,
    "spectral_entropy": fastrank.spectral_entropy,
    "stable_rank": fastrank.stable_rank,
}


def _matrices(gen):
    """Odd fp64 shapes: tall, wide, rank-deficient (takes the TSQR fallback), a batch, and data."""
    return {
        "tall 53x37": torch.randn(53, 37, generator=gen, dtype=torch.float64),
        "wide 37x53": torch.randn(37, 53, generator=gen, dtype=torch.float64),
        "rank-6 41x29": torch.randn(41, 6, generator=gen, dtype=torch.float64)
        @ torch.randn(6, 29, generator=gen, dtype=torch.float64),
        "batch 2x19x23": torch.randn(2, 19, 23, generator=gen, dtype=torch.float64),
    }


def _close(got, want, where):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    err = ((got - want).abs() / want.abs().clamp_min(1e-300)).max().item()
    assert err <= RTOL, f"{where}: sharded {got.tolist()} vs one process {want.tolist()}, relative error {err:.1e}"


COLLECTIVES = ("all_reduce", "all_gather", "all_to_all_single", "all_gather_into_tensor")


@contextlib.contextmanager
def _counted_collectives():
    """Count the torch.distributed collectives called inside: {name: [elements sent, per call]}."""
    calls: dict = {}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name):
        def counted(*args, **kwargs):
            tensor = args[1] if name in ("all_gather", "all_to_all_single", "all_gather_into_tensor") else args[0]
            calls.setdefault(name, []).append(tensor.numel())
            return originals[name](*args, **kwargs)

        return counted

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _placements_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(14)
    matrices = _matrices(gen)
    data = torch.randn(61, 13, generator=gen, dtype=torch.float64) + 3
    mesh = init_device_mesh("cpu", (world,))
    layouts = [("1-D", mesh, p) for p in ([Shard(0)], [Shard(1)], [Replicate()])]
    if world == 4:
        mesh_2d = init_device_mesh("cpu", (2, 2))
        layouts += [
            ("2-D", mesh_2d, p)
            for p in (
                [Shard(0), Shard(0)],
                [Shard(0), Shard(1)],  # FSDP2 rows x row-wise tensor parallel columns
                [Shard(1), Shard(0)],
                [Replicate(), Shard(1)],
                [Shard(1), Shard(1)],
            )
        ]
    for mesh_name, layout_mesh, placements in layouts:
        for name, full in matrices.items():
            matrix_placements = [Shard(p.dim - 2) if isinstance(p, Shard) else p for p in placements]
            sharded = distribute_tensor(full, layout_mesh, matrix_placements)
            where = f"{name}, {mesh_name} {placements}"
            for function_name, function in FUNCTIONS.items():
                _close(function(sharded), function(full, method="exact"), f"{function_name} of {where}")
            got = fastrank.rank.rank_metrics(sharded)
            for key, value in fastrank.rank.rank_metrics(full, method="exact").items():
                _close(got[key], value, f"rank_metrics[{key}] of {where}")
        sharded_data = distribute_tensor(data, layout_mesh, placements)
        for center in (False, True):
            _close(
                fastrank.effective_rank(sharded_data, gram=True, center=center),
                fastrank.effective_rank(data, gram=True, center=center, method="exact"),
                f"data 61x13 gram=True center={center}, {mesh_name} {placements}",
            )

    # effective_ranks: DTensors and plain tensors mixed; one all-reduce per shape group, no gather
    weights = [torch.randn(47, 31, generator=gen, dtype=torch.float64) for _ in range(3)] + [
        torch.randn(31, 47, generator=gen, dtype=torch.float64)
    ]
    inputs = [distribute_tensor(w, mesh, [Shard(0)]) for w in weights[:2]] + [
        weights[2],
        distribute_tensor(weights[3], mesh, [Shard(1)]),
    ]
    with _counted_collectives() as calls:
        got = fastrank.effective_ranks(inputs, metric="all")
    want = fastrank.effective_ranks(weights, metric="all", method="exact")
    for i, (g, w) in enumerate(zip(got, want)):
        for key in w:
            _close(g[key], w[key], f"effective_ranks item {i} {key}")
    # two shape groups: per group a max of the peaks, the Gram sum and the flag max
    assert len(calls.get("all_reduce", [])) == 6, calls
    assert sorted(calls["all_reduce"])[-2:] == [31 * 31, 2 * 31 * 31], calls  # Grams only: r^2 per matrix
    assert not calls.get("all_gather") and not calls.get("all_gather_into_tensor"), calls
    assert not calls.get("all_to_all_single"), calls  # both groups shard the long side

    # the small side sharded: a row-sharded wide weight is re-sharded by one all-to-all
    wide = torch.randn(31, 47, generator=gen, dtype=torch.float64)
    wide_sharded = distribute_tensor(wide, mesh, [Shard(0)])
    with _counted_collectives() as calls:
        got = fastrank.effective_rank(wide_sharded)
    _close(got, fastrank.effective_rank(wide, method="exact"), "wide 31x47 Shard(0)")
    assert calls["all_to_all_single"] == [wide_sharded.to_local().numel()], calls
    assert calls["all_gather"] == [1], calls  # the shard widths, one int from each rank

    # a rank-deficient weight is recomputed from the all-gathered R factors (r x r each), not gathered
    low_rank = matrices["rank-6 41x29"]
    with _counted_collectives() as calls:
        got = fastrank.effective_rank(distribute_tensor(low_rank, mesh, [Shard(0)]))
    _close(got, fastrank.effective_rank(low_rank, method="exact"), "rank-6 41x29 through TSQR")
    assert calls["all_gather"] == [29 * 29], calls

    # bad input names what was expected and what was given
    partial = DTensor.from_local(weights[0] / world, mesh, [Partial()])  # summands, e.g. a TP output
    with pytest.raises(ValueError, match="Partial"):
        fastrank.effective_rank(partial)
    with pytest.raises(ValueError, match="method must be one of .* got 'randomized'"):
        fastrank.effective_rank(inputs[0], method="randomized")
    with pytest.raises(ValueError, match="hermitian=True"):
        fastrank.effective_rank(distribute_tensor(torch.eye(8, dtype=torch.float64), mesh, [Shard(0)]), hermitian=True)
    batch_sharded = distribute_tensor(torch.randn(world, 5, 7, dtype=torch.float64), mesh, [Shard(0)])
    with pytest.raises(ValueError, match="batch dim"):
        fastrank.effective_rank(batch_sharded)
    bad = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    bad[8, 4] = float("nan")  # on the last rank's rows only: every rank raises
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastrank.effective_rank(distribute_tensor(bad, mesh, [Shard(0)]))


@pytest.mark.parametrize("world", [2, 4], ids=["2-processes", "4-processes"])
def test_dtensor_placements_equal_one_process(tmp_path, world):
    run_processes(_placements_worker, world, tmp_path)


# ----------------------------------------------------------------------------- tensor parallel
def _tp_worker(rank: int, world: int) -> None:
    # torch's own tensor parallelism: ColwiseParallel shards a weight's rows (Shard(0)), RowwiseParallel
    # its columns (Shard(1)); the widths are multiples of the world size (with 29 hidden units torch's
    # own sharded forward fails: "a and b must have same reduction dim").
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    torch.manual_seed(3)
    full = nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 20), nn.ReLU(), nn.Linear(20, 44)).double()
    model = copy.deepcopy(full)
    mesh = init_device_mesh("cpu", (world,))
    parallelize_module(
        model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel(), "4": ColwiseParallel(use_local_output=False)}
    )
    weights = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    assert all(isinstance(w, DTensor) for w in weights.values())
    assert weights["0.weight"].placements == (Shard(0),) and weights["2.weight"].placements == (Shard(1),)
    want = fastrank.effective_ranks(
        {name: p.detach() for name, p in full.named_parameters() if p.dim() == 2}, metric="all", method="exact"
    )
    got = fastrank.effective_ranks(weights, metric="all")
    for name in weights:
        for key, value in want[name].items():
            _close(got[name][key], value, f"tensor-parallel {name} {key}")
    # The sharded forward still matches the full model (the weights above are the ones it uses).
    x = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = model(x)
    out = out.full_tensor() if isinstance(out, DTensor) else out
    torch.testing.assert_close(out, full(x), rtol=1e-12, atol=1e-12)


def test_tensor_parallel_weights_equal_one_process(tmp_path):
    run_processes(_tp_worker, 2, tmp_path)


# ----------------------------------------------------------------------------- FSDP2
STEPS = 3


_model, _data = conv_mlp, conv_mlp_data


def _train(model, x, y, steps=STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    return out


def _fsdp_worker(rank: int, world: int, checkpoint: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    x, y = _data()
    single = _model()
    _train(single, x, y)

    model = _model()
    fully_shard(model[0])
    fully_shard(model[3])
    fully_shard(model)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    _train(model, x[shard], y[shard])
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        assert is_sharded(p), name
        err = ((p.full_tensor() - q).norm() / q.norm()).item()
        assert err < 1e-12, f"{name}: relative difference {err:.2e} between FSDP2 and one process"
    for index in (0, 3):
        collapsed = fastrank.sharded.collapsed_weight_of(model[index])
        err = ((collapsed - single[index].weight).norm() / single[index].weight.norm()).item()
        assert err < 1e-12, f"collapsed weight of layer {index}: relative difference {err:.2e}"
    for index in (0, 3):  # the layers gather their sharded factors (every rank reads the weight)
        weight = model[index].weight
        assert not is_sharded(weight)
        torch.testing.assert_close(weight, single[index].weight, rtol=1e-12, atol=1e-12)

    # eval cache: one F.linear with the cached collapsed weight, refreshed after a training step
    for _ in range(2):
        torch.testing.assert_close(_eval(model, x), _eval(single, x), rtol=1e-12, atol=1e-12)
        _train(model, x[shard], y[shard], steps=1)
        _train(single, x, y, steps=1)
    torch.testing.assert_close(_eval(model, x), _eval(single, x), rtol=1e-12, atol=1e-12)
    # a step within one eval window: FSDP2 reshards, the optimizer updates the shards, the next
    # forward gathers into the same unsharded parameters (same objects, versions kept)
    model.eval()
    single.eval()
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(model(x), single(x), rtol=1e-12, atol=1e-12)
        _train(model, x[shard], y[shard], steps=1)
        _train(single, x, y, steps=1)
    model.train()
    single.train()

    # DCP round trip into a differently initialized sharded model
    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint)
    fresh = _model(seed=1)
    fully_shard(fresh[0])
    fully_shard(fresh[3])
    fully_shard(fresh)
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(fresh, state)
    torch.testing.assert_close(_eval(fresh, x), _eval(single, x), rtol=1e-12, atol=1e-12)
    full = get_model_state_dict(fresh, options=_full_options())
    for key, value in single.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-12, atol=1e-12, msg=lambda m: f"{key}: {m}")

    # collapse of the sharded model: plain layers holding the gathered collapsed weights
    expected = fastrank.collapse(copy.deepcopy(single))
    collapsed = fastrank.collapse(fresh)
    assert type(collapsed[0]) is nn.Conv2d and type(collapsed[3]) is nn.Linear
    for index in (0, 3):
        for name, value in expected[index].state_dict().items():
            got = collapsed[index].state_dict()[name]
            assert not is_sharded(got), f"{index}.{name}"
            torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-12, msg=lambda m: f"{index}.{name}: {m}")
    torch.testing.assert_close(_eval(collapsed, x), _eval(expected, x), rtol=1e-12, atol=1e-12)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def test_fsdp2_overparam_training_equals_one_process(tmp_path):
    run_processes(_fsdp_worker, 2, tmp_path, str(tmp_path / "dcp"))


# ----------------------------------------------------------------------------- FSDP1
def _fsdp1_model() -> nn.Module:
    """An OverparamConv2d, then OverparamLinear layers, one residual with batch norms, fp64."""
    torch.manual_seed(0)
    return nn.Sequential(
        fastrank.OverparamConv2d(3, 4, kernel_sizes=(3, 1), padding=1),
        nn.ReLU(),
        nn.Flatten(),
        fastrank.OverparamLinear(4 * 6 * 6, 16, depth=2),
        fastrank.OverparamLinear(16, 16, depth=3, residual=True, batch_norm=True),
        fastrank.OverparamLinear(16, 5, depth=3, bias=False),
    ).double()


def _train_mode(model: nn.Module) -> None:
    """Train mode with the batch norms in eval mode (on their running statistics): each rank
    normalizes its half of the batch, the single process all of it."""
    model.train()
    model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm1d) else None)


def _fsdp1_worker(rank: int, world: int, use_orig_params: bool) -> None:
    """FullyShardedDataParallel (FSDP1), one flat parameter per wrapped layer: without
    ``use_orig_params`` (its default) a forward sets each layer's parameters as plain tensor
    attributes, views of the gathered flat parameter, and leaves ``_parameters`` without them."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.set_num_threads(1)
    x, y = _data()
    policy = ModuleWrapPolicy({fastrank.OverparamConv2d, fastrank.OverparamLinear})
    single = _fsdp1_model()
    model = FSDP(_fsdp1_model(), auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    for round in range(2):  # train, compare the parameters, evaluate (the eval cache serves a second call)
        _train_mode(model)
        _train_mode(single)
        _train(model, x[shard], y[shard])
        _train(single, x, y)
        with FSDP.summon_full_params(model):
            for (name, p), q in zip(model.named_parameters(), single.parameters()):
                err = ((p - q).norm() / q.norm()).item()
                assert err < 1e-12, f"round {round}, {name}: relative difference {err:.2e} between FSDP1 and one process"
        model.eval()
        single.eval()
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(model(x), single(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_orig_params", [False, True], ids=["flat", "orig-params"])
def test_fsdp1_overparam_training_equals_one_process(tmp_path, use_orig_params):
    run_processes(_fsdp1_worker, 2, tmp_path, use_orig_params)


# ----------------------------------------------------------------------------- RankTracker
def _transformer() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=24, dropout=0.0, batch_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
        fastrank.OverparamLinear(16, 12, depth=2),
    )
    return model.double()


def _tokens():
    return torch.randn(6, 11, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _tracked(model, x, token_rate):
    tracker = fastrank.RankTracker(
        model, embeddings=("0.layers.0", "0.layers.1"), every=2, center=True, token_rate=token_rate, background=True
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # measures at steps 0 and 2
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        tracker.step()
    return tracker.history


def _tracker_worker(rank: int, world: int, out_path: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    x = _tokens()
    model = _transformer()
    for block in model[0].layers:
        fully_shard(block)
    fully_shard(model[1])
    fully_shard(model)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    history = _tracked(model, x[shard], token_rate=0.5)
    if rank == 0:
        torch.save(history, out_path)


def test_tracker_on_sharded_transformer_equals_one_process(tmp_path):
    out_path = str(tmp_path / "history.pt")
    run_processes(_tracker_worker, 2, tmp_path, out_path)
    got = torch.load(out_path, weights_only=True)
    want = _tracked(_transformer(), _tokens(), token_rate=0.5)
    names = [(row["step"], row["name"]) for row in want]
    assert [(row["step"], row["name"]) for row in got] == names
    assert any(name == "1.weight" for _, name in names), names
    assert any("linear1" in name for _, name in names), names
    for g, w in zip(got, want):
        for key, value in w.items():
            if key not in ("step", "name"):
                _close(g[key], value, f"step {w['step']} {w['name']} {key}")
    assert want[0]["samples"] == 6 * 6  # 6 sequences, round(0.5 * 11) = 6 tokens each


# ----------------------------------------------------------------------------- one process
def test_select_tokens_keeps_the_same_positions_for_every_sequence():
    x = torch.arange(2 * 10 * 3, dtype=torch.float64).reshape(2, 10, 3)
    kept = select_tokens(x, 0.3, seed=0, step=5)
    assert kept.shape == (2, 3, 3)
    positions = kept[0, :, 0] // 3
    torch.testing.assert_close(kept[1, :, 0] // 3 - 10, positions)  # sequence 1, same positions
    assert bool((positions.diff() > 0).all())
    again = select_tokens((x[1:],), 0.3, seed=0, step=5)  # tuple outputs, a different batch split
    torch.testing.assert_close(again[0], kept[1])
    assert select_tokens(x, None, 0, 0) is x and select_tokens(x[0], 0.5, 0, 0) is not None
    torch.testing.assert_close(select_tokens(x.transpose(0, 1), 0.3, 0, 5, token_dim=0), kept.transpose(0, 1))
    assert select_tokens(x, 0.01, 0, 0).shape == (2, 1, 3)


@pytest.mark.parametrize("rate", [0, 1.5, -0.1, True, "half"], ids=str)
def test_token_rate_rejects_bad_values(rate):
    with pytest.raises(ValueError, match=f"token_rate must be None or a number in \\(0, 1\\], got {rate!r}"):
        check_token_rate(rate)
    with pytest.raises(ValueError, match="token_rate"):
        fastrank.RankTracker(nn.Linear(3, 3), token_rate=rate)


def test_plain_tensors_are_not_sharded():
    assert not is_sharded(torch.ones(2, 2)) and not is_sharded([1.0])
