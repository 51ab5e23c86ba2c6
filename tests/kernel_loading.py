"""Load a Triton kernel module for the tests: interpreted on the CPU without a GPU, native with one.

Triton decides interpreter or compiler when a kernel is decorated, i.e. when the kernel module is
imported, reading TRITON_INTERPRET at that moment (triton/runtime/jit.py: ``knobs.runtime.interpret``
in ``jit``). conftest.py sets the flag when there is no GPU; nothing but the interpreter can run a
kernel then, so the flag cannot hurt any other test module.
"""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def load_kernels(name: str):
    """``fastrank.kernels.<name>``, built for the interpreter exactly when INTERPRET is set.

    Skips the calling test module when Triton is not installed. A module imported earlier under
    the other setting is re-executed in place (``importlib.reload``), so launchers other modules
    imported from it see the rebuilt kernels too.
    """
    pytest.importorskip("triton")
    module = importlib.import_module(f"fastrank.kernels.{name}")
    if module.BUILT_FOR_INTERPRETER != INTERPRET:
        module = importlib.reload(module)
    return module
