"""What the installed torch says about its CUDA backend, read one way for the whole package."""

from __future__ import annotations

import torch

__all__ = ["cuda_matmul_allows_tf32"]


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
