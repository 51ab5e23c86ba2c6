"""fastrank: linear over-parameterization at single-layer cost, and effective rank at scale."""

from ._version import __version__
from .chain import chain_costs, chain_linear, chain_matmul, collapsed_weight
