"""Routes the chain and sketch ops to their Triton kernels on CUDA.

The kernel modules (``fastrank.kernels.chain`` / ``.sketch``) import their op modules (the torch
twins they fall back to and the argument checks they share), so the op modules cannot import
them; this module, imported by the package after the ops, connects the two. Without a CUDA device
or without Triton nothing is registered and the torch bodies serve every device.
"""

import torch

from . import chain, sketch


def register() -> bool:
    """Register the Triton kernels when CUDA and Triton are available; whether it did."""
    if not torch.cuda.is_available():
        return False
    try:
        from .kernels import chain as chain_kernels
        from .kernels import sketch as sketch_kernels
    except ImportError:  # Triton missing (or broken): the torch bodies stay in place
        return False
    chain.register_cuda_kernels(chain_kernels)
    sketch.register_cuda_kernel(sketch_kernels)
    return True


register()
