"""Chain-product kernel under pytest-benchmark (CUDA only; skipped without a GPU).

    pytest benchmarks/test_chain_kernel_bench.py --benchmark-only --benchmark-json=chain_kernel.json

For every case (width d, batch B, chain length L, dtype) four variants compute the same
``[X_1, ..., X_L]`` with ``X_j = X_{j-1} @ W_j^T`` (W_j: d x d):

* ``torch.matmul x L``: L separate torch.matmul calls (cuBLAS), the baseline;
* ``chain_matmul``: fastrank's one-launch chain kernel, every intermediate returned;
* ``chain_matmul last``: the same kernel returning only X_L;
* ``torch.compile chain``: torch.compile of the sequential loop.

Each row's ``extra_info`` carries the median time, TFLOP/s (2 B d^2 L flops), the ratio against the
baseline measured in the same run, which path chain_matmul took (on-chip kernel, or one
torch.matmul per step above MAX_ONCHIP_WIDTH), the device name, versions, dtype, shape and date.
"""

import datetime
import functools

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="chain kernel benchmarks need CUDA")
triton = pytest.importorskip("triton")

WIDTHS = [256, 1024, 4096]
BATCHES = [512, 8192, 65536]
LENGTHS = [2, 4, 8]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ["torch.matmul x L", "chain_matmul", "chain_matmul last", "torch.compile chain"]
BASELINE = VARIANTS[0]

# One parameter per (case, variant), the baseline first, so that every ratio below compares with a
# baseline measured earlier in the same run.
CASES = [
    (dtype_name, d, batch, length, variant)
    for dtype_name in DTYPES
    for d in WIDTHS
    for batch in BATCHES
    for length in LENGTHS
    for variant in VARIANTS
]
_MEDIANS: dict[tuple, float] = {}


def _case_id(case):
    dtype_name, d, batch, length, variant = case
    return f"{dtype_name}-d{d}-B{batch}-L{length}-{variant.replace(' ', '_')}"


@functools.lru_cache(maxsize=1)
def _inputs(dtype_name, d, batch, length):
    """x (B, d) and L factors (d, d), scaled so that every X_j stays of order one."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, d, device="cuda", generator=gen).to(dtype)
    factors = [(torch.randn(d, d, device="cuda", generator=gen) / d**0.5).to(dtype) for _ in range(length)]
    return x, factors


def _sequential(x, factors):
    outputs, block = [], x
    for factor in factors:
        block = torch.matmul(block, factor.T)
        outputs.append(block)
    return outputs


def _variant_fn(variant, x, factors):
    from fastrank.kernels.chain import chain_matmul

    if variant == "torch.matmul x L":
        return lambda: _sequential(x, factors)
    if variant == "chain_matmul":
        return lambda: chain_matmul(x, factors, return_all=True)
    if variant == "chain_matmul last":
        return lambda: chain_matmul(x, factors, return_all=False)
    if variant == "torch.compile chain":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit across the grid
        compiled = torch.compile(_sequential, dynamic=False)
        return lambda: compiled(x, factors)
    raise ValueError(variant)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chain_kernel(benchmark, case):
    from fastrank.kernels import chain as chain_kernels

    dtype_name, d, batch, length, variant = case
    x, factors = _inputs(dtype_name, d, batch, length)
    fn = _variant_fn(variant, x, factors)

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"{dtype_name} d={d} B={batch} L={length}"
    benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)

    stats = benchmark.stats.stats
    flops = 2.0 * batch * d * d * length
    key = (dtype_name, d, batch, length)
    if variant == BASELINE:
        _MEDIANS[key] = stats.median
    baseline = _MEDIANS.get(key)
    benchmark.extra_info.update(
        variant=variant,
        dtype=dtype_name,
        d=d,
        batch=batch,
        length=length,
        median_s=stats.median,
        q1_s=stats.q1,
        q3_s=stats.q3,
        tflops=flops / stats.median / 1e12,
        speedup_vs_matmul=(baseline / stats.median) if baseline else None,
        chain_path=(
            None
            if not variant.startswith("chain_matmul")
            else "on-chip kernel"
            if d <= chain_kernels.MAX_ONCHIP_WIDTH
            else "torch.matmul per step"
        ),
        tf32=torch.backends.cuda.matmul.allow_tf32,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
