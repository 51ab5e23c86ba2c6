import importlib
import importlib.metadata
import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter. The flag must be set
# before triton is first imported, which happens when a kernel module is imported by a test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_installed_kernels_package() -> None:
    """Import PyPI's ``kernels`` (a dependency of transformers >= 5.25) before the checkout can
    shadow it: ``python -m pytest`` puts the checkout on ``sys.path``, where the ``kernels/``
    folder (installed as ``fastrank.kernels``) would be found under that name, and transformers'
    ``from kernels import ...`` would fail on it."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # transformers then treats it as missing
    finally:
        sys.path[:] = saved


_import_installed_kernels_package()
