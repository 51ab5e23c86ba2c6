"""Optional dependencies (``extras_require`` entries of setup.py), imported on first use with an
error that names the extra to install."""

from __future__ import annotations

import sys
from types import ModuleType


class MissingExtra(RuntimeError):
    """An optional dependency (an ``extras_require`` entry of setup.py) is not installed."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming ``pip install fastrank[extra]``."""
    try:
        __import__(module)  # the import statement's hook, so that tests can hide a package
    except ImportError:
        raise MissingExtra(
            f"{needed_for} needs {module.split('.')[0]}, which is not installed: "
            f"pip install \"fastrank[{extra}]\" (or pip install {module.split('.')[0]})"
        ) from None
    return sys.modules[module]


def pyplot(needed_for: str = "plotting") -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    matplotlib = require("matplotlib", "plot", needed_for)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plot", needed_for)
