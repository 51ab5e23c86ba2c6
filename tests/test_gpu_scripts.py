"""benchmarks/gpu/train_grid.py: its CPU plumbing (the dry run run.sh and CI take) and its goals."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "train_grid.py"


@pytest.fixture(scope="module")
def train_grid():
    spec = importlib.util.spec_from_file_location("train_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_rows_and_the_tracker_cost(train_grid, tmp_path):
    grid_path, tracker_path = tmp_path / "grid.json", tmp_path / "tracker.json"
    assert train_grid.main(["--json", str(grid_path), "--tracker-json", str(tracker_path), "--dry-run"]) == 0
    grid = json.loads(grid_path.read_text())
    assert grid["dry_run"] is True and grid["not_run"] == []
    assert [row["variant"] for row in grid["rows"]] == list(train_grid.VARIANTS)
    for row in grid["rows"]:
        assert "error" not in row, row
        assert row["eager_ms"] > 0 and row["graph_ms"] is None and row["launches"] is None
    assert grid["goals"][0]["eager_ratio"] > 0
    tracker = json.loads(tracker_path.read_text())
    assert tracker["step_s_off"] > 0 and tracker["step_s_tracked"] > 0
    assert tracker["measurements_per_loop"] == tracker["steps"] // tracker["every"]
    assert tracker["parameters"] == tracker["blocks"] * (tracker["width"] ** 2 + tracker["width"])


def test_the_grid_covers_every_shape_once(train_grid):
    shapes = train_grid.grid_order()
    assert len(shapes) == len(set(shapes)) == 2 * 3 * 4 * 3
    assert shapes[0][0] == "bf16"


def _rows(times, graphs, launches, d=256, batch=64, depth=4):
    return [
        {"d": d, "B": batch, "L": depth, "variant": variant, "eager_ms": t, "graph_ms": g, "launches": n}
        for variant, t, g, n in zip(("fastrank", "sequential chain", "collapsed autograd", "nn.Linear"),
                                    times, graphs, launches)
    ]


def test_goals(train_grid):
    # eager 1.05x the better naive path; collapsed cheaper under graphs, fastrank 4x nn.Linear
    # against a bound of 1.1 (1 + 3 * 256 / 64) = 14.3; 7 launches against nn.Linear's 4 + 2.
    met = train_grid.goals(_rows((1.05, 1.0, 2.0, 0.5), (0.4, 0.5, 0.3, 0.1), (7, 9, 8, 4)))
    assert met["eager_ratio"] == pytest.approx(1.05) and met["eager_met"]
    assert met["graph_bound"] == pytest.approx(1.1 * 13) and met["graph_met"]
    assert met["graph_ratio_to_linear"] == pytest.approx(4.0)
    assert met["launches_met"] is False
    missed = train_grid.goals(_rows((1.2, 1.0, 2.0, 0.5), (2.0, 0.5, 0.3, 0.1), (6, 9, 8, 4), batch=8192))
    assert not missed["eager_met"] and not missed["graph_met"] and missed["launches_met"]
    # The graph goal applies only where the collapsed form is the cheaper naive one.
    assert "graph_met" not in train_grid.goals(_rows((1, 1, 2, 1), (1, 0.5, 0.9, 0.1), (1, 1, 1, 1)))
