"""The compile gate, python -m fastrank.kernels.report: the package's kernels pass it, and it fails
kernels that spill, need too much shared memory, do not compile or compile too slowly.

The report runs in a subprocess: this test process has TRITON_INTERPRET=1 when there is no GPU
(conftest.py), and Triton builds kernels for the interpreter when they are decorated.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastrank.kernels import report

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "kernel_report_cases.py"


def _unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return report.aot_unavailable_reason(90)


needs_aot = pytest.mark.skipif(_unavailable() is not None, reason=f"no ahead-of-time compile: {_unavailable()}")


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------ the package's kernels
@needs_aot
def test_every_selectable_config_compiles_without_spills_for_sm90(tmp_path):
    out = tmp_path / "report.json"
    # Rows are cached under ~/.cache/fastrank/kernel-report: only kernels edited since the last run
    # are compiled again. A cold run compiles 1002 configs (about 5 minutes on 2 cores, Triton 3.9).
    result = _run([sys.executable, "-m", "fastrank.kernels.report", "--arch", "90", "--json", str(out),
                   "--failures-only"], timeout=1800)
    if result.returncode == 0:
        return
    assert out.exists(), f"report exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    failing = [row for row in json.loads(out.read_text())["rows"] if row["failures"]]
    raise AssertionError(
        f"{len(failing)} selectable configs fail the sm_90 gate (prune them in the kernel's autotune "
        "configs or fix the kernel):\n"
        + "\n".join(f"{r['kernel']} {r['dtype']} {r['variant']} {r['config']}: {r['failures']}" for r in failing)
    )


# ------------------------------------------------------------------------------ the gate itself
def _config(row: dict) -> str:
    return row["config"].split(" num_warps")[0]


def _label(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


@needs_aot
def test_gate_fails_on_spills_shared_memory_and_compile_errors(tmp_path):
    from kernel_report_cases import OVERSIZED, PASSING, PRUNED, SPILLING, UNCOMPILABLE

    out = tmp_path / "gate.json"
    result = _run([sys.executable, str(CASES), "gate", "--arch", "90", "--kernel", "tile_product", "--no-cache",
                   "--json", str(out)], timeout=600)
    assert result.returncode == 1, f"expected exit 1, got {result.returncode}:\n{result.stdout}\n{result.stderr}"
    rows = {_config(row): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {_label(c) for c in (PASSING, SPILLING, OVERSIZED, UNCOMPILABLE)}, (
        f"expected every config but the pruned one ({_label(PRUNED)}), got {sorted(rows)}"
    )

    passing = rows[_label(PASSING)]
    assert passing["status"] == "pass", passing
    assert passing["spill_stores"] == 0 and 0 < passing["regs"] <= 255 and passing["shared"] > 0, passing
    # 32 rows are too few for a 4-warp wgmma (64 rows per warp group): Triton picks mma.sync
    assert passing["wgmma"] + passing["mma"] > 0, f"an fp16 dot should run on tensor cores: {passing}"

    spilling = rows[_label(SPILLING)]
    assert spilling["status"] == "FAIL" and spilling["spill_stores"] > 0, spilling
    assert [f.split(" ")[0] for f in spilling["failures"]] == ["spills"], spilling["failures"]

    oversized = rows[_label(OVERSIZED)]
    assert oversized["status"] == "FAIL" and oversized["shared"] > report.SHARED_MEMORY_LIMIT[90], oversized
    assert oversized["failures"] == [
        f"shared memory {oversized['shared']} B > {report.SHARED_MEMORY_LIMIT[90]} B (sm_90)"
    ], oversized["failures"]

    uncompilable = rows[_label(UNCOMPILABLE)]
    assert uncompilable["status"] == "FAIL", uncompilable
    assert uncompilable["failures"][0].startswith("does not compile"), uncompilable["failures"]

    for row in rows.values():  # the printed table names every failure
        line = next(line for line in result.stdout.splitlines() if _config(row) in line)
        assert line.rstrip().endswith(")") == (row["status"] == "FAIL") and row["status"] in line, line


@needs_aot
def test_gate_fails_a_compile_over_the_time_limit(tmp_path):
    out = tmp_path / "slow.json"
    result = _run([sys.executable, str(CASES), "gate", "--arch", "90", "--kernel", "tile_product_slow", "--no-cache",
                   "--timeout", "0.05", "--json", str(out)], timeout=300)
    assert result.returncode == 1, f"expected exit 1, got {result.returncode}:\n{result.stdout}\n{result.stderr}"
    (row,) = json.loads(out.read_text())["rows"]
    assert row["failures"] == ["compile exceeded 0.05 s"], row


@needs_aot
def test_table_disagreeing_with_the_kernel_names_kernel_and_argument():
    result = _run([sys.executable, str(CASES), "mismatch", "--arch", "90", "--no-cache"], timeout=300)
    assert result.returncode == 2, f"expected exit 2, got {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "kernel tile_product" in result.stderr and "'c_ptr'" in result.stderr, result.stderr


@needs_aot
def test_table_matches_every_package_kernel():
    """Every KERNELS entry agrees with its kernel (checked without compiling anything)."""
    script = (
        "from fastrank.kernels import report\n"
        "tasks = report.build_tasks(report.KERNELS, [90])\n"
        "print(sorted({t.kernel for t in tasks}), len(tasks))\n"
    )
    result = _run([sys.executable, "-c", script], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(str(sorted(report.KERNELS))), result.stdout


# ------------------------------------------------------------------------------ reading compiler output
def test_parse_ptxas_log_reads_registers_spills_and_stack():
    log = (
        "ptxas info    : Compiling entry function '_chain_matmul_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for _chain_matmul_kernel\n"
        "    15960 bytes stack frame, 37000 bytes spill stores, 38152 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 1 barriers, 15960 bytes cumulative stack size\n"
    )
    assert report.parse_ptxas_log(log) == {"regs": 32, "spill_stores": 37000, "spill_loads": 38152, "stack": 15960}
    with pytest.raises(RuntimeError, match="no register count"):
        report.parse_ptxas_log("ptxas fatal   : Ptx assembly aborted due to errors")


def test_count_instructions_separates_vector_and_scalar_loads():
    ptx = "\n".join([
        "@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "ld.global.nc.v2.f32 {%f1, %f2}, [%rd2];",
        "@%p2 ld.global.b32 { %r5 }, [ %rd3 + 0 ];",
        "ld.global.L1::evict_last.b16 %rs1, [%rd4];",
        "cp.async.cg.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 0x10, %r10;",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {...};",
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {...};",
        "st.global.v4.b32 [ %rd6 + 0 ], { %r1, %r2, %r3, %r4 };",
    ])
    assert report.count_instructions(ptx) == {
        "wgmma": 1, "mma": 1, "ld_v8": 0, "ld_v4": 1, "ld_v2": 1, "ld_scalar": 2, "cp_async": 1,
    }


def test_judge_passes_only_clean_rows():
    clean = {"regs": 128, "spill_stores": 0, "spill_loads": 0, "shared": 232448}
    assert report.judge(clean, 90) == []
    assert report.judge({**clean, "shared": 232449}, 90) == ["shared memory 232449 B > 232448 B (sm_90)"]
    assert report.judge({**clean, "shared": 200000}, 80) == ["shared memory 200000 B > 166912 B (sm_80)"]
    assert report.judge({**clean, "spill_loads": 4}, 90) == ["spills 0 B stored / 4 B loaded"]
    assert report.judge({"error": "PTXASError: x"}, 90) == ["does not compile: PTXASError: x"]
    assert report.judge({"timeout_s": 30.0, "error": None}, 90) == ["compile exceeded 30 s"]


def test_format_groups_counts_failures_per_kernel_dtype_and_variant():
    def row(variant, regs, spills, shared, failures, **instructions):
        return {"kernel": "k", "arch": 90, "dtype": "fp16", "variant": variant, "regs": regs,
                "spill_stores": spills, "shared": shared, "failures": failures, **instructions}

    rows = [
        row("BLOCK_N=64 RETURN_ALL=1", 128, 0, 1024, [], wgmma=4, mma=0, ld_v4=2, cp_async=1),
        row("BLOCK_N=64 RETURN_ALL=0", 255, 96, 2048, ["spills 96 B stored / 96 B loaded"], wgmma=0, mma=3,
            ld_scalar=5),
        {"kernel": "k", "arch": 90, "dtype": "fp16", "variant": "BLOCK_N=64 RETURN_ALL=0",
         "failures": ["compile exceeded 30 s"]},
    ]
    header, line = report.format_groups(rows, ignore=["RETURN_ALL"]).splitlines()
    assert header.split()[:6] == ["kernel", "sm", "dtype", "variant", "configs", "fail"]
    assert line.split() == ["k", "90", "fp16", "BLOCK_N=64", "3", "2", "1", "0", "1", "128-255", "96", "2048",
                            "1", "1", "0", "1", "1"]
