"""Gaussian-sketch kernel under pytest-benchmark (CUDA only; skipped without a GPU).

    pytest benchmarks/test_sketch_kernel_bench.py --benchmark-only --benchmark-json=sketch_kernel.json

(FASTRANK_BENCH_QUICK=1: X of 65,536 x 4096 instead of 1,000,000 x 4096.)
The cases are fastrank.bench.sketch.sketch_kernel_cases(): Y = X @ Omega with k = 256 for X in bf16
and fp32 (TF32 on for both fastrank and torch), the fastrank sketch against torch.matmul with the
same Omega materialized (the baseline) and one read of X (X.sum(), the floor). extra_info gets
``x_gb_per_s`` (bytes of X read once over the median time), ``ratio`` / ``ratio_to_floor`` and, for
the two sketches, the error of the first 4,096 rows of Y against fp64. About 30 s on an H100, most
of it building X and the first call's autotuning.
"""

import pytest
import torch

from fastrank.bench import pytest_cases, pytest_run, pytest_settings

_, QUICK = pytest_settings()  # FASTRANK_BENCH_QUICK=1: the --quick cases
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="sketch kernel benchmarks need CUDA")

if torch.cuda.is_available():
    from fastrank.bench.sketch import sketch_kernel_cases

    PARAMS, IDS, _prepared = pytest_cases(sketch_kernel_cases(quick=QUICK, device="cuda"))
else:
    PARAMS, IDS, _prepared = pytest_cases([])


@pytest.mark.parametrize("case,variant", PARAMS, ids=IDS)
def test_sketch_kernel(benchmark, case, variant):
    benchmark.extra_info.update(note=case.note, device_name=torch.cuda.get_device_name(), torch=torch.__version__)
    prepared = _prepared(case.name)
    result = pytest_run(benchmark, case, variant, prepared.variants[variant], "cuda")
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.extra_info.get("median_s", benchmark.stats.stats.median)
    benchmark.extra_info["x_gb_per_s"] = case.x_bytes / median / 1e9
    if case.error is not None and prepared.reference is not None:
        info = case.error(variant, result, prepared.reference())
        benchmark.extra_info.update(info)
        if "error" in info:
            # tests/tolerance.py's bound for one product over 4096 terms with fp32 accumulation and
            # operands of unit roundoff u: 2 (u + 2**-24 sqrt(4096)); u = 2**-8 (bf16), 2**-11 (TF32)
            unit = 2.0**-8 if case.dtype == "bfloat16" else 2.0**-11
            bound = 2 * (unit + 2.0**-24 * 4096**0.5)
            assert info["error"] <= bound, f"{case.name} {variant}: relative error {info['error']:.2e} > {bound:.2e}"
