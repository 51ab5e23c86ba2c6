"""What every kernel launcher of ``fastrank.kernels`` shares: the interpreter switch, host-side size
arithmetic, the autotune size buckets and the device guard."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the flag when a kernel is decorated, i.e. when a kernel module is imported; each
    module records the value it was built with as ``BUILT_FOR_INTERPRETER``.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side size arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions whose Python call costs about 3 us (Triton 3.6 and 3.9, 2-core Xeon), and a grouped
# launch computed some twenty of them.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def size_bucket(n: int) -> int:
    """Autotune key for a size: the next power of two (at least 16)."""
    return max(16, next_power_of_2(n))


def device_guard(tensor: torch.Tensor):
    """Make ``tensor``'s CUDA device current for a launch (Triton launches on the current device);
    a no-op for CPU tensors (the interpreter)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
