import json
import os
import pickle

import pytest
import torch
import torch.nn as nn

import fastrank
from fastrank.checkpoint import CheckpointError, load_weights, rank_report
from fastrank.cli import main


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
    assert "loaded safely" in capsys.readouterr().err
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
