"""fastrank paper: Observation 1's trend and Observation 2's ordering on small problems."""

import math

import pytest
import torch

from fastrank.bench import paper


def _by_kind(rows, kind):
    return [row["mean"] for row in sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["depth"])]


def test_observation1_entropy_falls_with_depth():
    rows = paper.init_entropy(depths=(1, 2, 4, 8), features=32, samples=64, seeds=3)
    for kind in paper.KINDS:
        means = _by_kind(rows, kind)
        assert all(a > b for a, b in zip(means, means[1:])), f"{kind}: {means} does not fall with depth"
        assert means[0] <= math.log(32) + 1e-9
    for depth in (2, 4, 8):  # a ReLU between factors loses directions faster than the linear chain
        linear = next(r for r in rows if r["depth"] == depth and r["kind"] == "linear embeddings")
        relu = next(r for r in rows if r["depth"] == depth and r["kind"] == "relu embeddings")
        assert relu["mean"] < linear["mean"], depth
    assert all(row["seeds"] == 3 and row["std"] >= 0 for row in rows)


def test_observation1_matches_the_anchor_library_at_256():
    rows = paper.init_entropy(depths=(1, 4, 16), features=256, samples=8, seeds=5)
    measured = dict(zip((1, 4, 16), _by_kind(rows, "collapsed weight")))
    for depth, value in measured.items():
        # reference values are given to 2 decimals; the seed-to-seed spread is below 0.011
        assert value == pytest.approx(paper.REFERENCE_RHO_256[depth], abs=0.02), (depth, value)


def test_observation2_deeper_is_lower_rank_and_generalizes_better():
    rows = paper.matrix_completion(depths=(1, 2, 3), size=24, rank=2, observed=0.4, steps=400)
    eranks = [row["effective_rank"] for row in rows]
    tests = [row["test_error"] for row in rows]
    assert eranks[0] > eranks[1] > eranks[2], eranks
    assert tests[2] < tests[0], tests
    assert all(row["train_error"] < 0.05 for row in rows[1:]), rows  # the deep chains fit the observed entries
    assert rows[2]["effective_rank"] < 2 * rows[0]["target_effective_rank"], rows


def test_tables_and_plot(tmp_path):
    results = {
        "quick": True,
        "settings": {
            "observation1": {"depths": (1, 2), "features": 16, "samples": 32, "seeds": 2},
            "observation2": {"depths": (1, 2), "size": 12, "rank": 2, "observed": 0.5, "lr": 0.01,
                             "init_scale": 1e-3, "steps": 50, "seeds": (0,)},
        },
        "observation1": paper.init_entropy(depths=(1, 2), features=16, samples=32, seeds=2),
        "observation2": paper.matrix_completion(depths=(1, 2), size=12, rank=2, observed=0.5, steps=50),
        "seconds": {"observation1": 0.1, "observation2": 0.2},
        "environment": paper.environment("cpu"),
    }
    text = paper.format_markdown(results)
    assert "### Observation 1" in text and "### Observation 2" in text
    assert text.count("\n| 1 |") == 2 and text.count("\n| 2 |") == 2
    pytest.importorskip("matplotlib")
    path = tmp_path / "paper.png"
    paper.plot(results, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_observation3_depth_lowers_rank_under_every_optimizer():
    rows = paper.optimizer_sweep(depths=(1, 4), size=24, rank=2, observed=0.4, steps=500, seeds=(0,))
    assert {row["optimizer"] for row in rows} == set(paper.OPTIMIZERS)
    for optimizer in paper.OPTIMIZERS:
        shallow, deep = (next(r for r in rows if r["optimizer"] == optimizer and r["depth"] == d) for d in (1, 4))
        assert deep["effective_rank"] < shallow["effective_rank"] / 2, (optimizer, shallow, deep)
        assert deep["diverged"] == 0


def test_observation4_depth_lowers_rank_for_every_init():
    rows = paper.init_sweep(scales=(1e-3,), depths=(1, 4), size=24, rank=2, observed=0.4, steps=500, seeds=(0,))
    for init in paper.INITS:
        shallow, deep = (next(r for r in rows if r["init"] == init and r["depth"] == d) for d in (1, 4))
        assert deep["effective_rank"] < shallow["effective_rank"] / 2, (init, shallow, deep)


def test_sweep_tables_and_plot(tmp_path):
    small = dict(depths=(1, 2), size=12, rank=2, observed=0.5, steps=30, seeds=(0,))
    results = {
        "quick": True,
        "settings": {
            "observation1": {"depths": (1, 2), "features": 16, "samples": 32, "seeds": 2},
            "observation2": {"depths": (1, 2), "size": 12, "rank": 2, "observed": 0.5, "lr": 0.01,
                             "init_scale": 1e-3, "steps": 30, "seeds": (0,)},
            "observation3": {**small, "init_scale": 1e-3, "learning_rates": paper.LEARNING_RATES},
            "observation4": {**small, "scales": (1e-3,)},
        },
        "observation1": paper.init_entropy(depths=(1, 2), features=16, samples=32, seeds=2),
        "observation2": paper.matrix_completion(depths=(1, 2), size=12, rank=2, observed=0.5, steps=30),
        "observation3": paper.optimizer_sweep(optimizers=("sgd", "adam"), init_scale=1e-3, **small),
        "observation4": paper.init_sweep(inits=("orthogonal",), scales=(1e-3,), **small),
        "seconds": {"observation1": 0.1, "observation2": 0.2, "observation3": 0.3, "observation4": 0.4},
        "environment": paper.environment("cpu"),
    }
    text = paper.format_markdown(results)
    assert "### Observation 3" in text and "| sgd |" in text and "| orthogonal, RMS 0.001 |" in text
    pytest.importorskip("matplotlib")
    path = tmp_path / "paper.png"
    paper.plot(results, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_digits_experiments_run_and_are_sane():
    pytest.importorskip("sklearn")
    x, y = paper.load_digits()
    assert x.shape == (1797, 64) and 0 <= float(x.min()) and float(x.max()) <= 1 and set(y.tolist()) == set(range(10))
    ranks = paper.digits_embedding_rank(hidden_layers=(1, 3), linear_depths=(2,), samples=300, steps=300, seeds=(0,))
    assert [r["sweep"] for r in ranks] == ["ReLU layers"] * 2 + ["linear over-parameterization"]
    assert all(1 <= r["effective_rank"] <= 64 and r["test_accuracy"] > 0.8 for r in ranks), ranks
    claim = paper.digits_overparameterized(depths=(1, 2), samples=(200,), steps=300, seeds=(0,))
    assert all(r["test_accuracy"] > 0.8 for r in claim), claim
    collapse = paper.digits_collapse(weight_decays=(0.0,), hidden_layers=2, samples=300, steps=300, seeds=(0,))
    assert [r["layer"] for r in collapse] == [1, 2, 3]
    assert all(r["input_nc1"] > 0 and 0.5 < r["input_ncc_accuracy"] <= 1 for r in collapse), collapse


def test_reproduce_runs_only_the_parts_asked_for(tmp_path):
    results = paper.reproduce(quick=True, parts=("1",))
    assert "observation1" in results and "observation2" not in results and results["digits"] == {}
    text = paper.format_markdown(results)
    assert "### Observation 1" in text and "### Observation 2" not in text
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['5'\]"):
        paper.reproduce(parts=("5",))
    pytest.importorskip("matplotlib")
    paper.plot(results, str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"


def test_digits_ncc_depth():
    pytest.importorskip("sklearn")
    rows = paper.digits_ncc_depth(depths=(2,), samples=300, steps=300, seeds=(0,))
    assert [r["layer"] for r in rows] == [1, 2]
    assert all(0.5 < r["ncc_accuracy"] <= 1 and r["nc1"] > 0 for r in rows), rows


# ---- the practical claim, tuned per depth ---------------------------------------------------------


_TOY_CLAIM = {"cases": [("digits", "mlp", 60), ("mnist", "cnn", 60)], "depths": (1, 2), "learning_rates": (1e-3, 1e-2),
              "steps": 3, "seeds": (0, 1), "validation": 0.25}


def test_claim_part_runs_from_the_cli_and_writes_its_rows(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("mlxtend")
    import json

    from fastrank.bench.cli import main

    monkeypatch.setattr(paper, "claim_settings", lambda quick: dict(_TOY_CLAIM))  # toy sizes, the same code
    out = tmp_path / "claim.json"
    assert main(["paper", "--part", "claim", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["claim"]
    assert [(r["dataset"], r["architecture"], r["depth"]) for r in rows] == [
        ("digits", "mlp", 1), ("digits", "mlp", 2), ("mnist", "cnn", 1), ("mnist", "cnn", 2)]
    for row in rows:
        assert row["learning_rate"] in _TOY_CLAIM["learning_rates"] and row["seeds"] == 2
        assert 0 <= row["test_accuracy"] <= 1 and row["test_accuracy_ci95"] >= 0
        assert row["test_samples"] == (1797 if row["dataset"] == "digits" else 5000) - 60
        assert len(row["weight_effective_ranks"]) == (3 if row["architecture"] == "mlp" else 4)
        assert row["embedding_effective_rank"] > 0
    depth1 = [r for r in rows if r["depth"] == 1]
    assert all(r["difference"] == 0 and r["difference_ci95"] == 0 for r in depth1)


def test_claim_interval_and_paired_difference():
    mean, half = paper._interval([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    torch.manual_seed(0)
    rows = paper.claim([("digits", "mlp", 80)], depths=(1, 3), learning_rates=(1e-2,), steps=20, seeds=(0, 1, 2))
    plain, deep = rows
    assert deep["difference"] == pytest.approx(deep["test_accuracy"] - plain["test_accuracy"], abs=1e-12)
    # the over-parameterized network is collapsed before testing: same capacity as the plain one
    assert len(deep["weight_effective_ranks"]) == len(plain["weight_effective_ranks"]) == 3


def test_paper_help_names_every_part(capsys):
    from fastrank.bench.cli import main

    with pytest.raises(SystemExit):
        main(["paper", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name, title in paper.PART_TITLES.items():
        assert f"{name}: {title}" in shown, name
