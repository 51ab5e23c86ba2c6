#!/usr/bin/env bash
# One command for a GPU machine: every test (CUDA cases run natively there), the CUDA benchmark
# suites (chain kernel, chain layers, rank, sketch), a kernel profile of one layer's train step,
# the train-step grid against its goals and RankTracker's cost in a training loop, from a plain
# checkout with nothing installed.
#
#   bash benchmarks/gpu/run.sh [OUTDIR] [--dry-run]
#
# Writes into OUTDIR (default: $OUT, else benchmarks/gpu/out):
#   run.log                  everything printed, starting with what the machine has
#   tests.xml                JUnit XML of the test run
#   bench-chain-kernel.json  pytest-benchmark --benchmark-json of each suite
#   bench-chain.json
#   bench-rank.json
#   bench-sketch.json
#   profile.json             kernel launches and device time per kernel of one OverparamLinear train
#                            step (benchmarks/gpu/profile_step.py)
#   train-grid.json          train steps of fastrank, the sequential chain, collapsed autograd and
#                            nn.Linear at d 64/256/1024, B 1/64/1024/8192, L 2/4/8, bf16 / fp32, eager
#                            and replayed from CUDA graphs: wall and device time, kernel launches, the
#                            three goals met or missed per shape, the shapes its budget left out
#                            (benchmarks/gpu/train_grid.py)
#   tracker-cost.json        RankTracker's overhead (weights and one embedding every 100 steps,
#                            background=True) on a 336 M-parameter bf16 transformer trained with
#                            AdamW, with the device's eigensolver and with the host's (host_threads),
#                            against the goal <= 2% (benchmarks/gpu/tracker_cost.py)
#   host-cost.json, .md      host time per call of each public launcher through Triton's JIT and
#                            through its launch plan, and of the torch matmuls it replaces, with the
#                            real driver (benchmarks/host_cost.py --device cuda)
#   summary.json             device, versions, date, and per step: passed / failed / skipped / errors,
#                            exit status, whether it ran into its time limit; the grid's goal counts
#                            and the tracker's overhead per eigensolver (rewritten after every step,
#                            "complete" once the last has run, so a run stopped from outside keeps it)
#
# Needs python3 with torch, triton, pytest and pytest-benchmark; fastrank runs from this checkout
# (a temporary package folder links fastrank/ and kernels/ as fastrank.kernels; PYTHONSAFEPATH
# keeps the checkout's own fastrank/, which lacks kernels, off sys.path). Each step has a time
# limit, together under 8 minutes; at its limit a step is interrupted (SIGINT: pytest still writes
# its reports; SIGKILL 5 s later, 12 s for the tests) and the next one starts.
#
# --dry-run: the same steps on the CPU (CUDA hidden), tests collected only, benchmark suites run
# with every CUDA case skipped, the grid and the tracker loop at toy sizes (their JSON flagged
# dry_run); exits 0 when everything collected, nothing failed and both JSON files were written.
# CI runs it.
set -uo pipefail
cd "$(dirname "$0")/../.."

dry_run=0
outdir="${OUT:-benchmarks/gpu/out}"
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) echo "run.sh: unknown option $arg (expected [OUTDIR] [--dry-run])" >&2; exit 2 ;;
        *) outdir="$arg" ;;
    esac
done
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
# the summary reads only this run's files
rm -f "$outdir/summary.json" "$outdir/train-grid.json" "$outdir/tracker-cost.json" "$outdir/host-cost.json" \
    "$outdir/profile.json"
python="${PYTHON:-python3}"

# Seconds per step. The GPU machine's lease gives a command at most 10 minutes; these add up to
# 470 s, plus up to 5 s per step between SIGINT and SIGKILL (12 s for the tests, whose 12 workers
# took 9 s to stop on an H200) and about 20 s of setup: at most 542 s.
# On an H100 the CUDA test files took about 130 s on 12 workers, the chain suites 20-30 s each,
# the rank suite's quick cases 25 s and its model-scale CUDA cases most of 150 s. The tests now
# stop at 115 s (the kernel files, last, are cut: CI runs them under the interpreter) and the rank
# suite at 35 s, about its first model-scale case (the 1024 weights, with the host solver that
# the tracker's default waits on; a per-matrix SVD loop of 3.6 s a call, timed once), so that the
# train-step grid (115 s), the tracker loop (65 s: rounds of an untracked and a tracked 100-step
# loop per eigensolver, as many as fit: two at the 43 ms step of an H200) and the launchers' host
# cost (30 s: 27 s for four calls' 40 rounds on an H200, now five calls) fit. The grid, the tracker and the host cost size themselves to their limits
# (--budget-s, 12 s under the limit for starting Python and CUDA); the grid and the tracker write
# their JSON as they go. FASTRANK_GPU_LIMITS="TESTS CHAIN_KERNEL CHAIN RANK SKETCH [PROFILE
# TRAIN_GRID TRACKER_COST HOST_COST]" overrides them for a shorter lease (missing trailing ones keep their
# defaults), FASTRANK_GPU_STEPS (e.g. "tests bench-rank") runs only the steps it names and
# FASTRANK_GPU_TESTS only the test files it names.
read -r -a limits <<< "${FASTRANK_GPU_LIMITS:-}"
default_limits=(115 40 25 35 20 25 115 65 30)
for index in "${!default_limits[@]}"; do
    limits[index]="${limits[index]:-${default_limits[index]}}"
done
read -r tests_limit chain_kernel_limit chain_limit rank_limit sketch_limit profile_limit train_grid_limit \
    tracker_cost_limit host_cost_limit <<< "${limits[*]}"
all_steps="tests bench-chain-kernel bench-chain bench-rank bench-sketch profile train-grid tracker-cost host-cost"
steps="${FASTRANK_GPU_STEPS:-$all_steps}"
for name in $steps; do
    if [[ " $all_steps " != *" $name "* ]]; then
        echo "run.sh: FASTRANK_GPU_STEPS names an unknown step $name (expected one of: $all_steps)" >&2
        exit 2
    fi
done
selected() { [[ " $steps " == *" $1 "* ]]; }

log="$outdir/run.log"
: > "$log"
exec > >(tee -a "$log") 2>&1

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# ---------------------------------------------------------------------------------------- fastrank
# fastrank/ is the package and kernels/ its subpackage fastrank.kernels (setup.py package_dir):
# link both into one folder and put that first on the path.
mkdir -p "$scratch/site/fastrank"
for entry in fastrank/*; do
    [ "$(basename "$entry")" = "__pycache__" ] && continue
    ln -s "$PWD/$entry" "$scratch/site/fastrank/"
done
ln -s "$PWD/kernels" "$scratch/site/fastrank/kernels"
export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # python -m / -c would put the current folder (with its fastrank/) first
if [ "$dry_run" -eq 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
fi

echo "== run.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) dry_run=$dry_run out=$outdir"
echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
else
    echo "nvidia-smi: not found"
fi
echo "cpus: $(nproc 2>/dev/null || echo unknown)"
# The machine, for the log and for summary.json (whose writer, run after every step, imports no torch).
if ! "$python" - "$scratch/site" "$scratch/machine.json" <<'EOF'
import json, os, platform, sys
import torch
print("python", sys.version.replace("\n", " "), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
cuda = torch.cuda.is_available()
if cuda:
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
versions = {}
for name in ("triton", "pytest", "pytest_benchmark"):
    try:
        module = __import__(name)
        versions[name] = getattr(module, "__version__", "?")
        print(name, versions[name])
    except ImportError as error:
        versions[name] = None
        print(name, "MISSING", error)
import fastrank, fastrank.kernels
with open(sys.argv[2], "w") as f:
    json.dump({
        "device_name": torch.cuda.get_device_name() if cuda else f"CPU: {platform.processor() or platform.machine()}",
        "device_capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": versions["triton"], "fastrank": fastrank.__version__,
    }, f)
site = os.path.abspath(sys.argv[1])
for module in (fastrank, fastrank.kernels):
    path = os.path.abspath(os.path.dirname(module.__file__))
    print(module.__name__, fastrank.__version__, "from", os.path.realpath(path))
    if not path.startswith(site):
        sys.exit(f"{module.__name__} was imported from {path}, not from this checkout's {site}: "
                 "an installed fastrank shadows it")
EOF
then
    echo "run.sh: the environment check failed (see above)" >&2
    exit 1
fi

# summary.json from the steps' status files and the JSON they wrote: `summarize partial` after each
# step (quiet), `summarize final` at the end (printed, and in a dry run checked).
cat > "$scratch/summary.py" <<'EOF'
import datetime, json, os, re, sys
import xml.etree.ElementTree as ET

scratch, outdir, dry_run, final = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "final"
steps = {}
for name in ("tests", "bench-chain-kernel", "bench-chain", "bench-rank", "bench-sketch", "profile", "train-grid",
             "tracker-cost", "host-cost"):
    status_path = os.path.join(scratch, f"{name}.status")
    if not os.path.exists(status_path):
        steps[name] = {"ran": False}
        continue
    status, timed_out, seconds = open(status_path).read().split()
    output = open(os.path.join(scratch, f"{name}.out")).read()
    collected = re.findall(r"(\d+)(?:/\d+)? tests? collected", output)
    counts = {"collected": int(collected[-1]) if collected else None,  # --collect-only runs
              "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    xml_path = os.path.join(scratch, f"{name}.xml")
    junit = os.path.exists(xml_path)
    if junit:
        try:
            suites = list(ET.parse(xml_path).getroot().iter("testsuite"))
        except ET.ParseError:  # cut off by the SIGKILL after the limit's SIGINT
            suites, junit = [], "truncated"
        for suite in suites:
            for key in ("tests", "failures", "errors", "skipped"):
                counts["failed" if key == "failures" else key] += int(suite.get(key, 0))
        counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    steps[name] = {"ran": True, "exit_status": int(status), "time_limit_reached": timed_out == "true",
                   "seconds": int(seconds), "junit": junit, **counts}
# What the grid and the tracker loop found (their JSON files, as far as they got).
def read_json(name):
    try:
        with open(os.path.join(outdir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

results = {}
grid = read_json("train-grid.json")
if grid is not None:
    results["train-grid"] = {"dry_run": grid.get("dry_run"), "shapes_run": len(grid.get("goals", [])),
                             "shapes_not_run": len(grid.get("not_run", [])), "rows": len(grid.get("rows", [])),
                             "goal_counts": grid.get("goal_counts"), "autotuned": grid.get("autotuned", {})}
tracker = read_json("tracker-cost.json")
if tracker is not None:
    results["tracker-cost"] = {key: tracker.get(key) for key in (
        "dry_run", "parameters", "host_threads", "steps", "rounds", "step_ms_untracked", "solvers", "goal",
        "complete")}
host = read_json("host-cost.json")
if host is not None:
    results["host-cost"] = {f"{row['path']}: {row['call']}": row["us"] for row in host}
with open(os.path.join(scratch, "machine.json")) as f:
    machine = json.load(f)
summary = {
    "dry_run": dry_run,
    "complete": final,  # False: written after a step, the run going on (or stopped from outside)
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    **machine,
    "steps": steps,
    "results": results,
}
with open(os.path.join(outdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
if not final:
    sys.exit(0)
print("\n== summary")
for name, step in steps.items():
    if not step["ran"]:
        print(f"{name:20s} did not run")
        continue
    collected = f"collected {step['collected']}  " if step["collected"] is not None else ""
    print(f"{name:20s} exit {step['exit_status']}  {step['seconds']:4d} s  {collected}"
          f"passed {step['passed']}  failed {step['failed']}  errors {step['errors']}  skipped {step['skipped']}"
          + ("  TIME LIMIT" if step["time_limit_reached"] else ""))
if "train-grid" in results:
    print(f"train-grid: {results['train-grid']['shapes_run']} shapes run, {results['train-grid']['shapes_not_run']} not; "
          f"goals {results['train-grid']['goal_counts']}")
    for kernel, tuned in results["train-grid"]["autotuned"].items():
        print(f"train-grid: {kernel} tuned {tuned['keys']} keys in {tuned['seconds']:.1f} s; chosen "
              + ", ".join(f"{count}x {config}" for config, count in sorted(tuned["chosen"].items(), key=lambda c: -c[1])))
for solver, cost in ((results.get("tracker-cost") or {}).get("solvers") or {}).items():
    if cost["overhead"] is not None:
        print(f"tracker-cost: {solver} solver: overhead {cost['overhead']:.2%} (goal <= 2%)"
              + ("  (dry run: toy sizes on the CPU)" if dry_run else ""))
for name, us in results.get("host-cost", {}).items():
    print(f"host-cost: {us:7.1f} us  {name}")
if dry_run:
    # The dry run checks the plumbing: tests collected, and no benchmark case ran on the CPU.
    selected = os.environ.get("FASTRANK_GPU_STEPS", " ".join(steps)).split()
    problems = [f"{name}: not run" for name, step in steps.items() if not step["ran"] and name in selected]
    if "tests" in selected and not steps["tests"].get("collected"):
        problems.append("tests: nothing collected")
    for name in ("bench-chain-kernel", "bench-chain", "bench-rank", "bench-sketch"):
        step = steps[name]
        if step.get("ran") and (step["skipped"] == 0 or step["skipped"] != step["tests"]):
            problems.append(f"{name}: {step['tests'] - step['skipped']} of {step['tests']} cases not skipped "
                            "without CUDA (every one should be)")
    # The grid and the tracker loop ran their plumbing and wrote their rows.
    for name, result in (("train-grid", grid), ("tracker-cost", tracker)):
        if name not in selected:
            continue
        if result is None:
            problems.append(f"{name}: wrote no {name}.json")
        elif result.get("dry_run") is not True or not result.get("complete"):
            problems.append(f"{name}: {name}.json is not a complete dry run")
        elif not result.get("rows" if name == "train-grid" else "loops"):
            problems.append(f"{name}: {name}.json holds no measurements")
    if problems:
        sys.exit("dry run: " + "; ".join(problems))
EOF
summarize() {
    "$python" "$scratch/summary.py" "$scratch" "$outdir" "$dry_run" "$1"
}

# ---------------------------------------------------------------------------------------- steps
# step NAME LIMIT_S PYTEST_ARGS...: pytest with a JUnit report in $scratch/NAME.xml; records the
# exit status and whether the limit cut it short in $scratch/NAME.status.
step() {
    local name="$1" limit="$2" grace=5
    [ "$name" = tests ] && grace=12
    shift 2
    echo
    echo "== $name (limit ${limit} s): pytest $*"
    local start=$SECONDS
    timeout -s INT -k "$grace" "$limit" "$python" -m pytest -p no:cacheprovider --junitxml="$scratch/$name.xml" "$@" \
        2>&1 | tee "$scratch/$name.out"
    local status=${PIPESTATUS[0]}
    local timed_out=false
    if [ $((SECONDS - start)) -ge "$limit" ]; then
        timed_out=true
    fi
    echo "$status $timed_out $((SECONDS - start))" > "$scratch/$name.status"
    echo "== $name: exit $status, $((SECONDS - start)) s, time limit reached: $timed_out"
    summarize partial
}

# The test files with CUDA cases only (CI runs the rest on the CPU), the quick ones first and the
# kernel files last, so that a run cut short by its limit has done the layers' and the ops'
# routing: on an H200 (2026-12-04) the whole suite's first 441 tests took the 140 s, test_chain_kernel
# cases 17-27 s each on 12 workers (their kernels' first compiles). The ahead-of-time compile gate
# (about 800 compiles, CPU work) runs in CI, not on the GPU's time. FASTRANK_GPU_TESTS (test files
# or node ids, space-separated) narrows the selection for a short lease.
if [ -n "${FASTRANK_GPU_TESTS:-}" ]; then
    read -r -a test_selection <<< "$FASTRANK_GPU_TESTS"
else
    test_selection=(tests/test_cuda_routing.py tests/test_compile.py tests/test_func_transforms.py tests/test_rank_cuda.py
                    tests/test_training_stacks.py::test_fused_adamw_on_cuda_trains_and_evaluates_half_layers
                    tests/test_integrations.py::test_lightning_fit_logs_what_a_hand_run_tracker_measures
                    tests/test_tracking.py::test_a_model_compiled_with_cuda_graphs_measures_every_replay
                    tests/test_launch_fast_path.py::test_replays_compute_what_the_jit_path_computes
                    tests/test_chain.py tests/test_sketch_kernel.py tests/test_chain_kernel.py)
fi
if ! selected tests; then
    echo "== tests: not selected (FASTRANK_GPU_STEPS)"
elif [ "$dry_run" -eq 1 ]; then
    step tests "$tests_limit" -q --collect-only "${test_selection[@]}" > /dev/null  # 800 lines: summary only
    tail -n 1 "$scratch/tests.out"
else
    # pytest-xdist, where the machine has it, spreads the tests (and the kernels' first compiles)
    # over 12 workers (the GPU machine has 16 cores).
    workers=()
    if "$python" -c "import xdist" 2>/dev/null; then
        workers=(-n 12)
    fi
    step tests "$tests_limit" -q -rs --durations=15 "${workers[@]}" "${test_selection[@]}"
fi
cp "$scratch/tests.xml" "$outdir/tests.xml" 2>/dev/null

export FASTRANK_BENCH_DEVICE=cuda FASTRANK_BENCH_QUICK=1
for suite in chain-kernel:"$chain_kernel_limit":test_chain_kernel_bench.py \
             chain:"$chain_limit":test_chain_bench.py \
             rank:"$rank_limit":test_rank_bench.py \
             sketch:"$sketch_limit":test_sketch_kernel_bench.py; do
    IFS=: read -r name limit file <<< "$suite"
    selected "bench-$name" || continue
    step "bench-$name" "$limit" "benchmarks/$file" -q -rs --benchmark-only \
        --benchmark-json="$outdir/bench-$name.json"
done

# script NAME LIMIT_S ARGS...: a Python script (not a pytest step) under its time limit, recording
# its exit status as step() does.
script() {
    local name="$1" limit="$2"
    shift 2
    echo
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout -s INT -k 5 "$limit" "$python" "$@" 2>&1 | tee "$scratch/$name.out"
    local status=${PIPESTATUS[0]}
    local timed_out=false
    [ $((SECONDS - start)) -ge "$limit" ] && timed_out=true
    echo "$status $timed_out $((SECONDS - start))" > "$scratch/$name.status"
    echo "== $name: exit $status, $((SECONDS - start)) s"
    summarize partial
}

# Kernel launches and device time per kernel of one OverparamLinear train step.
if selected profile; then
    script profile "$profile_limit" benchmarks/gpu/profile_step.py --json "$outdir/profile.json" \
        --budget-s $((profile_limit - 12))
fi

# The train-step grid and the tracker's cost (--dry-run: their CPU plumbing at toy sizes). Each
# stops starting work 12 s before its limit (Python and CUDA start-up) and lists what it left out.
dry_option=()
[ "$dry_run" -eq 1 ] && dry_option=(--dry-run)
if selected train-grid; then
    script train-grid "$train_grid_limit" benchmarks/gpu/train_grid.py --json "$outdir/train-grid.json" \
        --budget-s $((train_grid_limit - 12)) "${dry_option[@]}"
fi
if selected tracker-cost; then
    script tracker-cost "$tracker_cost_limit" benchmarks/gpu/tracker_cost.py --json "$outdir/tracker-cost.json" \
        --budget-s $((tracker_cost_limit - 12)) "${dry_option[@]}"
fi

# Host time of each public launcher, JIT path against launch plan, with the real driver (--dry-run:
# the stubbed driver, CPU tensors, a few rounds).
if selected host-cost; then
    if [ "$dry_run" -eq 1 ]; then
        script host-cost "$host_cost_limit" benchmarks/host_cost.py --json "$outdir/host-cost.json" --rounds 2 --calls 5
    else
        script host-cost "$host_cost_limit" benchmarks/host_cost.py --device cuda --json "$outdir/host-cost.json" \
            --budget-s $((host_cost_limit - 12))
    fi
fi

# ---------------------------------------------------------------------------------------- summary
summarize final
summary_status=$?

# Exit status: 0 when every step ran to its end without failures (and, in a dry run, the summary's
# checks held: tests collected, every benchmark case skipped without CUDA, the grid's and the
# tracker's JSON written).
overall=$summary_status
for name in $steps; do
    read -r status timed_out _ < "$scratch/$name.status" || status=1
    if [ "$status" -ne 0 ]; then
        overall=1
    fi
done
echo "run.sh: done in $SECONDS s, exit $overall; results in $outdir"
exit "$overall"
