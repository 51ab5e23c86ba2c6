import csv
import json
import math
import subprocess
import sys

import pytest
import torch
import torch._dynamo  # noqa: F401  (torch._dynamo.config, patched below, is there after this import)
import torch.distributed as dist
import torch.nn as nn
from eigensolver_cases import record_host_solves
from multiprocess import run_processes

import fastrank
from fastrank import RankTracker


def _entropy_of_gram(X, center=False):
    X = X.double()
    if center:
        X = X - X.mean(0)
    s = torch.linalg.svdvals(X).square()
    p = s / s.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum()), float(s.square().sum() / s.max().square())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(12, 9), nn.Tanh())
        self.over = fastrank.OverparamLinear(9, 9, depth=3)
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(9, 4)

    def forward(self, x):
        return self.head(self.over(self.encoder(x)))


def test_embedding_rank_equals_rank_of_all_rows_seen():
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, every=1)
    batches = [torch.randn(n, 12) for n in (5, 7, 3)]
    for batch in batches:
        net(batch)
    result = tracker.compute()["encoder"]
    with torch.no_grad():
        rows = torch.cat([net.encoder(b) for b in batches])
    entropy, stable = _entropy_of_gram(rows)
    assert result["spectral_entropy"] == pytest.approx(entropy, rel=1e-10)
    assert result["effective_rank"] == pytest.approx(math.exp(entropy), rel=1e-10)
    assert result["stable_rank"] == pytest.approx(stable, rel=1e-10)
    assert result["samples"] == 15


def test_center_and_conv_outputs():
    model = nn.Sequential(nn.Conv2d(2, 5, 3))
    tracker = RankTracker(model, embeddings=("0",), weights=False, center=True)
    x = torch.randn(3, 2, 6, 7)
    model(x)
    result = tracker.compute()["0"]
    with torch.no_grad():
        rows = model(x).movedim(1, -1).reshape(-1, 5)  # N*H*W rows of C features
    entropy, _ = _entropy_of_gram(rows, center=True)
    assert result["spectral_entropy"] == pytest.approx(entropy, rel=1e-9)
    assert result["samples"] == 3 * 4 * 5


def test_sketch_accumulator_bounds_contain_exact():
    model = nn.Sequential(nn.Linear(40, 300))
    tracker = RankTracker(model, embeddings=("0",), weights=False, sketch_threshold=128, sketch_size=96)
    batches = [torch.randn(64, 40) for _ in range(4)]
    for batch in batches:
        model(batch)
    result = tracker.compute()["0"]
    with torch.no_grad():
        rows = torch.cat([model(b) for b in batches])
    exact = math.exp(_entropy_of_gram(rows)[0])
    assert result["effective_rank_lower"] <= exact <= result["effective_rank_upper"]
    # The outputs have rank <= 41 < sketch size: the sketch captures everything.
    assert result["effective_rank"] == pytest.approx(exact, rel=1e-6)


def test_weights_batched_collapsed_and_flattened():
    net = Net()
    result = RankTracker(net, weights=True).compute()
    assert set(result) == {"encoder.0.weight", "over.weight", "conv.weight", "head.weight"}
    with torch.no_grad():
        for name, matrix in [("over.weight", net.over.weight), ("conv.weight", net.conv.weight.flatten(1)),
                             ("head.weight", net.head.weight)]:
            s = torch.linalg.svdvals(matrix.double())
            p = s / s.sum()
            assert result[name]["spectral_entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-9), name
            assert result[name]["stable_rank"] == pytest.approx(float(s.square().sum() / s[0] ** 2), rel=1e-9)


def test_every_history_exports_and_remove(tmp_path):
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), every=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(7):
        loss = net(torch.randn(8, 12)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.step()
    steps = sorted({row["step"] for row in tracker.history})
    assert steps == [0, 3, 6]
    assert {row["name"] for row in tracker.history} == {"encoder", "encoder.0.weight", "over.weight", "conv.weight", "head.weight"}
    assert all(row["samples"] == 8 for row in tracker.history if row["name"] == "encoder")

    tracker.to_json(tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text()) == tracker.history
    tracker.to_csv(tmp_path / "h.csv")
    with open(tmp_path / "h.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tracker.history) and float(rows[0]["effective_rank"]) == pytest.approx(
        tracker.history[0]["effective_rank"])

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    writer = Writer()
    tracker.log(writer)
    assert writer.scalars and all(step == 6 for _, _, step in writer.scalars)
    latest_encoder = next(r for r in reversed(tracker.history) if r["name"] == "encoder")
    assert ("rank/encoder/effective_rank", latest_encoder["effective_rank"], 6) in writer.scalars
    assert len(writer.scalars) == sum(
        sum(1 for k in row if k not in ("step", "name")) for row in tracker.history if row["step"] == 6)

    tracker.remove()
    tracker.step_count = 9
    net(torch.randn(4, 12))
    assert tracker._accumulators["encoder"].gram is None  # no hook any more


def _train_tracked(background, sketch_threshold=4096):
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), every=2, center=True, background=background,
                          sketch_threshold=sketch_threshold, sketch_size=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(3)
    returned = []
    for _ in range(5):
        loss = net(torch.randn(7, 12, generator=generator)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # in place: a background measurement must have copied the weights before
        returned.append(tracker.step())
    return tracker, returned


@pytest.mark.parametrize("sketch_threshold", [4096, 4], ids=["gram", "sketch"])
def test_background_measurements_equal_synchronous_ones(sketch_threshold):
    synchronous, sync_returned = _train_tracked(False, sketch_threshold)
    background, bg_returned = _train_tracked(True, sketch_threshold)
    assert all(r is None for r in bg_returned)
    assert [r is not None for r in sync_returned] == [True, False, True, False, True]
    assert background._pending  # still running, or done and not yet recorded
    rows, expected = background.history, synchronous.history
    assert not background._pending
    assert [(r["step"], r["name"]) for r in rows] == [(r["step"], r["name"]) for r in expected]
    assert {r["step"] for r in rows} == {0, 2, 4}
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for key in row:
            if key not in ("step", "name"):
                assert row[key] == pytest.approx(want[key], rel=1e-12, abs=0), (row["name"], key)
    background.remove()
    assert background._executor is None


def _train_wide(host_threads, background):
    """A model whose spectra take the batched eigensolver: 70 x 70 weights (three of them, one the
    collapsed weight of a chain) and a 70-feature embedding, beyond the small-matrix path."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(30, 70), nn.Tanh(), nn.Linear(70, 70), nn.Tanh(), nn.Linear(70, 70),
                        fastrank.OverparamLinear(70, 70, depth=2))
    tracker = RankTracker(net, embeddings=("1",), every=2, center=True, background=background,
                          host_threads=host_threads)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(6)
    for _ in range(3):
        loss = net(torch.randn(90, 30, generator=generator)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.step()
    return tracker.history


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_host_threads_solve_on_the_host_and_equal_the_device_solver(background, monkeypatch):
    calls = record_host_solves(monkeypatch)
    expected = _train_wide(None, background)
    assert calls == []
    rows = _train_wide(3, background)
    # per measurement (steps 0 and 2): the embedding's Gram, then the three 70 x 70 weights at once
    assert [(call.shape, call.threads) for call in calls] == [((70, 70), 3), ((3, 70, 70), 3)] * 2
    assert [(r["step"], r["name"]) for r in rows] == [(r["step"], r["name"]) for r in expected]
    assert len(rows) == 2 * 5  # the 70 x 30 weight, small, takes fp64 svdvals
    for row, want in zip(rows, expected):
        for key in row:
            if key not in ("step", "name"):
                assert row[key] == pytest.approx(want[key], rel=1e-11, abs=0), (row["name"], key)


def test_background_error_is_raised_at_flush(monkeypatch):
    net = Net()
    tracker = RankTracker(net, every=1, background=True)

    def broken(*args, **kwargs):
        raise RuntimeError("spectrum failed")

    monkeypatch.setattr(fastrank.tracking, "effective_ranks", broken)
    tracker.step()
    with pytest.raises(RuntimeError, match="spectrum failed"):
        tracker.flush()


def test_no_autograd_graph_kept_alive():
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False)
    net(torch.randn(5, 12, requires_grad=True))
    acc = tracker._accumulators["encoder"]
    assert not acc.gram.requires_grad and acc.gram.grad_fn is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="no module named 'missing'"):
        RankTracker(Net(), embeddings=("missing",))
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        RankTracker(Net(), every=0)


BAD_OPTIONS = [
    (dict(method="foo"), "method must be one of ('auto', 'exact', 'randomized', 'slq'), got 'foo'"),
    (dict(sketch_size=0), "sketch_size must be a positive int, got 0"),
    (dict(sketch_size=2.5), "sketch_size must be a positive int, got 2.5"),
    (dict(sketch_threshold=-1), "sketch_threshold must be a non-negative int, got -1"),
    (dict(sketch_threshold="64"), "sketch_threshold must be a non-negative int, got '64'"),
    (dict(token_dim=5), "token_dim must be 0 (outputs (T, B, d)) or 1 (outputs (B, T, d)), got 5"),
    (dict(token_rate=1.5), "token_rate must be None or a number in (0, 1], got 1.5"),
    (dict(every=True), "every must be a positive int, got True"),
    (dict(num_classes=0), "num_classes must be a positive int or None, got 0"),
    (dict(seed=1.0), "seed must be an int, got 1.0"),
    (dict(weights="yes"), "weights must be a bool, got 'yes'"),
    (dict(forwards="eval"), "forwards must be one of ('all', 'training'), got 'eval'"),
    (dict(host_threads=0), "host_threads must be a positive int or None, got 0"),
    (dict(host_threads=2.0), "host_threads must be a positive int or None, got 2.0"),
    (dict(embeddings=3), "embeddings must be a module name or an iterable of module names (str), got 3"),
    (dict(embeddings=[nn.Linear(2, 2)]), "embeddings must be a module name or an iterable of module names (str), got (Linear("),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _ in BAD_OPTIONS])
def test_bad_options_raise_at_construction(options, message):
    with pytest.raises(ValueError) as error:
        RankTracker(Net(), **options)
    assert str(error.value).startswith("RankTracker: " + message), str(error.value)


def test_bad_model_and_non_module_embeddings_raise_at_construction():
    with pytest.raises(TypeError, match="^RankTracker: model must be a torch.nn.Module, got NoneType$"):
        RankTracker(None)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got OrderedDict"):
        RankTracker(Net().state_dict())
    with pytest.raises(ValueError, match=r"^RankTracker: embeddings: no module named 'encoder\.0\.weight' in the model "
                       r"\('encoder\.0\.weight' is a parameter of module 'encoder\.0'\); known names include"):
        RankTracker(Net(), embeddings=("encoder.0.weight",))
    net = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"'0\.running_mean' is a buffer of module '0'"):
        RankTracker(net, embeddings="0.running_mean")
    with pytest.raises(TypeError, match="unexpected keyword argument 'sketch_thresold'"):
        RankTracker(Net(), sketch_thresold=8)


# ---- which forwards are measured ------------------------------------------------------------


def _reference(rows):
    """fp64 metrics of the rows: (spectral entropy, stable rank, samples)."""
    entropy, stable = _entropy_of_gram(torch.cat(rows))
    return entropy, stable, sum(r.shape[0] for r in rows)


def _assert_measures(result, rows):
    entropy, stable, samples = _reference(rows)
    assert result["samples"] == samples
    assert result["spectral_entropy"] == pytest.approx(entropy, rel=1e-10)
    assert result["stable_rank"] == pytest.approx(stable, rel=1e-10)


def _assert_tracked(tracker, name, rows):
    """``tracker``'s measurement of ``name`` against the fp64 metrics of ``rows()``, which runs
    after the tracker is removed (under no_grad), so that its forwards are not counted."""
    result = tracker.compute()[name]
    tracker.remove()
    with torch.no_grad():
        _assert_measures(result, rows())


@pytest.mark.parametrize("forwards", ["all", "training"])
def test_forwards_all_measures_every_forward_training_only_training_mode(forwards):
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, forwards=forwards)
    train, held_out, evaluated = (torch.randn(n, 12) for n in (6, 5, 4))
    net.train()
    net(train).sum().backward()
    with torch.no_grad():  # a held-out batch, model in training mode: a forward like any other
        net(held_out)
    net.eval()
    with torch.no_grad():
        net(evaluated)
    net.train()
    result = tracker.compute()["encoder"]
    tracker.remove()
    with torch.no_grad():
        rows = [net.encoder(b) for b in (train, held_out, evaluated)]
    _assert_measures(result, rows if forwards == "all" else rows[:2])


def test_a_forward_under_inference_mode_is_measured_and_training_goes_on():
    # Accumulators first made under torch.inference_mode were inference tensors, to which the
    # next forward outside it could not add (RuntimeError).
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False)
    evaluated, train = torch.randn(5, 12), torch.randn(6, 12)
    with torch.inference_mode():
        net(evaluated)
    net(train).sum().backward()
    _assert_tracked(tracker, "encoder", lambda: [net.encoder(evaluated), net.encoder(train)])


def test_forwards_training_follows_the_model_not_the_watched_module():
    # A frozen encoder kept in eval mode while the model trains: its forwards are training forwards.
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, forwards="training")
    net.train()
    net.encoder.eval()
    batch = torch.randn(7, 12)
    net(batch)
    _assert_tracked(tracker, "encoder", lambda: [net.encoder(batch)])


class CheckpointedNet(Net):
    """Net with its encoder and the over-parameterized layer in one checkpointed region."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, x):
        region = lambda x: self.over(self.encoder(x))
        return self.head(torch.utils.checkpoint.checkpoint(region, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("forwards", ["all", "training"])
@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "full-recompute"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_recompute_is_not_counted(use_reentrant, early_stop, forwards):
    net = CheckpointedNet(use_reentrant)
    tracker = RankTracker(net, embeddings=("encoder", "over"), weights=False, forwards=forwards)
    batches = [torch.randn(n, 12, requires_grad=True) for n in (8, 3)]
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        for batch in batches:
            net(batch).square().sum().backward()
    assert all(batch.grad is not None for batch in batches)  # backward ran through the recompute
    result = tracker.compute()
    tracker.remove()
    with torch.no_grad():
        _assert_measures(result["encoder"], [net.encoder(b) for b in batches])
        _assert_measures(result["over"], [net.over(net.encoder(b)) for b in batches])


# ---- torch.compile ---------------------------------------------------------------------------


def _compile_counter(backend="aot_eager"):
    """A torch.compile backend that counts the graphs it compiles, then compiles them with ``backend``."""
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend(backend)


def _hook_guards(on):
    """Dynamo's guards on module hooks on or off (the default) within the block (pytest's
    monkeypatch deletes a torch config entry when it restores it)."""
    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=not on)


def _train_and_measure(net, forward, tracker, steps, labels=None):
    """``steps`` SGD steps of ``forward`` (the net, compiled or not) on seeded batches, the tracker
    stepped after each; its history."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(5)
    for step in range(steps):
        x = torch.randn(6 + step, 12, generator=generator)
        if labels is not None:
            tracker.set_labels(torch.randint(0, labels, (x.shape[0],), generator=generator))
        loss = forward(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.step()
    return tracker.history


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_model_stays_one_graph_and_measures_as_eager(backend):
    # The hooks are traced as calls of fastrank::track_output, which accumulate when the graph
    # runs: fullgraph holds (a graph break in a hook left the model in a graph per module), one
    # graph serves measured and unmeasured steps, and the history is eager's.
    options = dict(embeddings=("encoder", "over"), weights=True, every=2, num_classes=3)
    eager_net = Net()
    eager = _train_and_measure(eager_net, eager_net, RankTracker(eager_net, **options), 5, labels=3)
    graphs = []
    for tracked in (False, True):  # the same loop untracked, then tracked: the graphs it compiles
        torch._dynamo.reset()
        net = Net()
        tracker = RankTracker(net, **(options if tracked else dict(weights=False, every=2)))
        counter = _compile_counter(backend)
        compiled = _train_and_measure(net, torch.compile(net, backend=counter, fullgraph=True), tracker, 5,
                                      labels=3 if tracked else None)
        graphs.append(counter.frame_count)
    assert graphs[1] == graphs[0]  # the tracker adds none (fullgraph: it breaks none)
    assert [(row["step"], row["name"]) for row in compiled] == [(row["step"], row["name"]) for row in eager]
    assert {row["name"] for row in compiled} >= {"encoder", "over", "head.weight"}
    for got, expected in zip(compiled, eager):
        assert got["samples"] == expected["samples"] if "samples" in expected else "samples" not in got
        for metric in ("spectral_entropy", "stable_rank", "nc1", "class_mean_effective_rank"):
            if metric in expected:  # the compiled forward's fp32 rounding, not a missing or extra row
                assert got[metric] == pytest.approx(expected[metric], rel=1e-5), (got["step"], got["name"], metric)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_compiled_with_cuda_graphs_measures_every_replay():
    # mode="reduce-overhead": Inductor captures CUDA graphs around the cudagraph-unsafe op, which
    # runs at every replay (a captured call would run once, at the capture).
    torch._dynamo.reset()
    net = Net().cuda()
    tracker = RankTracker(net, embeddings=("encoder", "over"), weights=False, every=1)
    forward = torch.compile(net, mode="reduce-overhead")
    generator = torch.Generator().manual_seed(6)
    for step in range(5):
        batch = torch.randn(8, 12, generator=generator)
        with torch.no_grad():
            forward(batch.cuda())
        result = tracker.step()
        with torch.no_grad():
            rows = net.encoder(batch.cuda()).cpu()
        assert result["encoder"]["samples"] == 8, step
        entropy, _ = _entropy_of_gram(rows)
        assert result["encoder"]["spectral_entropy"] == pytest.approx(entropy, rel=1e-5), step
    tracker.remove()


@pytest.mark.parametrize("guarded", [False, True], ids=["first-tracker", "hook-guards-on"])
def test_a_tracker_made_after_a_compiled_call_measures(guarded):
    # torch.compile does not guard on forward hooks by default: a model compiled before its tracker
    # (or another model built the same way) ran without the hooks. The first tracker turns the
    # guards on and drops the code compiled before; with them on, a new hook fails a guard.
    with _hook_guards(guarded):
        _made_after_a_compiled_call()


def _made_after_a_compiled_call():
    torch._dynamo.reset()
    counter = _compile_counter()
    first = Net()
    torch.compile(first, backend=counter)(torch.randn(3, 12))
    net = Net()
    forward = torch.compile(net, backend=counter)
    forward(torch.randn(4, 12))
    tracker = RankTracker(net, embeddings=("encoder",), weights=False)
    assert not torch._dynamo.config.skip_nnmodule_hook_guards
    batch = torch.randn(5, 12)
    forward(batch)
    _assert_tracked(tracker, "encoder", lambda: [net.encoder(batch)])
    assert counter.frame_count >= 2  # compiled again, with the hook


def test_trackers_made_one_after_another_reuse_the_compiled_model():
    # A tracker per epoch (or per fold, per fit): the key reaches the graph as a tensor, not a
    # constant of the trace, so new trackers do not recompile the model into the recompile limit,
    # past which it would run eagerly.
    torch._dynamo.reset()
    net = Net()
    counter = _compile_counter()
    forward = torch.compile(net, backend=counter)
    RankTracker(net, embeddings=("encoder",), weights=False).remove()  # the hook guards on
    limit = torch._dynamo.config.recompile_limit
    for epoch in range(limit + 3):
        batch = torch.randn(4, 12)
        tracker = RankTracker(net, embeddings=("encoder",), weights=False)
        forward(batch)
        _assert_tracked(tracker, "encoder", lambda: [net.encoder(batch)])
    assert counter.frame_count <= 2, counter.frame_count


@torch._dynamo.config.patch(skip_nnmodule_hook_guards=True)  # as in a process without a tracker
def test_a_compiled_twin_without_a_tracker_leaves_the_tracked_model_its_hooks():
    # A teacher of the student's class, untracked, compiled and called first in the same modes: the
    # student, tracked, must not run the teacher's code (compiled without the hook).
    torch._dynamo.reset()
    student, teacher = Net(), Net()
    tracker = RankTracker(student, embeddings=("encoder",), weights=False)
    counter = _compile_counter()
    teach, learn = torch.compile(teacher, backend=counter), torch.compile(student, backend=counter)
    batch = torch.randn(5, 12)
    teach(batch)
    learn(batch)
    teach(batch)
    _assert_tracked(tracker, "encoder", lambda: [student.encoder(batch)])


@torch._dynamo.config.patch(skip_nnmodule_hook_guards=True)  # as in a process without a tracker
def test_a_tracker_made_inside_a_compiled_function_sees_the_code_compiled_before():
    # Made at a graph break of a compiled step, after the model ran there without hooks: the guards
    # are turned on and the code dropped outside the trace.
    torch._dynamo.reset()
    net = Net()
    made = {}

    @torch.compile(backend=_compile_counter())
    def step(x):
        net(x)
        torch._dynamo.graph_break()
        if "tracker" not in made:
            made["tracker"] = RankTracker(net, embeddings=("encoder",), weights=False)
        return net(x + 1)

    batches = [torch.randn(n, 12) for n in (3, 4)]
    for batch in batches:
        step(batch)
    result = made["tracker"].compute()["encoder"]
    made["tracker"].remove()
    with torch.no_grad():  # the forward after the tracker in the first call, both in the second
        _assert_measures(result, [net.encoder(batches[0] + 1), net.encoder(batches[1]), net.encoder(batches[1] + 1)])


def test_a_compiled_function_that_sets_the_mode_counts_training_forwards_only():
    # model.train() / model.eval() inside the compiled function take effect after its graph runs;
    # the traced hook passes the mode the trace is in.
    torch._dynamo.reset()
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, forwards="training")

    @torch.compile(backend=_compile_counter())
    def train_step(x):
        net.train()
        return net(x).square().mean()

    @torch.compile(backend=_compile_counter())
    def eval_step(x):
        net.eval()
        return net(x)

    train, evaluated = torch.randn(8, 12), torch.randn(3, 12)
    for _ in range(2):  # the second call runs the graphs compiled by the first
        train_step(train).backward()
        with torch.no_grad():
            eval_step(evaluated)
    _assert_tracked(tracker, "encoder", lambda: [net.encoder(train)] * 2)


def test_fastrank_imported_under_inference_mode_tracks_a_compiled_model():
    # The op's token made under inference_mode would be an inference tensor, which AOTAutograd's
    # write-back of the declared mutation may not update outside it.
    script = """
import torch
with torch.inference_mode():
    import fastrank
net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
tracker = fastrank.RankTracker(net, embeddings=("1",), weights=False)
forward = torch.compile(net, backend="aot_eager")
for rows in (5, 5):
    forward(torch.randn(rows, 4)).sum().backward()
print(int(tracker.compute()["1"]["samples"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "10"


@pytest.mark.parametrize("forwards", ["all", "training"])
def test_compiled_forwards_count_as_eager_ones(forwards):
    # Whether a forward counts is decided when the graph runs: training and eval graphs, a held-out
    # batch under no_grad, unmeasured steps, and a removed tracker (its graphs still call the op).
    torch._dynamo.reset()
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, every=2, forwards=forwards)
    forward = torch.compile(net, backend=_compile_counter())
    train, held_out, evaluated, unmeasured = (torch.randn(n, 12) for n in (6, 5, 4, 3))
    forward(train).sum().backward()
    with torch.no_grad():
        forward(held_out)
    net.eval()
    with torch.no_grad():
        forward(evaluated)
    net.train()
    result = tracker.step()["encoder"]
    forward(unmeasured)  # step 1: not measured
    assert tracker._accumulators["encoder"].gram is None
    tracker.step()
    tracker.remove()
    forward(unmeasured)  # step 2 would be measured; the tracker is gone
    torch.ops.fastrank.track_output(unmeasured, torch.tensor(tracker._key), "encoder", True, False)  # a stale graph's
    assert tracker._accumulators["encoder"].gram is None
    with torch.no_grad():
        rows = [net.encoder(b) for b in (train, held_out, evaluated)]
    _assert_measures(result, rows if forwards == "all" else rows[:2])


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_compiled_checkpoint_recompute_is_not_counted(use_reentrant):
    torch._dynamo.reset()
    net = CheckpointedNet(use_reentrant)
    tracker = RankTracker(net, embeddings=("encoder", "over"), weights=False)
    forward = torch.compile(net, backend=_compile_counter())
    batches = [torch.randn(n, 12, requires_grad=True) for n in (8, 3)]
    for batch in batches:
        forward(batch).square().sum().backward()
    assert all(batch.grad is not None for batch in batches)
    result = tracker.compute()
    tracker.remove()
    with torch.no_grad():
        _assert_measures(result["encoder"], [net.encoder(b) for b in batches])
        _assert_measures(result["over"], [net.over(net.encoder(b)) for b in batches])


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_leaves_the_tracker_out(strict):
    # torch.export of a watched model: no tracker op in the program, nothing accumulated from its
    # fake tensors (the hook once left fake tensors in the accumulators, or broke a strict export).
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder",), weights=False)
    program = torch.export.export(net, (torch.randn(4, 12),), strict=strict)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "fastrank.chain_matmul.default" in targets  # the layer's own op, not the tracker's
    assert not any("track_output" in target for target in targets), targets
    assert tracker._accumulators["encoder"].gram is None
    batch = torch.randn(4, 12)
    assert torch.equal(program.module()(batch), net(batch))
    _assert_tracked(tracker, "encoder", lambda: [net.encoder(batch)])


# ---- non-finite values ----------------------------------------------------------------------


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
@pytest.mark.parametrize("sketch_threshold", [4096, 4], ids=["gram", "sketch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_outputs_name_the_module_and_step(bad, sketch_threshold, background):
    net = Net()
    tracker = RankTracker(net, embeddings=("encoder", "over"), weights=False, every=2,
                          sketch_threshold=sketch_threshold, sketch_size=4, background=background)
    for _ in range(2):  # measured at step 0, then an unmeasured step
        net(torch.randn(4, 12))
        tracker.step()
    x = torch.randn(4, 12)
    net(x)
    with torch.no_grad():
        net.over.factors[0][0, 0] = bad  # the encoder's outputs stay finite, the layer's are not
    net(x)
    message = (r"^RankTracker: the outputs of module 'over' are not finite \(NaN or Inf\) in the forwards of "
               r"measurement step 2 \(8 rows accumulated\)")
    with pytest.raises(ValueError, match=message):
        tracker.step()
        tracker.flush()


def test_non_finite_weight_names_the_module_and_step():
    net = Net()
    tracker = RankTracker(net, every=1)
    tracker.step()
    with torch.no_grad():
        net.head.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^RankTracker: the weight of module 'head' is not finite \(NaN or Inf\) "
                       "at measurement step 1$"):
        tracker.compute()


# ---- two processes on gloo equal one process on the concatenated data ------------------------

def _data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 10, 12, generator=gen)  # two ranks' worth of rows


class _WideEncoder(nn.Module):
    """An embedding of 70 features: its 70 x 70 Gram is past the small-matrix path (which solves
    one CPU matrix of at most 64^3 work directly), so its spectrum goes to the eigensolver."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(12, 70), nn.Tanh())

    def forward(self, x):
        return self.encoder(x)


def _tracked_net(host_threads):
    return Net() if host_threads is None else _WideEncoder()


def _tracker_worker(rank, world, out_path, sketch, background, host_threads):
    calls = record_host_solves(pytest.MonkeyPatch())  # this process's own
    net = _tracked_net(host_threads)
    kwargs = dict(sketch_threshold=4, sketch_size=6) if sketch else {}
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, center=True,
                          background=background, host_threads=host_threads, **kwargs)
    net(_data()[rank])
    if background:  # all-reduced at step(), measured on the worker thread
        tracker.step()
        result = {row["name"]: {k: v for k, v in row.items() if k not in ("step", "name")}
                  for row in tracker.history}
    else:
        result = tracker.compute()
    result["host solves"] = [(call.shape, call.threads) for call in calls]
    if rank == 0:
        torch.save(result, out_path)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("sketch,background,host_threads",
                         [(False, False, None), (True, False, None), (False, True, None), (False, True, 2)],
                         ids=["gram", "sketch", "gram-background", "gram-background-host-solver"])
def test_distributed_equals_single_process(tmp_path, sketch, background, host_threads):
    out_path = str(tmp_path / "result.pt")
    run_processes(_tracker_worker, 2, tmp_path, out_path, sketch, background, host_threads)
    measured = torch.load(out_path, weights_only=True)
    # The all-reduced Gram's spectrum solved on the host threads where they are asked for.
    assert measured["host solves"] == ([((70, 70), host_threads)] if host_threads else []), measured["host solves"]
    distributed = measured["encoder"]
    net = _tracked_net(host_threads)
    kwargs = dict(sketch_threshold=4, sketch_size=6) if sketch else {}
    tracker = RankTracker(net, embeddings=("encoder",), weights=False, center=True, **kwargs)
    for rows in _data():  # the ranks' rows, each computed as its rank computed it (an fp32 forward
        net(rows)         # of 20 rows may round otherwise than two of 10: 2e-9 at 70 features)
    single = tracker.compute()["encoder"]
    assert distributed["samples"] == single["samples"] == 20
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, rel=1e-9), key


def test_weights_of_every_replaced_layer_type_are_measured_as_out_by_in():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(50)
    model = nn.Sequential(nn.Conv1d(3, 5, 3), fastrank.OverparamConv1d(5, 4, kernel_sizes=(3, 1)),
                          Conv1D(6, 4), fastrank.OverparamConv1D(7, 6))
    tracker = RankTracker(model, every=1)
    tracker.step()
    ranks = {row["name"]: row["effective_rank"] for row in tracker.history}
    assert set(ranks) == {"0.weight", "1.weight", "2.weight", "3.weight"}
    expected = {
        "0.weight": model[0].weight.reshape(5, -1),
        "1.weight": model[1].collapsed_parameters()[0].reshape(4, -1),
        "2.weight": model[2].weight.T,
        "3.weight": model[3].collapsed_parameters()[0],
    }
    for name, matrix in expected.items():
        assert ranks[name] == pytest.approx(float(fastrank.effective_rank(matrix.detach().double())), rel=1e-9), name


@pytest.mark.parametrize("method", ["exact", "randomized", "slq"])
def test_every_method_measures_embeddings_and_weights(method):
    torch.manual_seed(51)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), fastrank.OverparamLinear(10, 8, depth=2))
    tracker = RankTracker(model, embeddings=("1",), every=1, method=method, seed=0)
    x = torch.randn(64, 12)
    model(x)
    results = tracker.step()
    assert set(results) == {"1", "0.weight", "2.weight"}
    reference = fastrank.rank.rank_metrics(model[1](model[0](x)).detach().double().T @ model[1](model[0](x)).detach().double(), hermitian=True, method="exact")
    for metric in ("effective_rank", "spectral_entropy", "stable_rank"):
        assert all(math.isfinite(values[metric]) for values in results.values()), (metric, results)
        assert results["1"][metric] == pytest.approx(float(reference[metric]), rel=0.1), metric
