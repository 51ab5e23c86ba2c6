"""What every kernel launcher of ``fastrank.kernels`` shares: the interpreter switch, host-side size
arithmetic, the autotune size buckets, launches through a remembered autotune choice and the device
guard."""

from __future__ import annotations

import contextlib
import os
import weakref

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


class _Choices:
    """One autotuned kernel's remembered choices: where its key arguments sit, and per key the
    meta-parameters of the config its autotuner chose."""

    def __init__(self, kernel):
        self.positions = [(name, kernel.arg_names.index(name)) for name in kernel.keys]
        self.configs: dict[tuple, dict] = {}


_CHOICES: "weakref.WeakKeyDictionary[object, _Choices]" = weakref.WeakKeyDictionary()


def launch_tuned(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for an ``@triton.autotune`` kernel whose tensor arguments'
    dtypes all follow from the first argument's (or, for a tuple, its first entry's): the chain
    kernels, whose other tensors have that dtype or a fixed one.

    The first launch of each autotune key goes through the autotuner (which tunes, or finds its
    choice cached); later launches call the JIT function with the config it chose, skipping the
    autotuner's per-call work, which with a warm cache took 30 us of the chain kernel's launch
    (39 arguments) and 54 us of the factor gradients' (64), about half of Triton's host time per
    launch (Triton 3.6 and 3.9, 2-core Xeon, CUDA driver stubbed). The key is the autotuner's own:
    the values of its key arguments, and the dtype (which it adds for every tensor argument).
    """
    choices = _CHOICES.get(kernel)
    if choices is None:
        choices = _CHOICES[kernel] = _Choices(kernel)
    count = len(args)
    key = tuple(args[index] if index < count else kwargs[name] for name, index in choices.positions)
    first = args[0][0] if isinstance(args[0], tuple) else args[0]
    key += (first.dtype,)
    config = choices.configs.get(key)
    if config is None:
        kernel[grid](*args, **kwargs)
        choices.configs[key] = kernel.best_config.all_kwargs()
    else:
        kernel.fn[grid](*args, **kwargs, **config)
