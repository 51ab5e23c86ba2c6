"""Load a Triton kernel module for the tests: interpreted on the CPU without a GPU, native with one.

Triton decides interpreter or compiler when a kernel is decorated, i.e. when the kernel module is
imported, reading TRITON_INTERPRET at that moment (triton/runtime/jit.py: ``knobs.runtime.interpret``
in ``jit``). conftest.py sets the flag when there is no GPU; nothing but the interpreter can run a
kernel then, so the flag cannot hurt any other test module.
"""

import functools
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
    problem = interpreter_problem()
    if problem is not None:
        pytest.skip(problem, allow_module_level=True)
    module = importlib.import_module(f"fastrank.kernels.{name}")
    if module.BUILT_FOR_INTERPRETER != INTERPRET:
        module = importlib.reload(module)
    return module


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run a kernel on this machine, or None (also when not
    interpreting). Probed by running a kernel whose loop bound is an argument: Triton 3.6's
    interpreter turns that bound into an int from a one-element numpy array (its
    ``tensor.__index__``), which numpy 2.4 made an error, so every such kernel fails there."""
    if not INTERPRET:
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = 0
        for _ in range(n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception as error:  # the interpreter wraps what failed in its own error
        if "0-dimensional arrays can be converted" not in str(error):
            raise
        return (f"Triton {triton.__version__}'s interpreter cannot run a kernel loop with numpy "
                f"{numpy.__version__} ({error}); interpreted kernel tests need numpy < 2.4 with this "
                "Triton, or Triton 3.9, whose interpreter squeezes the array first")
    return None
