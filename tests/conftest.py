import os

import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter. The flag must be set
# before triton is first imported, which happens when a kernel module is imported by a test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
