"""fastrank: linear over-parameterization at single-layer cost, and effective rank at scale."""

from ._version import __version__
from .chain import chain_costs, chain_linear, chain_matmul, collapsed_weight
from .checkpoint import load_overparameterized
from .classes import class_metrics
from .conv import collapse_kernels
from .layers import (
    OverparamConv1D,
    OverparamConv1d,
    OverparamConv2d,
    OverparamLinear,
    OverparamReport,
    collapse,
    overparameterize,
)
from .rank import (
    RankEstimate,
    effective_rank,
    effective_ranks,
    nystrom_entropy,
    spectral_entropy,
    stable_rank,
)
from .tracking import RankTracker
from . import _cuda_kernels  # noqa: E402,F401  (after the ops: registers their CUDA kernels)
from . import sharded  # noqa: F401  (DTensor weights: reached through the rank functions and RankTracker)

__all__ = [
    "__version__",
    "OverparamLinear",
    "OverparamConv1d",
    "OverparamConv2d",
    "OverparamConv1D",
    "overparameterize",
    "OverparamReport",
    "collapse",
    "load_overparameterized",
    "chain_matmul",
    "chain_linear",
    "chain_costs",
    "collapsed_weight",
    "collapse_kernels",
    "spectral_entropy",
    "effective_rank",
    "stable_rank",
    "effective_ranks",
    "nystrom_entropy",
    "RankEstimate",
    "RankTracker",
    "class_metrics",
]
