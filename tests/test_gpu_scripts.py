"""benchmarks/gpu/train_grid.py and tracker_cost.py: their CPU plumbing (the dry runs run.sh and CI
take), the goal arithmetic and the kernel attribution of the grid, the tracker loop's sizing;
profile_step.py's budget and interruption; and benchmarks/host_cost.py's budget (run.sh's
host-cost step)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
ENVIRONMENT = ("device_name", "torch", "triton", "python", "fastrank", "date", "dry_run")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_grid():
    return _load("train_grid")


@pytest.fixture(scope="module")
def tracker_cost():
    return _load("tracker_cost")


@pytest.fixture(scope="module")
def profile_step():
    return _load("profile_step")


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_grid_dry_run_writes_a_row_per_variant(train_grid, tmp_path):
    path = tmp_path / "train-grid.json"
    assert train_grid.main(["--json", str(path), "--dry-run"]) == 0
    grid = json.loads(path.read_text())
    assert grid["dry_run"] is True and grid["complete"] is True and grid["not_run"] == []
    assert grid["modes"] == [train_grid.EAGER]
    assert [(row["variant"], row["mode"]) for row in grid["rows"]] == [(v, train_grid.EAGER) for v in train_grid.VARIANTS]
    (dtype, d, batch, depth), = train_grid.DRY_SHAPES
    for row in grid["rows"]:
        assert "error" not in row, row
        for field in ENVIRONMENT:
            assert field in row, (field, row)
        assert (row["dtype"], row["d"], row["B"], row["L"]) == (dtype, d, batch, depth)
        assert row["dry_run"] is True and row["repeats"] >= train_grid.MIN_REPEATS
        assert _positive(row["wall_ms"]), row
        low, high = row["wall_ms_quartiles"]
        assert 0 < low <= row["wall_ms"] <= high, row
        # No CUDA: no events, no profiler, no graphs.
        assert row["span_us"] is None and row["device_us"] is None and row["launches"] is None, row
    fastrank_row = grid["rows"][0]
    assert set(fastrank_row["goals"]) == {"eager", "launches"}
    (entry,) = grid["goals"]
    assert _positive(entry["warmup_s"]) and entry["warmup_s"] < entry["seconds"] <= grid["seconds"]
    assert _positive(entry["eager"]["value"]) and entry["eager"]["met"] in (True, False)
    assert entry["launches"]["met"] is None and entry["graph"]["met"] is None
    assert sum(grid["goal_counts"]["eager"].values()) == 1
    assert grid["autotunings"] == [] and grid["autotuned"] == {}  # the CPU layers take no kernel


def test_grid_sums_up_what_the_autotuners_chose(train_grid):
    def tuning(kernel, block_m, seconds):
        return {"kernel": kernel, "key": {"M_BUCKET": 16}, "dtype": "torch.bfloat16", "bench_s": seconds,
                "chosen": {"BLOCK_M": block_m, "num_warps": 8}, "timings_ms": [{"BLOCK_M": block_m, "ms": 0.1}]}

    summary = train_grid.autotune_summary([tuning("chain", 16, 1.5), tuning("chain", 64, 0.25),
                                           tuning("chain", 16, None), tuning("grads", 32, 2.0)])
    assert summary == {
        "chain": {"keys": 3, "seconds": 1.75, "chosen": {"BLOCK_M=16 num_warps=8": 2, "BLOCK_M=64 num_warps=8": 1}},
        "grads": {"keys": 1, "seconds": 2.0, "chosen": {"BLOCK_M=32 num_warps=8": 1}},
    }


def test_grid_order_covers_every_shape_once_most_important_first(train_grid):
    shapes = train_grid.grid_order()
    everything = {(dt, d, b, depth) for dt in train_grid.DTYPES for d in train_grid.WIDTHS
                  for b in train_grid.BATCHES for depth in train_grid.DEPTHS}
    assert len(shapes) == len(set(shapes)) == len(everything) == 72 and set(shapes) == everything
    assert [s[3] for s in shapes[:24]] == [4] * 24 and [s[0] for s in shapes[:24]] == ["bf16"] * 12 + ["fp32"] * 12


def test_grid_stops_at_its_budget_and_lists_the_rest(train_grid, tmp_path, monkeypatch):
    path = tmp_path / "train-grid.json"
    shapes = [("fp32", 8, 2, 2), ("fp32", 8, 3, 2), ("fp32", 8, 4, 3)]
    monkeypatch.setattr(train_grid, "DRY_SHAPES", shapes)
    result = train_grid.run_grid(path, "cpu", budget_s=0.0, dry_run=True)
    written = json.loads(path.read_text())
    assert written["complete"] is False and len(written["goals"]) == 1  # the first shape always runs
    assert [(s["d"], s["B"], s["L"]) for s in written["not_run"]] == [(8, 3, 2), (8, 4, 3)]
    assert written["not_run"][0]["why"].startswith("time budget")
    assert result["not_run"] == written["not_run"]


def _fake_profile(profile_step, monkeypatch, interrupt_at=None):
    """profile_step.profile replaced by one returning a row per module (the shapes' order kept in
    ``calls``), raising KeyboardInterrupt (run.sh's SIGINT) at call ``interrupt_at``; CUDA faked."""
    calls = []

    def profile(d, batch, depth):
        calls.append((d, batch, depth))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return [{"shape": f"d={d} B={batch} L={depth}", "module": module, "launches": 12, "median_step_ms": 1.0,
                 "device_us": 20.0, "kernels": [{"name": "k", "count": 12, "us": 20.0}]}
                for module in ("nn.Linear", f"OverparamLinear depth={depth}")]

    monkeypatch.setattr(profile_step, "profile", profile)
    monkeypatch.setattr(profile_step.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(profile_step.torch.cuda, "get_device_name", lambda *a: "fake GPU")
    return calls


def test_profile_stops_at_its_budget_and_lists_the_rest(profile_step, tmp_path, monkeypatch):
    calls = _fake_profile(profile_step, monkeypatch)
    path = tmp_path / "profile.json"
    assert profile_step.main(["--json", str(path), "--budget-s", "0"]) == 0
    written = json.loads(path.read_text())
    shapes = [f"d={d} B={b} L={L}" for d, b, L in profile_step.SHAPES]
    assert calls == profile_step.SHAPES[:1]  # the first shape always runs
    assert [row["shape"] for row in written["rows"]] == shapes[:1] * 2
    assert [entry["shape"] for entry in written["not_run"]] == shapes[1:]
    assert written["not_run"][0]["why"].startswith("time budget")


def test_profile_interrupted_keeps_the_shapes_measured(profile_step, tmp_path, monkeypatch):
    calls = _fake_profile(profile_step, monkeypatch, interrupt_at=3)
    path = tmp_path / "profile.json"
    assert profile_step.main(["--json", str(path)]) == 130
    written = json.loads(path.read_text())
    shapes = [f"d={d} B={b} L={L}" for d, b, L in profile_step.SHAPES]
    assert len(calls) == 3
    assert [row["shape"] for row in written["rows"]] == [shape for shape in shapes[:2] for _ in range(2)]
    assert [entry["shape"] for entry in written["not_run"]] == shapes[2:]
    assert {entry["why"] for entry in written["not_run"]} == {"interrupted at the time limit"}


def _rows(train_grid, wall, span, launches, d=256, batch=8192, depth=4):
    rows = []
    for variant, t, s, n in zip(train_grid.VARIANTS, wall, span, launches):
        rows.append({"d": d, "B": batch, "L": depth, "variant": variant, "mode": train_grid.EAGER,
                     "wall_ms": t, "span_us": None, "launches": n})
        rows.append({"d": d, "B": batch, "L": depth, "variant": variant, "mode": train_grid.GRAPH,
                     "wall_ms": s / 1e3 + 0.01, "span_us": s, "launches": n})
    return rows


def test_goals(train_grid):
    # Variants in order: fastrank, sequential chain, collapsed autograd, nn.Linear. At d=256,
    # B=8192, L=4 the collapsed form is the cheaper one: bound 1.1 (1 + 3 * 256 / 8192) = 1.2031.
    met = train_grid.goals(_rows(train_grid, (1.05, 2.0, 1.0, 0.5), (60, 200, 80, 50), (6, 12, 9, 4)))
    assert met["eager"] == {"value": pytest.approx(1.05), "target": 1.1, "met": True}
    assert met["graph"]["floor"] == pytest.approx(1 + 3 * 256 / 8192)
    assert met["graph"]["target"] == pytest.approx(1.1 * (1 + 3 * 256 / 8192))
    assert met["graph"]["value"] == pytest.approx(60 / 50) and met["graph"]["met"] is True
    assert met["graph"]["timer"] == "span_us"
    assert met["launches"] == {"value": 6, "target": 6, "met": True}
    missed = train_grid.goals(_rows(train_grid, (1.2, 2.0, 1.0, 0.5), (70, 200, 80, 50), (7, 12, 9, 4)))
    assert [missed[name]["met"] for name in ("eager", "graph", "launches")] == [False, False, False]
    # Where the activation chain is the cheaper form (B=1), the graph goal does not apply.
    narrow = train_grid.goals(_rows(train_grid, (1, 1, 2, 1), (10, 10, 20, 5), (1, 1, 1, 1), batch=1))
    assert narrow["graph"]["met"] is None and "activation chain" in narrow["graph"]["reason"]
    # A missing figure is "not measured", never met.
    rows = _rows(train_grid, (1, 1, 2, 1), (10, 10, 20, 5), (None, 1, 1, 1))
    assert train_grid.goals(rows)["launches"]["met"] is None
    counts = train_grid.goal_counts([met, missed, narrow])
    assert counts["graph"] == {"met": 1, "missed": 1, "not checked": 1}


def test_kernels_go_to_the_window_they_start_in(train_grid):
    windows = [(0.0, 100.0), (110.0, 200.0)]
    kernels = [(5.0, 10.0), (99.0, 3.0), (110.0, 2.0), (150.0, 4.0), (105.0, 1.0), (300.0, 1.0)]
    totals, outside = train_grid.attribute_kernels(windows, kernels)
    assert totals == [(2, 13.0), (2, 6.0)] and outside == 2


def test_tracker_dry_run_writes_every_kind_of_loop(tracker_cost, tmp_path):
    path = tmp_path / "tracker-cost.json"
    assert tracker_cost.main(["--json", str(path), "--dry-run", "--host-threads", "2"]) == 0
    cost = json.loads(path.read_text())
    for field in ENVIRONMENT:
        assert field in cost, field
    assert cost["dry_run"] is True and cost["complete"] is True and cost["host_threads"] == 2
    assert (cost["steps"], cost["rounds"]) == tracker_cost.DRY_PLAN
    # each round: untracked and tracked with each solver, the order rotated by the round
    assert [entry["solver"] for entry in cost["loops"]] == [None, "device", "host", "device", "host", None]
    assert [entry["round"] for entry in cost["loops"]] == [0, 0, 0, 1, 1, 1]
    assert [entry["tracked"] for entry in cost["loops"]] == [entry["solver"] is not None for entry in cost["loops"]]
    for entry in cost["loops"]:
        assert _positive(entry["seconds"]) and _positive(entry["step_ms"]), entry
        assert entry["steps"] == cost["every"]
    ranks = []
    for entry in cost["loops"]:
        if entry["tracked"]:
            assert entry["measurements"] == 1  # at the loop's first step
            ranks.append(entry["embedding_effective_rank"])
    assert all(_positive(rank) for rank in ranks)
    untracked = {entry["round"]: entry["step_ms"] for entry in cost["loops"] if not entry["tracked"]}
    assert cost["step_ms_untracked"] == pytest.approx(sum(untracked.values()) / 2)
    assert sorted(cost["solvers"]) == ["device", "host"]
    for solver, result in cost["solvers"].items():
        loops = [entry for entry in cost["loops"] if entry["solver"] == solver]
        by_round = [entry["step_ms"] / untracked[entry["round"]] - 1 for entry in loops]
        assert result["overhead_by_round"] == pytest.approx(by_round)
        assert result["overhead"] == pytest.approx(sum(by_round) / 2)  # the median of two
        assert result["step_ms_tracked"] == pytest.approx(sum(entry["step_ms"] for entry in loops) / 2)
        assert result["met"] == (result["overhead"] <= 0.02)
    assert cost["goal"] == 0.02 and set(cost["warmup"]["measurement_s"]) == {"device", "host"}
    assert _positive(cost["parameters"]) and cost["measured"]["weights"] == 4 * cost["blocks"] + 1


def test_tracker_rounds_rotate_their_order(tracker_cost):
    orders = [tracker_cost.round_order(index) for index in range(4)]
    assert orders == [(None, "device", "host"), ("device", "host", None), ("host", None, "device"),
                      (None, "device", "host")]


def test_tracker_model_has_a_few_hundred_million_parameters(tracker_cost):
    import torch

    with torch.device("meta"):
        model = tracker_cost.Transformer(tracker_cost.FULL)
    assert 2e8 < sum(p.numel() for p in model.parameters()) < 5e8
    assert tracker_cost.FULL.every == 100 and tracker_cost.FULL.dtype == "bfloat16"


def test_tracker_loop_fits_its_budget(tracker_cost):
    # Loops of `every` steps; 43 ms steps and 0.6 s per measurement (an H200): 14.1 s a round of an
    # untracked loop and one tracked loop per solver.
    assert tracker_cost.plan(0.043, 0.6, 100, budget_s=53) == (100, 3)
    assert tracker_cost.plan(0.043, 0.6, 100, budget_s=9) == (100, 1)  # one round, fitting or not
    assert tracker_cost.plan(0.001, 0.1, 100, budget_s=53) == (100, tracker_cost.MAX_ROUNDS)


def test_host_cost_stops_its_rounds_at_its_budget(tmp_path):
    """benchmarks/host_cost.py --budget-s (run.sh's GPU step): two rounds at least, then only as many
    as end within the budget; every row says how many ran and the seconds before and in them. The
    budget is set from a first run's setup time, so that a slow or loaded machine still leaves it
    rounds to stop. On the stubbed driver (gcc builds it)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("gcc") is None:
        pytest.skip("the stubbed CUDA driver is built with gcc")
    script = SCRIPTS.parent / "host_cost.py"
    path = tmp_path / "host-cost.json"

    def run(budget):
        done = subprocess.run([sys.executable, str(script), "--json", str(path), "--rounds", "400", "--calls", "50",
                               "--budget-s", str(budget)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = json.loads(path.read_text())
        assert {row["path"] for row in rows} == {"jit", "fast", "torch"} and all(_positive(row["us"]) for row in rows)
        path.unlink()
        (ran,), (setup_s,), (rounds_s,) = ({row[key] for row in rows} for key in ("rounds", "setup_s", "rounds_s"))
        assert setup_s > 0 and rounds_s > 0
        return ran, setup_s, rounds_s

    ran, setup_s, rounds_s = run(0)
    assert ran == 2
    budget = 1.5 * setup_s + 10 * rounds_s / 2 + 1.0  # about ten rounds past a setup as long again
    ran, setup_s, rounds_s = run(budget)
    assert 2 <= ran < 400
    assert ran > 2 or setup_s + 1.5 * rounds_s > budget  # two only where a third would have ended past it
    assert setup_s + rounds_s <= budget + 2 * rounds_s / ran + 1.0  # no round started that was due to end past it


def _summary_writer(tmp_path):
    """run.sh's summary writer (the script it writes to $scratch/summary.py), as a file."""
    text = (SCRIPTS / "run.sh").read_text()
    start = text.index("cat > \"$scratch/summary.py\" <<'EOF'\n") + len("cat > \"$scratch/summary.py\" <<'EOF'\n")
    path = tmp_path / "summary.py"
    path.write_text(text[start:text.index("\nEOF\n", start)] + "\n")
    return path


@pytest.mark.parametrize("report", ["whole", "truncated"])
def test_run_summary_reads_a_junit_report_cut_off_by_the_kill(tmp_path, report):
    # A step stopped at its limit is killed 12 s after its SIGINT, maybe while pytest writes its
    # JUnit report: the summary (rewritten after every step) records the cut and goes on.
    import subprocess
    import sys

    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    (scratch / "machine.json").write_text(json.dumps({"device_name": "fake GPU", "torch": "2.11.0"}))
    (scratch / "tests.status").write_text("124 true 127\n")
    (scratch / "tests.out").write_text("")
    whole = '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"></testsuite></testsuites>'
    (scratch / "tests.xml").write_text(whole if report == "whole" else whole[:40])
    done = subprocess.run([sys.executable, str(_summary_writer(tmp_path)), str(scratch), str(out), "0", "partial"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    tests = summary["steps"]["tests"]
    assert summary["complete"] is False and summary["device_name"] == "fake GPU"
    assert tests["time_limit_reached"] is True and tests["exit_status"] == 124
    if report == "whole":
        assert (tests["junit"], tests["tests"], tests["failed"], tests["skipped"], tests["passed"]) == (True, 5, 1, 2, 2)
    else:
        assert tests["junit"] == "truncated" and tests["tests"] == 0
    assert summary["steps"]["host-cost"] == {"ran": False}
