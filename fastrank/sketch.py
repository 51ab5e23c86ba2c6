"""Gaussian sketch op: Y = A @ Omega, and Y = A @ (A^T @ Omega) for Grams, batched.

One op, ``torch.ops.fastrank.gaussian_sketch``, dispatched by device through ``torch.library``:
the pure-torch twin below is the CPU body (and the body on any device without a kernel), the
Triton kernel in ``fastrank.kernels.sketch`` is the CUDA body, and a fake kernel gives shapes
to torch.compile. Omega is standard normal and depends only on (seed, device type):
- CUDA: entry (i, j) of Omega is Philox ``tl.randn(seed, i * k + j)``, drawn inside the kernel,
  never materialized;
- elsewhere: Omega = ``torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))``
  (fp32, drawn on the CPU), materialized by the twin.
Same seed and same device type give the same Omega, hence the same result. The op is a
measurement tool and has no autograd formula.
"""

import torch
from torch import Tensor

__all__ = ["gaussian_sketch", "gaussian_sketch_ref", "sketch_omega_ref"]


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


def sketch_omega_ref(rows, k, seed, device=None, dtype=torch.float32):
    """The (rows, k) Omega of the torch twin: fp32 normals from a CPU generator seeded by ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(rows, k, generator=generator, dtype=torch.float32)
    return omega.to(device=device, dtype=dtype)


def gaussian_sketch_ref(A, k, seed, gram=False):
    """Pure-torch twin of the op (its specification and CPU body).

    A: (..., m, n). gram=False: Y = A @ Omega, Omega (n, k). gram=True: Y = A @ (A^T @ Omega),
    Omega (m, k), i.e. a sketch of the Gram A A^T without forming it. Returns (..., m, k) in
    fp32 (fp64 for fp64 input); products are accumulated in that dtype.
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


def _register_cuda_kernel() -> None:
    """Route the op to the Triton kernel on CUDA; without Triton the torch body serves CUDA too."""
    try:
        from fastrank.kernels import sketch as sketch_kernels
    except ImportError:
        return

    @_gaussian_sketch_op.register_kernel("cuda")
    def _(A, k, seed, gram):
        return sketch_kernels.gaussian_sketch(A, k, seed, gram)


if torch.cuda.is_available():
    _register_cuda_kernel()


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
