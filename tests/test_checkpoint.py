import argparse
import copy
import json
import math
import os
import pickletools
import re
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastrank
from fastrank.checkpoint import CheckpointError, load_weights, rank_report
from fastrank.bench.cli import main


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(),
        fastrank.OverparamLinear(8, 6, depth=3), nn.Linear(6, 6), nn.Linear(6, 6),
    )


def _reference(matrix):
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    entropy = float(-(p * p.log()).sum())
    return {"effective_rank": math.exp(entropy), "spectral_entropy": entropy,
            "stable_rank": float((s.square().sum() / s[0].square()))}


def test_report_matches_svd_reference(tmp_path):
    model = _model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "step": 3}, path)
    weights = load_weights(path)
    names = [name for name, _ in weights]
    # The factor chain is reported as its collapsed weight, conv kernels flattened.
    assert names == ["model.0.weight", "model.3.weight", "model.4.weight", "model.5.weight"]
    shapes = dict((name, tuple(m.shape)) for name, m in weights)
    assert shapes["model.0.weight"] == (8, 27) and shapes["model.3.weight"] == (6, 8)
    with torch.no_grad():
        expected_collapsed = model[3].weight.double()
    assert torch.allclose(dict(weights)["model.3.weight"], expected_collapsed, rtol=1e-6, atol=1e-7)
    for row in rank_report(weights, method="exact"):
        ref = _reference(dict(weights)[row["name"]])
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=1e-6), (row["name"], key)


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "state.pt"
    torch.save(_model().state_dict(), path)
    out_json = tmp_path / "rows.json"
    assert main(["rank", str(path), "--json", str(out_json), "--method", "exact"]) == 0
    printed = capsys.readouterr().out
    assert "effective rank" in printed and "3.weight" in printed
    rows = json.loads(out_json.read_text())
    assert {row["name"] for row in rows} == {"0.weight", "3.weight", "4.weight", "5.weight"}
    assert all(row["effective_rank"] > 1 for row in rows)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_is_refused_not_executed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.randn(3, 3), "payload": _Exploit()}, path)
    assert not (tmp_path / "pwned.txt").exists()
    with pytest.raises(CheckpointError, match="loaded safely"):
        load_weights(path)
    assert main(["rank", str(path)]) == 2
    err = capsys.readouterr().err
    assert "loaded safely" in err and "may run code from the file: posix.system." in err
    assert len(err.strip().splitlines()) == 1 and "\x1b" not in err
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize(
    "content,match",
    [(None, "no such file"), (b"not a checkpoint at all", "not a PyTorch checkpoint"),
     ({"step": 3, "bias": torch.zeros(4)}, "no 2-D or 4-D weight")],
    ids=["missing", "garbage", "no-weights"],
)
def test_clear_errors(tmp_path, capsys, content, match):
    path = tmp_path / "file.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    assert main(["rank", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


# ---- checkpoints as training scripts write them ---------------------------------------------------


def _expected_weights(state_dict, prefix):
    return {f"{prefix}{name}": t.reshape(t.shape[0], -1) for name, t in state_dict.items()
            if name.endswith("weight") and t.dim() in (2, 4)}


def _assert_weights(weights, expected):
    assert [name for name, _ in weights] == list(expected)
    for name, matrix in weights:
        assert torch.equal(matrix, expected[name]), name


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_torchvision_and_timm_train_checkpoints_load(tmp_path, capsys, legacy):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(lr=0.1, model="resnet18", epochs=90, amp=True)
    torchvision_style = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "lr_scheduler": {"last_epoch": 3}, "epoch": 3, "args": args}
    timm_style = {"epoch": 7, "arch": "resnet18", "state_dict": model.state_dict(),
                  "optimizer": opt.state_dict(), "args": args, "version": 2,
                  "metric": np.float64(71.3), "best_epoch": np.int64(6), "dtype": np.dtype("float32")}
    for name, checkpoint, prefix in [("tv.pth", torchvision_style, "model."),
                                     ("timm.pth.tar", timm_style, "state_dict.")]:
        path = tmp_path / name
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
        _assert_weights(load_weights(path), _expected_weights(model.state_dict(), prefix))
        assert main(["rank", str(path), "--method", "exact"]) == 0
        assert f"{prefix}3.weight" in capsys.readouterr().out


def test_whole_pickled_model_is_refused_naming_the_globals(tmp_path, capsys):
    model = _model()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError) as caught:
        load_weights(path)
    message = str(caught.value)
    assert "torch.nn.modules.container.Sequential" in message
    assert "fastrank.layers.OverparamLinear" in message
    assert message.endswith("(load_weights(path, trusted=True)).")
    assert main(["rank", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "\x1b" not in err
    assert "--trust-checkpoint" in err


def test_trusted_load_of_a_whole_model_warns_and_reports(tmp_path, capsys):
    model = _model()
    path = tmp_path / "model.pt"
    torch.save({"model": model, "epoch": 2}, path)
    with pytest.warns(UserWarning, match="weights_only=False: unpickling runs any code"):
        weights = load_weights(path, trusted=True)
    expected = load_weights(_save_state_dict(tmp_path, {"model": model.state_dict()}))
    assert [n for n, _ in weights] == [n for n, _ in expected]
    for (name, a), (_, b) in zip(weights, expected):
        assert torch.equal(a, b), name
    assert main(["rank", str(path), "--trust-checkpoint", "--method", "exact"]) == 0
    captured = capsys.readouterr()
    assert "model.3.weight" in captured.out
    assert "fastrank rank: warning: loading" in captured.err


def _save_state_dict(tmp_path, obj):
    path = tmp_path / "state.pt"
    torch.save(obj, path)
    return path


def test_safetensors_file(tmp_path, capsys):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, str(path))
    expected = load_weights(_save_state_dict(tmp_path, state))
    _assert_weights(load_weights(path), dict(expected))
    # Recognized by content too, whatever the file is called.
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(path.read_bytes())
    _assert_weights(load_weights(renamed), dict(expected))
    assert main(["rank", str(path), "--method", "exact"]) == 0
    assert "3.weight" in capsys.readouterr().out


def test_safetensors_without_the_package(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"needs the safetensors package \(pip install 'fastrank\[safetensors\]'\)"):
        load_weights(path)


# ---- over-parameterized layers with skips and batch norms ---------------------------------------


def _trained_norms(layer, steps=3):
    """Running statistics and affine parameters away from their initial values."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for norm in layer.norms:
            norm.weight.copy_(torch.rand(norm.num_features, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(norm.num_features, generator=gen))
    layer.train()
    with torch.no_grad():
        for _ in range(steps):
            layer(torch.randn(16, layer.in_features, generator=gen) * 3 + 1)
    return layer.eval()


@pytest.mark.parametrize(
    "config",
    [dict(residual=True, depth=4), dict(residual=True, depth=3), dict(batch_norm=True, depth=3),
     dict(residual=True, batch_norm=True, depth=4), dict(depth=3, width=61 / 7)],
    ids=["residual", "residual-odd-depth", "batch-norm", "residual-batch-norm", "plain-width-61/7"],
)
def test_layer_is_reported_as_its_collapsed_parameters(tmp_path, config):
    torch.manual_seed(0)
    features = 7 if "width" in config else 12
    layer = fastrank.OverparamLinear(features, features, **config)
    if layer.batch_norm:
        _trained_norms(layer)
    model = nn.Sequential(nn.Linear(features, features), layer)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict()}, path)
    weights = dict(load_weights(path))
    assert list(weights) == ["model.0.weight", "model.1.weight"]
    with torch.no_grad():  # the layer's own collapse, in float64
        expected = copy.deepcopy(layer).double().collapsed_parameters()[0]
    torch.testing.assert_close(weights["model.1.weight"], expected, rtol=1e-13, atol=0)
    product = fastrank.collapsed_weight([f.detach().double() for f in layer.factors])
    if layer.residual or layer.batch_norm:  # what the factors alone give is another matrix
        assert (product - expected).abs().max() > 0.1
    row = {r["name"]: r for r in rank_report(list(weights.items()), method="exact")}["model.1.weight"]
    assert row["effective_rank"] == pytest.approx(_reference(expected)["effective_rank"], rel=1e-10)


@pytest.mark.parametrize(
    "make",
    [lambda: fastrank.OverparamConv2d(4, 6, kernel_sizes=[3, (1, 3), 1], groups=2, width=4 / 3),
     lambda: fastrank.layers.OverparamConv1d(4, 6, kernel_sizes=[3, 1, 2], groups=2, width=4 / 3),
     lambda: fastrank.layers.OverparamConv1D(6, 4, depth=3)],
    ids=["conv2d", "conv1d", "gpt2-conv1D"],
)
def test_conv_layer_is_reported_as_its_collapsed_kernel(tmp_path, make):
    torch.manual_seed(0)
    layer = make()
    path = _save_state_dict(tmp_path, layer.state_dict())
    weights = dict(load_weights(path))
    with torch.no_grad():
        expected = copy.deepcopy(layer).double().collapsed_parameters()[0]
    assert list(weights) == ["weight"]
    torch.testing.assert_close(weights["weight"], expected.reshape(6, -1), rtol=1e-13, atol=0)


def test_residual_checkpoint_without_residual_interval_reads_as_a_plain_chain(tmp_path):
    # Saved before residual layers wrote the buffer: nothing tells it from a plain chain.
    torch.manual_seed(0)
    layer = fastrank.OverparamLinear(8, 8, depth=4, residual=True)
    state = layer.state_dict()
    del state["residual_interval"]
    weights = dict(load_weights(_save_state_dict(tmp_path, state)))
    expected = fastrank.collapsed_weight([f.detach().double() for f in layer.factors])
    torch.testing.assert_close(weights["weight"], expected, rtol=1e-13, atol=0)


def _bn_state(**changes):
    torch.manual_seed(0)
    state = _trained_norms(fastrank.OverparamLinear(6, 6, depth=2, batch_norm=True)).state_dict()
    return {**{k: v for k, v in state.items() if k not in changes}, **{k: v for k, v in changes.items() if v is not None}}


@pytest.mark.parametrize(
    "state,reason",
    [(lambda: {f"layer.{k}": v for k, v in _bn_state(**{"norms.1.running_var": None}).items()},
      r"layer\.weight is not reported: .*lacks norms\.1\.running_var, which OverparamLinear\(.*batch_norm=True\) saves"),
     (lambda: {"layer.residual_interval": torch.tensor(3), "layer.factors.0": torch.randn(6, 6),
               "layer.factors.1": torch.randn(6, 6), "layer.factors.2": torch.randn(6, 6)},
      r"layer\.weight is not reported: .*residual_interval=3 factors; this version of fastrank builds skips over 2"),
     (lambda: {"layer.factors.0": torch.randn(5, 6), "layer.factors.1": torch.randn(4, 7)},
      r"layer\.weight is not reported: .*size mismatch with OverparamLinear\(in_features=6, out_features=4, .*\): factors\.1 \(4, 7\) where it has \(4, 5\)"),
     (lambda: {"layer.factors.0": torch.randn(5, 6), "layer.factors.1": torch.randn(4, 5, 1, 1)},
      r"layer\.weight is not reported: .*factors of \[2, 4\] dimensions"),
     (lambda: {"layer.factors.0": torch.randn(6, 6), "layer.factors.2": torch.randn(6, 6)},
      r"layer\.weight is not reported: .*lacks factors\.1")],
    ids=["norm-without-running-var", "other-residual-interval", "chain-that-does-not-chain", "mixed-2d-4d", "gap"],
)
def test_layer_that_cannot_be_collapsed_is_left_out_saying_why(tmp_path, capsys, state, reason):
    path = _save_state_dict(tmp_path, {**state(), "head.weight": torch.randn(3, 6)})
    with pytest.warns(UserWarning, match=reason):
        weights = load_weights(path)
    assert [name for name, _ in weights] == ["head.weight"]
    assert main(["rank", str(path), "--method", "exact"]) == 0
    captured = capsys.readouterr()
    assert "head.weight" in captured.out and "layer.weight" not in captured.out
    assert "fastrank rank: warning: layer.weight is not reported" in captured.err


def test_layer_left_out_is_named_when_nothing_else_is_reported(tmp_path, capsys):
    path = _save_state_dict(tmp_path, _bn_state(**{"norms.0.running_mean": None}))
    assert main(["rank", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert "warning: weight is not reported" in err[0] and "lacks norms.0.running_mean" in err[0]
    assert "holds no 2-D or 4-D weight tensors" in err[1]


# ---- damaged files ------------------------------------------------------------------------------


def _legacy_cut_inside_a_global(path):
    """Length of the legacy torch.save file at ``path`` cut in the middle of its first GLOBAL's name."""
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol, system info
            for _ in pickletools.genops(f):
                pass
        for opcode, _, position in pickletools.genops(f):
            if opcode.name == "GLOBAL":
                return position + 3
    raise AssertionError("no GLOBAL opcode in the object's pickle")


@pytest.mark.parametrize("trusted", [False, True], ids=["weights-only", "trusted"])
@pytest.mark.parametrize("cut", ["zip-half", "legacy-half", "legacy-in-a-global"])
def test_truncated_checkpoint_is_called_truncated(tmp_path, capsys, cut, trusted):
    full = tmp_path / "full.pt"
    torch.save(_model().state_dict(), full, _use_new_zipfile_serialization=cut.startswith("zip"))
    data = full.read_bytes()
    length = _legacy_cut_inside_a_global(full) if cut == "legacy-in-a-global" else len(data) // 2
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:length])
    kind = "zip archive" if cut.startswith("zip") else "pickle"
    expected = f"{path} is truncated or damaged ({length} bytes): it starts as a torch.save {kind} but"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trusted load's warning
        with pytest.raises(CheckpointError) as caught:
            load_weights(path, trusted=trusted)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert main(["rank", str(path), *(["--trust-checkpoint"] if trusted else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"fastrank rank: {expected}"), err


def test_zip_that_is_not_a_torch_archive(tmp_path):
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{path} \(\d+ bytes\) is a zip archive that torch.load cannot read: damaged, or not written by torch.save"):
        load_weights(path)


# ---- Hugging Face save_pretrained folders ---------------------------------------------------------


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _hf_weights(model):
    return {name: t.reshape(t.shape[0], -1) for name, t in model.state_dict().items()
            if name.endswith("weight") and t.dim() in (2, 4)}


@pytest.mark.parametrize("shards", [False, True], ids=["single-file", "sharded"])
def test_save_pretrained_folder(tmp_path, capsys, shards):
    pytest.importorskip("safetensors")
    model = _tiny_llama()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder, **({"max_shard_size": "4KB"} if shards else {}))
    files = sorted(p.name for p in folder.iterdir())
    if shards:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files, files
        assert len([f for f in files if f.endswith(".safetensors")]) > 2, files
    else:
        assert "model.safetensors" in files, files
    weights = dict(load_weights(folder))
    expected = _hf_weights(model)
    assert sorted(weights) == sorted(expected)
    for name, matrix in expected.items():
        assert torch.equal(weights[name], matrix), name
    assert main(["rank", str(folder), "--method", "exact"]) == 0
    assert "model.layers.1.mlp.down_proj.weight" in capsys.readouterr().out


@pytest.mark.parametrize("shards", [False, True], ids=["single-file", "sharded"])
def test_pytorch_model_bin_folder(tmp_path, shards):
    model = _tiny_llama()
    state = model.state_dict()
    if shards:
        names = list(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for shard, keys in halves.items():
            torch.save({k: state[k] for k in keys}, tmp_path / shard)
        weight_map = {k: shard for shard, keys in halves.items() for k in keys}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    weights = dict(load_weights(tmp_path))
    expected = _hf_weights(model)
    assert sorted(weights) == sorted(expected)
    for name, matrix in expected.items():
        assert torch.equal(weights[name], matrix), name


def test_folder_without_weights_says_what_was_looked_for(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["rank", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"fastrank rank: {tmp_path} is a folder without model weights: looked for model.safetensors, "
        f"model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json (a Hugging Face "
        f"save_pretrained folder); it holds config.json"
    )


def test_sharded_index_naming_a_missing_shard(tmp_path):
    torch.save({"a.weight": torch.randn(3, 3)}, tmp_path / "part-1.bin")
    weight_map = {"a.weight": "part-1.bin", "b.weight": "part-2.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json names the shard part-2\.bin, which is not in"):
        load_weights(tmp_path)
    (tmp_path / "pytorch_model.bin.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"is not a sharded-checkpoint index: expected JSON with a \"weight_map\""):
        load_weights(tmp_path)


# ---- load_overparameterized: a checkpoint back into its plain architecture ----------------------


class _Plain(nn.Module):
    """One layer of each replaceable kind, convolutions with every geometry a layer can have."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect")
        self.conv2d = nn.Conv2d(6, 6, (3, 2), stride=(1, 2), padding=(1, 0), groups=2, padding_mode="circular", bias=False)
        self.skip = nn.Linear(8, 8)  # residual=True, batch_norm=True in the trained model
        self.head = nn.Linear(8, 7)  # hidden int(7 * 4 / 3) = 9
        self.kept = nn.Linear(7, 3)  # excluded: plain in both


def _inputs():
    gen = torch.Generator().manual_seed(11)
    return {"conv1d": torch.randn(3, 4, 13, generator=gen), "conv2d": torch.randn(2, 6, 5, 9, generator=gen),
            "skip": torch.randn(5, 8, generator=gen), "head": torch.randn(5, 8, generator=gen),
            "kept": torch.randn(5, 7, generator=gen)}


def _trained():
    """``_Plain`` over-parameterized (depth 3, width 4/3), ``skip`` with skips and batch norms,
    every value moved away from its initialization."""
    torch.manual_seed(0)
    model = fastrank.overparameterize(_Plain(), depth=3, width=4 / 3, exclude="kept")
    model.skip = _trained_norms(fastrank.OverparamLinear(8, 8, depth=4, residual=True, batch_norm=True))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen))
    return model.eval()


def _geometry(layer):
    """What the layer is, without ``width`` (a float equal only up to _width_for's rounding)."""
    return type(layer).__name__, re.sub(r"width=[0-9.e+-]+", "", layer.extra_repr())


def _write(state, tmp_path, form):
    """``state`` in the form a user would hand load_overparameterized."""
    from safetensors.torch import save_file

    if form == "state_dict":
        return state
    if form in ("torch.save", "pytorch_model.bin"):
        torch.save(state, tmp_path / f"model.{'pt' if form == 'torch.save' else 'bin'}")
        return tmp_path / f"model.{'pt' if form == 'torch.save' else 'bin'}"
    if form == "safetensors":
        save_file(state, tmp_path / "weights.safetensors")
        return tmp_path / "weights.safetensors"
    folder = tmp_path / ("checkpoint-3" if form == "trainer-checkpoint" else "saved")
    folder.mkdir()
    if form == "sharded-folder":
        names = list(state)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, folder / shard)
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    if form == "trainer-checkpoint":  # what else a Trainer writes into checkpoint-N
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    return folder


@pytest.mark.parametrize(
    "form", ["state_dict", "torch.save", "pytorch_model.bin", "safetensors", "save_pretrained-folder",
             "sharded-folder", "trainer-checkpoint"],
)
def test_load_overparameterized_rebuilds_every_layer_from_every_source(tmp_path, form):
    pytest.importorskip("safetensors")
    trained = _trained()
    source = _write(trained.state_dict(), tmp_path, form)
    fresh = _Plain().eval()
    geometry = {name: (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
                for name, layer in fresh.named_children() if isinstance(layer, nn.Conv1d | nn.Conv2d)}
    loaded = fastrank.load_overparameterized(fresh, source)
    assert loaded is fresh
    for name, layer in trained.named_children():
        assert _geometry(getattr(loaded, name)) == _geometry(layer), name
    for name, (stride, padding, dilation, groups, mode) in geometry.items():  # the plain layer's, kept
        layer = getattr(loaded, name)
        assert (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode) == (stride, padding, dilation, groups, mode)
    assert loaded.head.hidden_features == 9 and loaded.skip.residual and loaded.skip.batch_norm
    assert isinstance(loaded.kept, nn.Linear) and not loaded.training
    ours, theirs = loaded.state_dict(), trained.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        for name, x in _inputs().items():
            assert torch.equal(getattr(loaded, name)(x), getattr(trained, name)(x)), name


def test_load_overparameterized_keeps_the_layers_dtype_device_and_mode():
    trained = _trained()
    fresh = _Plain().double()
    fresh.conv1d.eval()
    loaded = fastrank.load_overparameterized(fresh, trained.state_dict())
    for name, layer in loaded.named_children():
        assert all(p.dtype == torch.float64 and p.device == torch.device("cpu") for p in layer.parameters()), name
    assert [layer.training for layer in loaded.children()] == [False, True, True, True, True]
    ours = loaded.state_dict()
    for key, value in trained.state_dict().items():
        assert torch.equal(ours[key], value.double() if value.is_floating_point() else value), key
    x = _inputs()["head"].double()
    with torch.no_grad():  # the fp64 layer against the fp64 product of the saved factors
        expected = x @ fastrank.collapsed_weight([f.double() for f in trained.head.factors]).T + trained.head.bias.double()
        torch.testing.assert_close(loaded.head.eval()(x), expected, rtol=1e-12, atol=1e-12)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight


def test_load_overparameterized_takes_a_tied_parameter_saved_once(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="head"):  # the tied head stays plain
        trained = fastrank.overparameterize(_Tied(), depth=2)
    safetensors_torch.save_model(trained, str(tmp_path / "model.safetensors"))  # stores the tie once
    saved = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert len({"embed.weight", "head.weight"} & set(saved)) == 1
    loaded = fastrank.load_overparameterized(_Tied(), tmp_path)
    assert loaded.head.weight is loaded.embed.weight and torch.equal(loaded.embed.weight, trained.embed.weight)
    assert torch.equal(loaded.body.factors[1], trained.body.factors[1])
    untied = {k: v for k, v in saved.items() if k not in ("embed.weight", "head.weight")}
    with pytest.raises(CheckpointError, match=r"does not match the model: missing embed\.weight, head\.weight$"):
        fastrank.load_overparameterized(_Tied(), untied)


def _linear_state(**changes):
    torch.manual_seed(0)
    state = fastrank.overparameterize(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), depth=3).state_dict()
    return {**{k: v for k, v in state.items() if k not in changes}, **{k: v for k, v in changes.items() if v is not None}}


def _plain_sequential():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


_LAYER = r"load_overparameterized: the checkpoint's entries of layer '2' \(Linear; (2\.(factors\.\d|bias|residual_interval)(, )?)+\) do not fit the layer they imply: "


@pytest.mark.parametrize(
    "model,state,match",
    [(lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU()), lambda: {"1.factors.0": torch.randn(2, 2)},
      r"factors of an over-parameterized layer '1', but the model has a ReLU there; expected nn\.Linear, nn\.Conv1d, nn\.Conv2d or transformers' Conv1D"),
     (lambda: nn.Sequential(nn.Linear(4, 5)), lambda: {"0.block.factors.0": torch.randn(2, 2)},
      r"factors of an over-parameterized layer '0\.block', but the model has no module there"),
     (_plain_sequential, lambda: {**_linear_state(), "2.factors.0": torch.randn(5, 5, 1, 1)},
      _LAYER + r"factors of \[2, 4\] dimensions"),
     (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Conv2d(5, 3, 1)), _linear_state,
      r"layer '2' \(Conv2d; .*: its factors are 2-D \(an OverparamLinear's\); a Conv2d becomes OverparamConv2d, whose factors are 4-D"),
     (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4)), _linear_state,
      _LAYER + r"size mismatch with OverparamLinear\(in_features=5, out_features=4, depth=3, width=0\.75, bias=True, residual=False, batch_norm=False\): bias \(3,\) where it has \(4,\); factors\.2 \(3, 3\) where it has \(4, 3\)$"),
     (_plain_sequential, lambda: _linear_state(**{"2.bias": None}),
      _LAYER + r"it lacks bias, which OverparamLinear\(in_features=5, out_features=3, depth=3, width=1\.0, bias=True, residual=False, batch_norm=False\) saves"),
     (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3, bias=False)), _linear_state,
      _LAYER + r"it has bias, which OverparamLinear\(.*bias=False.*\) does not save"),
     (_plain_sequential, lambda: _linear_state(**{"2.residual_interval": torch.tensor(2)}),
      _LAYER + r"residual=True: the skip into node 2 needs equal widths, got 5 -> 3"),
     (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2)), _linear_state,
      r"load_overparameterized: the checkpoint does not match the model: missing 3\.weight, 3\.bias$"),
     (_plain_sequential, lambda: _linear_state(**{"extra.weight": torch.randn(2, 2)}),
      r"load_overparameterized: the checkpoint does not match the model: unexpected extra\.weight$"),
     (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2)),
      lambda: _linear_state(**{"3.weight": torch.randn(2, 4), "3.bias": torch.randn(2)}),
      r"load_overparameterized: the checkpoint does not match the model: .*size mismatch for 3\.weight: copying a param with shape torch\.Size\(\[2, 4\]\)")],
    ids=["not-a-linear-map", "no-module", "mixed-dims", "conv-from-linear-factors", "other-sizes", "missing-bias",
         "extra-bias", "residual-across-widths", "missing-key", "unexpected-key", "other-layer-shape"],
)
def test_load_overparameterized_names_what_does_not_match(model, state, match):
    with pytest.raises(CheckpointError, match=match):
        fastrank.load_overparameterized(model(), state())


def test_load_overparameterized_not_strict_loads_what_matches():
    fresh = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2))
    init = fresh[3].weight.detach().clone()
    state = _linear_state(**{"2.bias": None, "extra.weight": torch.randn(2, 2)})
    loaded = fastrank.load_overparameterized(fresh, state, strict=False)
    assert isinstance(loaded[2], fastrank.OverparamLinear) and loaded[2].depth == 3
    assert torch.equal(loaded[2].factors[0], state["2.factors.0"]) and torch.equal(loaded[3].weight, init)
    with pytest.raises(CheckpointError, match=r"size mismatch with OverparamLinear\(.*\): factors\.2 \(3, 3\) where it has \(4, 3\)"):  # shapes must match either way
        fastrank.load_overparameterized(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4)), state, strict=False)


def test_load_overparameterized_single_layer_at_the_top_level():
    torch.manual_seed(3)
    trained = _trained_norms(fastrank.OverparamLinear(6, 6, depth=4, residual=True, batch_norm=True))
    plain = fastrank.load_overparameterized(nn.Linear(6, 6), trained.state_dict()).eval()
    assert isinstance(plain, fastrank.OverparamLinear) and plain.residual and plain.batch_norm
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(plain(x), trained(x))
