"""Triton kernels of fastrank, installed as ``fastrank.kernels``.

Each module holds the ``@triton.jit`` kernels of one op family, a thin launcher per kernel and a
pure-torch twin beside it. Importing a module needs Triton (callers import them lazily) but not
a GPU.
"""
