"""Over-parameterized layers: drop-in ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (and transformers'
``Conv1D``) written as a chain of factors.

``OverparamLinear`` and ``OverparamConv2d`` hold the factors ``W_1 .. W_L`` as parameters and train
with their factorized gradient dynamics (arXiv 2103.10427), at about the cost of the plain layer:
each call runs whichever association of the chain is cheaper for its shapes. ``overparameterize``
swaps the layers of a model for over-parameterized ones; ``collapse`` swaps them back for plain
layers that compute the same function.

Modules, imported one way: ``base`` (argument checks, the eval cache, the shared layer base) <-
``linear`` / ``convolution`` (the layers) <- ``hf`` (transformers' ``Conv1D``) <- ``preserve`` (factoring an existing weight) <-
``convert`` (``overparameterize``, ``collapse`` and the report).
"""

from .base import _OverparamBase  # noqa: F401  (the layers' shared base, for isinstance checks)
from .base import _CollapseCache  # noqa: F401  (named by layers pickled before the package split)
from .convert import OverparamReport, collapse, overparameterize
from .convolution import OverparamConv1d, OverparamConv2d
from .hf import OverparamConv1D
from .linear import RESIDUAL_INTERVAL, OverparamLinear

# Pickles (torch.save of a whole model) name a class by its module: keep the public one, so that
# moving a class between the package's modules never breaks a saved model.
for _public in (OverparamLinear, OverparamConv1d, OverparamConv2d, OverparamConv1D, OverparamReport):
    _public.__module__ = __name__
del _public

__all__ = [
    "OverparamLinear",
    "OverparamConv1d",
    "OverparamConv2d",
    "OverparamConv1D",
    "OverparamReport",
    "overparameterize",
    "collapse",
    "RESIDUAL_INTERVAL",
]
