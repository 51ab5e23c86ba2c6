"""What the installed torch says about its CUDA backend, read one way for the whole package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["cuda_matmul_allows_tf32", "cuda_matmul_tf32"]


def cuda_matmul_allows_tf32() -> bool:
    """Whether torch's own fp32 CUDA matmul may use TF32, so the kernels do exactly when it does.

    torch >= 2.9 keeps the setting in ``torch.backends.cuda.matmul.fp32_precision`` ("ieee",
    "tf32", or "none" = inherit ``torch.backends.fp32_precision``), and that attribute also
    reflects the legacy setters (``allow_tf32 = True``, ``torch.set_float32_matmul_precision``).
    Reading the legacy ``allow_tf32`` there raises once the new API has been used ("mix of the
    legacy and new APIs"), so it is read only on a torch without the new attribute.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


@contextlib.contextmanager
def cuda_matmul_tf32(enabled: bool) -> Iterator[None]:
    """torch's fp32 CUDA matmul precision set to TF32 (``enabled``) or IEEE for the block, then
    restored; through ``fp32_precision`` where torch has it (see :func:`cuda_matmul_allows_tf32`)."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if enabled else "ieee") if name == "fp32_precision" else enabled)
    try:
        yield
    finally:
        setattr(matmul, name, before)
