import argparse
import json
import os
import pickle
import sys

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
    return {"effective_rank": torch.tensor(entropy).exp().item(), "spectral_entropy": entropy,
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
