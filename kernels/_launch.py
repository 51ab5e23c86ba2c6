"""What every kernel launcher of ``fastrank.kernels`` shares: the interpreter switch, the autotune
size buckets and the device guard."""

from __future__ import annotations

import contextlib
import os

import torch
import triton


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the flag when a kernel is decorated, i.e. when a kernel module is imported; each
    module records the value it was built with as ``BUILT_FOR_INTERPRETER``.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def size_bucket(n: int) -> int:
    """Autotune key for a size: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(int(n)))


def device_guard(tensor: torch.Tensor):
    """Make ``tensor``'s CUDA device current for a launch (Triton launches on the current device);
    a no-op for CPU tensors (the interpreter)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
