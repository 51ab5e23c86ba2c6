"""Hugging Face's ``Conv1D`` (GPT-2, GPT, ...): a linear layer ``y = x W + b`` that stores its weight
as ``(in, out)``. Recognized by class name and home, so that fastrank never imports transformers
unless a model holds one (collapse then builds the model's own ``Conv1D`` class)."""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn
from torch import Tensor

from .linear import OverparamLinear

__all__ = ["OverparamConv1D", "is_hf_conv1d"]

_HOME = "transformers.pytorch_utils"


def is_hf_conv1d(module: object, exact: bool = True) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (``exact``: that class itself, not a subclass)."""
    for cls in type(module).__mro__ if not exact else (type(module),):
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
            return isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2
    return False


class OverparamConv1D(OverparamLinear):
    r"""A drop-in for transformers' ``Conv1D(nf, nx)`` whose weight is a chain of ``depth`` factors.

    Computes ``y = x W + b`` with ``W = (W_L ... W_1)^T`` of shape ``(nx, nf)``, stored as an
    :class:`OverparamLinear` ``nx -> nf`` (same factors, init, cost model, eval cache and
    gradients); only ``weight`` follows ``Conv1D``'s layout.

    Args:
        nf: output features (``Conv1D``'s first argument).
        nx: input features.
        depth, width, device, dtype: as :class:`OverparamLinear` (hidden size ``int(nf * width)``).
            ``Conv1D`` always has a bias, and so does this layer.

    Attributes:
        weight: the collapsed ``(nx, nf)`` weight, as ``Conv1D`` stores it (differentiable).
        nf, nx: as ``Conv1D``.

    Shape: input ``(..., nx)``, output ``(..., nf)``.

    :func:`fastrank.collapse` turns it back into the model's ``Conv1D`` class.
    """

    def __init__(
        self,
        nf: int,
        nx: int,
        depth: int = 2,
        width: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(nx, nf, depth=depth, width=width, bias=True, device=device, dtype=dtype)
        self.nf, self.nx = self.out_features, self.in_features

    @property
    def weight(self) -> Tensor:
        """The collapsed weight ``(nx, nf)``: ``Conv1D``'s layout, the transpose of ``collapsed_parameters()[0]``."""
        return self._collapsed()[0].T

    def to_plain(self, weight: Tensor, bias: Tensor | None) -> nn.Module:
        """A transformers ``Conv1D`` holding the ``(nf, nx)`` collapsed ``weight`` (transposed into
        its layout) and ``bias``."""
        conv1d = importlib.import_module(_HOME).Conv1D(self.nf, self.nx)
        conv1d.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv1d.weight.copy_(weight.T)
            conv1d.bias.copy_(bias)
        return conv1d
