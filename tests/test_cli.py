"""fastrank command line: parsing, a tiny bench run end to end, result rows, plots, output paths
checked before a run, plot and rank errors."""

import builtins
import json

import pytest
import torch

import fastrank
from fastrank import bench
from fastrank.bench import Case, Prepared
from fastrank.bench.chain import chain_cases
from fastrank.bench.rank import RankSizes, rank_cases
from fastrank.bench.cli import main

TINY_RANK = RankSizes(samples=256, features=16, gram_size=64, gram_rank=8, gram_sketch=16, batch=3,
                      weight_size=12, decay_size=64, decay_sketch=16, repeats=2)
REQUIRED = ("suite", "case", "variant", "baseline", "shape", "dtype", "device", "median_s", "q25_s",
            "q75_s", "ratio", "tflops", "error", "device_name", "torch", "triton", "fastrank", "date")


def _tiny_cases(suite, quick, device):
    cases = []
    if suite in ("chain", "all"):
        cases += chain_cases(features=16, depth=3, batches=(8,), compile_batches=(), repeats=2, device=device)
    if suite in ("rank", "all"):
        cases += rank_cases(sizes=TINY_RANK, device=device)
    return cases


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "suite_cases", _tiny_cases)


def _hide_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.parametrize(
    "argv",
    [["bench", "--suite", "gpu"], ["bench", "--device", "tpu"], ["paper", "--steps", "3"], ["bench", "--threads", "x"]],
    ids=["bad-suite", "bad-device", "unknown-option", "bad-threads"],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: fastrank" in capsys.readouterr().err


def test_bench_cuda_without_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["bench", "--device", "cuda"])


def test_suite_cases_by_name():
    assert {c.suite for c in bench.suite_cases("chain", True, "cpu")} == {"chain"}
    assert {c.suite for c in bench.suite_cases("rank", True, "cpu")} == {"rank"}
    everything = bench.suite_cases("all", True, "cpu")
    assert {c.suite for c in everything} == {"chain", "rank"}
    names = [(c.suite, c.name) for c in everything]
    assert len(names) == len(set(names)), names
    for case in everything:
        assert case.variants[0] == case.baseline, case.name


def test_tiny_bench_end_to_end(tiny, tmp_path, capsys):
    json_path, plot_path = tmp_path / "rows.json", tmp_path / "bench.png"
    pytest.importorskip("matplotlib")
    assert main(["bench", "--suite", "all", "--device", "cpu", "--json", str(json_path), "--plot", str(plot_path)]) == 0
    out, err = capsys.readouterr()
    assert "suite chain" in out and "suite rank" in out and "x base" in out
    # a tqdm bar where the `progress` extra is installed, plain "[i/n]" lines otherwise
    assert "[1/" in err or "bench:" in err, "no progress on stderr"
    rows = json.loads(json_path.read_text())
    assert {row["suite"] for row in rows} == {"chain", "rank"}
    for row in rows:
        missing = [key for key in REQUIRED if key not in row]
        assert not missing, f"{row['case']} / {row['variant']} lacks {missing}"
        assert row["device"] == "cpu" and row["torch"] == torch.__version__
    timed = [row for row in rows if row["median_s"] is not None]
    for row in timed:
        assert row["q25_s"] <= row["median_s"] <= row["q75_s"], row
        if row["variant"] == row["baseline"]:
            assert row["ratio"] == 1.0, row
    skipped = [row for row in rows if row["median_s"] is None]
    assert skipped and all(row["note"] for row in skipped), "torch.compile is listed as skipped, with why"
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_rows_report_accuracy(tiny, tmp_path):
    json_path = tmp_path / "rows.json"
    assert main(["bench", "--suite", "rank", "--device", "cpu", "--json", str(json_path)]) == 0
    rows = {(row["case"], row["variant"]): row for row in json.loads(json_path.read_text())}
    assert rows[("gram", "fastrank exact")]["error"] < 1e-9
    assert rows[("weights", "fastrank batched")]["error"] < 1e-9
    assert rows[("weights", "fastrank batched, host solver")]["error"] < 1e-9
    randomized = rows[("gram", "fastrank randomized")]
    assert randomized["bound_width"] is not None and randomized["bounds_contain_reference"] is True
    # every variant but the floors (eigenvalues, not ranks) is checked against the reference, and
    # every row of every case has its ratio to the case's floor
    assert all(row["error"] is not None for row in rows.values() if not row["variant"].endswith("(floor)"))
    assert all(row["ratio_to_floor"] is not None for row in rows.values()), [
        key for key, row in rows.items() if row["ratio_to_floor"] is None
    ]


def test_chain_rows_report_flops_and_gradient_error():
    rows = bench.run(chain_cases(features=16, depth=3, batches=(8,), compile_batches=(), repeats=2))
    by_variant = {(row["case"], row["variant"]): row for row in rows}
    for mode in ("train", "eval"):
        assert by_variant[(f"{mode} B=8", "nn.Linear")]["error"] is None  # another layer: no reference
        for variant in ("fastrank", "sequential chain", "collapsed autograd"):
            row = by_variant[(f"{mode} B=8", variant)]
            assert row["error"] < 1e-5, row  # fp32 against the fp64 chain
            assert row["tflops"] > 0


def test_failing_variant_is_reported_not_fatal():
    def broken():
        raise RuntimeError("no compiler here")

    case = Case(
        suite="chain", name="toy", shape="n=4", dtype="float32", baseline="base",
        variants=("base", "broken", "absent"),
        setup=lambda: Prepared({"base": lambda: torch.ones(4).sum(), "broken": broken}, skipped={"absent": "not here"}),
        repeats=3,
    )
    rows = bench.run([case])
    assert [row["variant"] for row in rows] == ["base", "broken", "absent"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["repeats"] == 3
    assert rows[1]["median_s"] is None and "RuntimeError: no compiler here" in rows[1]["note"]
    assert rows[2]["note"] == "not here"
    assert "skipped toy / broken" in bench.format_table(rows)


@pytest.mark.parametrize("command", [["bench", "--suite", "chain"], ["paper", "--quick"]], ids=["bench", "paper"])
def test_plot_without_matplotlib_says_so(command, tiny, monkeypatch, tmp_path, capsys):
    _hide_matplotlib(monkeypatch)
    plot_path = tmp_path / "out.png"
    assert main([*command, "--plot", str(plot_path)]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if "matplotlib" in line]
    assert len(message) == 1 and "pip install matplotlib" in message[0], err
    assert not plot_path.exists()


def test_json_has_no_nan_or_inf(tmp_path):
    rows = [{"median_s": float("inf"), "error": float("nan"), "ratio": 1.0}]
    from fastrank.bench.cli import _write_json

    path = tmp_path / "rows.json"
    _write_json(rows, str(path))
    assert json.loads(path.read_text()) == [{"median_s": None, "error": None, "ratio": 1.0}]


def test_pytest_cases_pairs_ids_and_one_setup_per_case():
    built = []

    def make(name, variants):
        def setup():
            built.append(name)
            return Prepared({v: (lambda v=v: v) for v in variants})

        return Case("rank", name, "1 x 1", "float32", variants[0], variants, setup)

    cases = [make("a b", ("base", "fast one")), make("c", ("base",))]
    params, ids, prepared = bench.pytest_cases(cases)
    assert [(case.name, variant) for case, variant in params] == [("a b", "base"), ("a b", "fast one"), ("c", "base")]
    assert ids == ["a_b-base", "a_b-fast_one", "c-base"]
    for case, variant in params:  # consecutive variants of a case reuse its setup
        assert prepared(case.name).variants[variant]() == variant
    assert built == ["a b", "c"]


def test_pytest_settings_reads_device_and_quick_from_the_environment(monkeypatch):
    monkeypatch.delenv("FASTRANK_BENCH_DEVICE", raising=False)
    monkeypatch.delenv("FASTRANK_BENCH_QUICK", raising=False)
    assert bench.pytest_settings() == ("cpu", False)
    monkeypatch.setenv("FASTRANK_BENCH_DEVICE", "cuda")
    monkeypatch.setenv("FASTRANK_BENCH_QUICK", "1")
    assert bench.pytest_settings() == ("cuda", True)
    monkeypatch.setenv("FASTRANK_BENCH_DEVICE", "gpu")
    with pytest.raises(ValueError, match="FASTRANK_BENCH_DEVICE must be 'cpu' or 'cuda', got 'gpu'"):
        bench.pytest_settings()
    monkeypatch.setenv("FASTRANK_BENCH_DEVICE", "cpu")
    monkeypatch.setenv("FASTRANK_BENCH_QUICK", "yes")
    with pytest.raises(ValueError, match="FASTRANK_BENCH_QUICK must be '0' or '1', got 'yes'"):
        bench.pytest_settings()


def test_synchronized_leaves_cpu_calls_alone_and_returns_the_result():
    def call():
        return 7

    assert bench.synchronized(call, "cpu") is call
    if torch.cuda.is_available():
        assert bench.synchronized(call, "cuda")() == 7


def test_cuda_rank_cases_run_end_to_end_at_toy_sizes():
    # The model-scale cases run only on a GPU; here the same code at toy sizes on the CPU.
    from fastrank.bench.rank import cuda_rank_cases

    cases = cuda_rank_cases(device="cpu", toy=True)
    assert [case.name for case in cases] == ["weights 1024", "model weights 4096", "embeddings 1M", "7B weights randomized"]
    for case in cases:
        prepared = case.setup()
        assert tuple(prepared.variants) == case.variants, case.name
        reference = prepared.reference() if prepared.reference is not None else None
        for variant, call in prepared.variants.items():
            row = case.error(variant, call(), reference)
            if reference is not None and (variant.startswith("fastrank exact") or variant.startswith("fastrank batched")):
                assert row["error"] < 1e-10, (case.name, variant, row)
            if variant == "fastrank randomized":
                assert 0 <= row["bound_width"] < 1, (case.name, row)
                assert row.get("bounds_contain_reference", True), (case.name, row)
            if variant.startswith("eigvalsh") or variant.startswith("X^T X"):
                assert row == {}, (case.name, variant, row)


class _FakeEvent:
    """A CUDA event on a fake clock: elapsed_time is the fake milliseconds between two records."""

    clock_ms = 0.0

    def __init__(self, enable_timing=True):
        self.at = None

    def record(self):
        self.at = _FakeEvent.clock_ms

    def elapsed_time(self, other):
        return other.at - self.at


@pytest.mark.parametrize("call_ms,do_bench_calls", [(2500.0, 0), (250.0, 0), (2.0, 1)],
                         ids=["second-long-call", "long-call", "short-call"])
def test_cuda_times_leaves_long_calls_to_events_alone(monkeypatch, call_ms, do_bench_calls):
    from fastrank.bench import runner

    calls, bench_calls = [], []

    def fn():
        calls.append(1)
        _FakeEvent.clock_ms += call_ms

    def fake_do_bench(fn, warmup, rep, return_mode):
        bench_calls.append(rep)
        return [call_ms] * 4

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(runner, "_do_bench", lambda: fake_do_bench)
    times = runner.cuda_times(fn, repeats=3)
    assert len(bench_calls) == do_bench_calls
    if do_bench_calls:
        assert bench_calls == [call_ms * 3] and len(calls) == 1  # the estimate, then do_bench's own calls
    elif call_ms >= runner.ONE_SHOT_MS:
        assert len(calls) == 1 and times == [call_ms / 1e3], "a call of a second or more is timed once"
    else:
        assert len(calls) == 3, "a long call is timed `repeats` times, the estimate among them"
        assert times == [call_ms / 1e3] * 3


def test_narrow_train_step_case_runs_end_to_end_at_toy_size():
    # A CUDA case of the chain-kernel suite; here the same code on the CPU (the torch twins).
    pytest.importorskip("triton")
    from fastrank.bench.chain import NARROW_STEP_VARIANTS, _narrow_step_case

    case = _narrow_step_case(16, 9, 3, repeats=1, device="cpu")
    assert "one fused backward launch" in case.note, case.note
    prepared = case.setup()
    assert tuple(prepared.variants) == NARROW_STEP_VARIANTS
    reference = prepared.reference()
    for variant, call in prepared.variants.items():
        row = case.error(variant, call(), reference)
        if variant != NARROW_STEP_VARIANTS[-1]:  # the floor has no error
            assert row["error"] < 0.05, (variant, row)  # bf16 against fp64: 3 steps, K <= 16
    assert "fused" not in _narrow_step_case(256, 9, 3, repeats=1, device="cpu").note  # wider than resident


def test_sketch_kernel_cases_run_end_to_end_at_toy_size():
    # CUDA cases of the rank suite (1,000,000 x 4096 X); here the same code at 64 rows on the CPU.
    from fastrank.bench.sketch import SKETCH_FLOOR, SKETCH_VARIANTS, sketch_kernel_cases

    assert sketch_kernel_cases(device="cpu") == []
    cases = sketch_kernel_cases(device="cpu", toy=True)
    assert [case.dtype for case in cases] == ["bfloat16", "float32"]
    for case in cases:
        prepared = case.setup()
        assert tuple(prepared.variants) == SKETCH_VARIANTS
        reference = prepared.reference()
        for variant, call in prepared.variants.items():
            row = case.error(variant, call(), reference)
            if variant == SKETCH_FLOOR:
                assert row == {}
            else:  # one rounding of Y in the dtype, against fp64
                assert row["error"] < (1e-2 if case.dtype == "bfloat16" else 1e-5), (case.name, variant, row)


# ---- errors before the run ----------------------------------------------------------------------


def _unwritable_path(tmp_path, kind):
    """A path no one can write, root included, and the reason the operating system gives."""
    if kind == "missing-folder":
        return tmp_path / "no-such-folder" / "out.json", "No such file or directory"
    if kind == "under-a-file":
        (tmp_path / "a-file").write_text("")
        return tmp_path / "a-file" / "out.json", "Not a directory"
    return tmp_path, "Is a directory"


def _history_csv(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("step,name,effective_rank\n0,fc.weight,3.5\n1,fc.weight,3.25\n")
    return path


def _run_must_not_start(monkeypatch):
    from fastrank import checkpoint, plot
    from fastrank.bench import paper

    def started(*args, **kwargs):
        raise AssertionError("the command ran before its output path was checked")

    monkeypatch.setattr(bench, "suite_cases", started)
    monkeypatch.setattr(paper, "reproduce", started)
    monkeypatch.setattr(checkpoint, "load_weights", started)
    monkeypatch.setattr(plot, "load_history", started)


@pytest.mark.parametrize("kind", ["missing-folder", "under-a-file", "a-directory"])
@pytest.mark.parametrize(
    "command,option",
    [(["bench", "--suite", "chain"], "--json"), (["bench", "--suite", "chain"], "--plot"),
     (["paper", "--quick"], "--json"), (["paper", "--quick"], "--plot"), (["rank", "ckpt.pt"], "--json"),
     (["plot", "history.csv"], "--output")],
    ids=["bench-json", "bench-plot", "paper-json", "paper-plot", "rank-json", "plot-output"],
)
def test_unwritable_output_is_refused_before_the_run(tmp_path, monkeypatch, capsys, command, option, kind):
    path, reason = _unwritable_path(tmp_path, kind)
    _run_must_not_start(monkeypatch)
    assert main([*command, option, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"fastrank {command[0]}: cannot write {option} {path}: {reason}\n"
    assert captured.out == ""


def test_output_check_leaves_existing_files_and_creates_none(tmp_path, capsys):
    from fastrank.bench.cli import _unwritable

    existing = tmp_path / "old.json"
    existing.write_text("kept")
    assert _unwritable(str(existing)) is None and existing.read_text() == "kept"
    assert _unwritable(str(tmp_path / "new.json")) is None and not (tmp_path / "new.json").exists()


def test_plot_writes_the_history(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "ranks.png"
    assert main(["plot", str(_history_csv(tmp_path)), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_FORMATS = (
    "expected the CSV written by RankTracker.to_csv (a header row with step and name columns), the "
    "JSON list of rows written by RankTracker.to_json, a Lightning CSVLogger metrics.csv or a Hugging "
    "Face trainer_state.json holding the rank callbacks' <prefix>/<name>/<metric> values"
)


@pytest.mark.parametrize(
    "name,content,detail",
    [("ranks.csv", b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text: invalid start byte at byte 0"),
     ("ranks.json", b"\xff\xfe\x00binary", "not UTF-8 text: invalid start byte at byte 0"),
     ("ranks.csv", b"epoch,loss\n1,0.5\n", "its header row is ['epoch', 'loss']"),
     ("ranks.csv", b"", "it is empty"),
     ("ranks.txt", b"step,name\n1,fc\n", "not JSON: Expecting value at line 1 column 1; a name not ending in .csv is read as JSON"),
     ("ranks.json", b'{"fc": 3}', "the JSON holds a dict, not a list of rows"),
     ("ranks.json", b'[{"step": 1, "effective_rank": 2.0}]', "row 0 is {'step': 1, 'effective_rank': 2.0}, without name"),
     ("ranks.json", b"[3]", "row 0 is 3, not an object")],
    ids=["binary-csv", "binary-json", "other-csv", "empty-csv", "csv-named-txt", "json-dict", "row-without-name",
         "row-not-an-object"],
)
def test_plot_of_a_file_that_is_not_a_history_names_it_and_the_format(tmp_path, capsys, name, content, detail):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["plot", str(path), "-o", str(tmp_path / "out.png")]) == 2
    assert capsys.readouterr().err == f"fastrank plot: {path} is not a RankTracker history ({detail}); {_FORMATS}\n"
    assert not (tmp_path / "out.png").exists()


def test_plot_history_keeps_text_cells(tmp_path):
    from fastrank.plot import load_history

    path = tmp_path / "ranks.csv"
    path.write_text("step,name,effective_rank,method\n2,fc.weight,3.5,slq\n3,fc.weight,,exact\n")
    assert load_history(path) == [
        {"step": 2.0, "name": "fc.weight", "effective_rank": 3.5, "method": "slq"},
        {"step": 3.0, "name": "fc.weight", "effective_rank": "", "method": "exact"},
    ]


def test_rank_with_slq(tmp_path, capsys):
    # Every metric of `fastrank rank --method slq` is the library's slq answer for that metric,
    # and the exact value lies within that answer's bounds.
    gen = torch.Generator().manual_seed(7)
    weights = {"a.weight": torch.randn(40, 30, generator=gen, dtype=torch.float64),
               "b.weight": torch.randn(40, 30, generator=gen, dtype=torch.float64),
               "c.weight": torch.randn(9, 9, generator=gen, dtype=torch.float64)}
    path, out = tmp_path / "state.pt", tmp_path / "rows.json"
    torch.save(weights, path)
    assert main(["rank", str(path), "--method", "slq", "--json", str(out), "--device", "cpu"]) == 0
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert sorted(rows) == sorted(weights)
    for name, matrix in weights.items():
        for metric in ("effective_rank", "spectral_entropy", "stable_rank"):
            answer = getattr(fastrank, metric)(matrix, method="slq", return_bounds=True)
            exact = float(getattr(fastrank, metric)(matrix, method="exact"))
            assert rows[name][metric] == pytest.approx(float(answer.estimate), rel=1e-10), (name, metric)
            assert float(answer.lower) <= exact <= float(answer.upper), (name, metric, answer, exact)
