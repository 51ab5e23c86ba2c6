"""Chain-product kernel under pytest-benchmark (CUDA only; skipped without a GPU).

    pytest benchmarks/test_chain_kernel_bench.py --benchmark-only --benchmark-json=chain_kernel.json

(FASTRANK_BENCH_QUICK=1: the sizes of `fastrank bench --quick`.)
The cases are fastrank.bench.chain.chain_kernel_cases(), the ones `fastrank bench --device cuda`
runs beside the chain suite: for every width d, batch B, chain length L and dtype, the Triton chain
kernel (every intermediate, or only the last) against one torch.matmul per factor (the baseline)
and torch.compile of that loop; then a collapsed train step's d x d work in bf16, each against one
torch.matmul per factor: the weight chain W_L through L - 1 transposed factors with every partial product
(d = 256 L = 4, d = 256 L = 8, d = 1024 L = 4), the grouped factor gradients (d = 256 and 1024,
M = d, L = 4), each also replayed from a CUDA graph (device time without launch costs); and the narrow activation chain's train step (x W_1^T ... W_L^T and every gradient;
d = 64 B = 64 L = 4, d = 64 B = 1024 L = 4, d = 32 B = 256 L = 8, d = 256 B = 1024 L = 4) with its
intermediates kept or recomputed (the fused backward), against autograd through one torch.matmul
per factor. `fastrank bench` adds the ratio to the baseline measured in the same
run, TFLOP/s and the error against fp64; extra_info also holds the autotunings the case's first
calls made (fastrank.kernels._launch.autotunings).
"""

import pytest
import torch

from fastrank.bench import pytest_cases, pytest_run, pytest_settings

_, QUICK = pytest_settings()  # FASTRANK_BENCH_QUICK=1: the --quick cases
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="chain kernel benchmarks need CUDA")

if torch.cuda.is_available():
    from fastrank.bench.chain import chain_kernel_cases

    PARAMS, IDS, _prepared = pytest_cases(chain_kernel_cases(quick=QUICK))
else:
    PARAMS, IDS, _prepared = pytest_cases([])


@pytest.mark.parametrize("case,variant", PARAMS, ids=IDS)
def test_chain_kernel(benchmark, case, variant):
    from fastrank.kernels._launch import autotunings

    benchmark.extra_info.update(note=case.note, device_name=torch.cuda.get_device_name(), torch=torch.__version__)
    tuned = len(autotunings())
    pytest_run(benchmark, case, variant, _prepared(case.name).variants[variant], "cuda")
    # What the autotuners timed at this case's first calls (keys no earlier case tuned): which
    # config the figure is of, and by how much it won.
    benchmark.extra_info["autotunings"] = autotunings()[tuned:]
