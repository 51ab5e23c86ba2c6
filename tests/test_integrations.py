"""Rank tracking in training frameworks: the Lightning and Hugging Face callbacks, the history plot
(``RankTracker.plot``, ``fastrank plot``), and fastrank without either framework installed."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fastrank
import fastrank.bench.cli
from fastrank import RankTracker


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), fastrank.OverparamLinear(16, 8, depth=3), nn.Linear(8, 3))


def _batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 12, generator=gen)
    y = torch.randn(40, 3, generator=gen)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]  # 5 batches an epoch


def _hand_run(net, epochs, every, embeddings=("1",), device="cpu"):
    """The same training as the Lightning module below, stepped by hand with a RankTracker."""
    net = net.to(device)
    tracker = RankTracker(net, embeddings=embeddings, every=every)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(epochs):
        for x, y in _batches():
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            tracker.step()
    return tracker.history


# ---- Lightning -------------------------------------------------------------------------------


def _lightning_fit(tmp_path, net, callback, epochs, checkpoint=None, validate=False, accelerator="cpu"):
    """``Trainer.fit`` of ``net`` on ``_batches()`` with SGD; returns the logger (``logged``: every
    ``(step, metrics)`` the Trainer sent). ``checkpoint``: run ``net[:3]`` (the embeddings measured
    and the over-parameterized layer) under ``torch.utils.checkpoint``, "reentrant" or
    "non-reentrant". ``validate``: a validation set of 15 rows in batches of 5, checked every
    2 training batches, and a 2-batch sanity check before training."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            if checkpoint is None:
                return nn.functional.mse_loss(self.net(x), y)
            region = torch.utils.checkpoint.checkpoint(
                self.net[:3], x.requires_grad_(), use_reentrant=checkpoint == "reentrant")
            return nn.functional.mse_loss(self.net[3](region), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class MemoryLogger(pl.loggers.Logger):
        def __init__(self):
            super().__init__()
            self.logged = []

        name, version = "memory", 0
        experiment = None

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

    logger = MemoryLogger()
    validation = dict(num_sanity_val_steps=2, val_check_interval=2) if validate else dict(limit_val_batches=0)
    trainer = pl.Trainer(
        max_epochs=epochs, logger=logger, callbacks=[callback], accelerator=accelerator, devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **validation,
    )
    x = torch.cat([b[0] for b in _batches()])
    y = torch.cat([b[1] for b in _batches()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    gen = torch.Generator().manual_seed(2)
    held_out = torch.utils.data.TensorDataset(torch.randn(15, 12, generator=gen), torch.randn(15, 3, generator=gen))
    val_loader = torch.utils.data.DataLoader(held_out, batch_size=5) if validate else None
    trainer.fit(Module(net), train_dataloaders=loader, val_dataloaders=val_loader)
    return logger


def _assert_same_history(history, expected, prefix, offset=1):
    # a callback records each measurement at the framework's global step: a plain tracker's step + 1
    assert [(row["step"], row["name"]) for row in history] == [(row["step"] + offset, prefix + row["name"]) for row in expected]
    for got, want in zip(history, expected):
        assert got.keys() == want.keys(), got["name"]
        for key in got.keys() - {"step", "name"}:
            assert got[key] == pytest.approx(want[key], rel=1e-9), (got["step"], got["name"], key)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_lightning_fit_logs_what_a_hand_run_tracker_measures(tmp_path, device):
    # With validation every 2 batches; on CUDA the background tracker measures on a stream of its
    # own, the hand run's in the loop's stream.
    pytest.importorskip("lightning.pytorch")
    from fastrank.integrations.lightning import RankCallback

    net = _net()
    expected = _hand_run(copy.deepcopy(net), epochs=3, every=4, device=device)
    callback = RankCallback(embeddings=("net.1",), every=4, background=True)
    logger = _lightning_fit(tmp_path, net, callback, epochs=3, validate=True,
                            accelerator="gpu" if device == "cuda" else "cpu")
    assert sum("val_loss" in metrics for _, metrics in logger.logged) == 3 * 2  # validation ran: 2 an epoch
    history = callback.tracker.history
    # 15 batches, measured at batches 0, 4, 8, 12: one embedding and four weights each
    assert len({row["step"] for row in history}) == 4
    _assert_same_history(history, expected, prefix="net.")
    rank_logs = [(step, m) for step, m in logger.logged if any(k.startswith("rank/") for k in m)]
    # logged at trainer.global_step when measured: the optimizer steps taken, batch + 1
    assert [step for step, _ in rank_logs] == [1, 5, 9, 13]
    last = rank_logs[-1][1]
    want_last = {row["name"]: row for row in expected if row["step"] == 12}
    assert last["rank/net.1/effective_rank"] == pytest.approx(want_last["1"]["effective_rank"], rel=1e-9)
    assert last["rank/net.2.weight/stable_rank"] == pytest.approx(want_last["2.weight"]["stable_rank"], rel=1e-9)
    assert all(math.isfinite(v) for v in last.values())


def test_a_lightning_callback_reused_for_a_second_fit_tracks_it(tmp_path):
    # The first fit's teardown removed its tracker's hooks; the second fit (a new model, as a
    # search trial's) gets a tracker of its own instead of the removed one, which measured no
    # embedding (weights only).
    pytest.importorskip("lightning.pytorch")
    from fastrank.integrations.lightning import RankCallback

    callback = RankCallback(embeddings=("net.1",), every=4, background=False)
    histories = []
    for trial, seed in enumerate((0, 1)):
        net = _net()
        if seed:
            with torch.no_grad():
                for parameter in net.parameters():
                    parameter.mul_(1.5)
        expected = _hand_run(copy.deepcopy(net), epochs=1, every=4)
        _lightning_fit(tmp_path / f"trial{trial}", net, callback, epochs=1)
        _assert_same_history(callback.tracker.history, expected, prefix="net.")
        assert "net.1" in {row["name"] for row in callback.tracker.history}, trial
        histories.append(callback.tracker.history)
    assert histories[0] != histories[1]


@pytest.mark.parametrize("checkpoint", [None, "non-reentrant", "reentrant"], ids=["plain", "non-reentrant", "reentrant"])
def test_lightning_measures_training_batches_only(tmp_path, checkpoint):
    # The sanity check, the validation runs (every 2 batches, in batches of 5) and the recompute of
    # the checkpointed region in backward must leave the measurement of the hand run unchanged.
    pytest.importorskip("lightning.pytorch")
    from fastrank.integrations.lightning import RankCallback

    net = _net()
    expected = _hand_run(copy.deepcopy(net), epochs=2, every=3, embeddings=("1", "2"))
    callback = RankCallback(embeddings=("net.1", "net.2"), every=3, background=False)
    logger = _lightning_fit(tmp_path, net, callback, epochs=2, checkpoint=checkpoint, validate=True)
    assert sum("val_loss" in metrics for _, metrics in logger.logged) == 4  # validation ran: 2 a epoch
    history = callback.tracker.history
    embeddings = [row for row in history if row["name"] in ("net.1", "net.2")]
    assert [row["step"] for row in embeddings] == [1, 1, 4, 4, 7, 7, 10, 10]  # global steps
    assert all(row["samples"] == 8 for row in embeddings), [row["samples"] for row in embeddings]
    _assert_same_history(history, expected, prefix="net.")


# ---- callback arguments ----------------------------------------------------------------------

_FRAMEWORKS = ["lightning", "transformers"]


def _callback_class(framework):
    pytest.importorskip("lightning.pytorch" if framework == "lightning" else "transformers")
    return __import__(f"fastrank.integrations.{framework}", fromlist=["RankCallback"]).RankCallback


@pytest.mark.parametrize("framework", _FRAMEWORKS)
@pytest.mark.parametrize("options,error,message", [
    (dict(method="foo"), ValueError, "RankCallback: method must be one of ('auto', 'exact', 'randomized', 'slq'), got 'foo'"),
    (dict(sketch_size=0), ValueError, "RankCallback: sketch_size must be a positive int, got 0"),
    (dict(token_dim=5), ValueError, "RankCallback: token_dim must be 0 (outputs (T, B, d)) or 1 (outputs (B, T, d)), got 5"),
    (dict(every=0), ValueError, "RankCallback: every must be a positive int, got 0"),
    (dict(embeddings=[1]), ValueError, "RankCallback: embeddings must be a module name or an iterable of module names (str), got (1,)"),
    (dict(sketch_thresold=8), TypeError, "RankCallback: RankTracker has no argument 'sketch_thresold'; its arguments are"),
    (dict(forwards="all"), ValueError, "RankCallback: forwards='all' given; the callback measures training forwards only"),
    (dict(prefix=""), ValueError, "RankCallback: prefix must be a non-empty str, got ''"),
    (dict(host_threads=0), ValueError, "RankCallback: host_threads must be a positive int or None, got 0"),
], ids=["method", "sketch_size", "token_dim", "every", "embeddings", "unknown", "forwards", "prefix", "host_threads"])
def test_callback_arguments_are_checked_at_construction(framework, options, error, message):
    with pytest.raises(error) as raised:
        _callback_class(framework)(**options)
    assert str(raised.value).startswith(message), str(raised.value)


# ---- Hugging Face ----------------------------------------------------------------------------


def _gpt2_train(tmp_path, callback_options, evaluate=False, checkpointing=None, compile_backend=None, **config):
    """``Trainer.train`` of a tiny GPT-2 (3 steps of 4 sequences of 16 tokens) with a RankCallback
    attached; returns (trainer, callback, model). ``evaluate``: 6 held-out sequences in batches of 3,
    evaluated after every step. ``checkpointing``: gradient checkpointing of the blocks,
    "reentrant" or "non-reentrant". ``compile_backend``: the Trainer compiles the model
    (``torch_compile=True``) with this torch.compile backend."""
    transformers = pytest.importorskip("transformers")
    from fastrank.integrations.transformers import RankCallback

    config = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=2, **config)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    if checkpointing is not None:
        options = {"use_reentrant": checkpointing == "reentrant"}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(options)
        else:  # transformers before 5.25
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (18, 16), generator=gen)
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    evaluation = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=3) if evaluate else {}
    compiling = dict(torch_compile=True, torch_compile_backend=compile_backend) if compile_backend else {}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **evaluation, **compiling,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset[:12],
                                   eval_dataset=dataset[12:] if evaluate else None)
    callback = RankCallback(**callback_options).attach(trainer)
    trainer.train()
    return trainer, callback, model


def test_transformers_trainer_logs_rank_of_a_tiny_gpt2(tmp_path):
    options = dict(embeddings=("transformer.h.1",), every=1, background=False)
    trainer, callback, model = _gpt2_train(tmp_path, options)
    history = callback.tracker.history
    assert sorted({row["step"] for row in history}) == [1, 2, 3]  # global_step, as logged
    names = {row["name"] for row in history}
    # GPT-2's Conv1D weights (stored (in, out)) are measured, as (out, in)
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1" in names
    attn = [row for row in history if row["name"] == "transformer.h.0.attn.c_attn.weight"][-1]
    weight = model.transformer.h[0].attn.c_attn.weight.detach().double()  # (32, 96) = (in, out)
    assert attn["effective_rank"] == pytest.approx(float(fastrank.effective_rank(weight.T)), rel=1e-9)
    logged = [entry for entry in trainer.state.log_history if "rank/transformer.h.1/effective_rank" in entry]
    assert [entry["rank/step"] for entry in logged] == [1.0, 2.0, 3.0]  # global_step after each step


def test_transformers_trainer_with_the_host_solver_logs_what_the_default_does(tmp_path, monkeypatch):
    # RankCallback(host_threads=2, background=True): the spectra on two host threads, on the
    # tracker's worker; the same history as the default solver inline.
    from eigensolver_cases import record_host_solves

    calls = record_host_solves(monkeypatch)
    options = dict(embeddings=("transformer.h.1",), every=1)
    _, default, _ = _gpt2_train(tmp_path / "default", dict(options, background=False))
    assert calls == []
    _, hosted, _ = _gpt2_train(tmp_path / "host", dict(options, background=True, host_threads=2))
    assert calls and {call.threads for call in calls} == {2}  # the blocks' same-shape weights: batched eigenvalue problems
    assert hosted.tracker.host_threads == 2
    _assert_same_history(hosted.tracker.history, default.tracker.history, prefix="", offset=0)


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"], ids=["plain", "non-reentrant", "reentrant"])
def test_transformers_trainer_measures_training_steps_only(tmp_path, checkpointing):
    # Evaluation after every step and the recompute of checkpointed blocks in backward (the MLP's
    # hook runs inside it) must leave the measurement of the plain run unchanged. No dropout, so
    # that the runs train alike.
    options = dict(embeddings=("transformer.h.1", "transformer.h.1.mlp"), every=1, background=False)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    _, plain, _ = _gpt2_train(tmp_path / "plain", options, **no_dropout)
    trainer, callback, model = _gpt2_train(tmp_path / "run", options, evaluate=True, checkpointing=checkpointing,
                                           **no_dropout)
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 3  # evaluated after each step
    assert model.transformer.h[1].gradient_checkpointing == (checkpointing is not None)
    history = callback.tracker.history
    embeddings = [row for row in history if row["name"] in options["embeddings"]]
    assert [row["step"] for row in embeddings] == [1, 1, 2, 2, 3, 3]  # global steps
    assert all(row["samples"] == 4 * 16 for row in embeddings), [row["samples"] for row in embeddings]
    _assert_same_history(history, plain.tracker.history, prefix="", offset=0)


def test_a_transformers_callback_reused_for_a_second_train_tracks_it(tmp_path):
    # Hyperparameter-search trials reuse the Trainer's callbacks: the second train() gets a tracker
    # of its own (the first one's hooks came off at its on_train_end).
    options = dict(embeddings=("transformer.h.1",), every=1, background=False)
    trainer, reused, _ = _gpt2_train(tmp_path / "first", options)
    first = reused.tracker
    trainer.train()  # the same callback, a second run
    assert reused.tracker is not first
    embeddings = [row for row in reused.tracker.history if row["name"] == "transformer.h.1"]
    assert [row["samples"] for row in embeddings] == [4 * 16] * 3


def test_transformers_trainer_with_torch_compile_measures_what_eager_does(tmp_path):
    # Trainer(torch_compile=True) with evaluation after every step: the blocks' hooks run in the
    # compiled graphs (fastrank::track_output), training forwards only, as in the eager run.
    torch._dynamo.reset()
    options = dict(embeddings=("transformer.h.1", "transformer.h.1.mlp"), every=1, background=False)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    _, eager, _ = _gpt2_train(tmp_path / "eager", options, **no_dropout)
    trainer, compiled, model = _gpt2_train(tmp_path / "compiled", options, evaluate=True, compile_backend="aot_eager",
                                           **no_dropout)
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 3
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # the compiled model ran
    history, expected = compiled.tracker.history, eager.tracker.history
    assert [(row["step"], row["name"]) for row in history] == [(row["step"], row["name"]) for row in expected]
    embeddings = [row for row in history if row["name"] in options["embeddings"]]
    assert [row["samples"] for row in embeddings] == [4 * 16] * 6
    for got, want in zip(history, expected):
        for key in got.keys() - {"step", "name"}:  # the compiled graphs' fp32 rounding
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], got["name"], key)


# ---- plots ------------------------------------------------------------------------------------


def _tracked_history(modules):
    rows = []
    for step in range(0, 50, 10):
        for j in range(modules):
            rows.append({"step": step, "name": f"layer{j}.weight", "effective_rank": 5.0 + j + step / 10})
    return rows


@pytest.mark.parametrize("modules", [3, 60], ids=["lines", "heat-map"])
def test_plot_history_writes_a_png(tmp_path, modules):
    pytest.importorskip("matplotlib")
    from fastrank.plot import plot_history

    path = tmp_path / "ranks.png"
    plot_history(_tracked_history(modules), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_tracker_plot_and_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    net = _net()
    tracker = RankTracker(net, embeddings=("1",), every=1)
    for x, _ in _batches():
        net(x)
        tracker.step()
    tracker.plot(tmp_path / "tracker.png", metric="stable_rank")
    assert (tmp_path / "tracker.png").stat().st_size > 5000
    tracker.to_csv(tmp_path / "ranks.csv")
    tracker.to_json(tmp_path / "ranks.json")
    for source in ("ranks.csv", "ranks.json"):
        out = tmp_path / f"{source}.png"
        assert fastrank.bench.cli.main(["plot", str(tmp_path / source), "-o", str(out)]) == 0
        assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_names_a_missing_metric(tmp_path, capsys):
    path = tmp_path / "h.json"
    path.write_text('[{"step": 0, "name": "a", "effective_rank": 2.0}]')
    assert fastrank.bench.cli.main(["plot", str(path), "-o", str(tmp_path / "x.png"), "--metric", "nc1"]) == 2
    assert "no row has a value for metric 'nc1'; the rows have ['effective_rank']" in capsys.readouterr().err


# ---- without the frameworks ------------------------------------------------------------------

_BLOCKED = """
import sys
for name in ("lightning", "pytorch_lightning", "transformers"):
    sys.modules[name] = None  # makes "import name" raise ImportError
import fastrank, fastrank.integrations, fastrank.tracking
assert not any(m in sys.modules and sys.modules[m] is not None for m in ("lightning", "transformers"))
for module, extra in (("lightning", "lightning"), ("transformers", "transformers")):
    try:
        __import__(f"fastrank.integrations.{module}")
    except ImportError as error:
        assert f'pip install "fastrank[{extra}]"' in str(error), error
    else:
        raise AssertionError(f"fastrank.integrations.{module} imported without its framework")
print("ok")
"""


def test_fastrank_imports_without_the_frameworks():
    result = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ---- plots of what the frameworks wrote ---------------------------------------------------------


def test_load_history_reads_lightning_metrics_csv_and_hf_trainer_state(tmp_path):
    from fastrank.plot import load_history

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,rank/net.1/effective_rank,rank/net.1/samples,rank/net.2.weight/effective_rank,step,train_loss\n"
        "0,3.5,32.0,2.5,1,\n"
        "0,,,,1,0.7\n"
        "0,3.25,32.0,2.0,5,\n"
    )
    rows = load_history(csv_path)
    assert rows == [
        {"step": 1.0, "name": "net.1", "effective_rank": 3.5, "samples": 32.0},
        {"step": 1.0, "name": "net.2.weight", "effective_rank": 2.5},
        {"step": 5.0, "name": "net.1", "effective_rank": 3.25, "samples": 32.0},
        {"step": 5.0, "name": "net.2.weight", "effective_rank": 2.0},
    ]
    state = {"log_history": [
        {"loss": 2.0, "step": 1},
        {"rank/h.1/effective_rank": 4.0, "rank/step": 1.0, "step": 2},  # measured at 1, logged at 2
        {"eval_loss": 1.5, "step": 2},
    ]}
    json_path = tmp_path / "trainer_state.json"
    json_path.write_text(json.dumps(state))
    assert load_history(json_path) == [{"step": 1.0, "name": "h.1", "effective_rank": 4.0}]


def test_plot_reads_a_real_trainer_state(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastrank.integrations.transformers import RankCallback
    from fastrank.plot import load_history

    config = transformers.GPT2Config(vocab_size=37, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 37, (8, 8), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": t, "labels": t} for t in tokens])
    callback = RankCallback(embeddings="transformer.h.0", every=1, background=False).attach(trainer)
    trainer.train()
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    rows = load_history(tmp_path / "trainer_state.json")
    tracked = callback.tracker.history
    assert {row["name"] for row in rows} == {row["name"] for row in tracked}
    ours = {(row["name"], row["step"]): row["effective_rank"] for row in rows}
    theirs = sorted(row["effective_rank"] for row in tracked if row["name"] == "transformer.h.0")
    assert sorted(v for (name, _), v in ours.items() if name == "transformer.h.0") == pytest.approx(theirs, rel=1e-12)
    pytest.importorskip("matplotlib")
    assert fastrank.bench.cli.main(["plot", str(tmp_path / "trainer_state.json"), "-o", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_transformers_console_shows_a_summary_while_the_log_keeps_every_key(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from fastrank.integrations.transformers import RankCallback

    config = transformers.GPT2Config(vocab_size=37, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 37, (8, 8), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(  # disable_tqdm: the PrinterCallback prints every log
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": t, "labels": t} for t in tokens])
    RankCallback(embeddings="transformer.h.1", every=1, background=False).attach(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rank/step" in entry]
    assert [entry["rank/step"] for entry in logged] == [1.0, 2.0] == [entry["step"] for entry in logged]
    assert len(logged[0]) > 30  # every metric of every layer (4 embedding, 3 x 9 weight) reaches the log
    printed = [line for line in capsys.readouterr().out.splitlines() if "rank/step" in line]
    assert len(printed) == 2, printed
    assert "rank/transformer.h.1/effective_rank" in printed[0] and "rank/weights/mean_effective_rank" in printed[0]
    assert "stable_rank" not in printed[0] and printed[0].count("rank/") <= 5, printed[0]
