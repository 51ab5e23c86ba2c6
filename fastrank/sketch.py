"""Gaussian sketch op: Y = A @ Omega, and Y = A @ (A^T @ Omega) for Grams, batched.

One op, ``torch.ops.fastrank.gaussian_sketch``, dispatched by device through ``torch.library``:
the pure-torch twin below is the CPU body (and the body on any device without a kernel), the
Triton kernel in ``fastrank.kernels.sketch`` is the CUDA body, and a fake kernel gives shapes
to torch.compile. Omega is standard normal and depends only on (seed, device type):
- CUDA: Omega is :func:`philox_omega`: entry (i, j) is one of the four normals (two Box-Muller
  pairs) of the Philox-4x32-10 call with counter (i, j // 4, 0, 0) and key (seed, 0); the kernel
  draws it once per call into a small (k, n) buffer that its GEMM reads;
- elsewhere: Omega = ``torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))``
  (fp32, drawn on the CPU), materialized by the twin.
Same seed and same device type give the same Omega, hence the same result. The op is a
measurement tool and has no autograd formula.
"""

import torch
from torch import Tensor

__all__ = ["gaussian_sketch", "gaussian_sketch_ref", "philox_omega", "sketch_omega_ref"]


def _accumulation_dtype(dtype):
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64: the output and accumulation dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(A, k, seed):
    if A.dim() < 2 or A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"gaussian_sketch: A must have shape (..., m, n) with m, n >= 1, got {tuple(A.shape)}")
    if not A.is_floating_point():
        raise TypeError(f"gaussian_sketch: A must be floating point, got {A.dtype}")
    if k < 1:
        raise ValueError(f"gaussian_sketch: sketch size k must be >= 1, got {k}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"gaussian_sketch: seed must be in [0, 2**31), got {seed}")


# Philox-4x32-10 constants (Salmon et al. 2011, as in Triton's tl.philox).
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of the 64-bit product of the constant ``a`` and uint32 values ``b``
    (held in int64), without an int64 overflow: ``b`` is split into 16-bit halves."""
    high_part = b >> 16
    low_part = b & 0xFFFF
    upper = a * high_part  # < 2**48
    lower = a * low_part  # < 2**48
    hi = (upper + (lower >> 16)) >> 16
    lo = (((upper & 0xFFFF) << 16) + lower) & _MASK32
    return hi, lo


def _open_uniform(words: Tensor) -> Tensor:
    """uint32 Philox words (held in int64) -> odd multiples of 2**-24 in (0, 1), exact in fp32."""
    return ((words >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def philox_omega(rows, k, seed, device=None, dtype=torch.float32):
    """The (rows, k) Omega the CUDA kernel draws, materialized in torch (its specification).

    Entry (i, j), with q = j // 4 and t = j % 4: Philox-4x32-10 of counter (i, q, 0, 0) and key
    (seed, 0) gives words r0..r3, each turned into u = (2 * (r >> 9) + 1) * 2**-24 in (0, 1)
    (exact in fp32); two fp32 Box-Muller pairs make the group's four entries:
    t = 0, 1: sqrt(-2 log u0) (cos, sin)(2 pi u1); t = 2, 3: sqrt(-2 log u2) (cos, sin)(2 pi u3),
    each sin(2 pi u) evaluated as cos(2 pi (u - 1/4)) (u - 1/4 is exact), as the kernel does.
    Entry (i, j) depends on (seed, i, j) only, not on ``rows`` or ``k``.
    """
    groups = -(-k // 4)
    c0 = torch.arange(rows, device=device, dtype=torch.int64)[:, None].expand(rows, groups)
    c1 = torch.arange(groups, device=device, dtype=torch.int64)[None, :].expand(rows, groups)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = int(seed) & _MASK32, int(seed) >> 32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    u1, u3 = _open_uniform(c1), _open_uniform(c3)
    radius01 = torch.sqrt(-2.0 * torch.log(_open_uniform(c0)))
    radius23 = torch.sqrt(-2.0 * torch.log(_open_uniform(c2)))
    two_pi = 6.283185307179586
    quads = torch.stack(
        [radius01 * torch.cos(two_pi * u1), radius01 * torch.cos(two_pi * (u1 - 0.25)),
         radius23 * torch.cos(two_pi * u3), radius23 * torch.cos(two_pi * (u3 - 0.25))],
        dim=-1,
    )  # (rows, groups, 4)
    return quads.reshape(rows, 4 * groups)[:, :k].to(dtype)


def sketch_omega_ref(rows, k, seed, device=None, dtype=torch.float32):
    """The (rows, k) Omega of the op on ``device``: :func:`philox_omega` on CUDA (what the kernel
    draws), elsewhere fp32 normals from a CPU generator seeded by ``seed``."""
    if torch.device(device if device is not None else "cpu").type == "cuda":
        return philox_omega(rows, k, seed, device=device, dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(rows, k, generator=generator, dtype=torch.float32)
    return omega.to(device=device, dtype=dtype)


def gaussian_sketch_ref(A, k, seed, gram=False):
    """Pure-torch twin of the op (its specification and CPU body).

    A: (..., m, n). gram=False: Y = A @ Omega, Omega (n, k). gram=True: Y = A @ (A^T @ Omega),
    Omega (m, k), i.e. a sketch of the Gram A A^T without forming it. Returns (..., m, k) in
    fp32 (fp64 for fp64 input); products are accumulated in that dtype.

    The CUDA kernel computes the same products on the tensor cores in A's dtype: for fp16 / bf16
    input it rounds Omega once to that dtype (and, in the Gram form, Z = A^T Omega to bf16, or
    to TF32's 10-bit mantissa for fp16), and fp32 uses TF32 exactly where torch's fp32 matmul
    does; it differs from this twin by those roundings (the tests' per-dtype tolerances).
    """
    _check_inputs(A, k, seed)
    acc_dtype = _accumulation_dtype(A.dtype)
    A = A.to(acc_dtype)
    rows = A.shape[-2] if gram else A.shape[-1]
    omega = sketch_omega_ref(rows, k, seed, device=A.device, dtype=acc_dtype)
    if gram:
        return A @ (A.mT @ omega)
    return A @ omega


@torch.library.custom_op("fastrank::gaussian_sketch", mutates_args=())
def _gaussian_sketch_op(A: Tensor, k: int, seed: int, gram: bool) -> Tensor:
    return gaussian_sketch_ref(A, k, seed, gram).contiguous()


@_gaussian_sketch_op.register_fake
def _(A, k, seed, gram):
    return A.new_empty((*A.shape[:-1], k), dtype=_accumulation_dtype(A.dtype))


def register_cuda_kernel(sketch_kernels) -> None:
    """Route the op to the Triton kernel of ``sketch_kernels`` (``fastrank.kernels.sketch``) on CUDA.

    Called by ``fastrank._cuda_kernels`` when Triton imports (the kernel module imports this one);
    without it the torch body serves CUDA too.
    """

    @_gaussian_sketch_op.register_kernel("cuda")
    def _(A, k, seed, gram):
        return sketch_kernels.gaussian_sketch(A, k, seed, gram)



def gaussian_sketch(A, k, seed=0, gram=False):
    """Batched Gaussian sketch through ``torch.ops.fastrank.gaussian_sketch``.

    Args:
        A: (..., m, n) floating tensor, any strides; leading dims are a batch and share one Omega.
        k: number of sketch columns.
        seed: int in [0, 2**31); same seed and device type give the same Omega and result.
        gram: False: Y = A @ Omega with Omega (n, k). True: Y = A @ (A^T @ Omega) with Omega
            (m, k), a sketch of the Gram A A^T (m x m) that is never formed.
    Returns:
        (..., m, k), fp32 for fp16/bf16/fp32 input, fp64 for fp64 input.
    """
    _check_inputs(A, k, seed)
    return torch.ops.fastrank.gaussian_sketch(A, int(k), int(seed), bool(gram))
